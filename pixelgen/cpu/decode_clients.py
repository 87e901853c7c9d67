"""Token-by-token decoding on the CPU: a one-thread XLA client per core, the batch's rows split
between them.

Why: a decoding step of a small model is a hundred or so tiny ops (4-row matmuls, a softmax over
the KV cache). XLA:CPU hands each op to its intra-op thread pool, and on a machine with few
cores those hand-offs can cost more than the ops (compare `python -m pixelgen.bench
igpt_sample` under `taskset -c 0` and on every core).
JAX's CPU client sizes its pool by the CPU affinity of the thread that makes it, so a client
made while that thread is pinned to one core runs each op on the calling thread, with no
hand-offs. Rows of a sampled batch are independent, so one such client per core decodes its
share of the rows, all at once, and the two cores are used after all.

`map_rows` is how the samplers (`pixelgen.sampling.sample`, `pixelgen.sampling.generate`)
run: on the core clients where their parameters sit on one CPU device (not sharded over a mesh,
not traced inside another jit) and weigh at most MAX_PARAM_BYTES (larger models have ops big
enough for the shared pool); elsewhere, and on GPU and TPU, where the parameters are. On a
2-core CPU, the samplers split the weights between the two clients instead of the rows
(`pixelgen.cpu.core_split`). PIXELGEN_CPU_DECODE=rows keeps the row split, =shared turns
both off.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable

from pixelgen.cpu import native

ENV = 'PIXELGEN_CPU_DECODE'
CHOICES = ('cores', 'rows', 'shared')
MAX_CORES = 8  # one client (one copy of the parameters) per core, at most this many
MAX_PARAM_BYTES = 512 * 2 ** 20

Rows = tuple[int, int]  # [start, stop) of the batch


_setting = 'cores'  # config.runtime.cpu_decode, set by backend.configure


def mode() -> str:
    """'cores' (the default: decode on one-thread clients, one per core, with the weights split
    between two cores where `pixelgen.cpu.core_split` applies, else the rows), 'rows' (the rows
    split, always) or 'shared' (on the device the parameters are on, with its shared pool):
    $PIXELGEN_CPU_DECODE where it is set, else config.runtime.cpu_decode."""
    choice = os.environ.get(ENV) or _setting
    if choice not in CHOICES:
        given = f'{ENV}' if os.environ.get(ENV) else 'config.runtime.cpu_decode'
        raise ValueError(f'{given}={choice!r}; expected cores (the default: decode on a '
                         'one-thread CPU client per core), rows (split the rows between those '
                         'clients, never the weights) or shared (on the parameters\' own '
                         'device).')
    return choice


@functools.cache
def core_devices() -> tuple[jax.Device, ...]:
    """One device per core of this process's CPU affinity (at most MAX_CORES), each the only
    device of its own one-thread CPU client; () with fewer than 2 cores (the main client is then
    one-threaded already) or where such clients cannot be made."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS): decode on the main client
        return ()
    if len(cores) < 2:
        return ()
    return one_thread_devices(cores[:MAX_CORES])


def one_thread_devices(cores: list[int]) -> tuple[jax.Device, ...]:
    """The device of a new one-thread CPU client pinned to each of `cores` (repeats allowed);
    () where such clients cannot be made (a warning says why)."""
    from jaxlib import xla_client  # the constructor behind jax's own CPU backend

    restore = os.sched_getaffinity(0)
    devices = []
    try:
        for core in cores:
            os.sched_setaffinity(0, {core})  # this thread only; the client's pool inherits it
            devices.append(xla_client.make_cpu_client().devices()[0])
    except Exception as error:  # noqa: BLE001 (any failure: decode on the main client)
        logging.warning('pixelgen.cpu.decode_clients: could not make one-thread CPU clients (%s); '
                        'decoding on the main CPU client instead.', error)
        return ()
    finally:
        os.sched_setaffinity(0, restore)
    return tuple(devices)


def decode_devices(params: Any, batch_size: int) -> tuple[jax.Device, ...]:
    """The core devices `map_rows` splits a batch over for these parameters: () where it runs
    on the parameters' own device instead (see the module docstring)."""
    leaves = jax.tree.leaves(params)
    if mode() == 'shared' or not leaves or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return ()
    if not all(isinstance(x, jax.Array) for x in leaves):
        return ()
    device_sets = {frozenset(x.sharding.device_set) for x in leaves}
    if len(device_sets) != 1:
        return ()
    (device_set,) = device_sets
    if len(device_set) != 1 or next(iter(device_set)).platform != 'cpu':
        return ()
    if sum(x.nbytes for x in leaves) > MAX_PARAM_BYTES:
        return ()
    return core_devices()[:batch_size]


