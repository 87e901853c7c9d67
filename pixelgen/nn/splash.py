"""Splash attention: the TPU Pallas kernel `jax.experimental.pallas.ops.tpu.splash_attention`,
driven by a `MaskSpec`.

Like `pixelgen.nn.block_sparse`, splash computes only the (query block, key block) pairs with
an allowed entry, but in one fused kernel with an online softmax, so no logits reach memory.
The layer's mask becomes a splash mask:
- causal: the kernel's lazy `CausalMask` (no [n, n] array at any length);
- full, row, column, conv: a `NumpyMask` of the dense mask (DALL·E's layers are sparse, so the
  kernel skips most blocks).
Column layers run with the image in column-major order (the paper's transpose trick, as in
block_sparse), where their mask is W × W triangles on the diagonal instead of nearly causal.

Blocks are multiples of 128 (the TPU's lanes); a length that is not a whole number of blocks
is padded. Off TPU the kernel runs in Pallas interpret mode: exact but slow, for tests only.

XLA cannot partition a Pallas TPU kernel, so inside `parallel.activation_sharding` on a mesh
of several devices the kernel runs under `jax.shard_map`: each device attends its own batch
rows and heads (as the logical rules shard them), over the whole sequence
(`parallel.per_device_heads`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pixelgen import parallel
from pixelgen.nn.block_sparse import column_major_order, transpose_image
from pixelgen.nn.masks import MaskSpec

LANES = 128  # splash's block sizes must be multiples of this
DEFAULT_BLOCK_SIZE = 128


def check_block_size(block_size: int) -> None:
    if block_size < LANES or block_size % LANES:
        raise ValueError(f'splash attention block_size={block_size} must be a positive '
                         f'multiple of {LANES} (the TPU lane width); pass e.g. '
                         f'{DEFAULT_BLOCK_SIZE} or 512, or leave it unset.')


def splash_mask(mask: MaskSpec, length: int, padded: int) -> splash.Mask:
    """The splash mask [padded, padded] of `mask` at `length` in the order the kernel sees it
    (column-major image for column layers at full length).

    Padding keys (positions >= length) are never visible to real queries; padding queries
    see at least one key, so their softmax stays finite (their outputs are dropped)."""
    if mask.kind == 'causal':  # padding lies in every real query's future
        return splash.CausalMask((padded, padded))
    if mask.kind == 'full':
        if padded == length:
            return splash.FullMask((padded, padded))
        dense = np.zeros((padded, padded), bool)
        dense[:, :length] = True
        return splash.NumpyMask(dense)
    dense = mask.dense(padded)  # DALL·E kinds are causal, and every query sees itself
    if mask.column_major(length):
        order = column_major_order(mask.text_len, mask.grid_width)
        dense[:length, :length] = dense[np.ix_(order, order)]
    return splash.NumpyMask(dense)


@functools.lru_cache(maxsize=64)
def _heads_mask(mask: MaskSpec, length: int, padded: int, heads: int) -> splash.MultiHeadMask:
    """The layer's mask for every head (cached: every layer of a kind and every trace reuses
    it, and splash caches its block analysis by the mask's contents)."""
    return splash.MultiHeadMask((splash_mask(mask, length, padded),) * heads)


def _kernel(mask: MaskSpec, length: int, heads: int, block_size: int, interpret: bool):
    """The splash MHA kernel of one layer shape. Made at every trace: it holds arrays that
    belong to the trace it was made in."""
    padded = math.ceil(length / block_size) * block_size
    b = block_size
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash.make_splash_mha(_heads_mask(mask, length, padded, heads), head_shards=1,
                                  q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec,
                     block_size: int = DEFAULT_BLOCK_SIZE,
                     interpret: bool | None = None) -> jax.Array:
    """Masked self-attention by the splash kernel.

    Args:
      q, k, v: [batch, length, heads, head_dim].
      mask: the layer's mask description.
      block_size: queries (and keys) per kernel block, a multiple of 128; the length need not
        divide by it (it is padded).
      interpret: run the kernel in Pallas interpret mode; None: everywhere but on TPU.

    Returns:
      [batch, length, heads, head_dim] in q's dtype; equal to dense masked attention.
    """
    check_block_size(block_size)
    if interpret is None:
        interpret = jax.default_backend() != 'tpu'
    attend = functools.partial(_attend, mask=mask, block_size=block_size, interpret=interpret)
    return parallel.per_device_heads(attend, q, k, v)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: MaskSpec, block_size: int,
            interpret: bool) -> jax.Array:
    """`splash_attention` on one device's q, k, v [batch, length, heads, head_dim]."""
    _, length, heads, head_dim = q.shape
    transpose = mask.column_major(length)
    if transpose:
        q, k, v = (transpose_image(x, mask.text_len, mask.grid_width) for x in (q, k, v))
    kernel = _kernel(mask, length, heads, block_size, interpret)
    padded = math.ceil(length / block_size) * block_size
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # splash does not scale logits
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    # The kernel takes one example, heads first: [heads, padded, head_dim].
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))
    out = jax.vmap(kernel)(q, k, v).transpose(0, 2, 1, 3)[:, :length]  # [b, l, h, d]
    if transpose:
        out = transpose_image(out, mask.text_len, mask.grid_width)
    return out.astype(q.dtype)
