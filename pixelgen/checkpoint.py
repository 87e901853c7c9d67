"""Orbax checkpoints: the whole training state, the input pipeline position, and what it was.

A checkpoint at `<workdir>/checkpoints/<step>/` holds three items:
  state : params, optimizer state, step, base RNG key (an Orbax StandardSave pytree)
  data  : the grain iterator position of every host (so a resumed run sees the same batches)
  meta  : JSON: the task and model config that produced it, for a clear mismatch error, and
          a checksum of every saved array (`checksums`)
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
kill at any moment (even during an async save) leaves the previous checkpoint as the latest.

Disk problems stop a run with a message, never with a damaged latest checkpoint: the workdir
gets a probe write before training (`probe_workdir`), each save first checks that a checkpoint
fits on the disk, and a save that fails anyway (disk full, quota, I/O error) raises
CheckpointSaveError naming the intact checkpoint that a rerun resumes from.

Every restore is verified against the checksums saved with the checkpoint: each array's
checksum is computed over its logical content (its elements and their positions in the whole
array, not its shards or files), so it holds after a restore onto another mesh. A checkpoint
that fails is a CorruptCheckpointError, like an unreadable one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from typing import Any

import grain
import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pixelgen import storage
from pixelgen.config import ADDED_KEYS, ConfigDict


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir does not fit the config; the message says what to do."""


class CorruptCheckpointError(OSError):
    """A checkpoint's files are missing or unreadable."""


class WorkdirError(OSError):
    """The workdir cannot be written, or its disk has no room for a checkpoint."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the checkpoints before it are intact."""


# What Orbax writes last into a checkpoint on an object store (which has no atomic rename).
COMMIT_FILE = 'commit_success.txt'

# Each finished checkpoint gets `<step>/files.sha256.json`: the size of every file, and the
# SHA-256 of every file up to DIGEST_MAX_BYTES (metadata, the data position, tree nodes; on a
# small model every file). Larger files are array data, which the array checksums cover.
DIGEST_FILE = 'files.sha256.json'
DIGEST_MAX_BYTES = 16 << 20

# The key of the meta item that holds the arrays' checksums (absent in older checkpoints).
CHECKSUMS = 'checksums'

# Free space a save needs beyond the checkpoint itself (logs, samples, file-system overhead).
SPACE_MARGIN_BYTES = 16 << 20
SPACE_FACTOR = 1.2  # a checkpoint's files against its arrays' bytes (metadata, alignment)

# A failed save's leftovers must stay gone this long after removal before it counts as done.
REMOVE_SETTLE_SECONDS = 0.5
REMOVE_TIMEOUT_SECONDS = 30.0


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute (a URL such as gs://bucket/run already is)."""
    return storage.join(storage.absolute(workdir), 'checkpoints')


def probe_workdir(workdir: str) -> None:
    """Creates `workdir` and writes, syncs and removes a file there (an object, for a URL);
    WorkdirError if it fails."""
    probe = storage.join(workdir, f'.pixelgen_probe_{uuid.uuid4().hex}')
    if storage.is_remote(workdir):
        try:
            storage.write_bytes(probe, b'\0' * 4096)
            storage.remove(probe)
        except Exception as e:  # noqa: BLE001 - whatever the object store's client raised
            raise WorkdirError(
                f'The workdir {workdir} is not writable ({type(e).__name__}: {e}). Check that '
                'the bucket exists and that these credentials may write to it (gcloud auth '
                'application-default login), or pass another --workdir.') from e
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, 'wb') as f:
            f.write(b'\0' * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f'The workdir {workdir} is not writable ({e}). Pass a --workdir on '
                           'a disk you can write to, or fix its permissions.') from e


