"""Evaluators for the eval job (`python -m pixelgen.evaluate`), one module per task.

`pixelgen/evaluators/<task>.py` defines
  EVALUATORS: dict[str, Callable[[EvalContext], dict[str, float]]]
Each evaluator reads a saved checkpoint (never the training state), may write files
(PNGs, plots) under `ctx.out_dir`, and returns scalars for the JSON report and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from pixelgen.config import ConfigError


@dataclasses.dataclass
class EvalContext:
    loaded: object                   # pixelgen.pretrained.Loaded: model, config, step, assets
    out_dir: str                     # where this evaluation writes its files
    num_examples: int | None = None  # cap on evaluation examples (None: the whole split)
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # --option key=value


def evaluators(task: str) -> dict[str, Callable[[EvalContext], dict[str, float]]]:
    """{name: evaluator} for `task` ({} if the task has no evaluator module)."""
    try:
        mod = importlib.import_module(f'{__name__}.{task}')
    except ModuleNotFoundError as e:
        if e.name != f'{__name__}.{task}':
            raise
        return {}
    return mod.EVALUATORS


def get(task: str, names: list[str]) -> dict[str, Callable[[EvalContext], dict[str, float]]]:
    available = evaluators(task)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f'--eval {",".join(unknown)}: not an evaluator of task {task!r}; '
                          f'available: {sorted(available)}.')
    return {n: available[n] for n in names}
