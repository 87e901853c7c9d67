"""Tasks: what a training run learns. Each knows its data, model, loss, metrics and pictures.

A task is the module `pixelgen/tasks/<config.task>.py`. It provides:
  base_config() -> ConfigDict                     every key the task reads, with its meaning;
                                                  the shipped configs change values only
                                                  (shared keys: pixelgen/tasks/defaults.py)
  build_model(config, rngs) -> nnx.Module        the model, from the config alone
  make_loss(config) -> object with .loss(model, batch, rng, step) -> (loss, metrics)
                                                  the objective without any data
  Task(config, workdir)                           data, model, loss, metrics and pictures
                                                  for the generic trainer (see igpt.py)
  load_assets(config, workdir) -> dict            optional: what pixelgen.load returns beside
                                                  the model (a palette, a tokenizer, ...)
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import jax.numpy as jnp

from pixelgen.config import ConfigError

TASKS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != 'defaults'))
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_problems(m) -> list[str]:
    """What is wrong with the fields models share (dtype, attention, remat), where present."""
    from pixelgen.nn.attention import IMPLEMENTATIONS, cudnn_unavailable
    from pixelgen.nn.transformer import REMAT_POLICIES

    problems = []
    if m.dtype not in DTYPES:
        problems.append(f'model.dtype={m.dtype!r} must be one of {sorted(DTYPES)}')
    if 'attention' in m and m.attention not in IMPLEMENTATIONS:
        problems.append(f'model.attention={m.attention!r} must be one of {IMPLEMENTATIONS}')
    elif m.get('attention') == 'cudnn' and m.dtype in DTYPES:  # before any compile
        reason = cudnn_unavailable(DTYPES[m.dtype])
        if reason:
            problems.append(f"model.attention='cudnn' {reason}; use model.attention='auto' "
                            "(cuDNN where it applies) or 'block_sparse'")
    if 'remat' in m and m.remat not in REMAT_POLICIES:
        problems.append(f'model.remat={m.remat!r} must be one of {sorted(REMAT_POLICIES)}')
    return problems


def raise_problems(problems: list[str]) -> None:
    """One ConfigError (one line) listing every problem of a config, if it has any."""
    if problems:
        raise ConfigError(f'Invalid config: {"; ".join(problems)}. Fix '
                          f'{"it" if len(problems) == 1 else "them"} with '
                          '--config.<key>=<value>.')


def module(config_or_name) -> ModuleType:
    """The task module named by `config.task` (or by a name)."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.task
    if name not in TASKS:
        raise ConfigError(f'config.task={name!r} is not a task; expected one of {TASKS}.')
    return importlib.import_module(f'{__name__}.{name}')


def validate(config) -> None:
    """The task's own checks of a config (its `validate_config`), from the config alone: a
    job runs them before it writes anything."""
    check = getattr(module(config), 'validate_config', None)
    if check is not None:
        check(config)


def model_builder(config):
    """`build(rngs) -> model` for `config`, without touching any data (used by pixelgen.load)."""
    build = module(config).build_model
    return lambda rngs: build(config, rngs)


def make_loss_only(config):
    """The task's loss without its data (for compiling a step from shapes alone)."""
    return module(config).make_loss(config)


def make(config, workdir: str):
    """The task object for `config.task`."""
    return module(config).Task(config, workdir)


def load_assets(config, workdir: str) -> dict:
    """What the task keeps in a workdir beside the checkpoint (palette, tokenizer, ...)."""
    loader = getattr(module(config), 'load_assets', None)
    return loader(config, workdir) if loader else {}