def checkpoint_bytes(state: Any) -> int:
    """Bytes of the arrays of a (possibly abstract) state: what one checkpoint stores."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def check_free_space(directory: str, state: Any) -> None:
    """WorkdirError unless `directory`'s disk has room for one more checkpoint of `state`
    (old checkpoints are deleted only after the new one is complete)."""
    if storage.is_remote(directory):  # object stores have no free-space figure
        return
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):  # the disk it will be on
        existing = os.path.dirname(existing)
    needed = int(SPACE_FACTOR * checkpoint_bytes(state)) + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise WorkdirError(
            f'The disk of {directory} is nearly full: {free / 2**20:.1f} MiB free, but a '
            f'checkpoint needs about {needed / 2**20:.1f} MiB. Free some space (older runs, '
            f'checkpoints_corrupt/) or pass a --workdir on another disk, then rerun.')


class Manager(ocp.CheckpointManager):
    """Orbax's CheckpointManager whose failed saves (raised at the save itself or later, from
    the background thread) become a CheckpointSaveError naming the intact checkpoint."""

    _saving: int | None = None  # the step whose save may still be in flight
    _unsigned: int | None = None  # the saved step whose files.sha256.json is still to write

    def save(self, step: int, *args, **kwargs) -> bool:
        self._raise_failed_save(self.wait_until_finished)  # a failure of the previous save
        self._saving = step
        saved = self._raise_failed_save(
            lambda: super(Manager, self).save(step, *args, **kwargs))
        self._unsigned = step
        return saved

    def wait_until_finished(self) -> None:
        """Waits for the save in flight, then writes its files.sha256.json."""
        self._raise_failed_save(super().wait_until_finished)
        step, self._unsigned = self._unsigned, None
        if step is not None and jax.process_index() == 0 and storage.is_dir(
                storage.join(str(self.directory), str(step))):  # finished: in its place
            write_digest(str(self.directory), step)

    def _raise_failed_save(self, action):
        try:
            return action()
        except CheckpointSaveError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the storage layer raised
            step, self._saving = self._saving, None
            if step is None:
                raise
            try:  # let what is left of a failed background save stop writing first
                super().wait_until_finished()
            except Exception:  # noqa: BLE001 - the failure is reported below
                pass
            if jax.process_index() == 0:  # give the space back
                _remove_unfinished(str(self.directory), step)
            self.reload()
            intact = sorted(self.all_steps())
            resume = (f'checkpoint {intact[-1]} is intact and a rerun resumes from it'
                      if intact else 'no earlier checkpoint exists, so a rerun starts afresh')
            raise CheckpointSaveError(
                f'Saving checkpoint {step} in {self.directory} failed ({type(e).__name__}: '
                f'{e}); {resume}. Free disk space or fix the storage, then rerun the same '
                'command.') from e


def _files(folder: str) -> dict[str, int]:
    """{path relative to `folder`: size} of every file under it."""
    if storage.is_remote(folder):
        return storage._remote_files(folder)
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, names in os.walk(folder) for f in names}


def _sha256(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def write_digest(directory: str, step: int) -> None:
    """Writes `<step>/files.sha256.json` into the finished checkpoint `step` (see
    DIGEST_FILE). A kill before it is written leaves a checkpoint that only its array
    checksums vouch for."""
    folder = storage.join(directory, str(step))
    sizes = {name: size for name, size in _files(folder).items() if name != DIGEST_FILE}
    digest = {'size': sizes, 'sha256': {
        name: _sha256(storage.join(folder, name))
        for name, size in sizes.items() if size <= DIGEST_MAX_BYTES}}
    storage.write_text(storage.join(folder, DIGEST_FILE), json.dumps(digest, sort_keys=True))


def check_digest(directory: str, step: int) -> None:
    """CorruptCheckpointError naming the first file of checkpoint `step` that is missing, or
    whose size or SHA-256 differs from its `files.sha256.json` (nothing to check where that
    file is absent: a checkpoint killed before it, or written before it existed)."""
    folder = storage.join(directory, str(step))
    where = f'{directory}/{step}'
    path = storage.join(folder, DIGEST_FILE)
    if not storage.exists(path):
        return
    try:
        digest = json.loads(storage.read_text(path))
        sizes, hashes = dict(digest['size']), dict(digest['sha256'])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f'Checkpoint {where} is damaged: its {DIGEST_FILE} is '
                                     f'unreadable ({e}).') from e
    found = _files(folder)
    for name, size in sorted(sizes.items()):
        if name not in found:
            raise CorruptCheckpointError(f'Checkpoint {where} is damaged: {name} is missing.')
        if found[name] != size:
            raise CorruptCheckpointError(f'Checkpoint {where} is damaged: {name} has '
                                         f'{found[name]} bytes, {size} were written.')
        if name in hashes and _sha256(storage.join(folder, name)) != hashes[name]:
            raise CorruptCheckpointError(f'Checkpoint {where} is damaged: the SHA-256 of '
                                         f'{name} differs from the one written.')


def _remove_unfinished(directory: str, step: int) -> None:
    """Removes what a failed save of `step` left: locally, Orbax's temporary folders; on an
    object store, where Orbax writes into `<step>/` and marks it complete with
    commit_success.txt last, that folder if it has no such mark."""
    if storage.is_remote(directory):
        folder = storage.join(directory, str(step))
        if not storage.exists(storage.join(folder, COMMIT_FILE)):
            storage.rmtree(folder)
        return
    # A failed background save can leave tensorstore writes in flight after Orbax's thread
    # has given up, and they may recreate files while the folder is removed: remove until
    # nothing has come back for REMOVE_SETTLE_SECONDS (or REMOVE_TIMEOUT_SECONDS pass).
    pattern = os.path.join(directory, f'{step}.*tmp*')
    deadline = time.monotonic() + REMOVE_TIMEOUT_SECONDS
    while True:
        for tmp in glob.glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(REMOVE_SETTLE_SECONDS)
        if not glob.glob(pattern) or time.monotonic() > deadline:
            return


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> Manager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return Manager(checkpoint_dir(workdir), options=options,
                   item_names=('state', 'data', 'meta'))


# Config fields that change how a model computes, not what it stores: free to differ on restore.
_NOT_SHAPE = ('dtype', 'attention', 'remat')


def describe(config: ConfigDict) -> dict[str, Any]:
    """What must match for a checkpoint to be restored into a run of `config`."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in _NOT_SHAPE}
    data = {k: config.data[k] for k in ('image_size', 'palette_size') if k in config.data}
    for added in ADDED_KEYS.values():  # model keys added later, at the value older runs had
        for dotted, old_value in added.get(config.task, {}).items():
            section, _, key = dotted.partition('.')
            if section == 'model' and model.get(key, old_value) == old_value:
                model.pop(key, None)
    signature = {'task': config.task, 'model': model, 'data': data}
    if config.task == 'igpt' and config.objective != 'ar':
        signature['objective'] = config.objective
    return signature


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[2] uint32: the sum of `x`'s elements as 32-bit words, and their sum weighted by an odd
    number derived from each element's index in the whole array (mod 2**32). A flipped bit
    changes an element's word by ±2**b, which no odd weight maps to 0 mod 2**32, so both sums
    change; the weights also catch moved elements. Integer sums are exact and associative, so
    the result does not depend on how the array is sharded."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = x.dtype.itemsize * 8
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif bits < 32:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{bits}')).astype(jnp.uint32)
    elif bits == 32:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:  # [..., bits // 32] words: each weighted by an odd factor
        parts = jax.lax.bitcast_convert_type(x, jnp.uint32)
        odd = jnp.arange(1, 2 * parts.shape[-1], 2, dtype=jnp.uint32)
        words = jnp.sum(parts * odd, axis=-1, dtype=jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)  # the element's index in the whole array,
    stride = 1                              # built per axis so that no axis is gathered
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= x.shape[axis]
    weights = index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * weights, dtype=jnp.uint32)])


