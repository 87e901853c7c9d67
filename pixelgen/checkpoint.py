"""Orbax checkpoints: the whole training state, the input pipeline position, and what it was.

A checkpoint at `<workdir>/checkpoints/<step>/` holds three items:
  state : params, optimizer state, step, base RNG key (an Orbax StandardSave pytree)
  data  : the grain iterator position of every host (so a resumed run sees the same batches)
  meta  : JSON: the task and model config that produced it, for a clear mismatch error
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
kill at any moment (even during an async save) leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from pixelgen.config import ConfigDict


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir does not fit the config; the message says what to do."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True
                 ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=('state', 'data', 'meta'))


# Config fields that change how a model computes, not what it stores: free to differ on restore.
_NOT_SHAPE = ('dtype', 'attention', 'remat')


def describe(config: ConfigDict) -> dict[str, Any]:
    """What must match for a checkpoint to be restored into a run of `config`."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in _NOT_SHAPE}
    data = {k: config.data[k] for k in ('image_size', 'palette_size') if k in config.data}
    return {'task': config.task, 'model': model, 'data': data}


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator, config) -> None:
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(describe(config))}
    if data_iterator is not None:
        args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**args), force=True)


def _diff(saved: dict, wanted: dict, prefix: str = '') -> list[str]:
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key, '<absent>'), wanted.get(key, '<absent>')
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _diff(a, b, f'{prefix}{key}.')
        elif a != b and not (isinstance(a, list | tuple) and list(a) == list(b or [])):
            lines.append(f'{prefix}{key}: checkpoint has {a!r}, config has {b!r}')
    return lines


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator,
            config) -> Any:
    """Restores `step` into the structure/shardings of `abstract_state` (and the iterator)."""
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    differences = _diff(meta, describe(config))
    if differences:
        raise CheckpointMismatchError(
            f'The checkpoint at {manager.directory}/{step} belongs to a different model:\n  '
            + '\n  '.join(differences)
            + '\nNothing was overwritten. Use a new --workdir, or restore the original config '
              'values (see config.json in that workdir).')
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError) as e:
        raise CheckpointMismatchError(
            f'Could not restore {manager.directory}/{step} into this model: {e}\n'
            'Nothing was overwritten. Use a new --workdir or the config that wrote it.') from e
    return restored['state']


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of a pytree of arrays, as Orbax restore targets."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
