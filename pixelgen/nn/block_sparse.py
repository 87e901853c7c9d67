"""Block-sparse attention: compute only the (query block, key block) pairs a mask allows.

A mask [n, n] is cut into blocks of `block_size` queries × `block_size` keys. Every query
block needs the key blocks that hold at least one allowed entry; query blocks that need the
same number of key blocks form a group, computed by batched einsums. Causal attention then
costs about half of dense, and DALL·E's row / column / conv layers cost O(n · (text + window))
instead of O(n²). The plan is plain numpy, made once at trace time from the dense mask, so every
layer kind uses the same code.

Within a group the key blocks come in parts (`KeyPart`):
- shared: read by every query block of the group (DALL·E's text prefix, or everything when the
  group is one query block). Their logits are one einsum of the whole group against those keys,
  with no copies. Shared blocks that every query may fully see skip the mask altogether.
- banded: query block i reads key block i + offset (DALL·E's local window). Each offset is one
  slice of the key blocks; other patterns fall back to a gather.
Slices and broadcasts keep the backward pass free of scatters, which are slow on CPU.

Column layers use the paper's transpose trick: the image is put in column-major order, where
the column mask becomes lower-triangular W × W blocks on the diagonal (`column_major_order`).

Within a group each query row sees all its keys at once (one softmax over all parts: a shared
maximum and normaliser), so an exact softmax needs no online rescaling; memory for the logits is
the sum over groups, not n².
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
class KeyPart:
    """Key blocks that a group of query blocks reads the same way.

    blocks: int [s] (shared: every query block of the group reads these) or int [g, m] (query
            block i reads row i).
    mask:   bool [g, bq, s*bk or m*bk], the element mask over those keys; None where every
            entry is allowed (no masking work at all).
    """
    blocks: np.ndarray
    mask: np.ndarray | None

    @property
    def shared(self) -> bool:
        return self.blocks.ndim == 1


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Query blocks (int [g]) that attend to the same number of key blocks, in parts."""
    query_blocks: np.ndarray
    parts: tuple[KeyPart, ...]


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
        return sum(len(g.query_blocks) * self.block_size ** 2 * p.blocks.shape[-1]
                   for g in self.groups for p in g.parts)

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
    if _column_major(mask, length):  # the plan sees the mask in the order it is computed in
        order = column_major_order(mask.text_len, mask.grid_width)
        dense[:length, :length] = dense[np.ix_(order, order)]
    blocks = dense.reshape(nb, block_size, nb, block_size)
    needed = blocks.any(axis=(1, 3))  # [nq, nk]
    needed[:, 0] |= ~needed.any(axis=1)  # padding query blocks still read one block
    by_count: dict[int, list[int]] = {}
    for qb in range(nb):
        by_count.setdefault(int(needed[qb].sum()), []).append(qb)
    groups = []
    for _, query_blocks in sorted(by_count.items()):
        query_blocks = np.asarray(query_blocks)
        reads = needed[query_blocks]  # [g, nb]
        shared = np.flatnonzero(reads.all(axis=0))
        full = blocks[query_blocks][:, :, shared].all(axis=(0, 1, 3))  # [s] no mask needed
        own = reads.copy()
        own[:, shared] = False
        per_block = np.stack([np.flatnonzero(row) for row in own])  # [g, m]
        parts = [KeyPart(shared[full], None),
                 KeyPart(shared[~full], _element_mask(blocks, query_blocks, shared[~full])),
                 KeyPart(per_block, _element_mask(blocks, query_blocks, per_block))]
        groups.append(BlockGroup(query_blocks, tuple(p for p in parts if p.blocks.size)))
    return BlockPlan(length, padded, block_size, tuple(groups))


