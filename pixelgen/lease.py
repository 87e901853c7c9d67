"""One trainer per workdir: a lease object `<workdir>/trainer.lock` that is created only if
absent.

Two trainers on one workdir would write the same checkpoint steps and interleave their
metrics. The lock is a small JSON object holding the holder's host, pid, start time and
heartbeat. It is created only where no object of that name exists: locally with
`O_CREAT | O_EXCL`, on gs:// with the precondition `ifGenerationMatch=0`, so of two trainers
starting together exactly one gets it. The holder rewrites the heartbeat every
`stale_minutes / 4` (at most every minute) from a background thread and removes the lock
when it ends.

A lock is stale, and is taken over with a message, when its holder is a process of this host
that no longer exists, or when its heartbeat is older than `stale_minutes` (a holder on
another host that died). A stale lock is taken over by removing exactly the object that was
judged stale (locally: checked and removed under an flock of `trainer.lock.takeover`, which
only takeovers take; on gs://: deleted with `ifGenerationMatch=<its generation>`), then
creating a new one as above, so two trainers taking over the same stale lock cannot both win
and a fresh lock is never removed.

Evaluation, sampling and other read-only jobs take no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import jax
import numpy as np

from pixelgen import storage
from pixelgen.checkpoint import WorkdirError

LOCK_FILE = 'trainer.lock'
STALE_MINUTES = 10.0


class WorkdirLockedError(WorkdirError):
    """Another live trainer holds the workdir; the message names it."""


def lock_path(workdir: str) -> str:
    return storage.join(workdir, LOCK_FILE)


def _describe(holder: dict) -> str:
    beat = time.time() - holder.get('heartbeat', 0)
    return (f'pid {holder.get("pid")} on host {holder.get("host")!r} (started '
            f'{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))}, '
            f'heartbeat {beat:.0f} s ago)')


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_reason(holder: dict, stale_minutes: float, now: float | None = None) -> str | None:
    """Why the lock of `holder` may be taken over, or None while its holder may be alive."""
    now = time.time() if now is None else now
    if holder.get('host') == socket.gethostname() and isinstance(holder.get('pid'), int) \
            and not _alive_here(holder['pid']):
        return f'its process {holder["pid"]} on this host has ended'
    age = now - float(holder.get('heartbeat', 0))
    if age > stale_minutes * 60:
        return (f'its heartbeat is {age / 60:.1f} minutes old (over --lock_stale_minutes='
                f'{stale_minutes:g})')
    return None


class Lease:
    """The lock on one workdir, held by this process until `release`."""

    def __init__(self, workdir: str, stale_minutes: float = STALE_MINUTES):
        self.path = lock_path(workdir)
        self.stale_minutes = stale_minutes
        self.token = uuid.uuid4().hex  # tells this holder's lock from a successor's
        self._generation = None  # gs://: the generation of the object this holder wrote
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> bytes:
        now = time.time()
        if not hasattr(self, '_started'):
            self._started = now
        return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'token': self.token,
                           'started': self._started, 'heartbeat': now}).encode()

    # The two stores: create-if-absent, read, remove-if-unchanged. ----------------------------

    def _create(self, data: bytes) -> bool:
        if storage.is_remote(self.path):
            fs, key = storage._fs(self.path)
            try:
                fs.pipe_file(key, data, mode='create')  # ifGenerationMatch=0
            except FileExistsError:
                return False
            self._generation = fs.info(key).get('generation')
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict, object] | None:
        """(holder, version) of the lock now, or None if there is none. A lock being written
        (empty or partial) reads as a holder with a heartbeat of now: never stale."""
        try:
            if storage.is_remote(self.path):
                fs, key = storage._fs(self.path)
                fs.invalidate_cache(key)
                version = fs.info(key).get('generation')
                text = fs.cat_file(key).decode()
            else:
                with open(self.path) as f:
                    text = f.read()
                version = text
        except FileNotFoundError:
            return None
        try:
            return json.loads(text), version
        except ValueError:
            return {'host': '?', 'pid': '?', 'heartbeat': time.time()}, version

    def _remove_if_unchanged(self, version) -> bool:
        """Removes the lock if it is still the one read as `version`; False if it changed."""
        if storage.is_remote(self.path):
            fs, key = storage._fs(self.path)
            bucket, name, _ = fs.split_path(key)
            try:
                fs.call('DELETE', 'b/{}/o/{}', bucket, name, ifGenerationMatch=version)
            except (FileExistsError, FileNotFoundError):  # 412: another generation by now
                return False
            return True
        import fcntl  # takeovers on this disk, one at a time: the check and the removal
        with open(f'{self.path}.takeover', 'a') as guard:  # are then one step
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                with open(self.path) as f:
                    if f.read() != version:
                        return False
                os.remove(self.path)
                return True
            except FileNotFoundError:
                return False
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    # Acquire, heartbeat, release. ---------------------------------------------------------

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one with a message; WorkdirLockedError if a
        live trainer holds it."""
        for _ in range(5):
            # Read first, then create only if absent: the precondition alone decides a race.
            found = self._read()
            if found is None:
                if self._create(self._record()):
                    self._start_heartbeat()
                    return
                continue  # another trainer created it meanwhile: judge that one
            holder, version = found
            reason = stale_reason(holder, self.stale_minutes)
            if reason is None:
                raise WorkdirLockedError(
                    f'Another trainer is using {storage.parent(self.path)}: {_describe(holder)}'
                    f' holds {self.path}. Wait for it to end or stop it, or pass another '
                    '--workdir. If that trainer is gone, its lock is taken over once its '
                    'heartbeat is older than --lock_stale_minutes '
                    f'({self.stale_minutes:g}); delete {self.path} to take over now.')
            if self._remove_if_unchanged(version):
                print(f'[pixelgen] took over the stale lock {self.path} of '
                      f'{_describe(holder)}: {reason}.', flush=True)
        raise WorkdirLockedError(f'Could not take the lock {self.path}: other trainers keep '
                                 'taking it. Check for trainers starting on this workdir.')

    def _start_heartbeat(self) -> None:
        interval = min(60.0, self.stale_minutes * 60 / 4)
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                        name='pixelgen-lock-heartbeat')
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            found = self._read()
            if found is None or found[0].get('token') != self.token:
                print(f'[pixelgen] WARNING: the workdir lock {self.path} is no longer this '
                      'trainer\'s (removed or taken over as stale); another trainer may be '
                      'writing here.', flush=True)
                return
            self._rewrite()

    def _rewrite(self) -> None:
        data = self._record()
        if storage.is_remote(self.path):
            fs, key = storage._fs(self.path)
            fs.pipe_file(key, data)
            return
        storage.write_bytes(self.path, data)  # atomic replace

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        found = self._read()
        if found is not None and found[0].get('token') == self.token:
            storage.remove(self.path)


def check_stale_minutes(stale_minutes: float) -> None:
    """ConfigError unless `stale_minutes` (--lock_stale_minutes) is positive."""
    if not stale_minutes > 0:
        from pixelgen.config import ConfigError
        raise ConfigError(f'--lock_stale_minutes={stale_minutes:g} must be positive (default '
                          f'{STALE_MINUTES:g}).')


@contextlib.contextmanager
def hold(workdir: str, stale_minutes: float = STALE_MINUTES) -> Iterator[Lease | None]:
    """The workdir's lock for the duration of the block: process 0 takes it for the whole
    job, and every process raises WorkdirLockedError if it could not."""
    check_stale_minutes(stale_minutes)
    lease, error = None, None
    if jax.process_index() == 0:
        lease = Lease(workdir, stale_minutes)
        try:
            lease.acquire()
        except WorkdirLockedError as e:
            lease, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirLockedError(f'Process 0 could not take the lock '
                                       f'{lock_path(workdir)}; its log says why.')
    if error is not None:
        raise error
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
