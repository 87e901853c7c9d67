"""python -m pixelgen.memory --config configs/igpt.py:l --devices 64 [--config.mesh.fsdp=64]
       [--mesh data=1,fsdp=-1] [--sample_batch 16]

Memory per device of one training step of a config on a mesh of `--devices` devices, from
the shapes and the sharding rules (exact arithmetic, nothing is allocated or compiled):
parameters, gradients and optimizer state, each as sharded by `config.sharding_rules`, and
for Image GPT the activations the backward pass keeps (see `activation_bytes_per_device`).

Also what the jobs that load a trained model need (`pixelgen.load`: evaluate, sample, rerank,
dvae encode, init_from): `load`, the parameters alone per device on the mesh `pixelgen.load`
would use on `--devices` devices (`--mesh`, default config.mesh fitted to them), and for
Image GPT and DALL·E `sample`, those parameters plus the KV cache of `--sample_batch` rows
(`sample_bytes_per_device`).

With `--compile`, also compiles the train step for the devices JAX sees and prints XLA's
memory analysis per device: arguments (the state and batch), temporaries (activations and
workspace) and outputs not aliased to the donated arguments. Simulate a pod's device count
on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N. The CPU backend models
buffer reuse across a Python loop of layers poorly; with `model.scan_layers=True` (the
paper configs) its temporaries track the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import math
import types

from pixelgen import cli
from pixelgen.config import parse_config_args


def _sharded_bytes(tree, mesh, rules) -> float:
    """Bytes per device of a (abstract) tree of variables carrying logical axis names, each
    split as `rules` put it on `mesh` (anything with a `.shape` dict of axis sizes)."""
    import jax
    from flax import nnx

    from pixelgen import parallel

    def shard_bytes(spec, leaf) -> float:
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        mesh_spec = parallel.logical_to_mesh(names, leaf.shape, mesh, rules)
        split = 1
        for axes in mesh_spec:
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                split *= mesh.shape[a]
        return math.prod(leaf.shape) * leaf.dtype.itemsize / split

    sizes = jax.tree.map(shard_bytes, nnx.get_partition_spec(tree), tree,
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return float(sum(jax.tree.leaves(sizes)))


def state_bytes_per_device(config, num_devices: int) -> dict[str, float]:
    """Bytes per device of params / grads / optimizer state under config.mesh and rules."""
    import jax
    from flax import nnx

    from pixelgen import parallel, tasks
    from pixelgen.trainer import abstract_state, init_state, make_optimizer

    shape = parallel.mesh_shape(dict(config.mesh), num_devices)
    mesh = types.SimpleNamespace(shape=dict(zip(parallel.AXES, shape, strict=True)))
    build = tasks.model_builder(config)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    _, _, abstract = abstract_state(
        lambda: init_state(build(nnx.Rngs(0)), tx, config.seed))

    def total(tree) -> float:
        return _sharded_bytes(tree, mesh, config.sharding_rules)

    params = total(abstract['params'])
    return {'mesh': dict(mesh.shape), 'params_bytes': params, 'grads_bytes': params,
            'optimizer_bytes': total(abstract['opt_state']),
            'num_params': float(sum(math.prod(x.shape)
                                    for x in jax.tree.leaves(abstract['params'])))}


def load_mesh(config, num_devices: int, mesh: dict[str, int] | None = None) -> dict[str, int]:
    """The mesh `pixelgen.load(workdir, mesh=mesh)` uses on `num_devices` devices for a run of
    `config`: `mesh` as given, or config.mesh fitted to them (`parallel.fit_mesh`)."""
    from pixelgen import parallel

    if mesh is not None:
        return dict(zip(parallel.AXES, parallel.mesh_shape(dict(mesh), num_devices),
                        strict=True))
    return parallel.fit_mesh(dict(config.mesh), num_devices)[0]


def load_bytes_per_device(config, num_devices: int,
                          mesh: dict[str, int] | None = None) -> dict[str, float]:
    """Bytes per device of the parameters `pixelgen.load` restores (nothing else of the
    training state is read), on the mesh it uses (`load_mesh`), and in all."""
    import jax

    from pixelgen import pretrained

    sizes = load_mesh(config, num_devices, mesh)
    _, abstract, _ = pretrained.abstract_params(config)
    total = float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)))
    per_device = _sharded_bytes(abstract, types.SimpleNamespace(shape=sizes),
                                config.sharding_rules)
    return {'mesh': sizes, 'params_bytes': per_device, 'params_bytes_total': total}


def kv_cache_bytes(config, batch_size: int) -> dict[str, float] | None:
    """The KV cache that sampling `batch_size` rows of `config`'s model allocates (Image GPT
    with the autoregressive objective, DALL·E; None for other models): all layers' keys and
    values [batch, heads, positions, head_dim] in the compute dtype, at the full sequence
    length (and for small bias-free layers the fused q/k/v kernels the cache also holds)."""
    import jax
    from flax import nnx

    from pixelgen import tasks
    if config.task not in ('igpt', 'dalle'):
        return None
    if config.task == 'igpt':
        from pixelgen.tasks.igpt import objective
        if objective(config) != 'ar':
            return None
    build = tasks.model_builder(config)
    positions = nnx.eval_shape(lambda: build(nnx.Rngs(0))).seq_len
    cache = jax.eval_shape(lambda: build(nnx.Rngs(0)).init_cache(batch_size))
    return {'batch': float(batch_size), 'positions': float(positions),
            'kv_cache_bytes': float(sum(x.size * x.dtype.itemsize
                                        for x in jax.tree.leaves(cache)))}


def sample_bytes_per_device(config, num_devices: int, batch_size: int,
                            mesh: dict[str, int] | None = None) -> dict[str, float] | None:
    """Bytes per device of sampling `batch_size` rows from a loaded model: its parameters as
    `load_bytes_per_device` shards them, plus the whole KV cache (`kv_cache_bytes`) on every
    device: pixelgen.sampling pins no layout on its batch, and XLA keeps the cache whole
    (on 8 simulated devices with fsdp=8 the compiled loop's temporaries were 1.5x the whole
    cache). Logits and the token buffer are left out (rows x vocab floats, small beside it).
    None for models that do not sample (CLIP, the dVAE, BERT-objective iGPT)."""
    cache = kv_cache_bytes(config, batch_size)
    if cache is None:
        return None
    load = load_bytes_per_device(config, num_devices, mesh)
    return {**cache, 'params_bytes': load['params_bytes'],
            'total_bytes': load['params_bytes'] + cache['kv_cache_bytes']}


def layer_residual_bytes(config, rows: int, tensor_split: int,
                         policy: str = 'none') -> float:
    """Bytes per device that one transformer layer keeps for its backward pass under the
    remat `policy`: JAX's saved residuals of a Block on [rows, n, width] (parameters, constants
    and literals left out). Residuals shaped like the residual stream [rows, n, width] are
    replicated over the tensor axis; the others (attention, MLP hidden) are split by it."""
    import jax
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint prints

    from pixelgen.nn.masks import CAUSAL, FULL
    from pixelgen.nn.transformer import REMAT_POLICIES, Block
    from pixelgen.tasks import DTYPES
    from pixelgen.tasks.igpt import objective

    m = config.model
    n, dtype = config.data.image_size ** 2, DTYPES[m.dtype]
    block = nnx.eval_shape(lambda: Block(
        m.width, m.num_heads, mask=FULL if objective(config) == 'bert' else CAUSAL,
        num_layers=m.num_layers, mlp_ratio=m.mlp_ratio, dtype=dtype,
        attention_impl=m.attention, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(block)

    def layer(params, x):
        return nnx.merge(graphdef, params)(x)
    if REMAT_POLICIES[policy] is not None:
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[policy])
    stream = (rows, n, m.width)
    total = 0.0
    for aval, source in saved_residuals(layer, params, jax.ShapeDtypeStruct(stream, dtype)):
        if source.startswith(('from the argument params', 'from a constant', 'from a literal')):
            continue
        size = math.prod(aval.shape) * aval.dtype.itemsize
        total += size if tuple(aval.shape) == stream else size / tensor_split
    return total


def activation_bytes_per_device(config, num_devices: int) -> dict[str, float] | None:
    """Bytes per device of what one Image GPT training step keeps for its backward pass,
    from the shapes alone (None for other tasks). Per device and micro-batch, with

      B = batch_size / grad_accum_steps / (its split over the batch axes), n = image_size²,
      d = width, L = num_layers, V = palette_size, s = bytes of the compute dtype, /t = split
      over the tensor axis by config.sharding_rules ('heads' and 'mlp' alike, else 1),
      saved(p) = `layer_residual_bytes` under remat policy p: JAX's saved residuals of one
                 layer (what the backward reads; saved(full) = its input, B n d s),
      head     = B n (2 (V / t_vocab) 4 + d s): float32 logits and their gradient, ln_f(h_L),

    the activations are L saved(remat) + head, plus saved('none') when remat is not 'none'
    (the backward recomputes one layer at a time and holds that layer's internals). E.g.
    'full': L B n d s + saved('none') + head. Gradients are in `state_bytes_per_device`.
    JAX's residuals come before XLA's fusion, which may drop or add some buffers.
    """
    if config.task != 'igpt':
        return None
    from pixelgen import parallel

    m = config.model
    mesh = types.SimpleNamespace(shape=dict(zip(
        parallel.AXES, parallel.mesh_shape(dict(config.mesh), num_devices), strict=True)))

    def split(name: str, size: int) -> int:
        axes = parallel.logical_to_mesh((name,), (size,), mesh, config.sharding_rules)[0]
        return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str)
                                                 else axes or ()))

    rows = config.batch_size // config.grad_accum_steps
    b = rows // split('batch', rows)
    heads, hidden = split('heads', m.num_heads), split('mlp', m.mlp_ratio * m.width)
    t = heads if heads == hidden else 1
    layer = layer_residual_bytes(config, b, t)
    saved = layer if m.remat == 'none' else layer_residual_bytes(config, b, t, m.remat)
    n, s = config.data.image_size ** 2, jnp_itemsize(m.dtype)
    head = b * n * (2 * config.data.palette_size / split('vocab', config.data.palette_size)
                    * 4 + m.width * s)
    total = m.num_layers * saved + (layer if m.remat != 'none' else 0.0) + head
    return {'rows_per_device': float(b), 'saved_bytes_per_layer': saved,
            'layer_internals_bytes': layer, 'head_bytes': head, 'activation_bytes': total}


def jnp_itemsize(dtype_name: str) -> int:
    import jax.numpy as jnp

    from pixelgen.tasks import DTYPES
    return jnp.dtype(DTYPES[dtype_name]).itemsize


def lower_train_step(config):
    """The train step of `config` traced and lowered for the devices JAX sees, from shapes
    alone (an Image GPT batch of tokens): `.compile()` it for XLA's analyses."""
    import jax
    import numpy as np
    from flax import nnx

    from pixelgen import parallel, tasks
    from pixelgen.trainer import abstract_state, init_state, make_optimizer, make_train_step

    mesh = parallel.make_mesh(config.mesh)
    build = tasks.model_builder(config)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    graphdef, rest, abstract = abstract_state(
        lambda: init_state(build(nnx.Rngs(0)), tx, config.seed))
    rules = tuple(config.sharding_rules)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    task = tasks.make_loss_only(config)
    step = make_train_step(task, graphdef, rest, tx, schedule, config.grad_accum_steps,
                           config.concurrent_microbatches)
    tokens = jax.ShapeDtypeStruct((config.batch_size, config.data.image_size ** 2), np.int32,
                                  sharding=parallel.batch_sharding(mesh))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, shardings)
    with parallel.activation_sharding(mesh, rules):
        return jax.jit(step, out_shardings=(shardings, parallel.replicated(mesh)),
                       donate_argnums=0).lower(state, {'tokens': tokens})


