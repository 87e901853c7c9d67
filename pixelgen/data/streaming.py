"""Streamed image–text shards in img2dataset's layouts: webdataset tar files and parquet.

    config.data.dataset = 'webdataset:gs://bucket/pairs/{00000..00127}.tar'
    config.data.dataset = 'parquet:/data/pairs/*.parquet'

A pattern is a local path or a URL with `{a..b}` ranges (zero padding kept), `{x,y}`
alternatives and glob characters (`*`, `?`, `[...]`). A tar shard holds `{key}.jpg` (or png,
webp), `{key}.txt` and `{key}.json` members; a parquet file has an image-bytes column (`jpg`),
a caption column (`txt` or `caption`) and, from img2dataset, `status`. Nothing is prepared:
shards are read as they are, in order, member by member.

Training (`train_iterator`): the training shards of one epoch are permuted from
(`config.seed`, epoch); the H hosts × W decoding workers form H·W slots, and slot g reads
shards `perm[g::H·W]`, so hosts and workers read disjoint shards and every shard is read
once per epoch. Each slot moves to its next epoch on its own when its shards run out, so the
stream never ends and every host yields a batch at every step, whatever was skipped or
filtered: no collective waits on a host that ran dry. A host's stream takes its slots' examples
in turn (slot 0, 1, ..., W-1, 0, ...). The position (per slot: epoch, shard, record, counts of
skipped records) is the iterator's state, which the trainer saves in every checkpoint; a
resumed run reopens each slot's shard at its record and sees exactly the examples of an
uninterrupted run. Workers (`data.num_workers`, 0 = decode in the training process) read,
decode, filter and resize in their own processes and hand finished examples back.

Skipped records (`decode.SKIP_REASONS`: corrupt, undecodable, no caption, filtered by status,
caption length, aspect ratio or size) are counted per slot and logged with the iterator's
state at every checkpoint.

Evaluation reads `data.eval_dataset` when set, else the last `data.eval_shard_fraction` of the
shards in name order (at least one), which training then never reads.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import glob
import itertools
import json
import multiprocessing
import os
import queue
import re
import sys
import tarfile
import threading
import traceback
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from etils import epath

from pixelgen.data.decode import SKIP_REASONS, DataError, Filters, decode_pair

KINDS = ('webdataset', 'parquet')
STATE_VERSION = 1
_BRACE = re.compile(r'\{([^{}]*)\}')
_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)$')


def is_streaming(dataset: str) -> bool:
    """Whether `dataset` names a streamed source ('webdataset:<pattern>' / 'parquet:<pattern>')."""
    return dataset.split(':', 1)[0] in KINDS and ':' in dataset


def expand_braces(pattern: str) -> list[str]:
    """'s/{000..002}.tar' -> ['s/000.tar', 's/001.tar', 's/002.tar']; '{a,b}' -> both."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).startswith('0') else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices = body.split(',')
    return [p for choice in choices for p in expand_braces(head + choice + tail)]


def _glob(pattern: str) -> list[str]:
    if not any(c in pattern for c in '*?['):
        return [pattern]
    if '://' not in pattern:
        return glob.glob(os.path.expanduser(pattern))
    parts = pattern.split('/')
    first = next(i for i, part in enumerate(parts) if any(c in part for c in '*?['))
    base = epath.Path('/'.join(parts[:first]))
    return [os.fspath(p) for p in base.glob('/'.join(parts[first:]))]


def list_shards(pattern: str) -> list[str]:
    """The shard paths a pattern names, sorted. Brace-expanded URLs without glob characters
    are taken as written (no listing; a missing one fails when it is read); local ones are
    checked here."""
    shards = sorted({path for p in expand_braces(pattern) for path in _glob(p)})
    if not shards:
        raise DataError(f'The pattern {pattern!r} matches no file. Check the path; patterns '
                        'take globs (shards/*.tar) and ranges (shards/{00000..00127}.tar).')
    missing = [p for p in shards if '://' not in p and not os.path.exists(p)]
    if missing:
        raise DataError(f'{len(missing)} of the {len(shards)} shards that {pattern!r} names do '
                        f'not exist, e.g. {missing[0]}. Fix the range or use a glob.')
    return shards


