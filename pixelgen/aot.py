"""python -m pixelgen.aot --config CONFIG --topology TOPOLOGY [--json] [--config.k=v ...]

Compiles a config's train step, eval step and one KV-cache decoding step for a TPU slice
that is not here (ahead of time, like maxtext's train_compile.py): libtpu describes the
slice (`jax.experimental.topologies`), the config's mesh is laid over its devices as
training lays it over `jax.devices()`, every input is a `jax.ShapeDtypeStruct` with its
`NamedSharding` (the state's shapes from `jax.eval_shape` of the model's initialisation, the
batch from the task's batch layout), and each step is `jax.jit(...).lower(...).compile()`d
by XLA:TPU with the shardings the trainer pins. Nothing is allocated; no TPU is needed.

TOPOLOGY is libtpu's name of the chip grid: v5e:2x2 (a v5e-4, 4 chips), v5e:4x4, v6e:2x2,
v5p:2x2x1 (v5p-8: 4 chips), v5p:4x4x4 (v5p-128: 64 chips), v4:2x2x2 (v4-16: 8 chips). One
JAX device per chip (v4 and v5p in megacore mode, as JAX runs them).

It prints XLA's memory per device of each step (arguments, outputs, the part of the outputs
that reuses donated arguments, temporaries, generated code, total) against the chip's HBM,
and XLA's FLOPs per device; with --json one JSON object instead. It exits 1, naming the
shortfall and a fix, when a step does not fit; 2 on a config or command-line problem
(misspelled key, unknown topology, a mesh that does not divide the slice, no libtpu).

Needs libtpu: pip install -e '.[tpu]'. See docs/aot.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pixelgen.config import ConfigDict, ConfigError, parse_config_args, parse_job_args

GIB = 2 ** 30
STEPS = ('train', 'eval', 'decode')
INSTALL_HINT = "pip install -e '.[tpu]'"


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its name, HBM per JAX device, and libtpu's chip configuration."""
    name: str
    hbm_gib: float
    chip_config: str  # 'megacore': one JAX device per chip (two TensorCores), as JAX runs it


