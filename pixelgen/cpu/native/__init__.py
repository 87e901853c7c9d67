"""The project's native CPU kernels, built from the C++ sources beside this file on first use.

XLA FFI custom calls for decoding on the one-thread CPU core clients
(`pixelgen.cpu.decode_clients`):
- `pair_sum.cc` (PAIR_SUM): the sum of two clients' halves of a layer's output
  (`pixelgen.cpu.core_split`);
- `packed_matmul.cc` (PACKED_MATMUL): a decoding step's few rows times a weight matrix packed
  panel by panel (`pixelgen.cpu.packed_matmul`);
and for training and scoring:
- `block_attention.cc` (BLOCK_ATTENTION_FORWARD, _BACKWARD): block-sparse attention fused into
  one kernel per direction (`pixelgen.cpu.native_attention`).

They are one library, compiled with the C++ compiler (`CXX`, default g++; about 10 s) against
the headers jaxlib ships, for this CPU (-march=native where the compiler has it), and kept in
PIXELGEN_NATIVE_DIR (default ~/.cache/pixelgen/native) under a name that hashes the sources,
the jaxlib version and the CPU's flags. Where it cannot be built or loaded, `library()` is None
with a warning, and decoding and attention run on XLA's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile

import jax

SOURCES = tuple(os.path.join(os.path.dirname(__file__), name)
                for name in ('pair_sum.cc', 'packed_matmul.cc', 'block_attention.cc'))
HEADERS = (os.path.join(os.path.dirname(__file__), 'vectors.h'),)
PAIR_SUM = 'pixelgen_pair_sum'
PACKED_MATMUL = 'pixelgen_packed_matmul'
BLOCK_ATTENTION_FORWARD = 'pixelgen_block_attention_forward'
BLOCK_ATTENTION_BACKWARD = 'pixelgen_block_attention_backward'
_TARGETS = {PAIR_SUM: 'PixelgenPairSum', PACKED_MATMUL: 'PixelgenPackedMatmul',
            BLOCK_ATTENTION_FORWARD: 'PixelgenBlockAttentionForward',
            BLOCK_ATTENTION_BACKWARD: 'PixelgenBlockAttentionBackward'}


def _cpu_flags() -> bytes:
    """This CPU's feature flags (the library is built for them): a home folder shared by
    machines of different CPUs keeps one build per kind."""
    try:
        with open('/proc/cpuinfo', 'rb') as f:
            return next((line for line in f if line.startswith((b'flags', b'Features'))), b'')
    except OSError:
        return b''


def _library_path() -> str:
    """Where the library for these sources, jaxlib and CPU lives (built once per triple)."""
    import jaxlib
    digest = hashlib.sha256(jaxlib.__version__.encode() + _cpu_flags())
    for source in SOURCES + HEADERS:
        with open(source, 'rb') as f:
            digest.update(f.read())
    folder = os.environ.get('PIXELGEN_NATIVE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'pixelgen', 'native')
    return os.path.join(folder, f'pixelgen-native-{digest.hexdigest()[:16]}.so')


def build(path: str, compiler: str | None = None) -> str | None:
    """Compiles the library to `path` (atomically), for this CPU where the compiler can
    (-march=native); None, with the reason logged, where that fails (no compiler, no jaxlib
    headers)."""
    compiler = compiler or os.environ.get('CXX', 'g++')
    folder = os.path.dirname(path)
    partial = None
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix='.so.partial', delete=False) as tmp:
            partial = tmp.name
        command = [compiler, '-O3', '-std=c++17', '-shared', '-fPIC', '-w',
                   '-I', jax.ffi.include_dir(), *SOURCES, '-o', partial]
        done = subprocess.run([*command[:2], '-march=native', *command[2:]],
                              capture_output=True, text=True, check=False, timeout=300)
        if done.returncode != 0:  # a compiler without -march=native: portable code
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f'{compiler} failed: {done.stderr.strip()[-1000:]}')
        os.replace(partial, path)  # whole or not at all, if another process builds it too
        return path
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logging.warning('pixelgen.cpu.native: could not build %s (%s); decoding and attention run '
                        'on XLA\'s own ops instead (when decoding, the rows, not the weights, '
                        'split between the cores).',
                        ' '.join(SOURCES), error)
        return None
    finally:
        if partial and os.path.exists(partial):
            os.unlink(partial)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The library, built if needed, loaded, and its kernels registered with XLA (`_TARGETS`);
    None where it cannot be (see `build`)."""
    path = _library_path()
    if not os.path.exists(path) and build(path) is None:
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(path)
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform='cpu')
    except (OSError, AttributeError, ValueError) as error:
        logging.warning('pixelgen.cpu.native: could not load %s (%s); decoding and attention run '
                        'on XLA\'s own ops instead.', path, error)
        return None
    lib.pixelgen_pair_sum_reset.argtypes = [ctypes.c_int64]
    lib.pixelgen_packed_matmul_panel.restype = ctypes.c_int64
    return lib


def panel() -> int | None:
    """The panel width (floats) `packed_matmul.cc` was built for; None without the library."""
    lib = library()
    return None if lib is None else int(lib.pixelgen_packed_matmul_panel())
