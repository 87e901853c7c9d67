"""Devices: the mesh, logical axis rules, and how batches and state are placed on it.

The mesh has the axes ('data', 'fsdp', 'tensor'); `config.mesh` gives their sizes and -1
fills the rest. Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv',
'vocab', 'length'; see `nn/attention.logical_init`), and so do the major activations
('batch', 'length', 'embed', 'heads', 'mlp', 'vocab'; see `constrain`). The config's
`sharding_rules` map each logical name to mesh axes, maxtext style. Optimizer state carries
the same names as the parameters it mirrors, so it is sharded the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
Rules = Sequence[tuple[str, Any]]

# The default rules: batch over data and fsdp, weights' embed dim over fsdp (ZeRO-3 style),
# Megatron-style tensor parallelism over heads, mlp and vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
    ('vocab', 'tensor'), ('kv', None), ('length', None))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-host job. With no arguments JAX detects the cluster (TPU pod, SLURM...)."""
    if coordinator_address is None and (num_processes is not None or process_id is not None):
        raise ValueError('--num_processes/--process_id need --coordinator_address HOST:PORT.')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    print(f'[pixelgen] process {jax.process_index()} of {jax.process_count()}: '
          f'{jax.local_device_count()} local of {jax.device_count()} devices', flush=True)


def add_distributed_arguments(parser) -> None:
    """The multi-host flags every job takes (train, evaluate, sample, dvae, rerank)."""
    group = parser.add_argument_group('multi-host (see launch/)')
    group.add_argument('--distributed', action='store_true',
                       help='call jax.distributed.initialize() with cluster auto-detection '
                            '(TPU pods, SLURM); implied by --coordinator_address')
    group.add_argument('--coordinator_address', default=None, help='HOST:PORT of process 0')
    group.add_argument('--num_processes', type=int, default=None)
    group.add_argument('--process_id', type=int, default=None)


def initialize_from_args(args) -> None:
    """Joins the multi-host job that `args` (from add_distributed_arguments) name, if any."""
    if args.distributed or args.coordinator_address:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)


def host_range(n: int) -> tuple[int, int]:
    """This process's contiguous share [start, end) of n rows; the shares differ by at most
    one row, so none is longer than ceil(n / processes)."""
    host, hosts = jax.process_index(), jax.process_count()
    return n * host // hosts, n * (host + 1) // hosts


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Every process's `host_range(n)` rows of a result, concatenated in order: on every
    process, the [n, ...] array one process computes alone. `local` holds this process's
    rows, of a dtype JAX moves as it is (no 64-bit values). Every process must call it (it
    is a collective), with the same n."""
    hosts = jax.process_count()
    if hosts == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils
    longest = -(-n // hosts)
    local = np.asarray(local)
    padded = np.zeros((longest,) + local.shape[1:], local.dtype)
    padded[:len(local)] = local
    every = np.asarray(multihost_utils.process_allgather(padded))  # [hosts, longest, ...]
    return np.concatenate([every[h, :n * (h + 1) // hosts - n * h // hosts]
                           for h in range(hosts)])


def gather_varying(local: np.ndarray) -> np.ndarray:
    """Every process's rows concatenated in process order, where each may hold any number of
    them (local [k, ...], the same trailing shape and dtype everywhere). A collective."""
    hosts = jax.process_count()
    if hosts == 1:
        return np.asarray(local)
    local = np.asarray(local)
    counts = gather_rows(np.array([len(local)], np.int32), hosts)
    longest = max(int(counts.max()), 1)
    padded = np.zeros((longest,) + local.shape[1:], local.dtype)
    padded[:len(local)] = local
    every = gather_rows(padded, longest * hosts).reshape(hosts, longest, *local.shape[1:])
    return np.concatenate([every[h, :counts[h]] for h in range(hosts)])


def sum_across_hosts(values: dict[str, float]) -> dict[str, float]:
    """The sum of each value over every process (a collective: every process calls it with
    the same keys)."""
    if jax.process_count() == 1 or not values:
        return dict(values)
    from jax.experimental import multihost_utils
    keys = sorted(values)
    exact = np.array([values[k] for k in keys], np.float64)
    high = exact.astype(np.float32)  # JAX moves 32-bit values: send float64 as two parts
    low = (exact - high).astype(np.float32)
    every = np.asarray(multihost_utils.process_allgather(np.stack([high, low])), np.float64)
    return dict(zip(keys, every.sum(axis=(0, 1)).tolist(), strict=True))


def from_process_0(compute: Callable[[], Any]) -> Any:
    """`compute()` as process 0 finds it, on every process (a collective; the value must be
    JSON-serialisable, and lists come back as lists). Keeps the decisions of a multi-host job,
    such as which checkpoints to evaluate, the same on every process."""
    if jax.process_count() == 1:
        return compute()
    import json

    from jax.experimental import multihost_utils
    data = (np.frombuffer(json.dumps(compute()).encode(), np.uint8)
            if jax.process_index() == 0 else np.zeros(0, np.uint8))
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    padded = np.zeros(length, np.uint8)
    padded[:len(data)] = data
    data = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return json.loads(data.tobytes().decode())


def _filled_axis(sizes: dict[str, int]) -> list[str]:
    """The axes of `sizes` given as -1 (at most one); raises on unknown axes or several -1."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f'mesh {dict(sizes)} has unknown axes {sorted(unknown)}; the axes '
                         f'are {AXES}.')
    fill = [a for a in AXES if sizes.get(a, 1) == -1]
    if len(fill) > 1:
        raise ValueError(f'mesh {dict(sizes)} has -1 for {fill}; at most one axis may be -1.')
    return fill


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 in `sizes` so that the axis sizes multiply to `num_devices`."""
    unknown = _filled_axis(sizes)
    known = math.prod(sizes.get(a, 1) for a in AXES if a not in unknown)
    if unknown:
        if num_devices % known:
            raise ValueError(f'config.mesh {dict(sizes)} cannot fill {num_devices} devices: '
                             f'{num_devices} is not a multiple of {known}.')
        sizes = {**sizes, unknown[0]: num_devices // known}
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != num_devices:
        named = dict(zip(AXES, shape, strict=True))
        raise ValueError(f'config.mesh {named} needs {math.prod(shape)} devices but '
                         f'{num_devices} are available. Set one axis to -1.')
    return shape


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=-1' -> {'data': 1, 'fsdp': -1} (the --mesh of the jobs that load a model);
    ValueError naming the axes for bad syntax, an unknown axis, or a size that is neither
    positive nor -1."""
    example = 'e.g. --mesh data=1,fsdp=-1'
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(',')):
        name, sep, value = part.partition('=')
        name = name.strip()
        if not sep or not name:
            raise ValueError(f'--mesh {text!r}: expected AXIS=SIZE pairs separated by commas, '
                             f'{example}; the axes are {", ".join(AXES)}.')
        if name not in AXES:
            raise ValueError(f'--mesh {text!r}: unknown axis {name!r}; the axes are '
                             f'{", ".join(AXES)} ({example}).')
        if name in sizes:
            raise ValueError(f'--mesh {text!r} gives {name!r} twice.')
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and size != -1:
            raise ValueError(f'--mesh {text!r}: {name}={value.strip()!r} must be a positive '
                             f'integer or -1 (the devices left), {example}.')
        sizes[name] = size
    return sizes