def _element_mask(blocks: np.ndarray, query_blocks: np.ndarray,
                  key_blocks: np.ndarray) -> np.ndarray:
    """bool [g, bs, m*bs]: blocks [nq, bs, nk, bs] at the key blocks ([m] or [g, m]) of each
    query block."""
    g, bs = len(query_blocks), blocks.shape[1]
    keys = np.broadcast_to(key_blocks, (g, key_blocks.shape[-1]))
    return np.stack([blocks[qb][:, keys[i]].reshape(bs, -1)
                     for i, qb in enumerate(query_blocks)])


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec,
                           block_size: int = 128) -> jax.Array:
    """Self-attention over the allowed blocks of `mask`.

    Args:
      q, k, v: [batch, length, heads, head_dim] (self-attention: one length).
      mask: the layer's mask description.
      block_size: queries (and keys) per block; need not divide the length (it is padded).
    Returns:
      [batch, length, heads, head_dim] in q's dtype; equal to dense masked attention.
    """
    b, n, h, d = q.shape
    plan = make_plan(mask, n, min(block_size, n))
    transpose = _column_major(mask, n)
    if transpose:
        q, k, v = (transpose_image(x, mask.text_len, mask.grid_width) for x in (q, k, v))
    bs, nb = plan.block_size, plan.padded // plan.block_size
    if plan.padded != n:
        pad = [(0, 0), (0, plan.padded - n), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    # Heads first, so every block product is a plain batched matmul over the last two axes.
    qb, kb, vb = (x.transpose(0, 2, 1, 3).reshape(b, h, nb, bs, d) for x in (q, k, v))
    qb = qb * jnp.asarray(1.0 / math.sqrt(d), qb.dtype)
    outputs, order = [], []
    for group in plan.groups:
        g = len(group.query_blocks)
        qg = _read_blocks(qb, group.query_blocks[:, None])[:, :, :, 0]   # [b, h, g, bs, d]
        logits, values, specs = [], [], []
        for part in group.parts:
            if part.shared:  # keys [b, h, s*bs, d], one einsum for the whole group
                keys, vals = (_read_shared(x, part.blocks) for x in (kb, vb))
                spec = 'bhkd'
            else:  # keys [b, h, g, m*bs, d]
                keys, vals = (_read_blocks(x, part.blocks).reshape(b, h, g, -1, d)
                              for x in (kb, vb))
                spec = 'bhgkd'
            part_logits = jnp.einsum(f'bhgqd,{spec}->bhgqk', qg, keys,
                                     preferred_element_type=jnp.float32)
            if part.mask is not None:  # mask [g, bs, keys] broadcasts
                part_logits = jnp.where(part.mask, part_logits, MASK_VALUE)
            logits.append(part_logits)
            values.append(vals)
            specs.append(spec)
        # One softmax over all parts: a shared max, and the normaliser applied after the
        # value products ([.., bs, d] rather than [.., bs, keys] divisions).
        top = jax.lax.stop_gradient(
            functools.reduce(jnp.maximum, [x.max(axis=-1, keepdims=True) for x in logits]))
        weights = [jnp.exp(x - top) for x in logits]
        total = sum(w.sum(axis=-1, keepdims=True) for w in weights)  # [b, h, g, bs, 1]
        out = sum(jnp.einsum(f'bhgqk,{spec}->bhgqd', w.astype(v.dtype), vals,
                             preferred_element_type=jnp.float32)
                  for w, vals, spec in zip(weights, values, specs, strict=True))
        outputs.append((out / total).astype(q.dtype))
        order.extend(group.query_blocks.tolist())
    out = jnp.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]
    if order != sorted(order):
        out = out[:, :, np.argsort(order)]  # back to query-block order
    out = out.reshape(b, h, plan.padded, d).transpose(0, 2, 1, 3)[:, :n]
    return transpose_image(out, mask.text_len, mask.grid_width) if transpose else out


def default_block_size(mask: MaskSpec) -> int:
    """The block size that ran fastest on a 2-core CPU (forward + backward): 128 for causal
    Image GPT at 1024 tokens, 64 for DALL·E's row, column and conv layers at 1280 tokens
    (T = 256, W = 32; 32 was as fast for row and conv on an idle machine, slower under load)."""
    return 64 if mask.is_dalle else 128


def column_major_order(text_len: int, grid_width: int) -> np.ndarray:
    """int [T + W²]: position k of the column-major sequence holds raster position order[k]
    (text first, unchanged; then the image read column by column)."""
    image = np.arange(grid_width ** 2).reshape(grid_width, grid_width).T.reshape(-1)
    return np.concatenate([np.arange(text_len), text_len + image])


def _column_major(mask: MaskSpec, length: int) -> bool:
    return isinstance(mask, MaskSpec) and mask.column_major(length)


def transpose_image(x: jax.Array, text_len: int, grid_width: int) -> jax.Array:
    """[b, T + W², ...]: swaps the image's rows and columns (its own inverse), text unchanged.
    A reshape and transpose, so its gradient is one too (a gather's would be a scatter)."""
    image = x[:, text_len:].reshape(x.shape[0], grid_width, grid_width, *x.shape[2:])
    image = image.swapaxes(1, 2).reshape(x.shape[0], grid_width ** 2, *x.shape[2:])
    return jnp.concatenate([x[:, :text_len], image], axis=1)


def _read_shared(x: jax.Array, blocks: np.ndarray) -> jax.Array:
    """x [b, h, nb, bs, d], blocks int [s] -> [b, h, s*bs, d]; a slice if contiguous."""
    b, h, _, bs, d = x.shape
    start = int(blocks[0])
    if np.array_equal(blocks, start + np.arange(len(blocks))):
        picked = jax.lax.slice_in_dim(x, start, start + len(blocks), axis=2)
    else:
        picked = x[:, :, blocks]
    return picked.reshape(b, h, len(blocks) * bs, d)


def _read_blocks(x: jax.Array, blocks: np.ndarray) -> jax.Array:
    """x [b, h, nb, bs, d], blocks int [g, m] -> [b, h, g, m, bs, d].

    Column j is one slice when blocks[:, j] counts up by one (a band: query block i reads
    i + offset), else a gather."""
    g, _ = blocks.shape
    columns = []
    for column in blocks.T:
        start = int(column[0])
        if np.array_equal(column, start + np.arange(g)):
            columns.append(jax.lax.slice_in_dim(x, start, start + g, axis=2))
        else:
            columns.append(x[:, :, column])
    return jnp.stack(columns, axis=3)
