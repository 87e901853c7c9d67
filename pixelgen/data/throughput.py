"""How fast the streamed input pipeline decodes: images/s for 256² JPEG image–text pairs read
from webdataset shards in img2dataset's layout, decoded in the training process and in 1 and 2
worker processes (`python -m pixelgen.bench input_pipeline --json`).

The shards are written to a temporary folder first: `images` JPEGs of `source_size`² with
smooth random content (quality 95, as img2dataset writes them), `shard_size` per shard. Each
mode builds a fresh `StreamIterator`, takes one batch to start its workers, then times
`batches` batches of `batch` examples resized to `image_size`² (wall-clock). The workers'
read-ahead (`prefetch` batches) is a few percent of the timed images. The modes run in turn,
`rounds` times, and each reports its median rate, so that load from other processes on the
machine falls on every mode alike.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from pixelgen.data import streaming
from pixelgen.data.decode import Filters

SHAPE = dict(images=1024, source_size=256, image_size=256, shard_size=32, batch=32, batches=48,
             prefetch=2, rounds=3, workers=(0, 1, 2))


def _jpeg(rng: np.random.Generator, side: int) -> bytes:
    coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format='JPEG', quality=95)
    return out.getvalue()


def write_pairs(folder: str, images: int, side: int, shard_size: int) -> str:
    """Webdataset shards of `images` JPEG pairs; returns the dataset string."""
    rng = np.random.default_rng(0)
    shards = -(-images // shard_size)
    for shard in range(shards):
        with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w') as tar:
            for i in range(shard * shard_size, min(images, (shard + 1) * shard_size)):
                key = f'{i:09d}'
                meta = json.dumps({'key': key, 'status': 'success', 'width': side,
                                   'height': side}).encode()
                for ext, data in (('jpg', _jpeg(rng, side)), ('txt', f'picture {i}'.encode()),
                                  ('json', meta)):
                    info = tarfile.TarInfo(f'{key}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f'webdataset:{folder}/{{00000..{shards - 1:05d}}}.tar'


def _keep(example: dict) -> dict:
    return {'image': example['image'], 'caption': example['caption']}


def images_per_second(source: streaming.StreamingSource, workers: int, batch: int,
                      batches: int, prefetch: int) -> tuple[float, float]:
    """(images/s, CPU ms of the training process per image) of one mode."""
    iterator = streaming.StreamIterator(source, local_batch=batch, seed=0, host=0, hosts=1,
                                        prepare=_keep, num_workers=workers, prefetch=prefetch)
    try:
        next(iterator)  # starts the workers
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(iterator)
        images = batch * batches
        return (images / (time.perf_counter() - start),
                (time.process_time() - cpu) * 1e3 / images)
    finally:
        iterator.close()


def measure(shape: dict) -> dict:
    """{'images_per_s': {'in_process': r0, 'workers_1': r1, 'workers_2': r2},
    'speedup_2_workers': r2 / r0, 'main_process_cpu_ms_per_image' per mode (what decoding
    leaves on the training process), the shape, the cores and the 1-minute load average}."""
    with tempfile.TemporaryDirectory(prefix='pixelgen-input-bench-') as folder:
        dataset = write_pairs(folder, shape['images'], shape['source_size'],
                              shape['shard_size'])
        source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset,
                                           filters=Filters(image_size=shape['image_size']))
        runs = {f'workers_{w}' if w else 'in_process': [] for w in shape['workers']}
        for _ in range(shape['rounds']):
            for workers, name in zip(shape['workers'], runs, strict=True):
                runs[name].append(images_per_second(source, workers, shape['batch'],
                                                    shape['batches'], shape['prefetch']))
        rates = {name: round(float(np.median([r for r, _ in v])), 1) for name, v in runs.items()}
        main_cpu = {name: round(float(np.median([c for _, c in v])), 3)
                    for name, v in runs.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    result = {'case': 'input_pipeline', 'shape': dict(shape, workers=list(shape['workers'])),
              'images_per_s': rates,
              'images_per_s_runs': {k: [round(r, 1) for r, _ in v] for k, v in runs.items()},
              'main_process_cpu_ms_per_image': main_cpu,
              'cores': cores,
              'load_average_1m': round(os.getloadavg()[0], 2)}
    if 'in_process' in rates and 'workers_2' in rates:
        result['speedup_2_workers'] = round(rates['workers_2'] / rates['in_process'], 2)
    return result
