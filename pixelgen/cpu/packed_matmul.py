"""A decoding step's matmuls as a native kernel over weights packed once, before the loop.

Why: a decoding step multiplies a few rows by every weight matrix once, so its speed is the
speed at which the weights stream in. XLA:CPU's matmul library walks a row-major [k, n]
kernel in column tiles, a strided read; packed as [n / panel, k, panel], each panel of columns
is one contiguous run, which the kernel in `pixelgen/cpu/native/packed_matmul.cc` reads once, in
order. `python benchmarks/decode_floor.py --split halves packed` times the 8 layers' matmuls
of `igpt_sample` (weights split between the cores) with XLA's matmuls and packed.

How: the samplers, where they run on the one-thread CPU core clients
(`pixelgen.cpu.decode_clients`, `pixelgen.cpu.core_split`), make `PackedWeights(model)` while
tracing their loops, which packs every float32 parameter of two or more axes, at every split
of its axes into contracted and kept ones, before the loop; XLA drops the packs no matmul
uses. Its `project` is the step's `DecodeOps.project`: it finds the packed copy of a layer's
kernel (the very array, by identity) and calls the kernel; anything not packed (another
dtype, an array made inside the loop, a layer with a bias) runs the layer's own op.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.cpu import native

TARGET = native.PACKED_MATMUL


def pack(kernel: jax.Array, contracted: int, panel: int) -> jax.Array:
    """kernel [*k_axes, *n_axes] (the first `contracted` axes k_axes) as [ceil(n / panel), k,
    panel] float32: panel p holds columns [p · panel, (p + 1) · panel), zero-padded."""
    k = math.prod(kernel.shape[:contracted])
    n = math.prod(kernel.shape[contracted:])
    panels = -(-n // panel)
    flat = jnp.pad(kernel.reshape(k, n).astype(jnp.float32), ((0, 0), (0, panels * panel - n)))
    return flat.reshape(k, panels, panel).transpose(1, 0, 2)


class PackedWeights:
    """The float32 parameters of a model packed once, while a decoding loop is traced, for
    `project` inside the loop (the kernel computes in float32)."""

    def __init__(self, model: nnx.Module, panel: int):
        self._table = {}  # (id(array), contracted) -> (array, packed copy)
        for array in jax.tree.leaves(nnx.state(model, nnx.Param)):
            if array.dtype == jnp.float32 and array.ndim >= 2:
                for contracted in range(1, array.ndim):
                    self._table[id(array), contracted] = (array, pack(array, contracted, panel))

    def matmul(self, x: jax.Array, kernel: jax.Array, contracted: int,
               fallback: Callable[[], jax.Array]) -> jax.Array:
        """x [*rows, *k_axes] · kernel [*k_axes, *n_axes] -> [*rows, *n_axes], the first
        `contracted` axes of kernel contracted with the last of x, by the native kernel where
        this very kernel was packed and x is float32; else `fallback()`."""
        entry = self._table.get((id(kernel), contracted))
        if entry is None or entry[0] is not kernel or x.dtype != jnp.float32:
            return fallback()
        rows = x.shape[:x.ndim - contracted]
        n_axes = kernel.shape[contracted:]
        x2d = x.reshape(math.prod(rows), math.prod(kernel.shape[:contracted]))
        return product(x2d, entry[1], math.prod(n_axes)).reshape(*rows, *n_axes)

    def project(self, layer, x: jax.Array, contracted: int = 1) -> jax.Array:
        """`layer(x)` for a bias-free `nnx.Linear` or projection `nnx.Einsum` (whose kernel's
        first `contracted` axes meet x's last ones), by `matmul` where its kernel was packed;
        `DecodeOps.project` of the packed decoding loops."""
        if getattr(layer, 'bias', None) is not None:
            return layer(x)
        return self.matmul(x, layer.kernel[...], contracted, lambda: layer(x))


def product(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """x [m, k] float32 · the [k, n] kernel that `pack` made `packed` from: [m, n], by the
    native kernel (`pixelgen.cpu.native.library()` must have registered it)."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(
        x, packed)

