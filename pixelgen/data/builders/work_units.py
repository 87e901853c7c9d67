"""A local dataset build's heavy work, split into units run by N processes and saved per unit.

`run_units(work_dir, units, convert, num_workers)` calls `convert(*args)` for every unit (a
chunk of a folder's files, one shard) in `num_workers` worker processes (0: in this one) and
saves each unit's result (a picklable list) as `work_dir/<index>.pkl`, whole or absent. A
build that was killed finds the units it finished there and converts only the rest; a unit
list of another plan (other files, sizes or settings: `plan`) starts afresh. `unit_result`
then reads the results back one unit at a time, in unit order, so that the single-process
tfds writer after it never holds more than one unit in memory.

Workers are spawned, not forked (the parent has started JAX's threads), and import only the
module of `convert`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
from collections.abc import Callable, Sequence

from tqdm import tqdm

PLAN_FILE = 'plan.json'


def work_dir_of(builder) -> str:
    """Where a tfds builder's build keeps its units: beside its data, one folder per process
    of a multi-host job (the same process index after a restart, so each resumes its own),
    so that processes building the same dataset at once never share or delete each other's."""
    import jax
    return os.path.join(os.fspath(builder.data_dir_root), '.pixelgen-work', builder.name,
                        builder.builder_config.name, f'process_{jax.process_index()}')


def _unit_path(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, f'{index:06d}.pkl')


def _convert_and_save(job: tuple) -> int:
    """In a worker: converts one unit and saves its result atomically; returns its index."""
    convert, work_dir, index, args = job
    result = convert(*args)
    path = _unit_path(work_dir, index)
    with open(path + '.tmp', 'wb') as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + '.tmp', path)
    return index


def plan_digest(units: Sequence[tuple], settings: dict) -> str:
    """A hash of the units' arguments and the build's settings: a resumed build must be the
    same build."""
    return hashlib.sha1(json.dumps([list(map(repr, u)) for u in units] + [settings],
                                   sort_keys=True).encode()).hexdigest()


def run_units(work_dir: str, units: Sequence[tuple], convert: Callable[..., list], *,
              num_workers: int, plan: str, what: str) -> None:
    """Converts every unit of `units` (argument tuples of `convert`, a module-level function)
    not already saved in `work_dir` by a build of the same `plan`."""
    os.makedirs(work_dir, exist_ok=True)
    plan_path = os.path.join(work_dir, PLAN_FILE)
    previous = open(plan_path).read() if os.path.exists(plan_path) else None
    if previous != plan:
        for name in os.listdir(work_dir):  # another build's units: their results differ
            os.remove(os.path.join(work_dir, name))
        with open(plan_path, 'w') as f:
            f.write(plan)
    todo = [i for i in range(len(units)) if not os.path.exists(_unit_path(work_dir, i))]
    if len(todo) < len(units):
        print(f'[prepare] {what}: resuming; {len(units) - len(todo)} of {len(units)} units '
              'were converted before', flush=True)
    jobs = [(convert, work_dir, i, tuple(units[i])) for i in todo]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=f'[prepare] {what}',
               unit='unit', mininterval=5, disable=None)
    try:
        if num_workers <= 0 or len(jobs) <= 1:
            for job in jobs:
                _convert_and_save(job)
                bar.update()
        else:
            context = multiprocessing.get_context('spawn')
            with context.Pool(min(num_workers, len(jobs))) as pool:
                for _ in pool.imap_unordered(_convert_and_save, jobs):
                    bar.update()
    finally:
        bar.close()


def unit_result(work_dir: str, index: int) -> list:
    """The saved result of unit `index`."""
    with open(_unit_path(work_dir, index), 'rb') as f:
        return pickle.load(f)


def remove(work_dir: str) -> None:
    """Drops a finished build's saved units."""
    shutil.rmtree(work_dir, ignore_errors=True)
