"""A decoding step's matmuls as a native kernel over weights packed once, before the loop.

Why: a decoding step multiplies a few rows by every weight matrix once, so its speed is the
speed at which the weights stream in. XLA:CPU's matmul library walks a row-major [k, n]
kernel in column tiles, and on the 2-core AMD VM this project is measured on that ran at 6-7
GB/s per core, where one contiguous stream runs at 60-80 (`benchmarks/decode_floor.py
--split halves packed`). Packed as [n / panel, k, panel] (each panel of columns contiguous),
the kernel in `pixelgen/native/packed_matmul.cc` reads every weight once, in order.

How: the samplers on the one-thread CPU core clients trace their loops under `packing(arrays,
panel)` (`pixelgen.core_split.as_party`), which packs every float32 array of two or more axes,
at every split of its axes into contracted and kept ones, before the loop; XLA drops the
packs no matmul uses. Inside the loop, `matmul(x, kernel, contracted, fallback)` finds the
packed copy of `kernel` (the very array, by identity) and calls the kernel, and anything not
packed (another dtype, an array made inside the loop) runs `fallback`, the layer's own op.
Outside `packing` it is always `fallback`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp

TARGET = 'pixelgen_packed_matmul'

# (id(array), contracted) -> (array, packed copy), while tracing under `packing`.
_packed: contextvars.ContextVar[dict | None] = contextvars.ContextVar('pixelgen_packed',
                                                                      default=None)


def pack(kernel: jax.Array, contracted: int, panel: int) -> jax.Array:
    """kernel [*k_axes, *n_axes] (the first `contracted` axes k_axes) as [ceil(n / panel), k,
    panel] float32: panel p holds columns [p · panel, (p + 1) · panel), zero-padded."""
    k = math.prod(kernel.shape[:contracted])
    n = math.prod(kernel.shape[contracted:])
    panels = -(-n // panel)
    flat = jnp.pad(kernel.reshape(k, n).astype(jnp.float32), ((0, 0), (0, panels * panel - n)))
    return flat.reshape(k, panels, panel).transpose(1, 0, 2)


@contextlib.contextmanager
def packing(arrays: Iterable[jax.Array], panel: int) -> Iterator[None]:
    """For tracing a decoding loop: `arrays` (the model's parameters) packed here, once, for
    `matmul` inside the loop. Only float32 arrays are packed (the kernel computes in float32)."""
    table = {}
    for array in arrays:
        if array.dtype == jnp.float32 and array.ndim >= 2:
            for contracted in range(1, array.ndim):
                table[id(array), contracted] = (array, pack(array, contracted, panel))
    token = _packed.set(table)
    try:
        yield
    finally:
        _packed.reset(token)


def active() -> bool:
    """Whether a loop is being traced under `packing`."""
    return _packed.get() is not None


def matmul(x: jax.Array, kernel: jax.Array, contracted: int,
           fallback: Callable[[], jax.Array]) -> jax.Array:
    """x [*rows, *k_axes] · kernel [*k_axes, *n_axes] -> [*rows, *n_axes], the first
    `contracted` axes of kernel contracted with the last of x, by the native kernel where
    `packing` packed this very kernel and x is float32; else `fallback()`."""
    entry = (_packed.get() or {}).get((id(kernel), contracted))
    if entry is None or entry[0] is not kernel or x.dtype != jnp.float32:
        return fallback()
    rows = x.shape[:x.ndim - contracted]
    n_axes = kernel.shape[contracted:]
    x2d = x.reshape(math.prod(rows), math.prod(kernel.shape[:contracted]))
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2d.shape[0], math.prod(n_axes)),
                                                      jnp.float32))(x2d, entry[1])
    return y.reshape(*rows, *n_axes)


def project(layer, x: jax.Array, contracted: int = 1) -> jax.Array:
    """`layer(x)` for a bias-free `nnx.Linear` or projection `nnx.Einsum` (whose kernel's first
    `contracted` axes meet x's last ones), by `matmul` where its kernel was packed."""
    if getattr(layer, 'bias', None) is not None:
        return layer(x)
    return matmul(x, layer.kernel[...], contracted, lambda: layer(x))
