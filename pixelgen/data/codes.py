"""Datasets of dVAE image codes with captions: written by the dVAE encode job, read by DALL·E.

A codes dataset is a tfds dataset directory (array_record, no TensorFlow):
  out_dir/dataset_info.json, features.json, metadata.json   (process 0 writes these)
  out_dir/codes-<split>.array_record-<p>-of-<P>              (one shard per process)
Each example is {'codes': uint16 [grid, grid], 'caption': str, 'label': int}. Any tfds reader
opens it (`tfds.builder_from_directory(out_dir).as_data_source(split)`); `open_codes` does
that and returns captions as `str`. Splits are written one call at a time and merged into the
dataset info, so `train` and `test` can come from separate runs of the encode job.

`out_dir` may be a URL (gs://...). The ArrayRecord writer and reader handle local files only
(google/array_record#120): each process writes its shard locally and copies it up, and
readers read a copy in their machine's cache (`storage.local_copy`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from pixelgen import storage
from pixelgen.data.pipeline import DataError

NAME = 'codes'
VERSION = '1.0.0'
FILE_FORMAT = 'array_record'


class CodesError(DataError):
    """A codes dataset that cannot be written or read; the message says what to do."""


def _features(grid_size: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        'codes': tfds.features.Tensor(shape=(grid_size, grid_size), dtype=np.uint16),
        'caption': tfds.features.Text(),
        'label': tfds.features.Scalar(dtype=np.int64),
    })


def _info(out_dir: str, grid_size: int, metadata: dict) -> tfds.core.DatasetInfo:
    identity = tfds.core.DatasetIdentity(name=NAME, version=tfds.core.Version(VERSION),
                                         data_dir=out_dir, module_name=__name__)
    return tfds.core.DatasetInfo(builder=identity, features=_features(grid_size),
                                 metadata=tfds.core.MetadataDict(metadata),
                                 description='dVAE image codes with captions (pixelgen).',
                                 disable_shuffling=True)


def _shard_name(split: str, index: int, count: int) -> str:
    return f'{NAME}-{split}.{FILE_FORMAT}-{index:05d}-of-{count:05d}'


def _all_process_counts(count: int) -> list[int]:
    if jax.process_count() == 1:
        return [count]
    from jax.experimental import multihost_utils
    return [int(c) for c in multihost_utils.process_allgather(np.int64(count))]


def write_codes(out_dir: str, split: str, examples: Iterable[dict], *, grid_size: int,
                codebook_size: int, metadata: dict | None = None) -> int:
    """Writes this process's `examples` ({'codes': uint16 [grid, grid], 'caption': str,
    'label': int}) as its shard of `split` and returns how many it wrote. In a multi-host job
    every process calls this with its own examples; process 0 writes the dataset info.
    Rewriting a split replaces it; other splits already in `out_dir` are kept, and `metadata`
    updates the metadata already there."""
    if not 2 <= codebook_size <= 65536:
        raise CodesError(f'codebook_size={codebook_size} must be in [2, 65536] (codes are uint16).')
    storage.makedirs(out_dir)
    existing = _builder(out_dir).info if _is_codes(out_dir) else None
    if existing and (existing.metadata['grid_size'], existing.metadata['codebook_size']) != (
            grid_size, codebook_size):
        raise CodesError(
            f'{out_dir} holds codes with grid_size={existing.metadata["grid_size"]}, '
            f'codebook_size={existing.metadata["codebook_size"]}, but this call writes '
            f'grid_size={grid_size}, codebook_size={codebook_size}. Write to a new directory.')
    features = _features(grid_size)
    process, processes = jax.process_index(), jax.process_count()
    shard = _shard_name(split, process, processes)
    if process == 0:  # shards of an earlier write of this split by another number of processes
        stale = f'{NAME}-{split}.{FILE_FORMAT}-'
        for name in storage.listdir(out_dir):
            if name.startswith(stale) and not name.endswith(f'-of-{processes:05d}'):
                storage.remove(storage.join(out_dir, name))
    with tempfile.TemporaryDirectory(prefix='pixelgen-codes-') as staging:
        # A URL's shard is written locally first (ArrayRecord writes local files only).
        local = (os.path.join(staging, shard) if storage.is_remote(out_dir)
                 else os.path.join(out_dir, shard))
        count = _write_shard(local, split, examples, features, grid_size, codebook_size)
        if storage.is_remote(out_dir):  # an object appears whole once uploaded
            storage.upload_file(local, storage.join(out_dir, shard))
    counts = _all_process_counts(count)
    if process == 0:
        splits = {name: info for name, info in existing.splits.items()} if existing else {}
        splits[split] = tfds.core.SplitInfo(name=split, shard_lengths=counts, num_bytes=0)
        user = dict(existing.metadata.get('user', {})) if existing else {}
        user.update(metadata or {})
        info = _info(out_dir, grid_size, {'grid_size': grid_size, 'codebook_size': codebook_size,
                                          'user': user})
        info.set_file_format(FILE_FORMAT)
        info.set_splits(tfds.core.SplitDict(list(splits.values())))
        info.write_to_directory(out_dir)
    if processes > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f'write_codes:{out_dir}:{split}')
    return count


def _write_shard(path: str, split: str, examples: Iterable[dict], features, grid_size: int,
                 codebook_size: int) -> int:
    """Writes `examples` to the local ArrayRecord file `path`; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter

    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    count = 0
    for example in examples:
        codes = np.asarray(example['codes'])
        if codes.shape != (grid_size, grid_size):
            writer.close()
            raise CodesError(f'Example {count} of split {split!r} has codes of shape '
                             f'{codes.shape}; expected ({grid_size}, {grid_size}).')
        if codes.size and int(codes.max()) >= codebook_size:
            writer.close()
            raise CodesError(f'Example {count} of split {split!r} has code {int(codes.max())} '
                             f'>= codebook_size={codebook_size}.')
        writer.write(serializer.serialize_example(features.encode_example({
            'codes': codes.astype(np.uint16), 'caption': str(example['caption']),
            'label': int(example['label'])})))
        count += 1
    writer.close()
    os.replace(path + '.tmp', path)  # readers never see a half-written shard
    return count


