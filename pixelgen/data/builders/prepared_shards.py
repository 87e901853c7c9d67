"""`prepared:webdataset:<pattern>` / `prepared:parquet:<pattern>`: streamed shards, converted
once into an array_record tfds dataset (random access: exact shuffles, any split slice).

    python -m pixelgen.prepare --dataset 'prepared:webdataset:/data/pairs/{00000..00127}.tar' \\
        --num_workers 16 [--data_dir D]
    python -m pixelgen.train ... \\
        --config.data.dataset='prepared:webdataset:/data/pairs/{00000..00127}.tar'

The pattern is read as `webdataset:` / `parquet:` read it (pixelgen/data/streaming.py). The
`test` split holds the last EVAL_SHARD_FRACTION of the shards in name order (at least one),
as a streamed source holds them out, and `train` the rest. Each shard is one unit of work,
decoded and checked in one of `num_workers` processes and saved, so a killed build resumes
after the shards it finished (work_units.py). Examples are {'image', 'caption', 'key'}, in
shard and record order. An RGB JPEG keeps its own bytes (no second lossy encoding); any
other image is stored as the PNG of its RGB pixels. Records are skipped and counted as a
stream skips them (corrupt, no image, undecodable, img2dataset status other than success);
the caption, size and aspect-ratio filters of streamed sources are training settings and
are not applied here.

A build's identity is the pattern's shards with their sizes and modification times, so
changed shards are a new dataset, built afresh, never the old build reused.
"""

from __future__ import annotations

import collections
import hashlib
import io
import re
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from pixelgen.data import streaming
from pixelgen.data.builders import work_units
from pixelgen.data.builders.shapes import png_bytes
from pixelgen.data.decode import IMAGE_FIELDS, DataError, Filters, decode_pair

PREPARED_PREFIX = 'prepared:'
EVAL_SHARD_FRACTION = 0.05
# Only broken records are dropped: the caption, size and aspect filters are training settings.
CHECKS = Filters(image_size=0, min_caption_length=0, max_aspect_ratio=0.0,
                 require_success_status=True)


def source_of(dataset: str) -> str:
    """'prepared:webdataset:<pattern>' -> 'webdataset:<pattern>'; DataError if malformed."""
    source = dataset[len(PREPARED_PREFIX):]
    if not streaming.is_streaming(source):
        raise DataError(f'config.data.dataset={dataset!r}: after {PREPARED_PREFIX!r} name the '
                        "shards as a streamed source does, 'webdataset:<pattern>' or "
                        "'parquet:<pattern>'.")
    return source


def shards_digest(shards: list[str]) -> str:
    """A hash of every shard's path, size and modification time (from metadata only)."""
    h = hashlib.sha1()
    for path in shards:
        try:
            st = epath.Path(path).stat()
            h.update(f'{path}\0{st.length}\0{st.mtime}\n'.encode())
        except OSError:
            h.update(f'{path}\0-\n'.encode())
    return h.hexdigest()


def convert_shard(kind: str, path: str) -> list[tuple[str, tuple]]:
    """One unit of a build (in a worker process): (key, outcome) of every record of a shard,
    outcome ('ok', image bytes, caption, kept as is) or ('skip', reason)."""
    results = []
    for key, fields in streaming.read_records(kind, path):
        if fields is None:
            results.append((key, ('skip', 'corrupt')))
            continue
        example, reason = decode_pair(fields, CHECKS)
        if example is None:
            results.append((key, ('skip', reason)))
            continue
        data = next(fields[k] for k in IMAGE_FIELDS if fields.get(k) is not None)
        with Image.open(io.BytesIO(data)) as image:  # the header only: decode_pair decoded it
            as_is = image.format == 'JPEG' and image.mode == 'RGB'
        results.append((key, ('ok', data if as_is else png_bytes(example['image']),
                              example['caption'], as_is)))
    return results


class PreparedShards(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """img2dataset shards converted to array_record; see the module doc."""

    name = 'prepared_shards'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def __init__(self, *, dataset: str, num_workers: int = 0, **kwargs: Any):
        self._source = source_of(dataset)
        self._kind, pattern = self._source.split(':', 1)
        self._shards = streaming.list_shards(pattern)
        self._num_workers = num_workers
        where = '/'.join(pattern.rstrip('/').split('/')[-2:])  # e.g. pairs/{00000..00127}.tar
        slug = re.sub(r'[^A-Za-z0-9_]+', '_', where).strip('_')[:40]
        digest = hashlib.sha1((self._source + '\n' + shards_digest(self._shards)).encode())
        kwargs.setdefault('config', tfds.core.BuilderConfig(
            name=f'{slug or "shards"}-{digest.hexdigest()[:10]}'))
        super().__init__(**kwargs)
        # tfds re-creates pickled builders from _original_state; keep the source there too.
        self._original_state.update(dataset=dataset, num_workers=num_workers)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=f'{self._source}, prepared.\n{__doc__}',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'caption': tfds.features.Text(),
                'key': tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)  # shard and record order, as a stream reads them

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the shards are read where they are
        held_out = max(1, round(EVAL_SHARD_FRACTION * len(self._shards)))
        if held_out >= len(self._shards):
            raise DataError(f'{self._source!r} has {len(self._shards)} shard(s): too few to '
                            f'hold out {EVAL_SHARD_FRACTION:.0%} as the test split and keep '
                            'the rest for training. Write more shards.')
        units = [(self._kind, path) for path in self._shards]
        self._work_dir = work_units.work_dir_of(self)
        work_units.run_units(self._work_dir, units, convert_shard,
                             num_workers=self._num_workers,
                             plan=work_units.plan_digest(units, {'version': str(self.VERSION)}),
                             what=self._source)
        self._counts: collections.Counter[str] = collections.Counter()
        first_test = len(self._shards) - held_out
        return {'train': self._generate_examples('train', range(first_test)),
                'test': self._generate_examples('test', range(first_test, len(self._shards)))}

    def _generate_examples(self, split: str, shard_indices: range):
        keys = set()
        for index in shard_indices:
            for key, outcome in work_units.unit_result(self._work_dir, index):
                if outcome[0] == 'skip':
                    self._counts[f'skipped_{outcome[1]}'] += 1
                    continue
                _, data, caption, as_is = outcome
                unique = f'{index}/{key}'  # keys repeat across shards in some writers
                if unique in keys:
                    self._counts['skipped_duplicate_key'] += 1
                    continue
                keys.add(unique)
                self._counts[f'written_{split}'] += 1
                self._counts['kept_jpeg_bytes'] += as_is
                yield unique, {'image': data, 'caption': caption, 'key': key}
        if split == 'test':  # generated last
            self.info.metadata['summary'] = {'source': self._source,
                                             'shards': len(self._shards),
                                             'counts': dict(sorted(self._counts.items()))}
            print(f'prepared {self._source}: '
                  + ', '.join(f'{k} {v}' for k, v in sorted(self._counts.items())), flush=True)
            work_units.remove(self._work_dir)
