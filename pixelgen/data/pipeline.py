"""Input pipelines: tfds array_record data sources, read and batched with grain.

`open_source` finds a split of any dataset: the project's embedded ones (`shapes`,
`fashion_mnist`) are built into the data dir on first use; any tfds catalog name that a user
has prepared (with `file_format='array_record'`) goes through the same path. No TensorFlow.
The data dir may be a URL (gs://...): array_record reads local files only
(google/array_record#120), so every machine copies the dataset's files to its local cache
on first use (`storage.local_copy`, one log line) and reads them there.

Training batches come from a grain `MapDataset`: seeded shuffle (a fresh permutation every
epoch), repeat, this host's rows of each global batch, decode/resize, batch, task map,
threaded prefetch. The iterator's state is saved in every checkpoint, so a resumed run sees
the same batches.

Streamed image–text shards ('webdataset:<pattern>', 'parquet:<pattern>') plug in at the same
three places, `open_split` / `open_source`, `train_iterator` and `eval_batches`: see
pixelgen/data/streaming.py. `add_stream_config` adds their config keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from pixelgen import storage
from pixelgen.data import builders, streaming
from pixelgen.data.decode import DataError, Filters, to_rgb_square
from pixelgen.parallel import host_range

Example = dict[str, np.ndarray]


def resolve_data_dir(data_dir: str) -> str:
    data_dir = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    return data_dir if storage.is_remote(data_dir) else os.path.expanduser(data_dir)


def _local_builder(dataset: str, data_dir: str, builder):
    """The builder of `dataset` in this machine's copy of the prepared dataset `builder`
    of the remote `data_dir`."""
    root, variant = data_dir.rstrip('/'), str(builder.data_dir)
    if not variant.startswith(root + '/'):
        raise DataError(f'tfds put {dataset!r} of {data_dir} at {variant}, outside that '
                        'data dir; pass the data dir that holds it.')
    local_root = storage.cache_dir('data', root)
    storage.local_copy(variant, os.path.join(local_root, variant[len(root) + 1:]),
                       what=f'dataset {dataset!r}')
    if builders.builds_locally(dataset):
        return builders.make_builder(dataset, local_root)
    return tfds.builder(dataset, data_dir=local_root)


def add_stream_config(data, captions: bool = True) -> None:
    """Adds the keys of streamed sources (`webdataset:` / `parquet:`, pixelgen.data.streaming)
    to a config's `data`; tfds datasets ignore them. `captions=False` (iGPT, dVAE) keeps
    images without a caption."""
    data.eval_dataset = ''           # streamed source to evaluate on; '' = held-out shards
    data.eval_shard_fraction = 0.05  # without eval_dataset: the last 5% of shards by name
    data.num_workers = 0             # decoding processes per host (0 = in the training one)
    data.min_caption_length = 1 if captions else 0  # characters; 0 keeps captionless images
    data.max_caption_length = 0      # characters; 0 = no limit
    data.max_aspect_ratio = 2.0      # longer / shorter side; DALL-E kept 1:2 to 2:1; 0 = any
    data.min_image_side = 0          # pixels of the shorter side before resizing
    data.require_success_status = True  # drop img2dataset records whose status is not success


def open_split(data, which: str):
    """The 'train' or 'eval' source that a config's `data` names (its dataset, splits, data
    dir and, for streamed sources, its filters, evaluation set and decoding workers)."""
    split = data.train_split if which == 'train' else data.eval_split
    if not streaming.is_streaming(data.dataset):
        return open_source(data.dataset, split, data.data_dir)
    filters = Filters(**{f: data[f] for f in (
        'min_caption_length', 'max_caption_length', 'max_aspect_ratio', 'min_image_side',
        'require_success_status')}, image_size=data.image_size)
    source = streaming.StreamingSource(
        data.dataset, 'train' if which == 'train' else 'eval', filters=filters,
        eval_dataset=data.eval_dataset, eval_shard_fraction=data.eval_shard_fraction)
    source.num_workers = data.num_workers
    return source


class Subset:
    """Rows `indices` of a random-access source."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        return self._source[int(self._indices[index])]


def without_phrases(source, phrases, caption_key: str = 'caption'):
    """The examples of `source` whose caption contains none of `phrases` (case-insensitive),
    e.g. held-out colour/shape pairs that a DALL·E run, its dVAE and its CLIP must all never
    see in training. The source itself when `phrases` is empty."""
    return _by_phrases(source, phrases, caption_key, matching=False) if phrases else source


