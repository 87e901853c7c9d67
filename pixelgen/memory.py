"""python -m pixelgen.memory --config configs/igpt.py:l --devices 64 [--config.mesh.fsdp=64]

Memory per device of a config's training state on a mesh of `--devices` devices, from the
shapes and the sharding rules (exact arithmetic, nothing is allocated): parameters,
gradients and optimizer state, each as sharded by `config.sharding_rules`.

With `--compile`, also compiles the train step for the devices JAX sees and prints XLA's
memory analysis (arguments, outputs, temporaries: the activations). Simulate a pod's device
count on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import argparse
import json
import math
import types

from pixelgen import cli
from pixelgen.config import parse_config_args


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

    def shard_bytes(spec, leaf) -> float:
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        mesh_spec = parallel.logical_to_mesh(names, leaf.shape, mesh, config.sharding_rules)
        split = 1
        for axes in mesh_spec:
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                split *= mesh.shape[a]
        return math.prod(leaf.shape) * leaf.dtype.itemsize / split

    def total(tree) -> float:
        sizes = jax.tree.map(shard_bytes, nnx.get_partition_spec(tree), tree,
                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        return float(sum(jax.tree.leaves(sizes)))

    params = total(abstract['params'])
    return {'mesh': dict(mesh.shape), 'params_bytes': params, 'grads_bytes': params,
            'optimizer_bytes': total(abstract['opt_state']),
            'num_params': float(sum(math.prod(x.shape)
                                    for x in jax.tree.leaves(abstract['params'])))}


def compiled_memory(config) -> dict[str, float]:
    """XLA's memory analysis of the compiled train step on the devices JAX sees."""
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
    step = make_train_step(task, graphdef, rest, tx, schedule, config.grad_accum_steps)
    tokens = jax.ShapeDtypeStruct((config.batch_size, config.data.image_size ** 2), np.int32,
                                  sharding=parallel.batch_sharding(mesh))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, shardings)
    with parallel.activation_sharding(mesh, rules):
        compiled = jax.jit(step, out_shardings=(shardings, parallel.replicated(mesh)),
                           donate_argnums=0).lower(state, {'tokens': tokens}).compile()
    analysis = compiled.memory_analysis()
    return {k: float(getattr(analysis, k)) for k in (
        'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
        'alias_size_in_bytes') if hasattr(analysis, k)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.memory', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--devices', type=int, default=None,
                        help='mesh size for the arithmetic (default: the devices JAX sees)')
    parser.add_argument('--compile', action='store_true',
                        help='also compile the train step and print XLA memory analysis')
    config, rest = parse_config_args(argv)
    args = parser.parse_args(rest)
    import jax
    devices = args.devices or jax.device_count()
    report = state_bytes_per_device(config, devices)
    report['devices'] = devices
    report['state_gib_per_device'] = (report['params_bytes'] + report['grads_bytes']
                                      + report['optimizer_bytes']) / 2**30
    if args.compile:
        report['compiled'] = compiled_memory(config)
        report['compiled_gib_per_device'] = sum(
            v for k, v in report['compiled'].items() if k != 'alias_size_in_bytes') / 2**30
    print(json.dumps(report, indent=2))
    return 0


if __name__ == '__main__':
    cli.run(main)
