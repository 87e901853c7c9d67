"""Importers of released weights: each turns another format into a pixelgen workdir.

A converter is a module of this package that defines
  NAME: str                                  the --from name, e.g. 'hf-clip'
  DESCRIPTION: str                           one line for --help
  convert(src: str, workdir: str) -> str     writes the workdir; returns a summary line
and writes its result with `save_workdir`, so that `pixelgen.load(workdir)` (and training
from it) work as for any trained run. `workdir` may be a URL (gs://...); `src` is a local
folder (the released formats' readers read local files; `python -m pixelgen.convert` copies
a gs:// --src to the local cache first).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from flax import nnx

from pixelgen import storage
from pixelgen.config import ConfigDict, ConfigError, save_config


def converters() -> dict[str, ModuleType]:
    """{--from name: converter module}, for every converter in this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith('_'):
            continue
        mod = importlib.import_module(f'{__name__}.{info.name}')
        found[mod.NAME] = mod
    return found


def get(name: str) -> ModuleType:
    available = converters()
    if name not in available:
        raise ConfigError(f'--from {name!r} is not a known format; expected one of '
                          f'{sorted(available)}.')
    return available[name]


def refuse_used_workdir(workdir: str) -> None:
    """A ConfigError if `workdir` already holds checkpoints: converting never overwrites
    training. Checked before anything is read or converted, and again before writing."""
    from pixelgen import checkpoint

    folder = checkpoint.checkpoint_dir(workdir)
    steps = sorted(int(n) for n in storage.listdir(folder) if n.isdigit()) if storage.is_dir(
        folder) else []
    if steps:
        raise ConfigError(f'{workdir} already holds checkpoints {steps}; convert into a new '
                          '--workdir.')


def save_workdir(config: ConfigDict, model: nnx.Module, workdir: str) -> str:
    """Writes `model` as step 0 of a new workdir for `config` (with a fresh optimizer state);
    refuses a workdir that already holds checkpoints."""
    from pixelgen import checkpoint
    from pixelgen.trainer import init_state, make_optimizer

    refuse_used_workdir(workdir)
    manager = checkpoint.make_manager(workdir, async_save=False)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    _, _, state = init_state(model, tx, config.seed)
    checkpoint.save(manager, 0, state, None, config)
    manager.wait_until_finished()
    manager.close()
    save_config(config, workdir)
    return storage.join(checkpoint.checkpoint_dir(workdir), '0')