# Reading shards ----------------------------------------------------------------------------

def _member_key(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): webdataset's key is the name up to the
    first dot of its base name."""
    folder, _, base = name.rpartition('/')
    stem, _, ext = base.partition('.')
    return (folder + '/' + stem if folder else stem), ext.lower()


def _tar_records(path: str, start: int) -> Iterator[tuple[str, dict | None]]:
    """(key, {extension: bytes}) of each record from record `start`; a record that cannot be
    read is (key, None), and a shard that breaks off ends after one such record."""
    with epath.Path(path).open('rb') as f:
        index, key, fields = 0, None, {}
        try:
            with tarfile.open(fileobj=f, mode='r|*') as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = _member_key(member.name)
                    if member_key != key:
                        if key is not None:
                            if index >= start:
                                yield key, fields
                            index += 1
                        key, fields = member_key, {}
                    if index >= start:
                        fields[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            if index >= start:
                yield key or f'{path}#{index}', None
            return
        if key is not None and index >= start:
            yield key, fields


def _parquet_records(path: str, start: int) -> Iterator[tuple[str, dict | None]]:
    import pyarrow.parquet as pq
    with epath.Path(path).open('rb') as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception:  # pyarrow raises ArrowInvalid / OSError on a broken file
            yield f'{path}#0', None
            return
        names = set(pf.schema_arrow.names)
        columns = [c for c in ('key', 'jpg', 'jpeg', 'png', 'webp', 'txt', 'caption', 'status',
                               'json') if c in names]
        position = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if position + rows <= start:
                position += rows
                continue
            try:
                table = pf.read_row_group(group, columns=columns).to_pylist()
            except Exception:
                yield f'{path}#{position}', None
                return
            for row in table[max(0, start - position):]:
                yield str(row.get('key') or f'{path}#{position}'), row
            position += rows


def read_records(kind: str, path: str, start: int = 0) -> Iterator[tuple[str, dict | None]]:
    """The records of one shard from record `start` on, as (key, fields or None if broken)."""
    return (_tar_records if kind == 'webdataset' else _parquet_records)(path, start)


def shard_size(kind: str, path: str) -> int:
    """The number of records in a shard: img2dataset's `<shard>_stats.json` count when it is
    there, else the parquet footer or a pass over the tar headers."""
    if kind == 'parquet':
        import pyarrow.parquet as pq
        with epath.Path(path).open('rb') as f:
            return pq.ParquetFile(f).metadata.num_rows
    stats = epath.Path(re.sub(r'\.tar$', '', path) + '_stats.json')
    if stats.exists():
        try:
            return int(json.loads(stats.read_text())['successes'])
        except (ValueError, KeyError, TypeError):
            pass  # not img2dataset's: count
    return sum(1 for _ in _tar_records(path, 0))


# The stream of one slot --------------------------------------------------------------------

def epoch_shards(num_shards: int, seed: int, epoch: int, slot: int, slots: int) -> list[int]:
    """Indices of the shards slot `slot` of `slots` reads in `epoch` (disjoint across slots,
    together every shard once)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(i) for i in order[slot::slots]]


def new_slot_state() -> dict:
    return {'epoch': 0, 'shard': 0, 'record': 0, 'used': 0,
            'skipped': {reason: 0 for reason in SKIP_REASONS}}