def _checksum_name(path) -> str:
    """A leaf's key path as a name that the saved and restored trees share."""
    names = [n for n in path_names(path) if n != 'value']
    return '/'.join(names)


def checksums(tree: Any) -> dict[str, list[int]]:
    """{array path: [sum, weighted sum]} of every array of `tree` (see `_leaf_checksum`),
    computed where the arrays are and brought to every host."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [x for _, x in flat]
    out_sharding = None
    for x in leaves:
        if isinstance(getattr(x, 'sharding', None), jax.sharding.NamedSharding):
            out_sharding = jax.sharding.NamedSharding(x.sharding.mesh,
                                                      jax.sharding.PartitionSpec())
            break
    sums = jax.jit(lambda xs: [_leaf_checksum(x) for x in xs],
                   out_shardings=out_sharding)(leaves)
    return {_checksum_name(path): [int(v) for v in np.asarray(s.addressable_data(0))]
            for (path, _), s in zip(flat, sums, strict=True)}


def verify(saved: dict[str, list[int]] | None, tree: Any, where: str) -> None:
    """CorruptCheckpointError unless the arrays of `tree` (restored from `where`) have the
    checksums saved with it (`saved`: the checkpoint's; None for a checkpoint without
    them, which is not checked). Only the arrays of `tree` are compared: a partial restore
    checks what it read."""
    if saved is None:
        return
    restored = checksums(tree)
    bad = sorted(name for name, value in restored.items()
                 if name in saved and list(saved[name]) != value)
    missing = sorted(name for name in restored if name not in saved)
    if bad or missing:
        what = (f'{len(bad)} array(s) differ from their saved checksum ({", ".join(bad[:4])}'
                f'{", ..." if len(bad) > 4 else ""})' if bad else
                f'no saved checksum for {", ".join(missing[:4])}')
        raise CorruptCheckpointError(f'Checkpoint {where} is damaged: {what}.')


def save(manager: Manager, step: int, state: Any, data_iterator, config) -> None:
    manager.wait_until_finished()  # the previous save's space is then counted as used
    check_free_space(str(manager.directory), state)
    meta = {**describe(config), CHECKSUMS: checksums(state)}
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
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


def _check_meta(manager: ocp.CheckpointManager, step: int, config,
                fix: str) -> dict[str, list[int]] | None:
    """CheckpointMismatchError unless checkpoint `step` was written for `config`'s model.
    Returns the checkpoint's array checksums (None where it has none)."""
    where = f'{manager.directory}/{step}'
    check_digest(str(manager.directory), step)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta['meta']
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
        raise CorruptCheckpointError(f'Checkpoint {where} is unreadable ({e}).') from e
    saved_checksums = meta.pop(CHECKSUMS, None)
    differences = _diff(meta, describe(config))
    if differences:
        raise CheckpointMismatchError(
            f'The checkpoint at {where} belongs to a different model:\n  '
            + '\n  '.join(differences) + '\n' + fix)
    return saved_checksums


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator,
            config) -> Any:
    """Restores `step` into the structure/shardings of `abstract_state` (and the iterator)."""
    where = f'{manager.directory}/{step}'
    saved = _check_meta(manager, step, config,
                        'Nothing was overwritten. Use a new --workdir, or restore the original '
                        'config values (see config.json in that workdir).')
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - the model matched, so the files are damaged
        raise CorruptCheckpointError(f'Checkpoint {where} is unreadable ({e}).') from e
    verify(saved, restored['state'], where)
    return restored['state']


