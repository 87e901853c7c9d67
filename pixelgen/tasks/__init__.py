"""Tasks: what a training run learns. Each knows its data, model, loss, metrics and pictures."""

from __future__ import annotations

from pixelgen.config import ConfigError

TASKS = ('igpt',)


def model_builder(config):
    """`build(rngs) -> model` for `config`, without touching any data (used by pixelgen.load)."""
    if config.task == 'igpt':
        from pixelgen.tasks.igpt import build_model
        return lambda rngs: build_model(config, rngs)
    raise ConfigError(f'config.task={config.task!r} is not a task; expected one of {TASKS}.')


def make_loss_only(config):
    """The task's loss without its data (for compiling a step from shapes alone)."""
    if config.task == 'igpt':
        from pixelgen.tasks.igpt import ImageGPTLoss
        return ImageGPTLoss()
    raise ConfigError(f'config.task={config.task!r} is not a task; expected one of {TASKS}.')


def make(config, workdir: str):
    """The task object for `config.task`."""
    if config.task == 'igpt':
        from pixelgen.tasks.igpt import ImageGPTTask
        return ImageGPTTask(config, workdir)
    raise ConfigError(f'config.task={config.task!r} is not a task; expected one of {TASKS}.')