# HBM per chip, from the Cloud TPU system architecture pages (docs.cloud.google.com/tpu/docs/
# v4, v5e, v5p, v6e: 32 GiB, 16 GB, 95 GB, 32 GB; Google's GB here are GiB). XLA keeps a
# little for itself (it offers 15.75 of v5e's 16 GiB to a program).
CHIPS = {
    'v4': Chip('TPU v4', 32.0, 'megacore'),
    'v5e': Chip('TPU v5e', 16.0, 'default'),
    'v5p': Chip('TPU v5p', 95.0, 'megacore'),
    'v6e': Chip('TPU v6e', 32.0, 'default'),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v5': 'v5p', 'v6': 'v6e'}
EXAMPLES = 'v5e:2x2, v5e:4x4, v6e:2x2, v5p:2x2x1, v5p:4x4x4, v4:2x2x2'


# The slice ---------------------------------------------------------------------------------
def _prepare_environment() -> None:
    """Before JAX starts: run JAX itself on the CPU (the slice is only compiled for), let
    libtpu load beside other processes that hold it (compile-only: no chip is opened), and
    give libtpu the one worker it would otherwise look up in the TPU VM's metadata."""
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


def libtpu_version() -> str | None:
    """The installed libtpu's version (or the library that TPU_LIBRARY_PATH points JAX at
    instead of it), or None if there is none."""
    spec = importlib.util.find_spec('libtpu')
    override = os.environ.get('TPU_LIBRARY_PATH', '')
    if override and os.path.isfile(override) and (
            spec is None or not spec.origin or os.path.realpath(override) != os.path.realpath(
                os.path.join(os.path.dirname(spec.origin), 'libtpu.so'))):
        return override
    if spec is None:
        return None
    try:
        return importlib.metadata.version('libtpu')
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def require_libtpu() -> str:
    version = libtpu_version()
    if version is None:
        raise ConfigError('Compiling for TPU needs libtpu, which is not installed here. '
                          f'Install it with {INSTALL_HINT} (no TPU is needed).')
    return version


def parse_topology(name: str) -> tuple[str, Chip, str]:
    """'v5e:2x2' -> ('v5e', its Chip, '2x2'); a ConfigError for anything else."""
    match = re.fullmatch(r'([a-z0-9]+)[:=_]((?:\d+x)*\d+)', name.strip().lower())
    family = match and ALIASES.get(match.group(1), match.group(1))
    if match is None or family not in CHIPS:
        accelerator = re.fullmatch(r'(v\d[a-z]*)-(\d+)', name.strip().lower())
        hint = (' That is an accelerator type; give the chip grid instead (v4 and v5p types '
                'count TensorCores, two per chip: v5p-8 is v5p:2x2x1, v4-16 is v4:2x2x2; '
                'v5e-16 is v5e:4x4).') if accelerator else ''
        raise ConfigError(f'Unknown TPU topology {name!r}: expected GENERATION:SHAPE with '
                          f'GENERATION one of {sorted(CHIPS)}, e.g. {EXAMPLES}.{hint}')
    return family, CHIPS[family], match.group(2)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[list[str]]:
    """Holds back what native code writes to stderr (libtpu's warnings about the TPU VM it
    is not on); the caller gets the text, to show if something fails."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+b') as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors='replace'))


def topology_devices(name: str) -> tuple[str, Chip, list]:
    """('v5e:2x2', Chip, compile-only devices of that slice), or a ConfigError."""
    require_libtpu()
    family, chip, shape = parse_topology(name)
    from jax.experimental import topologies
    canonical = f'{family}:{shape}'
    with _quiet_stderr() as noise:
        try:
            devices = topologies.get_topology_desc(
                platform='tpu', topology_name=canonical,
                chip_config_name=chip.chip_config).devices
        except Exception as e:  # libtpu says why (an uneven grid, a shape it does not know)
            error = e
        else:
            error = None
    if error is not None:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if 'INVALID_ARGUMENT' not in message and noise and noise[0].strip():
            message += '\n' + noise[0].strip()
        raise ConfigError(f'libtpu cannot describe TPU topology {name!r}: {message}\n'
                          f'Examples of valid topologies: {EXAMPLES}.')
    return canonical, chip, list(devices)


def topology_mesh(config: ConfigDict, devices: Sequence, topology: str):
    """The config's mesh over the slice's devices, as `trainer.train` builds it."""
    from pixelgen import parallel
    try:
        return parallel.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(f'{e} (config.mesh; {topology} has {len(devices)} devices)') from e


# The steps' inputs -------------------------------------------------------------------------
def batch_layout(config: ConfigDict, rows: int, *, eval_batch: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of a global batch of `rows` examples as the task's input
    pipeline yields it (train), or its eval batches (with the real-row `mask`)."""
    import numpy as np
    task = config.task
    if task == 'igpt':
        layout = {'tokens': ((rows, config.data.image_size ** 2), np.int32),
                  'label': ((rows,), np.int32)}
    elif task == 'dalle':
        m = config.model
        layout = {'text': ((rows, m.text_len), np.int32),
                  'image': ((rows, m.grid_size ** 2), np.int32)}
        if not eval_batch:
            layout['truncated'] = ((rows,), np.float32)
    elif task == 'clip':
        side = config.data.image_size
        layout = {'image': ((rows, side, side, 3), np.uint8),
                  'tokens': ((rows, config.model.context_length), np.int32)}
    elif task == 'dvae':
        side = config.data.image_size
        layout = {'image': ((rows, side, side, 3), np.uint8), 'label': ((rows,), np.int32)}
    else:
        raise ConfigError(f'pixelgen.aot does not know the batch of task {task!r}.')
    if eval_batch:
        layout['mask'] = ((rows,), np.float32)
    return layout


def _abstract(layout: dict, sharding) -> dict:
    import jax
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in layout.items()}