def restore_params(manager: ocp.CheckpointManager, step: int, target: Any, config) -> Any:
    """The `params` subtree of checkpoint `step`'s state (its `ema`, the parameters' moving
    average, where the run keeps one), restored into `target` (a pytree of
    jax.ShapeDtypeStruct with shardings, as the model's parameters): each device reads only
    its shards, and nothing else of the state (the optimizer's moments, the data position)
    is read; a checkpoint without them (a converted workdir) loads the same. Errors name
    what is missing and the fix."""
    where = f'{manager.directory}/{step}'
    try:
        return _restore_params(manager, step, target, config, where)
    except CorruptCheckpointError as e:
        others = [s for s in sorted(manager.all_steps(), reverse=True) if s != step]
        instead = (f'Load another step instead (--step {others[0]}, the newest other '
                   'checkpoint)' if others else 'No other checkpoint exists to load instead')
        raise CorruptCheckpointError(
            f'{e} Nothing was loaded. {instead}; a training run on this workdir moves the '
            'damaged checkpoint aside and resumes from the one before it.') from e


def _restore_params(manager: ocp.CheckpointManager, step: int, target: Any, config,
                    where: str) -> Any:
    saved_checksums = _check_meta(manager, step, config,
                                  'Its config.json does not describe it: restore the '
                                  'config.json the run wrote with this checkpoint.')
    saved = _saved_paths(storage.join(str(manager.directory), str(step), 'state'))
    if saved is not None and not any(path[:1] == ('params',) for path in saved):
        tops = sorted({path[0] for path in saved if path})
        raise CheckpointMismatchError(
            f'Checkpoint {where} holds no parameters (its state has {tops}, no "params"): it '
            'was not written by pixelgen.train or pixelgen.convert. Load another step, or '
            'convert the weights into a new workdir with python -m pixelgen.convert.')
    # The weights the model runs with: the moving average where the run keeps one.
    key = 'ema' if saved is not None and any(path[:1] == ('ema',) for path in saved) else 'params'
    flat = jax.tree_util.tree_flatten_with_path
    missing = ['.'.join(path_names(p)) for p, _ in flat(target)[0]
               if saved is not None and (key, *path_names(p)) not in saved]
    if missing:
        raise CheckpointMismatchError(
            f'Checkpoint {where} lacks {len(missing)} of the model\'s parameters '
            f'({", ".join(missing[:5])}{", ..." if len(missing) > 5 else ""}): its config.json '
            'does not describe it. Restore the config.json written with this checkpoint.')
    item = {key: target}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=args))
    except Exception as e:  # noqa: BLE001 - the model matched, so the files are damaged
        raise CorruptCheckpointError(f'Checkpoint {where} is unreadable ({e}).') from e
    params = restored['state'][key]
    if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
        raise CorruptCheckpointError(f'Checkpoint {where}: some parameters were not restored.')
    verify(saved_checksums, {key: params}, where)
    return params