def split(batch_size: int, parts: int) -> list[Rows]:
    """`parts` contiguous row ranges covering [0, batch_size), sizes differing by at most 1."""
    bounds = np.linspace(0, batch_size, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def map_rows(run: Callable[..., jax.Array], params: Any, shared: Sequence[Any],
             per_row: Sequence[Any], batch_size: int, pack: bool = False) -> jax.Array:
    """`run(params, *shared, *per_row, row_start=0, row_count=batch_size)`, computed as row
    ranges on the core devices where that applies (`decode_devices`), concatenated on the
    parameters' device.

    Args:
      run: a jitted function, or a functools.partial of one, of (params, *shared, *per_row
        arrays [row_count, ...], row_start=int32 scalar, row_count=int static) ->
        [row_count, ...]: the rows [row_start, row_start + row_count) of the batch. Row r of
        its result must depend only on row r of `per_row`, on `params` and on `shared` (the
        samplers draw each row's noise as the whole batch does). The start is traced, so the
        ranges of one size share one executable (`_executable`).
      params: the model's parameters (they decide where it runs).
      shared: what every range reads as well, e.g. the rng key.
      per_row: arrays [batch_size, ...].
      batch_size: the number of rows.
      pack: `run` takes a static `packed`, set True on the core devices where the native
        library loads (the samplers' matmuls then stream packed weights,
        `pixelgen.cpu.packed_matmul`).
    """
    devices = decode_devices(params, batch_size)
    if not devices or any(isinstance(x, jax.core.Tracer)
                          for x in jax.tree.leaves((shared, per_row))):
        return run(params, *shared, *per_row, row_start=np.int32(0), row_count=batch_size)
    home = next(iter(jax.tree.leaves(params)[0].sharding.device_set))
    if pack and native.library() is not None:
        run = functools.partial(run, packed=True)

    calls = []
    for device, (start, stop) in zip(devices, split(batch_size, len(devices)), strict=True):
        local = [jax.device_put(np.asarray(x)[start:stop], device) for x in per_row]
        *common, row_start = jax.device_put((params, *shared, np.int32(start)), device)
        args = (*common, *local)
        calls.append((_executable(run, device, args, stop - start), args, row_start))

    def call(executable, args, row_start) -> np.ndarray:
        return np.asarray(executable(*args, row_start=row_start))

    if len(calls) == 1:
        parts = [call(*calls[0])]
    else:
        parts = list(_pool(len(calls)).map(lambda c: call(*c), calls))
    return jax.device_put(np.concatenate(parts), home)


# Executables compiled for the core devices, least recently used last out. A range's
# executable is compiled once, on the first core device that needs it, and loaded on the others
# from its serialized form: the clients are alike, and loading takes about 0.5 s where
# compiling a sampler takes several.
MAX_EXECUTABLES = 32
_executables: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
_executables_lock = threading.Lock()


def _executable(run: Callable[..., jax.Array], device: jax.Device, args: tuple,
                row_count: int) -> Callable[..., jax.Array]:
    """`run` at `args` (on `device`) and `row_count`, compiled: called with (*args,
    row_start=...). Where the executable cannot be serialized, it is compiled per device."""
    func, fixed, keywords = ((run.func, run.args, run.keywords)
                             if isinstance(run, functools.partial) else (run, (), {}))
    leaves, tree = jax.tree.flatten(args)
    key = (func, fixed, tuple(sorted(keywords.items())), row_count, tree,
           tuple((x.shape, str(x.dtype)) for x in leaves))
    with _executables_lock:
        entry = _executables.setdefault(key, {'devices': {}, 'serialized': None})
        _executables.move_to_end(key)
        while len(_executables) > MAX_EXECUTABLES:
            _executables.popitem(last=False)
        if device in entry['devices']:
            return entry['devices'][device]
        row_start = jax.device_put(np.int32(0), device)
        if entry['serialized'] is None:
            compiled = func.lower(*fixed, *args, **keywords, row_start=row_start,
                                  row_count=row_count).compile()
            try:
                entry['serialized'] = serialize_executable.serialize(compiled)
            except (ValueError, NotImplementedError) as error:
                logging.warning('pixelgen.cpu.decode_clients: the executable cannot be serialized '
                                '(%s); '
                                'compiling it on every core client.', error)
                entry['serialized'] = False
        elif entry['serialized']:
            compiled = serialize_executable.deserialize_and_load(
                *entry['serialized'], backend=device.client, execution_devices=[device])
        else:
            compiled = func.lower(*fixed, *args, **keywords, row_start=row_start,
                                  row_count=row_count).compile()
        entry['devices'][device] = compiled
        return compiled


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """Threads that call the core clients at once (each call releases the GIL while it runs)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='pixelgen-decode')
