"""`pixelgen.load(workdir)`: a trained model, its config and its task's assets."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from pixelgen import checkpoint, parallel, tasks
from pixelgen.config import ConfigDict, load_saved_config
from pixelgen.trainer import abstract_state, init_state, make_optimizer


@dataclasses.dataclass
class Loaded:
    model: nnx.Module
    config: ConfigDict
    step: int
    workdir: str = ''
    assets: dict = dataclasses.field(default_factory=dict)  # tasks.load_assets

    @property
    def palette(self) -> np.ndarray | None:
        """iGPT: the [k, 3] colour centres in [-1, 1]."""
        return self.assets.get('palette')


def load(workdir: str, step: int | None = None) -> Loaded:
    """Restores the parameters of `workdir`'s latest checkpoint (or `step`) into its model.

    The training state (optimizer, data position) is read but not kept or changed.
    """
    config = load_saved_config(workdir)
    build = tasks.model_builder(config)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)

    def fresh():
        return init_state(build(nnx.Rngs(config.seed)), tx, config.seed)

    graphdef, rest, abstract = abstract_state(fresh)
    # Restore onto this machine's devices, whatever mesh wrote the checkpoint.
    mesh = parallel.make_mesh({'data': -1})
    shardings = parallel.state_shardings(abstract, mesh, tuple(config.sharding_rules))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    manager = checkpoint.make_manager(workdir, async_save=False)
    available = manager.all_steps()
    if not available:
        raise FileNotFoundError(f'{checkpoint.checkpoint_dir(workdir)} holds no checkpoint yet.')
    step = available[-1] if step is None else step
    if step not in available:
        raise FileNotFoundError(f'No checkpoint for step {step} in {workdir}; '
                                f'available steps: {available}.')
    state = checkpoint.restore(manager, step, abstract, None, config)
    manager.close()
    model = nnx.merge(graphdef, state['params'], rest)
    return Loaded(model=model, config=config, step=step, workdir=workdir,
                  assets=tasks.load_assets(config, workdir))