def fit_mesh(sizes: dict[str, int], num_devices: int) -> tuple[dict[str, int], bool]:
    """`sizes` (a config.mesh, written for some other device count) fitted to `num_devices`:
    (axis sizes without -1 that multiply to num_devices, whether a fixed axis changed).

    Each fixed axis becomes the largest size that divides both its own size and the devices
    still free, tensor first, then fsdp, then data (the axes that split parameters keep the
    most): a saved fsdp=128 is fsdp=8 on 8 devices and 1 on one. A shrunk axis still divides
    every dimension the saved one divided, so what training sharded stays sharded. The -1
    axis (data where there is none) takes the devices left over."""
    fill = _filled_axis(sizes)
    fitted, left = {}, num_devices
    for axis in ('tensor', 'fsdp', 'data'):
        if sizes.get(axis, 1) != -1:
            fitted[axis] = math.gcd(sizes.get(axis, 1), left)
            left //= fitted[axis]
    rest = fill[0] if fill else 'data'
    fitted[rest] = fitted.get(rest, 1) * left
    changed = any(fitted[a] != sizes.get(a, 1) for a in AXES if a not in fill)
    return {a: fitted[a] for a in AXES}, changed


def undivided(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules: Rules) -> list[tuple[int, str, int]]:
    """The dimensions that `logical_to_mesh` leaves replicated only because their size does
    not divide by the mesh axes their rule names: [(dim, 'axis' or 'a×b', split)]."""
    table, used, out = dict(rules), set(), []
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if not axes:
            continue
        split = math.prod(mesh.shape[a] for a in axes)
        if size % split == 0:
            used.update(axes)
        else:
            out.append((dim, '×'.join(axes), split))
    return out


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(dict(sizes), len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_parallelism(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from every host's local rows (split on the leading axis)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on every host (a gather across hosts if needed)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> P:
    """Maps logical axis names to a PartitionSpec on `mesh`.

    A dimension stays replicated when its rule names no mesh axis, when those axes are
    already used by an earlier dimension, or when its size does not divide by them (e.g. 2
    heads on a 4-way tensor axis): always valid, never an error.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every leaf of a train state, from its variables' logical names."""
    specs = nnx.get_partition_spec(abstract_state)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, logical_to_mesh(
            tuple(spec) + (None,) * (len(leaf.shape) - len(spec)), leaf.shape, mesh, rules)),
        specs, abstract_state, is_leaf=is_spec)


_ACTIVATION_CONTEXT: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    _ACTIVATION_CONTEXT.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.pop()


def activation_context() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the innermost `activation_sharding`, or None outside one."""
    return _ACTIVATION_CONTEXT[-1] if _ACTIVATION_CONTEXT else None


def per_device_heads(attend: Callable[..., jax.Array], q: jax.Array, k: jax.Array,
                     v: jax.Array) -> jax.Array:
    """attend(q, k, v), q, k, v [batch, length, heads, head_dim], for an attention kernel XLA
    cannot partition (splash, the native CPU kernel): inside `activation_sharding` on a mesh
    of several devices, each device attends its own batch rows and heads (as the rules shard
    them) over the whole sequence, under `jax.shard_map`; elsewhere it is called as is."""
    context = activation_context()
    if context is None or context[0].size == 1:
        return attend(q, k, v)
    mesh, rules = context
    # Batch rows and heads are independent; a kernel needs every key of its rows.
    spec = logical_to_mesh(('batch', None, 'heads', None), q.shape, mesh, rules)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Annotates activation `x` with logical axis names (a no-op outside a mesh context)."""
    if not _ACTIVATION_CONTEXT:
        return x
    mesh, rules = _ACTIVATION_CONTEXT[-1]
    spec = logical_to_mesh(names, x.shape, mesh, rules)
    if all(axes is None for axes in spec):
        return x  # nothing to pin, and a constraint would still block XLA's fusions
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
