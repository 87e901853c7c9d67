"""Block-sparse attention: compute only the (query block, key block) pairs a mask allows.

A mask [n, n] is cut into blocks of `block_size` queries × `block_size` keys. Every query
block needs the key blocks that hold at least one allowed entry; query blocks that need the
same number of key blocks form a group, computed by one batched einsum over gathered key
blocks. Causal attention then costs about half of dense, and DALL·E's row / column / conv
layers cost O(n · (text + window)) instead of O(n²). The plan is plain numpy, made once at
trace time from the dense mask, so every layer kind uses the same code.

Within a group each query row sees all its keys at once, so an exact softmax needs no
online rescaling; memory for the logits is the sum over groups, not n².
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pixelgen.nn.masks import MaskSpec

# Finite, so a fully masked row gives a uniform average rather than NaN (as the dense path).
MASK_VALUE = -1e10



@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Query blocks that attend to the same number of key blocks.

    query_blocks: int [g]           which query blocks
    key_blocks:   int [g, m]        the key blocks each one reads (in increasing order)
    mask:         bool [g, bq, m*bk] the element mask within those blocks
    """
    query_blocks: np.ndarray
    key_blocks: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    length: int
    padded: int
    block_size: int
    groups: tuple[BlockGroup, ...]

    @property
    def density(self) -> float:
        """Fraction of the padded [n, n] logits that the plan computes."""
        return self.computed / (self.padded * self.padded)

    @property
    def computed(self) -> int:
        """Logits the plan computes (padding included)."""
        return sum(g.mask.size for g in self.groups)

    @property
    def pays_off(self) -> bool:
        """Whether skipping blocks saves enough over dense [length, length] attention to beat
        its extra gathers and smaller matmuls (short sequences and full masks do not)."""
        return self.computed <= 0.75 * self.length * self.length


@functools.lru_cache(maxsize=64)
def make_plan(mask: MaskSpec, length: int, block_size: int) -> BlockPlan:
    """The block plan of `mask` at `length` (cached: every layer and step reuses it)."""
    nb = math.ceil(length / block_size)
    padded = nb * block_size
    dense = np.zeros((padded, padded), bool)
    dense[:length, :length] = mask.dense(length)
    blocks = dense.reshape(nb, block_size, nb, block_size)
    needed = blocks.any(axis=(1, 3))  # [nq, nk]
    needed[:, 0] |= ~needed.any(axis=1)  # padding query blocks still read one block
    by_count: dict[int, list[int]] = {}
    for qb in range(nb):
        by_count.setdefault(int(needed[qb].sum()), []).append(qb)
    groups = []
    for count, query_blocks in sorted(by_count.items()):
        key_blocks = np.stack([np.flatnonzero(needed[qb]) for qb in query_blocks])  # [g, m]
        element_mask = np.stack([
            blocks[qb][:, key_blocks[i]].reshape(block_size, count * block_size)
            for i, qb in enumerate(query_blocks)])
        groups.append(BlockGroup(np.asarray(query_blocks), key_blocks, element_mask))
    return BlockPlan(length, padded, block_size, tuple(groups))


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec,
                           block_size: int = 128) -> jax.Array:
    """Self-attention over the allowed blocks of `mask`.

    Args:
      q, k, v: [batch, length, heads, head_dim] (self-attention: one length).
      mask: the layer's mask description.
    Returns:
      [batch, length, heads, head_dim] in q's dtype; equal to dense masked attention.
    """
    b, n, h, d = q.shape
    plan = make_plan(mask, n, min(block_size, n))
    bs, nb = plan.block_size, plan.padded // plan.block_size
    if plan.padded != n:
        pad = [(0, 0), (0, plan.padded - n), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    # Heads first, so every block product is a plain batched matmul over the last two axes.
    qb, kb, vb = (x.transpose(0, 2, 1, 3).reshape(b, h, nb, bs, d) for x in (q, k, v))
    qb = qb * jnp.asarray(1.0 / math.sqrt(d), qb.dtype)
    outputs, order = [], []
    for group in plan.groups:
        g, m = group.key_blocks.shape
        qg = _gather_blocks(qb, group.query_blocks[:, None])[:, :, :, 0]   # [b, h, g, bs, d]
        kg = _gather_blocks(kb, group.key_blocks).reshape(b, h, g, m * bs, d)
        vg = _gather_blocks(vb, group.key_blocks).reshape(b, h, g, m * bs, d)
        logits = jnp.einsum('bhgqd,bhgkd->bhgqk', qg, kg, preferred_element_type=jnp.float32)
        logits = jnp.where(group.mask, logits, MASK_VALUE)  # mask [g, bs, m*bs] broadcasts
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        outputs.append(jnp.einsum('bhgqk,bhgkd->bhgqd', probs, vg,
                                  preferred_element_type=jnp.float32).astype(q.dtype))
        order.extend(group.query_blocks.tolist())
    out = jnp.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]
    if order != sorted(order):
        out = out[:, :, np.argsort(order)]  # back to query-block order
    out = out.reshape(b, h, plan.padded, d).transpose(0, 2, 1, 3)
    return out[:, :n]


def _gather_blocks(x: jax.Array, key_blocks: np.ndarray) -> jax.Array:
    """x [b, h, nb, bs, d], key_blocks [g, m] -> [b, h, g, m, bs, d]; a slice if contiguous."""
    g, m = key_blocks.shape
    start = int(key_blocks[0, 0])
    if g == 1 and np.array_equal(key_blocks[0], start + np.arange(m)):
        return jax.lax.slice_in_dim(x, start, start + m, axis=2)[:, :, None]
    return x[:, :, key_blocks]
