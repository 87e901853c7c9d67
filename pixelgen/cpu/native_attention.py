"""Block-sparse attention as one fused native kernel on the CPU.

XLA:CPU runs `block_sparse`'s tiles as batched matmuls with a 32-wide contraction and a dozen
element-wise ops between them, each reading and writing the [.., 32, K] logits through memory.
`pixelgen/cpu/native/block_attention.cc` instead walks a `BlockPlan`, the (query block, key block)
pairs of 32 × 32 that hold an allowed logit, and computes each pair's logits, softmax and
products while they sit in the core's caches (flash attention's online softmax; the backward
pass recomputes the probabilities from the forward's log-sum-exp). Every pair with an allowed
logit is computed, so it is equal to dense masked attention (tested).

A `MultiHeadAttention` whose `cpu_kernel` is `KERNEL` (`pixelgen.cpu.use_native_attention`,
which the tasks apply to every model they build) runs it where the step is lowered for the
CPU, for float32 layers whose head_dim is a multiple of 32, whatever the mask (full layers
too, which have no XLA tiles; lengths are padded to a multiple of 32), where the library
builds (`pixelgen.cpu.native`); PIXELGEN_NATIVE_ATTENTION=0 keeps XLA's tiles (or dense
attention). On a mesh of several devices each device runs the kernel on its own batch rows
and heads (`parallel.per_device_heads`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from pixelgen import parallel
from pixelgen.cpu import native
from pixelgen.nn.block_sparse import dense_in_tile_order, transpose_image
from pixelgen.nn.masks import MaskSpec

BLOCK = 32  # queries and keys per block (block_attention.cc's kBlock)
ENV = 'PIXELGEN_NATIVE_ATTENTION'
_enabled = True  # config.runtime.native_attention, set by backend.configure


def enabled() -> bool:
    """Whether the kernel may run: $PIXELGEN_NATIVE_ATTENTION (1 or 0) where it is set, else
    config.runtime.native_attention."""
    value = os.environ.get(ENV)
    return _enabled if value is None else value != '0'
FORWARD_TARGET = native.BLOCK_ATTENTION_FORWARD
BACKWARD_TARGET = native.BLOCK_ATTENTION_BACKWARD


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPlan:
    """The 32 × 32 block pairs of a mask at one length that hold an allowed logit: query block
    i's key blocks are key_block[row_start[i]:row_start[i + 1]], each with mask
    masks[mask_id] (0/1, [key, query]: transposed, as the kernel computes the pair) or -1
    where every logit of the pair is allowed. A length that is not a multiple of 32 is padded
    to `padded`: no real query sees a padding key, and each padding query sees key 0 only
    (its output is dropped, and its gradient is zero)."""
    length: int
    padded: int
    row_start: np.ndarray  # int32 [padded / 32 + 1]
    key_block: np.ndarray  # int32 [pairs]
    mask_id: np.ndarray    # int32 [pairs]
    masks: np.ndarray      # float32 [count, 32, 32]

    @property
    def density(self) -> float:
        """Logits the kernel computes, as a fraction of the [length, length] of dense
        attention."""
        return len(self.key_block) * BLOCK * BLOCK / self.length ** 2


def plan_from_dense(dense: np.ndarray, skip: bool = True) -> BlockPlan | None:
    """The plan of bool mask `dense` [length (query), length (key)]; None where a query has
    no allowed key (the kernel would give it zeros, dense attention a uniform average).
    skip=False keeps every block pair, masked ones too: dense masked attention in the same
    kernel (`benchmarks/attention_kernels.py` times the skipping apart from the fusion)."""
    length = dense.shape[0]
    if not dense.any(axis=1).all():
        return None
    padded = -(-length // BLOCK) * BLOCK
    full = np.zeros((padded, padded), bool)
    full[:length, :length] = dense
    full[length:, 0] = True
    blocks = padded // BLOCK
    grid = full.reshape(blocks, BLOCK, blocks, BLOCK).transpose(0, 2, 3, 1)  # [i, j, key, q]
    present, every = grid.any(axis=(2, 3)) | (not skip), grid.all(axis=(2, 3))
    rows, keys = np.nonzero(present)  # row-major: each query block's key blocks in order
    masks: dict[bytes, int] = {}
    ids = [-1 if every[i, j] else masks.setdefault(grid[i, j].tobytes(), len(masks))
           for i, j in zip(rows, keys, strict=True)]
    table = np.stack([np.frombuffer(m, bool).reshape(BLOCK, BLOCK) for m in masks]
                     or [np.zeros((BLOCK, BLOCK), bool)]).astype(np.float32)
    row_start = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
    return BlockPlan(length, padded, row_start, keys.astype(np.int32),
                     np.asarray(ids, np.int32), table)


def available(q: jax.Array) -> bool:
    """Whether the kernel can run q's layer when lowered for the CPU: float32, head_dim a
    multiple of 32, not turned off (`enabled()`, read when a function is traced), and the
    library built. Callers use it only in a branch that is lowered for the
    CPU alone (`jax.lax.platform_dependent`), whatever the host's default backend."""
    return (enabled() and q.dtype == jnp.float32
            and q.shape[-1] % BLOCK == 0 and native.library() is not None)