def eval_task(config: ConfigDict):
    """The task's object with what its `eval_sums` reads (the loss settings and the config),
    without its data: `Task.__init__` opens the dataset, which compiling does not need."""
    from pixelgen import tasks
    module = tasks.module(config)
    loss = module.make_loss(config)
    task = object.__new__(module.Task)
    task.__dict__.update(vars(loss))
    task.config = config
    return task


def decode_batch_size(config: ConfigDict) -> int:
    """The rows the task samples at once during training (its `write_samples`)."""
    s = config.sampling
    if config.task == 'igpt':
        return int(s.num_images)
    if config.task == 'dalle':
        return int(s.num_captions * s.samples_per_caption)
    return 8


def cache_shardings(cache: Any, mesh, rules) -> Any:
    """Shardings of a KV cache: k and v [(layers,) batch, heads, length, head_dim] split as
    the rules split 'batch' and 'heads'; a fused qkv kernel [width, 3 · heads · head_dim] as
    its 'embed'."""
    import jax
    from jax.sharding import NamedSharding

    from pixelgen import parallel

    def one(path, leaf):
        key = getattr(path[-1], 'key', None)
        if key in ('k', 'v'):
            names = (None,) * (leaf.ndim - 4) + ('batch', 'heads', None, None)
        elif key == 'qkv':
            names = (None,) * (leaf.ndim - 2) + ('embed', None)
        else:
            names = (None,) * leaf.ndim
        return NamedSharding(mesh, parallel.logical_to_mesh(names, leaf.shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, cache)


@dataclasses.dataclass
class Step:
    """A function with its abstract arguments and the shardings the trainer pins."""
    name: str
    fn: Any
    args: tuple
    in_shardings: tuple
    out_shardings: Any
    donate_argnums: tuple[int, ...]
    describe: str  # what it computes, in words
    fix: str       # what to change when it does not fit


def build_steps(config: ConfigDict, mesh, steps: Sequence[str] = STEPS,
                decode_batch: int | None = None) -> tuple[list[Step], dict[str, str], int]:
    """The steps to compile on `mesh`, built from the trainer's own functions, the reasons
    for the steps left out (a BERT model does not decode, ...), and the parameter count."""
    import jax
    import numpy as np
    from flax import nnx

    from pixelgen import parallel, tasks
    from pixelgen.trainer import (
        abstract_state,
        init_state,
        make_eval_step,
        make_optimizer,
        make_train_step,
        validate_loop_config,
    )

    validate_loop_config(config)
    module = tasks.module(config)
    if hasattr(module, 'validate_config'):
        module.validate_config(config)
    rules = tuple(config.sharding_rules)
    dp = parallel.batch_parallelism(mesh)
    micro = config.grad_accum_steps * config.concurrent_microbatches
    if config.batch_size % (dp * micro):
        raise ConfigError(
            f'config.batch_size={config.batch_size} must divide by the data-parallel size {dp} '
            f'times grad_accum_steps={config.grad_accum_steps} times concurrent_microbatches='
            f'{config.concurrent_microbatches}. Change --config.batch_size, --config.mesh or '
            'those two.')

    build = tasks.model_builder(config)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    graphdef, rest, abstract = abstract_state(
        lambda: init_state(build(nnx.Rngs(config.seed)), tx, config.seed))
    state_sharding = parallel.state_shardings(abstract, mesh, rules)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, state_sharding)
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    remat = config.model.remat
    out: list[Step] = []
    skipped: dict[str, str] = {}

    if 'train' in steps:
        fixes = []
        if remat is not None and remat != 'full':
            fixes.append('set --config.model.remat=full')
        if config.batch_size // (dp * micro) > 1:
            fixes.append('raise --config.grad_accum_steps')
        train = make_train_step(tasks.make_loss_only(config), graphdef, rest, tx, schedule,
                                config.grad_accum_steps, config.concurrent_microbatches)
        out.append(Step(
            'train', train, (state, _abstract(batch_layout(config, config.batch_size),
                                              batch_sharding)),
            (state_sharding, batch_sharding), (state_sharding, replicated), (0,),
            f'one optimizer step on a batch of {config.batch_size}',
            ', '.join(fixes + ['or a larger topology'])))
    if 'eval' in steps:
        evaluate = make_eval_step(eval_task(config), graphdef, rest)
        batch = _abstract(batch_layout(config, config.batch_size, eval_batch=True),
                          batch_sharding)
        out.append(Step(
            'eval', evaluate, (state['params'], batch),
            (state_sharding['params'], batch_sharding), replicated, (),
            f'the eval sums of a batch of {config.batch_size}',
            'lower --config.batch_size (the eval batch) or use a larger topology'))
    if 'decode' in steps:
        rows = decode_batch or decode_batch_size(config)
        reason = _no_decoding(config)
        if reason:
            skipped['decode'] = reason
        else:
            cache = jax.eval_shape(  # small layers' caches hold their fused qkv kernel
                lambda params: nnx.merge(graphdef, params, rest).init_cache(rows),
                abstract['params'])
            cache_sharding = cache_shardings(cache, mesh, rules)
            token_sharding = jax.sharding.NamedSharding(
                mesh, parallel.logical_to_mesh(('batch',), (rows,), mesh, rules))
            logits_sharding = jax.sharding.NamedSharding(mesh, parallel.logical_to_mesh(
                ('batch', 'vocab'), (rows, _decode_vocab(config)), mesh, rules))

            def decode(params, tokens, position, cache):
                return nnx.merge(graphdef, params, rest).decode_step(tokens, position, cache)
            cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 cache, cache_sharding)
            out.append(Step(
                'decode', decode,
                (state['params'], jax.ShapeDtypeStruct((rows,), np.int32, sharding=token_sharding),
                 jax.ShapeDtypeStruct((), np.int32, sharding=replicated), cache),
                (state_sharding['params'], token_sharding, replicated, cache_sharding),
                (logits_sharding, cache_sharding), (3,),
                f'one token for {rows} sequences with the KV cache',
                'lower --decode_batch or use a larger topology'))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract['params']))
    return out, skipped, num_params


