"""Paths that are local folders or object-store URLs (`gs://bucket/run`, any `etils.epath` URL).

Every file that pixelgen reads or writes at a path a user gave (workdirs, data dirs, codes
datasets, PNGs, reports) goes through this module (arrays go through Orbax / tensorstore,
which take the same URLs). Local paths keep their local behaviour: writes go to a temporary
file that is renamed into place, so a crash never leaves half a file. An object store has no
rename, but an object appears only once its upload is complete, which gives the same
guarantee for a write of one whole object.

Two things stay local on purpose and live under the local cache (`cache_dir`,
$PIXELGEN_CACHE_DIR or ~/.cache/pixelgen): copies of remote datasets (array_record reads
local files only, google/array_record#120) with the lock files that guard them, and the
staging files of writers that append (TensorBoard events), which are copied up whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

CACHE_ENV = 'PIXELGEN_CACHE_DIR'


def _configure_fsspec() -> None:
    """gcsfs (and s3fs) cache directory listings for the life of a process, so a process
    would never see what another one wrote (new checkpoints, for `pixelgen.evaluate
    --watch`). Off, as on a local disk; set before the first such file system is made."""
    try:
        import fsspec.config
    except ImportError:  # local paths only
        return
    for protocol in ('gs', 'gcs', 's3', 's3a'):
        fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


_configure_fsspec()


def is_remote(path) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return '://' in os.fspath(path)


def join(base, *parts: str) -> str:
    """`base/part/...` as a string; URLs stay URLs."""
    if not is_remote(base):
        return os.path.join(os.fspath(base), *parts)
    return os.fspath(epath.Path(base).joinpath(*parts))


def parent(path) -> str:
    return os.fspath(epath.Path(path).parent) if is_remote(path) else os.path.dirname(
        os.path.abspath(path))


def absolute(path) -> str:
    """An absolute local path, or the URL unchanged (a URL is already absolute)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
    return epath.Path(path).exists()


def is_file(path) -> bool:
    p = epath.Path(path)
    return p.exists() and not p.is_dir()


def is_dir(path) -> bool:
    return epath.Path(path).is_dir()