def codes_info(out_dir: str) -> dict:
    """{'grid_size', 'codebook_size', 'splits': {name: count}, 'metadata': dict}."""
    builder = _builder(out_dir)
    meta = builder.info.metadata
    splits = builder.info.splits
    return {'grid_size': int(meta['grid_size']), 'codebook_size': int(meta['codebook_size']),
            'splits': {name: int(s.num_examples) for name, s in splits.items()},
            'metadata': dict(meta.get('user', {}))}


def _is_codes(out_dir: str) -> bool:
    return storage.exists(storage.join(out_dir, 'dataset_info.json'))


def _builder(out_dir: str):
    if not _is_codes(out_dir):
        raise CodesError(f'{out_dir!r} is not a codes dataset (no dataset_info.json). Write one '
                         'with the dVAE encode job: python -m pixelgen.dvae encode --workdir '
                         f'DVAE_WORKDIR --dataset shapes --out {out_dir}')
    return tfds.builder_from_directory(out_dir)


class CodesSource:
    """Random access to one split: len(), [i] -> {'codes': uint16 [g, g], 'caption': str,
    'label': int}. Picklable (grain workers)."""

    def __init__(self, out_dir: str, split: str):
        builder = _builder(out_dir)
        if split.split('[')[0] not in builder.info.splits:
            raise CodesError(f'{out_dir} has no split {split!r}; it has '
                             f'{sorted(builder.info.splits)}.')
        if storage.is_remote(out_dir):  # array_record reads local files only
            builder = _builder(storage.local_folder(out_dir, 'codes', what='codes dataset'))
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        caption = record['caption']
        return {'codes': np.asarray(record['codes'], np.uint16),
                'caption': caption.decode() if isinstance(caption, bytes) else str(caption),
                'label': int(record['label'])}


def open_codes(out_dir: str, split: str) -> CodesSource:
    """A random-access source of `split` of the codes dataset in `out_dir`."""
    return CodesSource(out_dir, split)