def _no_decoding(config: ConfigDict) -> str | None:
    if config.task == 'igpt' and config.objective != 'ar':
        return f"objective={config.objective!r}: only 'ar' models decode token by token"
    if config.task not in ('igpt', 'dalle'):
        return f'task {config.task!r} has no token-by-token decoding'
    return None


def _decode_vocab(config: ConfigDict) -> int:
    return config.data.palette_size if config.task == 'igpt' else config.model.image_vocab_size


# Compiling ---------------------------------------------------------------------------------
def _shard_bytes(abstract_tree: Any) -> int:
    """Bytes per device of a tree of abstract arrays (ShapeDtypeStructs, a Lowered's
    out_info) that carry their shardings."""
    import jax
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        sharding = getattr(leaf, 'sharding', None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


_OOM = re.compile(r'HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM '
                  r'\(([\d.]+)([KMGT]?)\)')
_OOM_USED = re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm')
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def _parse_oom(message: str) -> tuple[str, float, float] | None:
    """('temporaries' | 'total', needed bytes, available bytes) from XLA:TPU's
    out-of-memory error, or None if `message` is not one."""
    for kind, pattern in (('temporaries', _OOM), ('total', _OOM_USED)):
        match = pattern.search(message)
        if match:
            a, au, b, bu = match.groups()
            return kind, round(float(a) * _UNITS[au]), round(float(b) * _UNITS[bu])
    return None


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend has a cost model
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost['flops']) if cost and 'flops' in cost else None


def lower(step: Step, mesh, rules):
    """`jax.jit(step).lower(...)` under the activation sharding the trainer uses."""
    import jax

    from pixelgen import parallel
    with parallel.activation_sharding(mesh, rules):
        return jax.jit(step.fn, in_shardings=step.in_shardings,
                       out_shardings=step.out_shardings,
                       donate_argnums=step.donate_argnums).lower(*step.args)


