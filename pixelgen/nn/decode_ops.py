"""The operations of one decoding step that a backend may supply in place of the layers' own.

A decoding step multiplies a few rows by every weight matrix once, so how the weights are read
decides its speed. Generic code runs each layer's own op (`PLAIN`). A backend passes its own
`DecodeOps` to `decode_step` and `init_cache`: the CPU's one-thread decode clients
(`pixelgen.cpu`) stream weights packed before the loop, and where a model's weights are split
between two cores they sum each block's partial outputs with the other core's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


def layer_projection(layer, x: jax.Array, contracted: int = 1) -> jax.Array:
    """`layer(x)`: a projection by the layer's own op (`contracted` axes of its kernel meet
    x's last ones)."""
    del contracted
    return layer(x)


def unchanged(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class DecodeOps:
    """What a decoding step calls for its matmuls and partial sums.

    project(layer, x, contracted): the output of a bias-free `nnx.Linear` or projection
      `nnx.Einsum` on x.
    combine(x): a block's attention or MLP output summed with the parts other devices
      computed (the identity where each device holds whole layers).
    fuse_qkv: whether `init_cache` may fuse small layers' q, k, v kernels into one matrix
      (not where `project` reads the kernels as they are).
    """
    project: Callable[..., jax.Array] = layer_projection
    combine: Callable[[jax.Array], jax.Array] = unchanged
    fuse_qkv: bool = True


PLAIN = DecodeOps()
