"""Host memory for XLA:CPU (and PyTorch) steps: keep freed buffers instead of faulting in new ones.

glibc's malloc serves large requests (above 128 KiB, rising to 32 MiB) with fresh mmap'd pages
and gives them back to the kernel when they are freed; each thread may also get an arena of its
own. XLA:CPU allocates the large intermediates of a step anew at every step, so each step first
page-faults through every one of them; PyTorch's CPU steps do the same. What the setting below
saves, per step and per matmul: `python benchmarks/allocator.py`
(docs/cpu-performance.md).

`configure()` asks glibc (mallopt) for one arena, no mmap'd chunks and no trimming, so freed
memory is reused. Call it before JAX creates its CPU client, whose threads take their arena
then: the `python -m pixelgen.<job>` entry points and the benchmark peers call it first. The
process keeps its peak heap until it exits, as a caching allocator does.

PIXELGEN_MALLOC=default leaves glibc's defaults; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = 'PIXELGEN_MALLOC'
# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))

_configured: str | None = None


def configure() -> str:
    """Applies the reuse setting once per process; returns what is in effect: 'reuse',
    'default' (PIXELGEN_MALLOC=default) or 'unavailable' (no glibc mallopt)."""
    global _configured
    if _configured is None:
        _configured = _apply()
    return _configured


def _apply() -> str:
    choice = os.environ.get(ENV, 'reuse')
    if choice not in ('reuse', 'default'):
        raise ValueError(f'{ENV}={choice!r}; expected reuse (the default: freed memory is '
                         'reused) or default (glibc as it comes).')
    if choice == 'default':
        return 'default'
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return 'unavailable'
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS):
        return 'unavailable'
    return 'reuse'