def compile_step(step: Step, mesh, rules, hbm_bytes: float) -> dict:
    """XLA's memory analysis (bytes per device) and FLOPs per device of `step`, compiled for
    the mesh's devices; when XLA stops at an out-of-memory, what it reports."""
    import jax
    start = time.perf_counter()
    lowered = lower(step, mesh, rules)
    result: dict[str, Any] = {'describes': step.describe}
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = _parse_oom(str(e))
        if oom is None:
            raise
        kind, needed, available = oom
        arguments = _shard_bytes(step.args)
        outputs = _shard_bytes(lowered.out_info)
        aliased = min(_shard_bytes([step.args[i] for i in step.donate_argnums]), outputs)
        total = needed if kind == 'total' else arguments + needed + outputs - aliased
        result.update(
            compiled=False, fits=False, argument_bytes=arguments, output_bytes=outputs,
            alias_bytes=aliased, temp_bytes=needed if kind == 'temporaries' else None,
            generated_code_bytes=None, total_bytes=total, xla_available_bytes=available,
            xla_flops=None, xla_error=str(e).strip().splitlines()[0])
    else:
        memory = compiled.memory_analysis()
        sizes = {key: int(getattr(memory, attr, 0) or 0) for key, attr in (
            ('argument_bytes', 'argument_size_in_bytes'),
            ('output_bytes', 'output_size_in_bytes'),
            ('alias_bytes', 'alias_size_in_bytes'),
            ('temp_bytes', 'temp_size_in_bytes'),
            ('generated_code_bytes', 'generated_code_size_in_bytes'))}
        # The outputs that reuse donated arguments (alias) take no memory of their own.
        total = (sizes['argument_bytes'] + sizes['output_bytes'] - sizes['alias_bytes']
                 + sizes['temp_bytes'] + sizes['generated_code_bytes'])
        result.update(compiled=True, fits=total <= hbm_bytes, **sizes, total_bytes=total,
                      xla_flops=_flops(compiled))
    result['compile_seconds'] = round(time.perf_counter() - start, 2)
    return result


def arithmetic_estimate(config: ConfigDict, num_devices: int) -> dict[str, float]:
    """`python -m pixelgen.memory`'s figures for the train step (nothing compiled): state
    (parameters, gradients, Adam moments) per device, and for Image GPT the activations."""
    from pixelgen import memory
    state = memory.state_bytes_per_device(config, num_devices)
    out = {'state_bytes': state['params_bytes'] + state['grads_bytes']
           + state['optimizer_bytes']}
    activations = memory.activation_bytes_per_device(config, num_devices)
    if activations is not None:
        out['activation_bytes'] = activations['activation_bytes']
        out['total_bytes'] = out['state_bytes'] + activations['activation_bytes']
    return out


def model_flops_per_device(config: ConfigDict, num_devices: int) -> float | None:
    """The task's model FLOPs of one train step (what the trainer's MFU counts: matmuls and
    attention, 3 × forward, no rematerialisation) per device; None where the task has no
    count from the config alone."""
    task = eval_task(config)
    if config.task == 'igpt':
        task.seq_len = config.data.image_size ** 2
    elif config.task == 'dalle':
        task.seq_len = config.model.text_len + config.model.grid_size ** 2
    else:
        return None
    return task.model_flops_per_step(config.batch_size) / num_devices


def shortfall(name: str, step: dict, topology: str, chip: Chip, fix: str) -> str:
    """'train step needs 21.3 GiB per device, v5e has 16 GiB: set ... or a larger topology'."""
    at_least = '' if step['compiled'] else 'at least '
    return (f'{name} step needs {at_least}{step["total_bytes"] / GIB:.1f} GiB per device, '
            f'{topology.split(":")[0]} has {chip.hbm_gib:g} GiB: {fix}')


