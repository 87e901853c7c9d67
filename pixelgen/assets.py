"""A workdir's assets: the files beside its checkpoints that give the model's tokens their
meaning (iGPT's `palette.npy`, the text tokenizers' `tokenizer.json`).

They are part of the checkpoints' contract. Each is written once, when a run first needs it
(or by `convert`), and its SHA-256 is recorded in `<workdir>/assets.json`. From then on every
reader (a resumed run, `pixelgen.load` and so every read-only job) checks it: an asset that
is missing while checkpoints exist, or whose digest changed, is refused with a UserError
naming the file. Nothing is refitted or retrained silently, since new token meanings under
old weights would train or sample garbage without any error. (Workdirs written before
assets.json existed have no digests: only a missing asset is detected there.)
"""

from __future__ import annotations

import hashlib
import json

from pixelgen import storage
from pixelgen.config import UserError

ASSETS_FILE = 'assets.json'
CHECKPOINTS = 'checkpoints'  # checkpoint.checkpoint_dir's folder name


class AssetError(UserError):
    """A workdir's asset is missing or changed; the message names the file and the fix."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recorded(workdir: str) -> dict[str, str]:
    """{asset file name: SHA-256} recorded in the workdir ({} where there is none)."""
    path = storage.join(workdir, ASSETS_FILE)
    if not storage.is_file(path):
        return {}
    try:
        table = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise AssetError(f'{path} is damaged ({e.msg}); restore it from a copy of the '
                         'workdir.') from e
    return table if isinstance(table, dict) else {}


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir holds a checkpoint (a step folder), without creating anything."""
    path = storage.join(workdir, CHECKPOINTS)
    return storage.is_dir(path) and any(n.isdigit() for n in storage.listdir(path))


def record(workdir: str, name: str) -> None:
    """Records the digest of the asset file `name` as it is now (call it on one process, right
    after writing the file)."""
    data = storage.read_bytes(storage.join(workdir, name))
    table = {**recorded(workdir), name: digest(data)}
    storage.write_text(storage.join(workdir, ASSETS_FILE),
                       json.dumps(table, indent=2, sort_keys=True))


def write(workdir: str, name: str, data: bytes) -> str:
    """Writes the asset `name` (whole or not at all) and records its digest; returns its
    path. Call it on one process only."""
    path = storage.write_bytes(storage.join(workdir, name), data)
    record(workdir, name)
    return path


def check(workdir: str, name: str, *, what: str, required: bool = True) -> bool:
    """Whether `workdir` has the asset `name`, intact: True if it matches its recorded digest
    (or none is recorded), False if it does not exist and nothing needs it (no digest, and no
    checkpoint, or `required` False); an AssetError naming the file otherwise.

    `what` says what the file is, for the message (e.g. 'the colour palette that the model's
    tokens index'). `required`: whether checkpoints imply the file (False where a workdir
    may lack it, e.g. a CLIP converted without its tokenizer, read for image features)."""
    path = storage.join(workdir, name)
    expected = recorded(workdir).get(name)
    if not storage.is_file(path):
        if expected is None and not (required and has_checkpoints(workdir)):
            return False
        raise AssetError(f'{path} is missing: it is {what}, and {workdir} holds checkpoints '
                         'trained with it. Restore the file from a copy of the workdir; it is '
                         'never rebuilt, since a new one would change what every token means. '
                         'To start afresh, train into a new --workdir.')
    if expected is not None:
        found = digest(storage.read_bytes(path))
        if found != expected:
            raise AssetError(
                f'{path} has changed since it was written (SHA-256 {found[:12]}..., recorded '
                f'{expected[:12]}... in {ASSETS_FILE}): it is {what}, and the checkpoints were '
                'trained with the original. Restore that file from a copy of the workdir, or '
                'train into a new --workdir.')
    return True


def read(workdir: str, name: str, *, what: str, required: bool = True) -> bytes | None:
    """The asset `name` of `workdir` after `check`; None when it does not exist and nothing
    needs it."""
    if not check(workdir, name, what=what, required=required):
        return None
    return storage.read_bytes(storage.join(workdir, name))
