"""Datasets of dVAE image codes with captions: written by the dVAE encode job, read by DALL·E.

A codes dataset is a tfds dataset directory (array_record, no TensorFlow):
  out_dir/dataset_info.json, features.json, metadata.json   (process 0 writes these)
  out_dir/codes-<split>.array_record-<i>-of-<N>              (each process's chunks, in order)
While a split is written, each process writes its examples in chunks of `chunk_size` under
out_dir/.partial-<split>/, each chunk complete or absent; when every process is done, process 0
renames the chunks into the split's shards and writes the dataset info. A write that was
killed resumes after its last complete chunk (`write_codes` with a function of the offset).
Each example is {'codes': uint16 [grid, grid], 'caption': str, 'label': int}. Any tfds reader
opens it (`tfds.builder_from_directory(out_dir).as_data_source(split)`); `open_codes` does
that and returns captions as `str`. Splits are written one call at a time and merged into the
dataset info, so `train` and `test` can come from separate runs of the encode job.

`out_dir` may be a URL (gs://...). The ArrayRecord writer and reader handle local files only
(google/array_record#120): each process writes its shard locally and copies it up, and
readers read a copy in their machine's cache (`storage.local_copy`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable

import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from pixelgen import storage
from pixelgen.data.pipeline import DataError

NAME = 'codes'
VERSION = '1.0.0'
FILE_FORMAT = 'array_record'
CHUNK_SIZE = 10_000  # examples per chunk: what a killed write redoes at most, per process


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


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _partial_dir(out_dir: str, split: str) -> str:
    return storage.join(out_dir, f'.partial-{split}')


_CHUNK = re.compile(r'^p(\d+)-of-(\d+)\.rows-(\d+)-(-?\d+)\.c(\d+)\.n(\d+)\.array_record$')


def _chunk_name(process: int, processes: int, rows: tuple[int, int], index: int,
                count: int) -> str:
    return (f'p{process:05d}-of-{processes:05d}.rows-{rows[0]}-{rows[1]}.c{index:05d}.n{count}'
            f'.{FILE_FORMAT}')


def _written_chunks(partial: str, process: int, processes: int, rows: tuple[int, int],
                    plan: dict) -> list[tuple[str, int]]:
    """This process's complete chunks of an interrupted write of the same plan, in order, as
    (name, examples); those of another plan (other rows, process count or settings) are
    deleted, since their examples differ."""
    mine = f'p{process:05d}-of-'
    names = [n for n in storage.listdir(partial) if n.startswith(mine)]
    plan_file = storage.join(partial, f'p{process:05d}.plan.json')
    plan = json.loads(json.dumps(plan, sort_keys=True))  # as the file holds it (no tuples)
    same_plan = plan['resumable'] and storage.is_file(plan_file) and json.loads(
        storage.read_text(plan_file)) == plan
    chunks = []
    for name in names:
        m = _CHUNK.match(name)
        if m and same_plan and (int(m[2]), int(m[3]), int(m[4])) == (processes, *rows) and int(
                m[5]) == len(chunks):
            chunks.append((name, int(m[6])))
        elif name.endswith(f'.{FILE_FORMAT}'):
            storage.remove(storage.join(partial, name))
    storage.write_text(plan_file, json.dumps(plan, sort_keys=True))
    return chunks


def write_codes(out_dir: str, split: str,
                examples: Iterable[dict] | Callable[[int], Iterable[dict]], *, grid_size: int,
                codebook_size: int, metadata: dict | None = None,
                rows: tuple[int, int] | None = None, chunk_size: int = CHUNK_SIZE) -> int:
    """Writes this process's examples ({'codes': uint16 [grid, grid], 'caption': str,
    'label': int}) into `split` and returns how many this call wrote. In a multi-host job
    every process calls this with its own examples; process 0 writes the dataset info.
    Rewriting a split replaces it; other splits already in `out_dir` are kept, and `metadata`
    updates the metadata already there.

    `examples` is an iterable, or a function `examples(k)` that yields this process's examples
    from its k-th on: then a write that was killed resumes after its last complete chunk,
    provided `rows` (this process's share, e.g. (start, end) of the source), the process
    count, the codes' shape and `metadata` are the same; otherwise it starts again."""
    if not 2 <= codebook_size <= 65536:
        raise CodesError(f'codebook_size={codebook_size} must be in [2, 65536] (codes are uint16).')
    if chunk_size < 1:
        raise CodesError(f'chunk_size={chunk_size} must be at least 1.')
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
    partial = _partial_dir(out_dir, split)
    storage.makedirs(partial)
    resumable = callable(examples)
    rows = rows if resumable and rows is not None else (0, -1)
    plan = {'grid_size': grid_size, 'codebook_size': codebook_size, 'metadata': metadata or {},
            'resumable': resumable}
    chunks = _written_chunks(partial, process, processes, rows, plan)
    done = sum(n for _, n in chunks)
    if chunks:
        print(f'[codes] {split}: resuming after {done:,} examples in {len(chunks)} chunk(s) '
              f'written before (process {process})', flush=True)
    stream = iter(examples(done) if resumable else examples)
    count = 0
    while True:
        name_of = functools.partial(_chunk_name, process, processes, rows, len(chunks))
        written = _write_chunk(partial, name_of, split, stream, features, grid_size,
                               codebook_size, chunk_size, first=done + count)
        if written is None:
            break
        chunks.append(written)
        count += written[1]
        if written[1] < chunk_size:
            break
    if not chunks:  # a process with no examples still holds a shard of the split
        chunks.append(_write_chunk(partial, functools.partial(
            _chunk_name, process, processes, rows, 0), split, iter(()), features, grid_size,
            codebook_size, chunk_size, first=0, allow_empty=True))
    _barrier(f'write_codes:chunks:{out_dir}:{split}')
    if process == 0:
        _finish_split(out_dir, split, existing, grid_size, codebook_size, metadata)
    _barrier(f'write_codes:{out_dir}:{split}')
    return count


def _write_chunk(partial: str, name_of, split: str, stream, features, grid_size: int,
                 codebook_size: int, chunk_size: int, *, first: int,
                 allow_empty: bool = False) -> tuple[str, int] | None:
    """Writes the next up to `chunk_size` examples of `stream` as one complete chunk file in
    `partial` and returns (its name, examples), or None when the stream is empty."""
    items = []
    for example in stream:
        items.append(example)
        if len(items) == chunk_size:
            break
    if not items and not allow_empty:
        return None
    with tempfile.TemporaryDirectory(prefix='pixelgen-codes-') as staging:
        local = os.path.join(staging, 'chunk')
        _write_shard(local, split, items, features, grid_size, codebook_size, first)
        name = name_of(len(items))
        if storage.is_remote(partial):  # an object appears whole once uploaded
            storage.upload_file(local, storage.join(partial, name))
        else:
            os.replace(local, os.path.join(partial, name))  # complete or absent
    return name, len(items)


def _finish_split(out_dir: str, split: str, existing, grid_size: int, codebook_size: int,
                  metadata: dict | None) -> None:
    """Process 0, once every process wrote its chunks: the chunks become the split's shards
    (process by process, in order) and the dataset info lists them."""
    partial = _partial_dir(out_dir, split)
    found = sorted((int(m[1]), int(m[5]), name, int(m[6]))
                   for name in storage.listdir(partial) if (m := _CHUNK.match(name)))
    processes = jax.process_count()
    found = [f for f in found if f'-of-{processes:05d}.' in f[2]]
    prefix = f'{NAME}-{split}.{FILE_FORMAT}-'
    for name in storage.listdir(out_dir):  # the shards of an earlier write of this split
        if name.startswith(prefix):
            storage.remove(storage.join(out_dir, name))
    for index, (_, _, name, _) in enumerate(found):
        storage.move(storage.join(partial, name),
                     storage.join(out_dir, _shard_name(split, index, len(found))))
    splits = {name: info for name, info in existing.splits.items()} if existing else {}
    splits[split] = tfds.core.SplitInfo(name=split, shard_lengths=[f[3] for f in found],
                                        num_bytes=0)
    user = dict(existing.metadata.get('user', {})) if existing else {}
    user.update(metadata or {})
    info = _info(out_dir, grid_size, {'grid_size': grid_size, 'codebook_size': codebook_size,
                                      'user': user})
    info.set_file_format(FILE_FORMAT)
    info.set_splits(tfds.core.SplitDict(list(splits.values())))
    info.write_to_directory(out_dir)
    storage.rmtree(partial)


def _write_shard(path: str, split: str, examples: Iterable[dict], features, grid_size: int,
                 codebook_size: int, first: int = 0) -> int:
    """Writes `examples` (this process's from its `first`-th on) to the local ArrayRecord file
    `path`; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter

    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    count = 0
    for example in examples:
        codes = np.asarray(example['codes'])
        if codes.shape != (grid_size, grid_size):
            writer.close()
            raise CodesError(f'Example {first + count} of split {split!r} has codes of shape '
                             f'{codes.shape}; expected ({grid_size}, {grid_size}).')
        if codes.size and int(codes.max()) >= codebook_size:
            writer.close()
            raise CodesError(f'Example {first + count} of split {split!r} has code '
                             f'{int(codes.max())} >= codebook_size={codebook_size}.')
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