# The report --------------------------------------------------------------------------------
def analyse(config: ConfigDict, topology: str, steps: Sequence[str] = STEPS,
            decode_batch: int | None = None, log=None) -> dict:
    """Compiles `steps` of `config` for `topology`; the report as a JSON-ready dict."""
    import jax
    canonical, chip, devices = topology_devices(topology)
    mesh = topology_mesh(config, devices, canonical)
    rules = tuple(config.sharding_rules)
    hbm = chip.hbm_gib * GIB
    built, skipped, num_params = build_steps(config, mesh, steps, decode_batch)
    report: dict[str, Any] = {
        'num_params': num_params, 'arithmetic': arithmetic_estimate(config, len(devices)),
        'topology': canonical, 'chip': chip.name, 'devices': len(devices),
        'device_kind': devices[0].device_kind, 'hbm_bytes_per_device': hbm,
        'mesh': {k: int(v) for k, v in mesh.shape.items()},
        'jax': jax.__version__, 'libtpu': libtpu_version(), 'steps': {}, 'skipped': skipped,
        'shortfalls': []}
    for step in built:
        if log:
            log(f'[aot] compiling the {step.name} step ({step.describe}) for {canonical}...')
        result = compile_step(step, mesh, rules, hbm)
        jax.clear_caches()  # a big model's executable and lowering take GBs of host memory
        gc.collect()
        if step.name == 'train':
            result['model_flops'] = model_flops_per_device(config, len(devices))
        report['steps'][step.name] = result
        if log:
            log(f'[aot] {step.name} step: {"" if result["compiled"] else "at least "}'
                f'{result["total_bytes"] / GIB:.2f} GiB per device; '
                f'{result["compile_seconds"]:.1f} s')
        if not result['fits']:
            fix = step.fix
            if (mesh.shape['fsdp'] == 1 and mesh.size > 1
                    and result['argument_bytes'] > 0.25 * result['total_bytes']):
                fix = ('shard the state (--config.mesh.data=1 --config.mesh.fsdp=-1), '
                       + fix)
            report['shortfalls'].append(shortfall(step.name, result, canonical, chip, fix))
    report['fits'] = not report['shortfalls']
    return report


def format_report(report: dict, spec: str) -> str:
    """The human-readable table of `analyse`'s report."""
    hbm = report['hbm_bytes_per_device']
    steps = report['steps']
    big = max([s['total_bytes'] for s in steps.values()] + [0]) >= GIB
    unit, scale = ('GiB', GIB) if big else ('MiB', 2 ** 20)
    most = max([s['xla_flops'] or 0 for s in steps.values()] + [0])
    flop_unit, flop_scale = ('TFLOP', 1e12) if most >= 1e12 else ('GFLOP', 1e9)

    def size(value) -> str:
        return '-' if value is None else f'{value / scale:.2f}'

    mesh = ', '.join(f'{k}={v}' for k, v in report['mesh'].items())
    lines = [f'{spec} on {report["topology"]}: {report["devices"]} x {report["chip"]} '
             f'({hbm / GIB:g} GiB HBM each), mesh {mesh}; jax {report["jax"]}, libtpu '
             f'{report["libtpu"]}', '',
             f'{unit} per device   arguments  outputs  aliased  temporaries     code      total'
             f'  of HBM  XLA {flop_unit}/device']
    for name, s in steps.items():
        flops = '-' if s['xla_flops'] is None else f'{s["xla_flops"] / flop_scale:.3f}'
        total = ('>= ' if not s['compiled'] else '') + size(s['total_bytes'])
        lines.append(f'{name + " step":<16} {size(s["argument_bytes"]):>9} '
                     f'{size(s["output_bytes"]):>8} {size(s["alias_bytes"]):>8} '
                     f'{size(s["temp_bytes"]):>12} {size(s["generated_code_bytes"]):>8} '
                     f'{total:>10} {100 * s["total_bytes"] / hbm:>6.0f}%  {flops:>16}')
    lines.append('')
    for name, s in steps.items():
        lines.append(f'{name} step: {s["describes"]}; compiled in {s["compile_seconds"]:.1f} s'
                     + ('' if s['compiled'] else f' (XLA: {s["xla_error"]})'))
    for name, reason in report['skipped'].items():
        lines.append(f'{name} step: not compiled ({reason})')
    if steps.get('train', {}).get('model_flops'):
        lines.append(f'train step model FLOPs (what MFU counts): '
                     f'{steps["train"]["model_flops"] / flop_scale:.3f} {flop_unit} per device; '
                     'XLA counts '
                     'a loop body once (scan_layers: one layer) and counts rematerialisation')
    lines.append('total = arguments + outputs - aliased (outputs written over donated '
                 'arguments) + temporaries + code')
    return '\n'.join(lines)