def slot_examples(kind: str, shards: list[str], filters: Filters, seed: int, slot: int,
                  slots: int, state: dict) -> Iterator[tuple[dict, dict]]:
    """Endless (example, state after it) of one slot, from `state` on."""
    state = json.loads(json.dumps(state))  # a private copy
    empty_epochs = 0
    while True:
        order = epoch_shards(len(shards), seed, state['epoch'], slot, slots)
        used_before = state['used']
        while state['shard'] < len(order):
            path = shards[order[state['shard']]]
            for key, fields in read_records(kind, path, state['record']):
                state['record'] += 1
                example, reason = (None, 'corrupt') if fields is None else decode_pair(
                    fields, filters)
                if example is None:
                    state['skipped'][reason] += 1
                    continue
                state['used'] += 1
                example['key'] = key
                yield example, json.loads(json.dumps(state))
            state['shard'] += 1
            state['record'] = 0
        state['epoch'] += 1
        state['shard'] = 0
        empty_epochs = 0 if state['used'] > used_before else empty_epochs + 1
        if empty_epochs >= 2:
            names = [shards[i] for i in order[:3]]
            raise DataError(f'No usable record in the shards {names}... (skipped so far: '
                            f'{format_counts(state["skipped"])}). Check the data or loosen the '
                            'filters (data.min_caption_length, max_aspect_ratio, '
                            'min_image_side, require_success_status).')


def format_counts(skipped: dict) -> str:
    parts = [f'{reason} {n}' for reason, n in skipped.items() if n]
    return ', '.join(parts) if parts else 'none'


def _worker_main(args: tuple, out: multiprocessing.Queue, ring, free, chunk: int) -> None:
    """A decoding worker: puts ('ok', [(example, state), ...]) for every `chunk` examples of
    its slot (one pipe message each), or ('error', message) once and stops. With a `ring`
    (shared memory of [capacity, h*w*3] bytes) each image goes into its next cell and the
    example carries the cell's index, so only captions and positions pass through the pipe;
    `free` counts the cells the training process has copied out."""
    try:
        cells = np.frombuffer(ring, np.uint8).reshape(len(ring) // args[2].image_size ** 2 // 3,
                                                      -1) if ring is not None else None
        done = []
        for i, (example, state) in enumerate(slot_examples(*args)):
            if cells is not None:
                free.acquire()
                cells[i % len(cells)] = example['image'].reshape(-1)
                example['image'] = i % len(cells)
            done.append((example, state))
            if len(done) == chunk:
                out.put(('ok', done))
                done = []
    except BaseException as e:  # noqa: BLE001 - handed to the training process
        out.put(('error', f'{type(e).__name__}: {e}\n{traceback.format_exc()}'))