@functools.lru_cache(maxsize=64)
def native_plan(mask: MaskSpec, length: int) -> BlockPlan | None:
    """The kernel's block plan of `mask` at `length` (in column-major image order for column
    layers, as XLA's tiles), or None where it has none. Cached."""
    return plan_from_dense(dense_in_tile_order(mask, length))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec) -> jax.Array:
    """Self-attention of `mask` by the kernel (a CPU-only custom call): q, k, v [batch,
    length, heads, head_dim] -> [batch, length, heads, head_dim]; equal to dense masked
    attention. Raises, naming what is missing, where the kernel cannot run this layer."""
    n, d = q.shape[1], q.shape[-1]
    plan = native_plan(mask, n) if available(q) else None
    if plan is None:
        raise ValueError(
            'The native attention kernel cannot run this layer: it needs float32 (here '
            f'{q.dtype.name}), head_dim a multiple of {BLOCK} (here {d}), the library built '
            f'(pixelgen.cpu.native), {ENV} not 0, and every query an allowed key. Use XLA\'s '
            'tiles instead (pixelgen.nn.block_sparse.block_sparse_attention).')
    transpose = mask.is_dalle and mask.column_major(n)
    if transpose:
        q, k, v = (transpose_image(x, mask.text_len, mask.grid_width) for x in (q, k, v))
    out = attention(q, k, v, plan)
    return transpose_image(out, mask.text_len, mask.grid_width) if transpose else out


class NativeAttention:
    """The kernel as a `MultiHeadAttention.cpu_kernel`: the layer calls `runs` and, where
    it holds, `__call__` in the branch it lowers for the CPU."""

    def runs(self, q: jax.Array, mask: MaskSpec) -> bool:
        """Whether the kernel computes `mask`'s attention for q [batch, length, heads,
        head_dim] (`available`, and a plan at this length)."""
        return available(q) and native_plan(mask, q.shape[1]) is not None

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec) -> jax.Array:
        return attend(q, k, v, mask)

    def __repr__(self) -> str:
        return 'NativeAttention()'


KERNEL = NativeAttention()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: BlockPlan) -> jax.Array:
    """Softmax attention over `plan`'s block pairs (logits scaled by 1/sqrt(head_dim)).

    Args:
      q, k, v: float32 [batch, length, heads, head_dim], length = plan.length.
    Returns:
      float32 [batch, length, heads, head_dim].
    """
    if native.library() is None:  # also registers the kernels with XLA
        raise RuntimeError('The native attention kernel is not available: pixelgen.cpu.native '
                           'could '
                           'not build or load its library (the warning above says why). '
                           'Install a C++ compiler (g++) or run XLA\'s tiles instead '
                           '(pixelgen.nn.block_sparse.block_sparse_attention).')
    if plan.padded != plan.length:
        pad = [(0, 0), (0, plan.padded - plan.length), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    out = parallel.per_device_heads(functools.partial(_attention, plan=plan), q, k, v)
    return out[:, :plan.length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: BlockPlan) -> jax.Array:
    return _forward(q, k, v, plan)[0]


def _plan_operands(plan: BlockPlan) -> tuple[np.ndarray, ...]:
    return plan.row_start, plan.key_block, plan.mask_id, plan.masks


def _scale(q: jax.Array) -> np.float32:
    return np.float32(1.0 / math.sqrt(q.shape[-1]))


def _forward(q, k, v, plan):
    *batch, length, heads, _ = q.shape
    out, lse = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32)),
        vmap_method='sequential')(q, k, v, *_plan_operands(plan), scale=_scale(q))
    return out, (q, k, v, out, lse)


def _backward(plan, residuals, d_out):
    q, k, v, out, lse = residuals
    shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call(
        BACKWARD_TARGET, (shape, shape, shape), vmap_method='sequential')(
            q, k, v, out, lse, d_out.astype(jnp.float32), *_plan_operands(plan),
            scale=_scale(q)))


_attention.defvjp(_forward, _backward)