def _config_spec(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
    return '?'


def load(config_path: str, overrides: dict | Sequence[str] = ()) -> ConfigDict:
    """A config as the command line would build it: `config_path` ('configs/x.py:variant')
    and overrides {'model.remat': 'full'} or ['model.remat=full']."""
    items = overrides.items() if isinstance(overrides, dict) else (
        o.split('=', 1) for o in overrides)
    config, rest = parse_config_args(
        ['--config', config_path] + [f'--config.{k}={v}' for k, v in items])
    assert not rest
    return config


def tpu_hlo_text(config_path: str, topology: str = 'v5e:2x2',
                 overrides: dict | Sequence[str] = (), *, step: str = 'train',
                 compiled: bool = False) -> str:
    """The StableHLO of `step` ('train', 'eval' or 'decode') of a config lowered for a TPU
    topology, with locations (so name scopes show), or with `compiled` the optimised HLO that
    XLA:TPU compiled from it. For checks that a TPU graph holds no CPU-only machinery, e.g.
    no `pixelgen_` custom call and no `optimization_barrier` (jax.checkpoint adds barriers of
    its own: check those with model.remat='none')."""
    _prepare_environment()
    config = load(config_path, overrides)
    canonical, _, devices = topology_devices(topology)
    mesh = topology_mesh(config, devices, canonical)
    built, skipped, _ = build_steps(config, mesh, (step,))
    if not built:
        raise ConfigError(f'No {step} step to lower: {skipped.get(step, "unknown step")}.')
    lowered = lower(built[0], mesh, tuple(config.sharding_rules))
    return lowered.compile().as_text() if compiled else lowered.as_text(debug_info=True)


def add_arguments(parser) -> None:
    parser.add_argument('--topology', required=True,
                        help=f'the TPU slice as GENERATION:SHAPE, e.g. {EXAMPLES}')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--steps', default=','.join(STEPS),
                        help='which steps to compile, comma-separated (default: all of '
                             f'{",".join(STEPS)})')
    parser.add_argument('--decode_batch', type=int, default=None,
                        help='sequences decoded at once (default: the batch the task samples '
                             'during training)')


def main(argv: list[str]) -> int:
    _prepare_environment()
    parsed = parse_job_args(argv, 'python -m pixelgen.aot', __doc__, add_arguments)
    if parsed is None:  # help was printed
        return 0
    config, args = parsed
    steps = tuple(s.strip() for s in args.steps.split(',') if s.strip())
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        raise ConfigError(f'--steps={args.steps}: expected some of {",".join(STEPS)}.')
    if args.decode_batch is not None and args.decode_batch < 1:
        raise ConfigError(f'--decode_batch={args.decode_batch} must be at least 1.')
    report = analyse(config, args.topology, steps, args.decode_batch,  # progress on stderr
                     log=lambda text: print(text, file=sys.stderr, flush=True))
    report['config'] = _config_spec(argv)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report, report['config']))
    for line in report['shortfalls']:
        print(f'error: {line}', file=sys.stderr)
    return 0 if report['fits'] else 1


if __name__ == '__main__':
    _prepare_environment()  # before pixelgen.cli imports JAX
    from pixelgen import cli
    cli.run(main)
