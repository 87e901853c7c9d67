"""`pixelgen.load(workdir)`: a trained model, its config and its task's assets.

Only the parameters are read, straight into their shards: each device reads the part of each
parameter that the mesh gives it, and the optimizer's moments (twice the parameters under
Adam) and the data position are never read, so a checkpoint without them (a converted
workdir, or one whose optimizer state was deleted) loads the same. No task keeps an EMA of
the weights: the parameters in the checkpoint are the ones the model runs with.

The mesh is the one the run was trained on, fitted to the devices here (`parallel.fit_mesh`:
a saved fsdp=128 is fsdp=8 on 8 devices, and one device on a laptop), or the `mesh` given.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
from flax import nnx

from pixelgen import checkpoint, parallel, storage, tasks
from pixelgen.config import ConfigDict, ConfigError, load_saved_config
from pixelgen.cpu import backend


@dataclasses.dataclass
class Loaded:
    model: nnx.Module
    config: ConfigDict
    step: int
    workdir: str = ''
    assets: dict = dataclasses.field(default_factory=dict)  # tasks.load_assets
    mesh: jax.sharding.Mesh | None = None  # the mesh the parameters are sharded over

    @property
    def palette(self) -> np.ndarray | None:
        """iGPT: the [k, 3] colour centres in [-1, 1]."""
        return self.assets.get('palette')


def load(workdir: str, step: int | None = None, *,
         mesh: dict[str, int] | None = None) -> Loaded:
    """Restores the parameters of `workdir`'s latest checkpoint (or `step`) into its model,
    sharded over `mesh` ({'data': 1, 'fsdp': -1}: axis sizes as in config.mesh, -1 for the
    devices left; default: the run's config.mesh fitted to the devices here, with one line
    saying so where an axis changed).

    Nothing else of the training state is read. An explicit `mesh` must fit the devices, and
    each of its axes must divide every parameter dimension that the config's sharding rules
    put on it (ConfigError naming the parameter otherwise); the default mesh instead leaves
    such a dimension whole, as training does.

    The mesh is made of this process's devices (`jax.local_devices()`): in a multi-host job
    every process holds the model on its own devices and computes its own rows (the eval job,
    sampling, reranking and `dvae encode` split their work with `parallel.host_range` and
    gather it with `parallel.gather_rows`), so a model to evaluate must fit one host.
    """
    config = load_saved_config(workdir)
    backend.configure(config.runtime)
    devices = jax.local_devices()
    if mesh is None:
        try:
            sizes, changed = parallel.fit_mesh(dict(config.mesh), len(devices))
        except ValueError as e:
            raise ConfigError(f'{workdir}/config.json: {e} Pass a mesh, e.g. --mesh '
                              'data=1,fsdp=-1.') from e
        if changed and jax.process_index() == 0:
            print(f'[pixelgen] {workdir} was trained on mesh {dict(config.mesh)}; loading onto '
                  f'{sizes} ({len(devices)} devices here)', flush=True)
    else:
        sizes = dict(mesh)
        try:
            parallel.mesh_shape(sizes, len(devices))
        except ValueError as e:
            reason = str(e).replace('config.mesh', 'The mesh').replace(' Set one axis to -1.', '')
            raise ConfigError(f'{reason} Pass axis sizes whose product is the {len(devices)} '
                              'devices here, or -1 on one axis for the devices left (e.g. '
                              '--mesh data=1,fsdp=-1).') from e
    return load_onto(workdir, step, parallel.make_mesh(sizes, devices),
                     strict=mesh is not None, config=config)


def load_onto(workdir: str, step: int | None, mesh: jax.sharding.Mesh, *,
              strict: bool = False, config: ConfigDict | None = None) -> Loaded:
    """`load` onto a given jax Mesh. With `strict`, a parameter dimension that its sharding
    rule puts on a mesh axis whose size does not divide it is a ConfigError (else it stays
    whole on every device, as in training). `config`: the workdir's, if already read."""
    config = load_saved_config(workdir) if config is None else config
    assets = tasks.load_assets(config, workdir)  # a missing or changed one: refused at once
    graphdef, abstract, rest = abstract_params(config)
    rules = tuple(config.sharding_rules)
    if strict:
        _check_divisible(abstract, mesh, rules)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    if not storage.is_dir(checkpoint.checkpoint_dir(workdir)):
        raise FileNotFoundError(f'{checkpoint.checkpoint_dir(workdir)} does not exist: '
                                f'{workdir} holds no checkpoint yet.')
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        available = sorted(manager.all_steps())
        if not available:
            raise FileNotFoundError(f'{checkpoint.checkpoint_dir(workdir)} holds no '
                                    'checkpoint yet.')
        step = available[-1] if step is None else step
        if step not in available:
            raise FileNotFoundError(f'No checkpoint for step {step} in {workdir}; available '
                                    f'steps: {available}. Pass one of them (or no step for '
                                    'the latest).')
        params = checkpoint.restore_params(manager, step, target, config)
    finally:
        manager.close()
    model = nnx.merge(graphdef, params, rest)
    return Loaded(model=model, config=config, step=step, workdir=workdir,
                  assets=assets, mesh=mesh)


def abstract_params(config: ConfigDict):
    """(graphdef, abstract parameters [an nnx.State of ShapeDtypeStructs], rest) of
    `config`'s model, from shapes alone."""
    build = tasks.model_builder(config)
    box = {}

    def split():
        graphdef, params, rest = nnx.split(build(nnx.Rngs(config.seed)), nnx.Param, ...)
        box['graphdef'] = graphdef
        return params, rest
    params, rest = jax.eval_shape(split)
    return box['graphdef'], params, rest


def _check_divisible(abstract: nnx.State, mesh, rules) -> None:
    specs = nnx.get_partition_spec(abstract)
    problems = []

    def check(path, spec, leaf):
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        for dim, axes, split in parallel.undivided(names, leaf.shape, mesh, rules):
            problems.append(('.'.join(checkpoint.path_names(path)[:-1]), leaf.shape, dim,
                             names[dim], axes, split))
    jax.tree_util.tree_map_with_path(
        check, specs, abstract, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    if problems:
        path, shape, dim, name, axes, split = problems[0]
        size = shape[dim]
        fits = [d for d in range(split, 0, -1) if size % d == 0][0]
        raise ConfigError(
            f'mesh {dict(mesh.shape)} does not divide {len(problems)} parameter dimension(s), '
            f'e.g. {path} {tuple(shape)}: dimension {dim} ({name!r}, {size}) would be split '
            f'{split} ways over {axes!r}. Pass a mesh whose {axes} size divides {size} (e.g. '
            f'{axes.split("×")[-1]}={fits}) with -1 on another axis, or no mesh to use the '
            "run's own.")


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """--mesh AXIS=SIZE,... for the jobs that load a model (pixelgen.parallel.parse_mesh)."""
    def mesh_type(text: str) -> dict[str, int]:
        try:
            return parallel.parse_mesh(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    parser.add_argument(
        '--mesh', type=mesh_type, default=None, metavar='AXIS=SIZE,...',
        help=f'the device mesh to load the parameters onto, axes {", ".join(parallel.AXES)}, '
             'e.g. data=1,fsdp=-1 (-1: the devices left; default: the run\'s config.mesh '
             'fitted to the devices here)')
