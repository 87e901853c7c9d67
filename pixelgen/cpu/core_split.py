"""Decoding with a model's weights split between two cores: half the heads and half the MLP
units on each core's client, their partial sums combined after every attention and MLP.

Why: a decoding step of a small model streams every weight once. Image GPT's `igpt_sample`
model holds 24 MiB of them, more than a core's caches keep between steps, so each step reads
them from memory again, while 12 MiB stay cached (compare the two with `taskset -c 0 python
benchmarks/decode_floor.py --layers 8 4`). With half the weights on
each core, as tensor parallelism splits them, each core's half stays in its caches. The
price is two sums of the halves per layer. XLA's in-process collectives and Python callbacks
cost as much as that saves (`decode_floor.py --split tensor clients`), so the sum is a small
XLA FFI custom call (`pixelgen/cpu/native/pair_sum.cc`) through which the two clients meet in
shared memory, built the first time it is needed (`pixelgen.cpu.native`). Each party's matmuls
stream its half of the weights packed (`pixelgen.cpu.packed_matmul`).

Where it applies (`applies`): a CPU process with exactly two cores, the samplers' one-thread
core clients in use (`pixelgen.cpu.decode_clients`), and a model whose attention and MLP
weights split in two along their 'heads' and 'mlp' axes, with no biases after those sums
(Image GPT's and DALL·E's samplers). Both halves decode every row, combine bitwise-equal
sums, and so draw the same tokens; on more cores, or where the library cannot be built (a
warning says why), the rows are split instead.
PIXELGEN_CPU_DECODE=rows chooses the row split, =shared neither.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelgen.cpu import decode_clients, native

TARGET = native.PAIR_SUM
SPLIT_AXES = ('heads', 'mlp')  # logical axes whose halves go to the two cores
TIMEOUT_MS = 60_000  # how long a party waits for the other before the call fails
PARTIES = 2


def pair_sum(x: jax.Array, party: int) -> jax.Array:
    """x plus the other party's x, in the same order on both (so bitwise equal)."""
    total = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x.astype(jnp.float32), party=np.int64(party))
    return total.astype(x.dtype)


def _split_axis(spec: jax.sharding.PartitionSpec) -> int | None:
    axes = [i for i, name in enumerate(tuple(spec)) if name in SPLIT_AXES]
    return axes[0] if axes else None


def splits(state: nnx.State) -> bool:
    """Whether `state` splits into two halves this way: some 'heads' or 'mlp' axis, each of
    even size; no stacked 'layers' axis (scanned models) and no biases (both halves would add
    them)."""
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree_util.tree_leaves_with_path(nnx.get_partition_spec(state), is_leaf=is_spec)
    found = False
    for (path, spec), x in zip(specs, jax.tree.leaves(state), strict=True):
        if 'layers' in tuple(spec) or any(getattr(k, 'key', None) == 'bias' for k in path):
            return False
        axis = _split_axis(spec)
        if axis is not None:
            if x.shape[axis] % PARTIES:
                return False
            found = True
    return found


def half(state: nnx.State, party: int) -> nnx.State:
    """`party`'s half of every parameter along its 'heads' or 'mlp' axis; the rest whole."""
    def take(spec, x):
        axis = _split_axis(spec)
        if axis is None:
            return x
        size = x.shape[axis] // PARTIES
        return jax.lax.slice_in_dim(x, party * size, (party + 1) * size, axis=axis)
    return jax.tree.map(take, nnx.get_partition_spec(state), state,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def as_party(model: nnx.Module, party: int) -> Callable[[jax.Array], jax.Array]:
    """For tracing a sampler's loop inside its jitted function: `model` (merged from
    `half(state, party)`) is set to decode with its share of the heads (the KV cache is
    sized by num_heads), and the returned function, the step's `DecodeOps.combine`, sums each
    block's attention and MLP outputs with the other party's."""
    from pixelgen.nn.attention import MultiHeadAttention
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MultiHeadAttention):
            module.num_heads = module.query.kernel.shape[1]
    return functools.partial(pair_sum, party=party)


def applies(state: nnx.State) -> bool:
    """Whether `map_halves` decodes these parameters (see the module docstring)."""
    if decode_clients.mode() != 'cores' or len(decode_clients.core_devices()) != PARTIES:
        return False
    if len(decode_clients.decode_devices(state, PARTIES)) != PARTIES or not splits(state):
        return False
    return native.library() is not None


_lock = threading.Lock()  # the library's two parties serve one pair of loops at a time
_placed: dict[str, tuple] = {}  # the last parameters' halves on the core devices


def _halves_on(state: nnx.State, devices: Sequence[jax.Device]) -> list[nnx.State]:
    """`half(state, p)` on devices[p], reused while `state` holds the same arrays (they are
    immutable: a changed parameter is a new array): slicing and copying the weights took
    about a twentieth of a 256-token `igpt_sample` call. Holds one model's halves."""
    leaves = jax.tree.leaves(state)
    key = (tuple(map(id, leaves)), tuple(devices))
    entry = _placed.get('last')
    if entry and entry[0] == key and all(ref() is x for ref, x in zip(entry[1], leaves,
                                                                         strict=True)):
        return entry[2]
    halves = [jax.device_put(half(state, party), device)
              for party, device in enumerate(devices)]
    _placed['last'] = (key, [weakref.ref(x) for x in leaves], halves)
    return halves


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The two parties' threads, apart from cpu_decode's: neither may wait behind other work."""
    return concurrent.futures.ThreadPoolExecutor(PARTIES, thread_name_prefix='pixelgen-half')


def map_halves(run: Callable[..., jax.Array], state: nnx.State, shared: Sequence[Any],
               per_row: Sequence[Any], batch_size: int) -> jax.Array:
    """`run(half(state, p), *shared, *per_row, row_start=0, row_count=batch_size, party=p)` on
    core client p, for p = 0 and 1 at once; party 0's result, on the parameters' device.

    `run` is a functools.partial of a jitted function that merges its half of the parameters
    and traces its loop under `as_party(model, party)`, so that both parties compute the same
    rows (`applies` says where this is used)."""
    devices = decode_clients.core_devices()[:PARTIES]
    home = next(iter(jax.tree.leaves(state)[0].sharding.device_set))
    lib = native.library()
    calls = []
    for party, (device, params) in enumerate(zip(devices, _halves_on(state, devices),
                                                 strict=True)):
        args = (params, *jax.device_put((*shared, *(np.asarray(x) for x in per_row)), device))
        row_start = jax.device_put(np.int32(0), device)
        executable = decode_clients._executable(functools.partial(run, party=party, packed=True),
                                            device, args, batch_size)
        calls.append((executable, args, row_start))
    cores = sorted(os.sched_getaffinity(0))[:PARTIES]  # core_devices' cores, in order

    def call(party: int) -> np.ndarray:
        # Each party's thread on its own core: one that the scheduler moved next to the
        # other would make both wait at every sum.
        restore = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cores[party]})
        try:
            executable, args, row_start = calls[party]
            return np.asarray(executable(*args, row_start=row_start))
        finally:
            os.sched_setaffinity(0, restore)

    with _lock:
        lib.pixelgen_pair_sum_reset(TIMEOUT_MS)
        results = list(_pool().map(call, range(PARTIES)))
    return jax.device_put(results[0], home)