class StreamIterator:
    """This host's batches of a streamed source, endless and checkpointable.

    Orbax saves `get_state()` (JSON bytes) through `grain.checkpoint.CheckpointSave` and
    restores it with `set_state` + `start_prefetch`, as it does grain's own iterators.
    """

    def __init__(self, source: StreamingSource, *, local_batch: int, seed: int, host: int,
                 hosts: int, prepare: Callable[[dict], dict],
                 batch_map: Callable[[dict], dict] | None = None,
                 augment: Callable | None = None, num_workers: int = 0, prefetch: int = 4):
        self._processes: list = []
        self._streams: list | None = None
        self._source, self._batch, self._seed = source, local_batch, seed
        self._host, self._hosts = host, hosts
        self._prepare, self._batch_map, self._augment = prepare, batch_map, augment
        self._workers, self._prefetch = num_workers, prefetch
        self._slots_per_host = max(num_workers, 1)
        self._slots = hosts * self._slots_per_host
        shards = source.shards
        if len(shards) < self._slots:
            raise DataError(
                f'{source.dataset!r} has {len(shards)} {source.split} shards, fewer than the '
                f'{hosts} host(s) x {self._slots_per_host} decoding slot(s) '
                f'(data.num_workers={num_workers}) that each need their own shards. Write '
                'more, smaller shards (img2dataset --number_sample_per_shard) or lower '
                'data.num_workers.')
        self._states = [new_slot_state() for _ in range(self._slots_per_host)]
        self._next_slot = 0

    # Streams -------------------------------------------------------------------------------
    def _slot_args(self, local_slot: int) -> tuple:
        s = self._source
        return (s.kind, s.shards, s.filters, self._seed,
                self._host * self._slots_per_host + local_slot, self._slots,
                self._states[local_slot])

    def start_prefetch(self) -> None:
        """Starts the slots' streams (worker processes when num_workers > 0)."""
        if self._streams is not None:
            return
        if not self._workers:
            self._streams = [slot_examples(*self._slot_args(0))]
            return
        context = multiprocessing.get_context('spawn')
        self._streams, self._rings = [], []
        self._pending = [collections.deque() for _ in range(self._workers)]
        capacity = max(self._prefetch * self._batch // self._workers, 4)
        chunk = max(1, min(8, capacity // 4))
        size = self._source.filters.image_size
        for slot in range(self._workers):
            out = context.Queue(maxsize=capacity // chunk)
            # Images of a known size travel through shared memory: a pipe moves a 256x256
            # image in several wake-ups, which cost more than decoding it on a busy host.
            ring = context.RawArray('B', capacity * size * size * 3) if size else None
            free = context.Semaphore(capacity) if size else None
            process = context.Process(target=_worker_main,
                                      args=(self._slot_args(slot), out, ring, free, chunk),
                                      daemon=True, name=f'pixelgen-decode-{slot}')
            process.start()
            self._processes.append(process)
            self._streams.append(out)
            cells = np.frombuffer(ring, np.uint8).reshape(capacity, size, size, 3) \
                if size else None
            self._rings.append((cells, free))

    def close(self) -> None:
        """Stops the worker processes (they are daemons: they also end with this process)."""
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(timeout=5)
        self._processes, self._streams = [], None

    def __del__(self):
        if not sys.is_finalizing():  # at exit the daemon workers end on their own
            self.close()

    def _next_example(self) -> tuple[dict, dict, int]:
        """(example, its slot's state after it, the slot's global index)."""
        slot = self._next_slot
        stream = self._streams[slot]
        if not self._workers:
            example, state = next(stream)
        elif self._pending[slot]:
            example, state = self._pending[slot].popleft()
        else:
            while True:
                try:
                    item = stream.get(timeout=10)
                    break
                except queue.Empty:
                    if not self._processes[slot].is_alive():
                        raise DataError(f'Decoding worker {slot} died (exit code '
                                        f'{self._processes[slot].exitcode}).') from None
            if item[0] == 'error':
                self.close()
                raise DataError(f'Decoding worker {slot} failed: {item[1]}')
            cells, free = self._rings[slot]
            for example, _ in item[1]:
                if cells is not None:
                    example['image'] = cells[example['image']].copy()
                    free.release()
            self._pending[slot].extend(item[1])
            example, state = self._pending[slot].popleft()
        self._states[slot] = state
        self._next_slot = (slot + 1) % self._slots_per_host
        return example, state, self._host * self._slots_per_host + slot

    # The iterator --------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.start_prefetch()
        rows = []
        for _ in range(self._batch):
            example, state, slot = self._next_example()
            row = self._prepare(example)
            if self._augment is not None:  # seeded by the example's place in the stream
                rng = np.random.default_rng([self._seed, slot, state['epoch'], state['shard'],
                                             state['record']])
                row = self._augment(row, rng)
            rows.append(row)
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return self._batch_map(batch) if self._batch_map is not None else batch

    def counts(self) -> dict:
        """{'used': n, 'skipped': {reason: n}} summed over this host's slots."""
        skipped = {reason: sum(s['skipped'][reason] for s in self._states)
                   for reason in SKIP_REASONS}
        return {'used': sum(s['used'] for s in self._states), 'skipped': skipped}

    def get_state(self) -> bytes:
        counts = self.counts()
        print(f'[data] host {self._host}: {counts["used"]} examples used; skipped: '
              f'{format_counts(counts["skipped"])}', flush=True)
        return json.dumps({'version': STATE_VERSION, 'dataset': self._source.dataset,
                           'shards': len(self._source.shards),
                           'slots_per_host': self._slots_per_host, 'hosts': self._hosts,
                           'next_slot': self._next_slot, 'slots': self._states},
                          indent=1).encode()

    def set_state(self, state: bytes) -> None:
        """Resumes at a saved position. Saved with other shards, `data.num_workers` or host
        count, it cannot be mapped exactly: the stream then restarts the earliest epoch any
        slot was in, over the shards it has now, and says so (the checkpoint stays good)."""
        state = json.loads(state)
        saved = (state['shards'], state['slots_per_host'], state['hosts'])
        here = (len(self._source.shards), self._slots_per_host, self._hosts)
        self.close()
        if saved == here:
            self._states, self._next_slot = state['slots'], state['next_slot']
            return
        epoch = min(s['epoch'] for s in state['slots'])
        print(f'[data] WARNING: the checkpoint\'s data position was saved with {saved[0]} '
              f'shards, {saved[1]} decoding slot(s) per host (data.num_workers) and {saved[2]} '
              f'host(s); this run has {here[0]}, {here[1]} and {here[2]}. An exact resume '
              f'needs the same three; host {self._host} restarts epoch {epoch} instead.',
              flush=True)
        self._states = [dict(new_slot_state(), epoch=epoch) for _ in self._states]
        self._next_slot = 0


# The source --------------------------------------------------------------------------------

class StreamingSource:
    """A streamed dataset: its shard list, split into training and held-out evaluation
    shards, and its filters. `len(src)` and `src[i]` give sequential-friendly access to the
    records in name order (record i, or the next usable one after it), for the few places that
    sample a dataset (palette fitting, tokenizer training, sample grids)."""

    def __init__(self, dataset: str, split: str = 'train', *, filters: Filters | None = None,
                 eval_dataset: str = '', eval_shard_fraction: float = 0.05):
        if not is_streaming(dataset):
            raise DataError(f'{dataset!r} is not a streamed source; expected '
                            "'webdataset:<pattern>' or 'parquet:<pattern>'.")
        self.dataset, self.split = dataset, split
        self.kind, pattern = dataset.split(':', 1)
        self.filters = filters or Filters()
        shards = list_shards(pattern)
        if eval_dataset:
            held_out = 0
        else:
            if not 0 < eval_shard_fraction < 1:
                raise DataError(f'data.eval_shard_fraction={eval_shard_fraction}: choose a '
                                'fraction in (0, 1), or name data.eval_dataset.')
            held_out = max(1, round(eval_shard_fraction * len(shards)))
            if held_out >= len(shards):
                raise DataError(
                    f'{dataset!r} has {len(shards)} shard(s): too few to hold out '
                    f'{eval_shard_fraction:.0%} for evaluation and train on the rest. Name '
                    'an evaluation source in data.eval_dataset, or write more shards.')
        self.train_shards = shards[:len(shards) - held_out]
        self.eval_shards = shards[len(shards) - held_out:]
        if eval_dataset and not is_streaming(eval_dataset):
            raise DataError(f'data.eval_dataset={eval_dataset!r}: a streamed training set '
                            "evaluates on a streamed source, 'webdataset:<pattern>' or "
                            "'parquet:<pattern>' (or leave it '' to hold out shards).")
        if eval_dataset:
            self.eval_kind, eval_pattern = eval_dataset.split(':', 1)
            self.eval_shards = list_shards(eval_pattern)
        else:
            self.eval_kind = self.kind
        if split.split('[')[0] != 'train':  # every other split name is the evaluation set
            self.kind = self.eval_kind
        self.shards = self.train_shards if split.split('[')[0] == 'train' else self.eval_shards
        self._sizes: list[int] | None = None
        self._reset_access()

    def _reset_access(self) -> None:
        self._lock = threading.Lock()
        self._cursor: tuple[int, int, Iterator] | None = None  # (shard, next record, reader)
        self._recent: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ('_lock', '_cursor', '_recent')}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_access()

    RECENT = 256

    def with_filters(self, **changes) -> StreamingSource:
        """This source with some of its `Filters` changed (e.g. exclude_phrases)."""
        other = copy.copy(self)
        other.filters = dataclasses.replace(self.filters, **changes)
        other._reset_access()
        return other

    def __repr__(self) -> str:
        return f'StreamingSource({self.dataset!r}, {self.split!r}, {len(self.shards)} shards)'

    def usable_examples(self, host: int = 0, hosts: int = 1) -> Iterator[dict]:
        """The usable examples of this host's shards (`shards[host::hosts]`, disjoint across
        hosts) in name order, each once, with its `key`; records that the filters or decoding
        reject are skipped."""
        for path in self.shards[host::hosts]:
            for key, fields in read_records(self.kind, path):
                example = decode_pair(fields, self.filters)[0] if fields is not None else None
                if example is not None:
                    example['key'] = key
                    yield example

    def sizes(self) -> list[int]:
        if self._sizes is None:
            print(f'[data] counting the records of {len(self.shards)} {self.split} shards of '
                  f'{self.dataset}', file=sys.stderr, flush=True)
            self._sizes = [shard_size(self.kind, p) for p in self.shards]
        return self._sizes

    def __len__(self) -> int:
        return sum(self.sizes())

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f'record {index} of {n}')
        bounds = np.cumsum([0] + self.sizes())
        for _ in range(n):
            shard = int(np.searchsorted(bounds, index, side='right') - 1)
            record = index - int(bounds[shard])
            key, fields = self._raw(shard, record)
            example = decode_pair(fields, self.filters)[0] if fields is not None else None
            if example is not None:
                example['key'] = key
                return example
            index = (index + 1) % n
        raise DataError(f'No usable record in {self.dataset!r} {self.split} shards.')

    def _raw(self, shard: int, record: int) -> tuple[str | None, dict | None]:
        """One record, read forward from an open shard where possible. The last RECENT
        records stay at hand, so that readers in several threads (grain's) asking for
        neighbouring indices out of order do not reopen the shard."""
        with self._lock:
            if (shard, record) in self._recent:
                return self._recent[shard, record]
            cursor = self._cursor
            if cursor is None or cursor[0] != shard or cursor[1] > record:
                cursor = (shard, record, read_records(self.kind, self.shards[shard], record))
            _, position, reader = cursor
            while True:
                item = next(reader, (None, None))
                self._recent[shard, position] = item
                if len(self._recent) > self.RECENT:
                    self._recent.popitem(last=False)
                position += 1
                if position > record or item == (None, None):
                    break
            self._cursor = (shard, position, reader)
            return item


def eval_batches(source: StreamingSource, *, batch_size: int, host: int, hosts: int,
                 prepare: Callable[[dict], dict], batch_map: Callable[[dict], dict] | None,
                 num_examples: int | None) -> Iterator[dict]:
    """This host's evaluation batches: its held-out shards `[host::hosts]` in name order,
    the first `num_examples / hosts` usable examples (all if None). Every host yields the same
    number of batches (with one host, as many as it has examples; with several, from the
    record counts of every shard), each of exactly `batch_size` rows; padding rows carry
    `mask == 0`."""
    if num_examples:
        limit = -(-num_examples // hosts)
        num_batches = -(-limit // batch_size)
    elif hosts > 1:
        sizes = source.sizes()
        limit = None
        num_batches = -(-max(sum(sizes[h::hosts]) for h in range(hosts)) // batch_size)
    else:
        limit, num_batches = None, None

    stream = itertools.islice(map(prepare, source.usable_examples(host, hosts)), limit)
    produced, template = 0, None
    while num_batches is None or produced < num_batches:
        rows = list(itertools.islice(stream, batch_size))
        if not rows and num_batches is None:
            return
        if rows:
            template = rows[0]
        elif template is None:
            raise DataError(f'Host {host} has no usable evaluation example in '
                            f'{source.shards[host::hosts][:3]} to shape its padding batches; '
                            'give it more evaluation shards.')
        batch = {k: np.stack([r[k] for r in rows or [template]]) for k in template}
        batch['mask'] = np.ones(len(rows) or 1, np.float32) * bool(rows)
        pad = batch_size - len(batch['mask'])
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        produced += 1
        yield batch_map(batch) if batch_map is not None else batch