def _saved_paths(state_dir: str) -> set[tuple[str, ...]] | None:
    """The key paths of the arrays in a saved state, from Orbax's `_METADATA` file alone (its
    tree metadata: no array is opened); None where that file is absent or unlike this one."""
    try:
        tree = json.loads(storage.read_text(storage.join(state_dir, '_METADATA')))
        return {tuple(str(k['key']) for k in entry['key_metadata'])
                for entry in tree['tree_metadata'].values()}
    except Exception:  # noqa: BLE001 - an older or newer layout: the restore itself checks
        return None


def path_names(path) -> tuple[str, ...]:
    """A key path as plain names: nnx's Variable `.value` and Orbax's ['value'] alike."""
    return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: Any, make_iterator,
                        config, restore_step: int | None = None) -> tuple[Any, Any, int | None]:
    """(state, data iterator, step) from the newest readable checkpoint, or `restore_step`.

    A damaged checkpoint is reported and moved aside to `<workdir>/checkpoints_corrupt/`
    (kept for inspection, never deleted), and the one before it is tried.
    With no checkpoint at all, returns (None, a fresh iterator, None).
    Before anything is restored or trained, checks that the disk has room for a checkpoint.
    """
    check_free_space(str(manager.directory), abstract_state)
    steps = sorted(manager.all_steps(), reverse=True)
    if restore_step is not None:
        if restore_step not in steps:
            raise FileNotFoundError(f'--restore_step {restore_step}: no such checkpoint in '
                                    f'{manager.directory}; available: {sorted(steps)}.')
        iterator = make_iterator()
        return restore(manager, restore_step, abstract_state, iterator, config), iterator, \
            restore_step
    for step in steps:
        iterator = make_iterator()  # a fresh one: a failed restore may leave it half-set
        try:
            return restore(manager, step, abstract_state, iterator, config), iterator, step
        except CorruptCheckpointError as e:
            aside = _move_aside(manager, step)
            print(f'[pixelgen] WARNING: {e} Moved it to {aside} and falling back to the '
                  'previous checkpoint.', flush=True)
    if steps:
        raise CorruptCheckpointError(f'No readable checkpoint in {manager.directory} '
                                     f'(tried steps {steps}). Move them away to start afresh.')
    return None, make_iterator(), None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged step out of the manager's directory, so training can save it anew."""
    source = storage.join(str(manager.directory), str(step))
    target = storage.join(storage.parent(str(manager.directory)), 'checkpoints_corrupt',
                          f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
        storage.move(source, target)
    jax.experimental.multihost_utils.sync_global_devices(f'pixelgen_move_aside_{step}')
    manager.reload()
    return target


def set_aside_later(manager: ocp.CheckpointManager, step: int, *, delete: bool = False
                    ) -> str | None:
    """Rewinding: the checkpoints after `step` (the one a run resumed from) are moved to
    `<workdir>/checkpoints_after_rewind/<step>-<time>/` (kept, never deleted), or deleted with
    `delete`, so that the run can save those steps anew. Returns the folder they went to."""
    later = sorted(s for s in manager.all_steps() if s > step)
    if not later:
        return None
    directory = str(manager.directory)
    target = storage.join(storage.parent(directory), 'checkpoints_after_rewind',
                          f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
        for s in later:
            source = storage.join(directory, str(s))
            if delete:
                storage.rmtree(source)
            else:
                storage.move(source, storage.join(target, str(s)))
        if delete:
            print(f'[pixelgen] rewound to step {step}: deleted the later checkpoints {later} '
                  '(--overwrite_later).', flush=True)
        else:
            print(f'[pixelgen] rewound to step {step}: moved the later checkpoints {later} to '
                  f'{target} (kept; pass --overwrite_later to delete them instead).',
                  flush=True)
    jax.experimental.multihost_utils.sync_global_devices(f'pixelgen_rewind_{step}')
    manager.reload()
    return None if delete else target


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of a pytree of arrays, as Orbax restore targets."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