def compiled_memory(config) -> dict[str, float]:
    """XLA's memory analysis per device of the compiled train step on the devices JAX sees."""
    analysis = lower_train_step(config).compile().memory_analysis()
    sizes = {k: float(getattr(analysis, k)) for k in (
        'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
        'alias_size_in_bytes')}
    # The new state is written over the donated old one: only unaliased outputs add memory.
    sizes['total_bytes'] = (sizes['argument_size_in_bytes'] + sizes['temp_size_in_bytes']
                            + sizes['output_size_in_bytes'] - sizes['alias_size_in_bytes'])
    return sizes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.memory', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--devices', type=int, default=None,
                        help='mesh size for the arithmetic (default: the devices JAX sees)')
    parser.add_argument('--compile', action='store_true',
                        help='also compile the train step and print XLA memory analysis')
    parser.add_argument('--sample_batch', type=int, default=16,
                        help='rows of the sampling figure (default 16, pixelgen.sample --num)')
    from pixelgen import pretrained
    pretrained.add_mesh_argument(parser)
    config, rest = parse_config_args(argv)
    args = parser.parse_args(rest)
    if args.sample_batch < 1:
        parser.error(f'--sample_batch must be at least 1, got {args.sample_batch}')
    import jax
    devices = args.devices or jax.device_count()
    try:
        load = load_bytes_per_device(config, devices, args.mesh)
    except ValueError as e:
        parser.error(f'--mesh on {devices} devices: {str(e).replace("config.mesh", "mesh")}')
    report = state_bytes_per_device(config, devices)
    report['devices'] = devices
    state = report['params_bytes'] + report['grads_bytes'] + report['optimizer_bytes']
    report['state_gib_per_device'] = state / 2**30
    activations = activation_bytes_per_device(config, devices)
    if activations is not None:
        report['activations'] = activations
        report['activations_gib_per_device'] = activations['activation_bytes'] / 2**30
        report['total_gib_per_device'] = (state + activations['activation_bytes']) / 2**30
    report['load'] = load
    report['load_gib_per_device'] = load['params_bytes'] / 2**30
    sample = sample_bytes_per_device(config, devices, args.sample_batch, args.mesh)
    if sample is not None:
        report['sample'] = sample
        report['sample_gib_per_device'] = sample['total_bytes'] / 2**30
    if args.compile:
        compiled = compiled_memory(config)
        report['compiled'] = compiled
        report['compiled_gib_per_device'] = {
            'arguments': compiled['argument_size_in_bytes'] / 2**30,
            'temporaries': compiled['temp_size_in_bytes'] / 2**30,
            'total': compiled['total_bytes'] / 2**30}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == '__main__':
    cli.run(main)