def with_phrases(source, phrases, caption_key: str = 'caption'):
    """The examples of `source` whose caption contains one of `phrases`: the held-out pairs'
    test images, to evaluate on."""
    return _by_phrases(source, phrases, caption_key, matching=True)


def _by_phrases(source, phrases, caption_key: str, *, matching: bool):
    if isinstance(source, streaming.StreamingSource):  # filtered as the shards stream
        phrases = tuple(p.lower() for p in phrases)
        return source.with_filters(**{'require_phrases' if matching else 'exclude_phrases':
                                      phrases})
    phrases = [p.lower() for p in phrases]

    def text(value) -> str:
        return (value.decode() if isinstance(value, bytes) else str(value)).lower()
    keep = [i for i in range(len(source))
            if any(p in text(source[i][caption_key]) for p in phrases) == matching]
    if not keep:
        raise DataError(f'No example of the dataset is {"with" if matching else "without"} the '
                        f'phrases {tuple(phrases)} (data.holdout_phrases).')
    return Subset(source, np.array(keep))


def open_source(dataset: str, split: str, data_dir: str = ''):
    """A random-access source of one split: `len(src)` examples, `src[i]` a feature dict.

    A streamed source ('webdataset:<pattern>', 'parquet:<pattern>') opens with the default
    filters: split 'train' is its training shards, any other its held-out shards."""
    if streaming.is_streaming(dataset):
        return streaming.StreamingSource(dataset, split)
    data_dir = resolve_data_dir(data_dir)
    if builders.builds_locally(dataset):  # embedded, or 'image_folder:<path>'
        builder = builders.ensure_built(dataset, data_dir)  # local, even if data_dir is not
    else:
        try:
            builder = tfds.builder(dataset, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DataError(f'Unknown dataset {dataset!r}: it is neither embedded '
                            f'({", ".join(builders.EMBEDDED)}) nor a tfds catalog name.') from e
        if not builder.is_prepared():
            raise DataError(
                f'Dataset {dataset!r} is not prepared in {data_dir}. pixelgen never downloads at '
                'run time: prepare it once on a machine with the data, in array_record format, '
                f"e.g. tfds.builder({dataset!r}, data_dir={data_dir!r}, file_format='array_record')"
                '.download_and_prepare(), then pass --config.data.data_dir=<that dir>.')
    if storage.is_remote(str(builder.data_dir)):
        builder = _local_builder(dataset, data_dir, builder)
    splits = builder.info.splits
    base_split = split.split('[')[0]
    if base_split not in splits:
        raise DataError(f'Dataset {dataset!r} has no split {base_split!r}; '
                        f'it has {sorted(splits)}.')
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as e:
        raise DataError(f'Dataset {dataset!r} in {data_dir} was prepared as TFRecord, which needs '
                        "TensorFlow. Re-prepare it with file_format='array_record'.") from e


def num_classes(source, feature: str = 'label') -> int:
    """The number of classes of a source's tfds `ClassLabel` feature (e.g. 10 for cifar10)."""
    if isinstance(source, streaming.StreamingSource):
        raise DataError(f'{source.dataset!r} is a streamed image-text source without class '
                        'labels; classification needs a labelled tfds dataset.')
    features = source.dataset_info.features
    if feature not in features or not hasattr(features[feature], 'num_classes'):
        raise DataError(f'Dataset {source.dataset_info.name!r} has no class-label feature '
                        f'{feature!r} (features: {sorted(features)}); classification needs one.')
    return int(features[feature].num_classes)


def image_example(image_size: int) -> Callable[[dict], Example]:
    """Per-example map: keeps the resized RGB image and the label (-1 when unlabelled)."""
    def prepare(features: dict) -> Example:
        return {'image': to_rgb_square(features['image'], image_size),
                'label': np.int32(features.get('label', -1))}
    return prepare


def random_crop_flip(crop_padding: int = 0, flip: bool = False
                     ) -> Callable[[Example, np.random.Generator], Example]:
    """Per-example augmentation for `train_iterator(augment=)`: zero-pad the image by
    `crop_padding` pixels on every side and crop back to its size at a random offset, then
    mirror it left-right with probability 1/2 if `flip`."""
    def augment(example: Example, rng: np.random.Generator) -> Example:
        image = example['image']  # [h, w, 3]
        if crop_padding:
            h, w = image.shape[:2]
            padded = np.pad(image, ((crop_padding, crop_padding), (crop_padding, crop_padding),
                                    (0, 0)))
            top, left = rng.integers(0, 2 * crop_padding + 1, size=2)
            image = padded[top:top + h, left:left + w]
        if flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {**example, 'image': np.ascontiguousarray(image)}
    return augment


class _HostRows(grain.MapDataset):
    """This host's rows of every global batch of an example stream.

    Global batch t holds stream elements [t*B, (t+1)*B); host h of H takes its contiguous
    B/H of them. So the global batches are the same for any number of hosts: a run on one
    host and on a pod see the same data in the same order.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, host: int, hosts: int):
        super().__init__(parent)
        self._global_batch, self._local_batch = global_batch, global_batch // hosts
        self._offset = host * self._local_batch

    def __len__(self) -> int:
        return len(self._parent) // self._global_batch * self._local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._local_batch)
        return self._parent[step * self._global_batch + self._offset + row]

    def __str__(self) -> str:
        return f'HostRows(global_batch={self._global_batch}, offset={self._offset})'


def train_iterator(source, *, batch_size: int, seed: int, prepare: Callable[[dict], Example],
                   batch_map: Callable[[Example], Example] | None = None,
                   augment: Callable[[Example, np.random.Generator], Example] | None = None,
                   num_threads: int = 2, prefetch: int = 4) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this host's share of each global batch.

    `batch_size` is the global batch; each host yields `batch_size / hosts` rows of it.
    `augment(example, rng)` runs after `prepare` with a generator seeded by `seed` and the
    example's position in the global stream: the same augmentation for any number of hosts,
    a new one every epoch, and the same again after a resume.
    """
    host, hosts = jax.process_index(), jax.process_count()
    if isinstance(source, streaming.StreamingSource):
        return streaming.StreamIterator(
            source, local_batch=batch_size // hosts, seed=seed, host=host, hosts=hosts,
            prepare=prepare, batch_map=batch_map, augment=augment,
            num_workers=getattr(source, 'num_workers', 0), prefetch=prefetch)
    if len(source) < batch_size:
        raise DataError(f'The training split has {len(source)} examples, fewer than one batch '
                        f'of {batch_size}. Lower --config.batch_size.')
    stream = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).map(prepare)
    if augment is not None:
        stream = stream.random_map(augment)
    ds = _HostRows(stream, batch_size, host, hosts)
    ds = ds.batch(batch_size // hosts, drop_remainder=True)
    if batch_map is not None:
        ds = ds.map(batch_map)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_batches(source, *, batch_size: int, prepare: Callable[[dict], Example],
                 batch_map: Callable[[Example], Example] | None = None,
                 num_examples: int | None = None) -> Iterator[Example]:
    """This host's share of the first `num_examples` examples (all if None), in fixed order:
    a contiguous range of them (`parallel.host_range`).

    Every batch has exactly `batch_size` rows, so one compiled step serves them all; padding
    rows carry `mask == 0`. Every host yields the same number of batches, enough for the
    longest share (a host with a shorter one ends with padding), so a step that is a
    collective across hosts runs as often on each of them and cannot hang.
    """
    if isinstance(source, streaming.StreamingSource):
        yield from streaming.eval_batches(
            source, batch_size=batch_size, host=jax.process_index(), hosts=jax.process_count(),
            prepare=prepare, batch_map=batch_map, num_examples=num_examples)
        return
    n = len(source) if not num_examples else min(num_examples, len(source))
    start, end = host_range(n)
    if jax.process_count() > 1:
        print(f'[eval] process {jax.process_index()} of {jax.process_count()}: examples '
              f'{start}..{end} of {n} ({end - start} rows)', flush=True)
    ds = grain.MapDataset.source(source)[start:end].map(prepare)
    longest = -(-n // jax.process_count())
    for first in range(0, longest, batch_size):
        rows = [ds[i] for i in range(first, min(first + batch_size, len(ds)))]
        real = len(rows)
        if not rows:  # this host's share is over: a batch of padding only
            rows = [prepare(source[0])]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch['mask'] = (np.arange(len(rows)) < real).astype(np.float32)
        pad = batch_size - len(rows)
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        yield batch_map(batch) if batch_map is not None else batch


def sample_pixels(source, *, image_size: int, num_images: int, pixels_per_image: int,
                  seed: int) -> np.ndarray:
    """uint8 [num_images * pixels_per_image, 3]: random pixels of random resized images."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(source), size=min(num_images, len(source)), replace=False)
    pixels = []
    for i in np.sort(indices):
        image = to_rgb_square(source[int(i)]['image'], image_size).reshape(-1, 3)
        pixels.append(image[rng.choice(len(image), pixels_per_image, replace=True)])
    return np.concatenate(pixels)