def listdir(path) -> list[str]:
    """The names in folder `path` ([] if it does not exist)."""
    p = epath.Path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path) -> None:
    """Creates a local folder and its parents; nothing to do on an object store (folders
    there are prefixes that exist once an object does)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path) -> bytes:
    return epath.Path(path).read_bytes()


def read_text(path) -> str:
    return epath.Path(path).read_text()


def write_bytes(path, data: bytes) -> str:
    """Writes `data` to `path` whole or not at all (creating its folder); returns `path`."""
    path = os.fspath(path)
    if is_remote(path):
        epath.Path(path).write_bytes(data)  # an object appears only when complete
        return path
    os.makedirs(parent(path), exist_ok=True)
    tmp = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a crash never leaves half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path, text: str) -> str:
    return write_bytes(path, text.encode())


def remove(path, missing_ok: bool = True) -> None:
    epath.Path(path).unlink(missing_ok=missing_ok)


def rmtree(path) -> None:
    """Removes folder `path` and everything in it (nothing if it does not exist)."""
    p = epath.Path(path)
    if p.exists():
        p.rmtree(missing_ok=True)


def move(source, target) -> None:
    """Renames a file or folder. An object store has no rename: there every object is
    copied, then the source deleted (both in the same store)."""
    source, target = os.fspath(source), os.fspath(target)
    if not is_remote(source):
        os.makedirs(parent(target), exist_ok=True)
        os.replace(source, target)
        return
    fs, src = _fs(source)
    dst = _fs(target)[1].rstrip('/')
    files = sorted(_remote_files(source))
    if files:
        fs.copy([f'{src.rstrip("/")}/{n}' for n in files], [f'{dst}/{n}' for n in files])
    else:  # one object
        fs.copy(src, dst)
    fs.rm(src, recursive=True)


class Appender:
    """A text file that grows line by line (metrics.jsonl). Locally: appended and flushed.
    On an object store, which cannot append, the whole object is written again at each
    `append` (what it held before this writer opened it included), so it is complete after
    every call, as a flushed local file is."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if is_remote(self.path):
            self._file = None
            self._text = read_text(self.path) if exists(self.path) else ''
        else:
            os.makedirs(parent(self.path), exist_ok=True)
            self._file = open(self.path, 'a')  # noqa: SIM115 - closed by close()

    def append(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        else:
            self._text += text
            write_text(self.path, self._text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---- The local cache --------------------------------------------------------------------

def cache_root() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join('~', '.cache',
                                                                         'pixelgen'))


def cache_dir(kind: str, url: str) -> str:
    """This machine's cache folder for `url` (e.g. ~/.cache/pixelgen/data/<hash of url>)."""
    digest = hashlib.sha256(os.fspath(url).rstrip('/').encode()).hexdigest()[:16]
    return os.path.join(cache_root(), kind, digest)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock between the processes of this machine (a local lock file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fs(url: str):
    """(fsspec file system, path in it) of a URL. The tree copies below use fsspec, the layer
    that epath itself uses for gs:// and the other URLs, for its parallel transfers."""
    import fsspec
    return fsspec.core.url_to_fs(os.fspath(url))


def _remote_files(url: str) -> dict[str, int]:
    """{path relative to folder `url`: size} of every file under it, from one listing."""
    fs, root = _fs(url)
    root = root.rstrip('/')
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    return {name[len(root) + 1:]: int(info.get('size') or 0) for name, info in found.items()
            if info.get('type') != 'directory' and name.startswith(root + '/')}


def _local_files(folder: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


_reported: set[str] = set()  # the copies this process has already named in a log line


def local_copy(url: str, local_dir: str, *, what: str = 'files') -> str:
    """Makes the local folder `local_dir` a copy of the folder at `url` and returns it.

    The first call on a machine downloads every file, saying so in one line; later calls,
    in this process or later ones, reuse the copy (saying so once per process) while the
    remote files keep their names and sizes (one listing), else copy them again. The
    processes of a machine share its copy (under a lock file); every machine makes its own.
    `local_dir` is a folder in the cache (`cache_dir`).
    """
    files = _remote_files(url)
    if not files:
        raise FileNotFoundError(f'{url} holds no files; check the path (and your access to '
                                'it: gcloud auth application-default login).')
    local_dir = local_dir.rstrip('/')
    # The lock and the partial copy live apart from the copy, so a reader of the folder
    # that holds it (a tfds data dir) never sees them.
    digest = hashlib.sha256(local_dir.encode()).hexdigest()[:16]
    with _locked(os.path.join(cache_root(), 'locks', digest)):
        if os.path.isdir(local_dir) and _local_files(local_dir) == files:
            if local_dir not in _reported:
                print(f'[storage] reusing the local copy {local_dir} of {url}', flush=True)
        else:
            print(f'[storage] copying {what} {url} ({len(files)} files, '
                  f'{sum(files.values()) / 2**20:.1f} MiB) to the local cache {local_dir}, '
                  'as its reader reads local files only; later runs reuse it', flush=True)
            staging = os.path.join(cache_root(), 'tmp')
            for stale in glob.glob(os.path.join(staging, f'{digest}-*')):  # killed copies
                shutil.rmtree(stale, ignore_errors=True)
            tmp = os.path.join(staging, f'{digest}-{uuid.uuid4().hex[:8]}')
            names = sorted(files)
            for name in names:
                os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            fs, root = _fs(url)
            fs.get([f'{root.rstrip("/")}/{n}' for n in names],
                   [os.path.join(tmp, n) for n in names])
            shutil.rmtree(local_dir, ignore_errors=True)
            os.makedirs(os.path.dirname(local_dir), exist_ok=True)
            os.replace(tmp, local_dir)  # complete or absent: a killed copy leaves only tmp
    _reported.add(local_dir)
    return local_dir


def local_folder(url: str, kind: str, what: str = 'files') -> str:
    """`url` itself if it is a local folder, else its copy in this machine's cache
    (`local_copy` into `cache_dir(kind, url)`), for readers of local files only."""
    if not is_remote(url):
        return url
    return local_copy(url, cache_dir(kind, url), what=what)


@contextlib.contextmanager
def local_file(path) -> Iterator[str]:
    """A local path with the content of file `path`: `path` itself if local, else a
    temporary copy, removed on exit (for readers of local files only)."""
    path = os.fspath(path)
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix='pixelgen-') as tmp:
        local = os.path.join(tmp, os.path.basename(path.rstrip('/')))
        with open(local, 'wb') as f:
            f.write(read_bytes(path))
        yield local


def upload_file(local_path: str, url: str) -> None:
    """Copies the local file `local_path` to `url` (streamed; the object appears whole)."""
    fs, path = _fs(url)
    fs.put_file(local_path, path)


def upload_tree(local_dir: str, url: str, last: tuple[str, ...] = ()) -> None:
    """Copies every file under the local folder `local_dir` to the folder at `url`. The
    files named in `last` (paths relative to `local_dir`) go after all the others, so a
    reader that waits for them finds the rest complete."""
    names = sorted(os.path.relpath(os.path.join(d, f), local_dir)
                   for d, _, files in os.walk(local_dir) for f in files)
    fs, root = _fs(url)
    for batch in ([n for n in names if n not in last], [n for n in names if n in last]):
        if batch:
            fs.put([os.path.join(local_dir, n) for n in batch],
                   [f'{root.rstrip("/")}/{n}' for n in batch])


def png_bytes(image) -> bytes:
    """uint8 [H, W, 3] (or a PIL image) encoded as PNG."""
    from PIL import Image
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf,
                                                                               format='PNG')
    return buf.getvalue()
