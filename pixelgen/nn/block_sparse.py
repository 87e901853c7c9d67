"""Block-sparse attention: the allowed logits as a few batched rectangles of equal shape.

A *tiling* covers every allowed (query, key) pair of a mask with tile sets. A tile set is G
equal rectangles of M queries × K keys, read out of q, k, v by reshapes and slices and computed
by one batched matmul, so the work skips the masked blocks while every op stays large:

- causal, n = bs · 2^L (Image GPT): a binary tree. The masked diagonal blocks
  [2^L, bs, bs] are one tile set; at level l the second half of each of the 2^l segments sees
  the first half densely ([2^l, n/2^(l+1), n/2^(l+1)], no mask). About n²/2 + n·bs/2 logits in
  L + 1 tile sets, where one set per query block would need 2^L of them.
- DALL·E's row / column / conv at T + W² tokens: the text queries see the text causally
  ([1, T, T]); the image, one tile per image row of W queries, sees all T text keys (shared,
  no mask) and the few image rows its window reaches (row: the row above and its own; conv:
  the 5 rows above and its own), gathered as one [W, O·W] band per row. Column layers first put
  the image in column-major order (the paper's transpose trick), where their band is the
  row's own W keys with a causal mask.

Each tile set has its own softmax statistics (max m, sum l); the sets are merged per query by
their log-sum-exps, as flash attention merges key blocks. The backward pass is written by hand
(`jax.custom_vjp`): it keeps the exponentials of the forward pass and computes key and value
gradients as Q^T·dS rather than dS^T·Q, so the large [.., M, K] operand is read in the layout
it was written in. Autodiff of the same forward pass stored those transposed and summed per-
block pieces in strided fusions, which cost XLA:CPU more than the matmuls
(`benchmarks/README.md`). Masks without a tiling (full, DALL·E kinds at other lengths) and
sequences too short for skipping to pay are computed densely by `attention.py`.

These tiles run on every platform. Where the step is lowered for the CPU, a layer given the
fused native kernel from outside (`MultiHeadAttention.cpu_kernel`, `pixelgen.cpu`) runs that
instead, for float32 layers whose head_dim is a multiple of 32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pixelgen.nn.masks import MaskSpec
from pixelgen.nn.matmul import rows_t_times

# Logit given to masked (query, key) pairs, here and in dense attention (nn.attention). Finite,
# so a fully masked row gives a uniform average rather than NaN; the original Image GPT uses
# `w*b - 1e10*(1-b)`.
MASK_VALUE = -1e10
DEFAULT_CAUSAL_BLOCK = 64  # the tiles of the causal tree's leaves


# Views: how a tile set reads its queries or keys out of [b, h, n, ...] and puts them back ---
@dataclasses.dataclass(frozen=True)
class Blocks:
    """`count` consecutive blocks of `size` positions from `start`: [b, h, count, size, ...]."""
    start: int
    count: int
    size: int

    def read(self, x: jax.Array) -> jax.Array:
        part = jax.lax.slice_in_dim(x, self.start, self.start + self.count * self.size, axis=2)
        return part.reshape(*x.shape[:2], self.count, self.size, *x.shape[3:])

    def place(self, y: jax.Array, n: int, fill: float = 0.0) -> jax.Array:
        """The adjoint of `read` (with `fill` elsewhere): [b, h, n, ...]."""
        flat = y.reshape(*y.shape[:2], self.count * self.size, *y.shape[4:])
        end = n - self.start - self.count * self.size
        return jnp.pad(flat, [(0, 0), (0, 0), (self.start, end)] + [(0, 0)] * (y.ndim - 4),
                       constant_values=fill)


@dataclasses.dataclass(frozen=True)
class Halves:
    """One half (`half` 0 or 1) of each of the 2^level equal segments: [b, h, 2^level, S, ...]."""
    level: int
    half: int

    def read(self, x: jax.Array) -> jax.Array:
        segments = 2 ** self.level
        split = x.reshape(*x.shape[:2], segments, 2, x.shape[2] // (2 * segments), *x.shape[3:])
        return split[:, :, :, self.half]

    def place(self, y: jax.Array, n: int, fill: float = 0.0) -> jax.Array:
        other = jnp.full_like(y, fill)
        pair = (y, other) if self.half == 0 else (other, y)
        return jnp.stack(pair, axis=3).reshape(*y.shape[:2], n, *y.shape[4:])


@dataclasses.dataclass(frozen=True)
class Shared:
    """Keys that every tile reads (DALL·E's text prefix): [b, h, length, ...]."""
    start: int
    length: int

    def read(self, x: jax.Array) -> jax.Array:
        return jax.lax.slice_in_dim(x, self.start, self.start + self.length, axis=2)

    def place(self, y: jax.Array, n: int) -> jax.Array:
        end = n - self.start - self.length
        return jnp.pad(y, [(0, 0), (0, 0), (self.start, end)] + [(0, 0)] * (y.ndim - 3))


@dataclasses.dataclass(frozen=True)
class Band:
    """For each of `count` blocks r of `size` from `start`, blocks r - o for o in `offsets`
    side by side (zeros before the first): [b, h, count, len(offsets) · size, ...]."""
    start: int
    count: int
    size: int
    offsets: tuple[int, ...]

    def read(self, x: jax.Array) -> jax.Array:
        blocks = Blocks(self.start, self.count, self.size).read(x)
        reach = max(self.offsets)
        padded = jnp.pad(blocks, [(0, 0), (0, 0), (reach, 0)] + [(0, 0)] * (x.ndim - 2))
        return jnp.concatenate([padded[:, :, reach - o:reach - o + self.count]
                                for o in self.offsets], axis=3)

    def place(self, y: jax.Array, n: int) -> jax.Array:
        """Sums each block's contributions from the rows that read it (the adjoint of read)."""
        pieces = jnp.split(y, len(self.offsets), axis=3)
        total = 0
        for o, piece in zip(self.offsets, pieces, strict=True):
            shifted = piece[:, :, o:]  # row r's keys are block r - o
            total = total + jnp.pad(shifted, [(0, 0), (0, 0), (0, o)]
                                    + [(0, 0)] * (y.ndim - 3))
        return Blocks(self.start, self.count, self.size).place(total, n)


View = Blocks | Halves | Shared | Band


@dataclasses.dataclass(frozen=True, eq=False)
class TileSet:
    """G rectangles: queries [b, h, G, M, d] × keys [b, h, G, K, d] (or [b, h, K, d] when
    shared). mask: bool broadcastable to [G, M, K]; None where every pair is allowed."""
    queries: Blocks | Halves
    keys: View
    mask: np.ndarray | None

    @property
    def shared(self) -> bool:
        return isinstance(self.keys, Shared)


@dataclasses.dataclass(frozen=True, eq=False)
class Tiling:
    """The tile sets of one mask at one (padded) length, and what they cost."""
    length: int       # the sequence length asked for
    padded: int       # what the tiles cover (causal trees pad to bs · 2^L)
    block_size: int   # tree leaves (causal) or image rows (DALL·E)
    tiles: tuple[TileSet, ...]
    computed: int     # logits per (batch, head), masked ones included

    @property
    def density(self) -> float:
        """Fraction of the [length, length] logits of dense attention that the tiles compute."""
        return self.computed / (self.length * self.length)

    @property
    def pays_off(self) -> bool:
        """Whether skipping saves enough over dense attention to beat its extra, smaller ops
        (short sequences, and nearly full masks, do not)."""
        return self.computed <= 0.75 * self.length * self.length


# Tilings ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def make_tiling(mask: MaskSpec, length: int, block_size: int = DEFAULT_CAUSAL_BLOCK
                ) -> Tiling | None:
    """The tiling of `mask` at `length`, or None where there is none (full masks, DALL·E kinds
    at a length other than T + W²). `block_size` sets the causal tree's leaves (about that
    many positions); DALL·E tiles by image rows. Cached: every layer and step reuses it."""
    if mask.kind == 'causal':
        return _causal_tree(length, block_size)
    if mask.is_dalle and length == mask.sequence_length:
        return _dalle_band(mask)
    return None


def _causal_tree(length: int, block_size: int) -> Tiling:
    levels = max(0, math.ceil(math.log2(max(length / max(block_size, 1), 1))))
    leaf = math.ceil(length / 2 ** levels)
    padded = leaf * 2 ** levels  # padding keys lie in every real query's future
    tiles = [TileSet(Blocks(0, 2 ** levels, leaf), Blocks(0, 2 ** levels, leaf),
                     np.tril(np.ones((leaf, leaf), bool)))]
    tiles += [TileSet(Halves(level, 1), Halves(level, 0), None) for level in range(levels)]
    half_rectangles = sum(2 ** level * (padded // 2 ** (level + 1)) ** 2
                          for level in range(levels))
    return Tiling(length, padded, leaf, tuple(tiles),
                  2 ** levels * leaf * leaf + half_rectangles)


def _dalle_band(mask: MaskSpec) -> Tiling:
    """Text causal; each image row reads all text and its band of image rows. The band's
    offsets and masks are read off the dense mask (in column-major order for column layers),
    and the tiles are checked to cover exactly the allowed pairs. (Tiles of 2 or 4 rows, with
    larger matmuls but more masked logits, were slower at T = 256, W = 32.)"""
    t, w = mask.text_len, mask.grid_width
    n = mask.sequence_length
    dense = dense_in_tile_order(mask, n)
    image = dense[t:, t:].reshape(w, w, w, w)  # [query row, query, key row, key]
    offsets = tuple(o for o in range(w) if any(image[r, :, r - o].any() for r in range(o, w)))
    band = np.zeros((w, w, len(offsets), w), bool)
    for i, o in enumerate(offsets):
        band[o:, :, i] = image[np.arange(o, w), :, np.arange(0, w - o)]
    causal_text = np.tril(np.ones((t, t), bool))
    if not (dense[t:, :t].all() and np.array_equal(dense[:t, :t], causal_text)
            and not dense[:t, t:].any() and band.sum() == image.sum()):
        raise ValueError(f'MaskSpec({mask.kind!r}) does not have the text + image band shape '
                         "this tiling needs; use attention_impl='dense'.")
    tiles = [TileSet(Blocks(t, w, w), Band(t, w, w, offsets), band.reshape(w, w, -1))]
    if t:
        tiles = [TileSet(Blocks(0, 1, t), Blocks(0, 1, t), causal_text),
                 TileSet(Blocks(t, w, w), Shared(0, t), None), *tiles]
    return Tiling(n, n, w, tuple(tiles), t * t + w * w * (t + len(offsets) * w))


# The attention ------------------------------------------------------------------------------
def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec,
                           block_size: int = DEFAULT_CAUSAL_BLOCK) -> jax.Array:
    """Self-attention over the allowed blocks of `mask` by XLA's tiles (masks with a tiling,
    `make_tiling`), on any platform.

    Args:
      q, k, v: [batch, length, heads, head_dim].
      mask: the layer's mask description.
      block_size: the causal tree's leaf size (DALL·E layers tile by image rows).
    Returns:
      [batch, length, heads, head_dim] in q's dtype; equal to dense masked attention.
    """
    n = q.shape[1]
    tiling = make_tiling(mask, n, block_size)
    if tiling is None:
        raise ValueError(f'MaskSpec({mask.kind!r}) at length {n} has no block-sparse tiling; '
                         "compute it densely (attention_impl='dense').")
    return _tiles_attention(tiling, mask, q, k, v)


def _tiles_attention(tiling: Tiling, mask: MaskSpec, q, k, v):
    """`block_sparse_attention` by XLA's tiles (any platform)."""
    n, d = q.shape[1], q.shape[-1]
    transpose = mask.is_dalle and mask.column_major(n)
    if transpose:
        q, k, v = (transpose_image(x, mask.text_len, mask.grid_width) for x in (q, k, v))
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    # Heads first, so every tile product is a plain batched matmul over the last two axes.
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if tiling.padded != n:
        pad = [(0, 0), (0, 0), (0, tiling.padded - n), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    out = _tiled_attention(tiling, q, k, v)[:, :, :n].transpose(0, 2, 1, 3)
    return transpose_image(out, mask.text_len, mask.grid_width) if transpose else out


def dense_in_tile_order(mask: MaskSpec, length: int) -> np.ndarray:
    """mask.dense(length), rows and columns in column-major image order where the tiles put
    the image so (column layers)."""
    dense = mask.dense(length)
    if mask.is_dalle and mask.column_major(length):
        order = column_major_order(mask.text_len, mask.grid_width)
        dense = dense[np.ix_(order, order)]
    return dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_attention(tiling: Tiling, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over `tiling`'s tiles; q (pre-scaled), k, v [b, h, padded, d]."""
    return _forward(tiling, q, k, v)[0]


def _spec(tiles: TileSet) -> str:
    return 'bhkd' if tiles.shared else 'bhgkd'


def _tile_einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """jnp.einsum(spec) in float32 over tile sets, whose g axis (the rectangles) is third.
    A set of one rectangle drops its g axis around the product: XLA:CPU otherwise lays the
    product out with the unit axis outermost and copies it back (at the causal tree's top
    level, 32 MiB per copy, three per layer of `igpt_train`)."""
    if x.shape[2] != 1:
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
    x_axes, y_axes = spec.split('->')[0].split(',')
    x, y = (a.squeeze(2) if 'g' in axes else a for a, axes in ((x, x_axes), (y, y_axes)))
    product = jnp.einsum(spec.replace('g', ''), x, y, preferred_element_type=jnp.float32)
    return jnp.expand_dims(product, 2)


def _logits(tiles: TileSet, q: jax.Array, k: jax.Array) -> jax.Array:
    s = _tile_einsum(f'bhgqd,{_spec(tiles)}->bhgqk', tiles.queries.read(q), tiles.keys.read(k))
    return s if tiles.mask is None else jnp.where(tiles.mask, s, MASK_VALUE)


def _forward(tiling: Tiling, q, k, v):
    n = q.shape[2]
    partial, lse = [], None
    for tiles in tiling.tiles:
        s = _logits(tiles, q, k)                                        # [b, h, G, M, K]
        m = s.max(axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        o = _tile_einsum(f'bhgqk,{_spec(tiles)}->bhgqd', e.astype(v.dtype),
                         tiles.keys.read(v))                            # unnormalised
        tile_lse = tiles.queries.place(m + jnp.log(e.sum(axis=-1, keepdims=True)), n,
                                       fill=MASK_VALUE)                 # [b, h, n, 1]
        lse = tile_lse if lse is None else jnp.logaddexp(lse, tile_lse)
        partial.append((e, m, o))
    out = sum(tiles.queries.place(o * jnp.exp(m - tiles.queries.read(lse)), n)
              for tiles, (_, m, o) in zip(tiling.tiles, partial, strict=True))
    out = out.astype(q.dtype)
    exps = tuple((e, m) for e, m, _ in partial)
    return out, (q, k, v, out, lse, exps)


def _backward(tiling: Tiling, residuals, d_out):
    q, k, v, out, lse, exps = residuals
    n = q.shape[2]
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)  # [b, h, n, 1]
    dq = dk = dv = 0.0
    for tiles, (e, m) in zip(tiling.tiles, exps, strict=True):
        rows, keys, spec = tiles.queries, tiles.keys, _spec(tiles)
        scale = jnp.exp(m - rows.read(lse))       # [b, h, G, M, 1]: P = e · scale
        d_rows = rows.read(d_out)                 # [b, h, G, M, d]
        dp = _tile_einsum(f'bhgqd,{spec}->bhgqk', d_rows.astype(v.dtype), keys.read(v))
        ds = e * (dp - rows.read(delta)) * scale  # dS = P ⊙ (dP − rowsum(dO ⊙ O))
        dq = dq + rows.place(_tile_einsum(f'bhgqk,{spec}->bhgqd', ds.astype(k.dtype),
                                          keys.read(k)), n)
        dk_tiles = _queries_t_times(rows.read(q), ds.astype(q.dtype), tiles.shared)
        dv_tiles = _queries_t_times((d_rows * scale).astype(v.dtype), e.astype(v.dtype),
                                    tiles.shared)
        dk = dk + keys.place(dk_tiles.swapaxes(-1, -2), n)
        dv = dv + keys.place(dv_tiles.swapaxes(-1, -2), n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _queries_t_times(a: jax.Array, b: jax.Array, shared: bool) -> jax.Array:
    """a^T · b over a tile set's queries: a [b, h, G, M, d], b [b, h, G, M, K] -> [.., d, K]
    (summed over G too when the keys are shared). Q^T·dS, not dS^T·Q: the big [.., M, K]
    operand keeps the layout it was written in, and only the small one is transposed."""
    if shared or a.shape[2] == 1:  # one rectangle: no g axis (see `_tile_einsum`)
        product = rows_t_times(a.reshape(*a.shape[:2], -1, a.shape[-1]),
                               b.reshape(*b.shape[:2], -1, b.shape[-1]), batch='bh')
        return product if shared else jnp.expand_dims(product, 2)
    return rows_t_times(a, b, batch='bhg')


_tiled_attention.defvjp(_forward, _backward)


# Column-major image order (the paper's transpose trick; splash uses it too) ----------------
def column_major_order(text_len: int, grid_width: int) -> np.ndarray:
    """int [T + W²]: position k of the column-major sequence holds raster position order[k]
    (text first, unchanged; then the image read column by column)."""
    image = np.arange(grid_width ** 2).reshape(grid_width, grid_width).T.reshape(-1)
    return np.concatenate([np.arange(text_len), text_len + image])


def transpose_image(x: jax.Array, text_len: int, grid_width: int) -> jax.Array:
    """[b, T + W², ...]: swaps the image's rows and columns (its own inverse), text unchanged.
    A reshape and transpose, so its gradient is one too (a gather's would be a scatter)."""
    image = x[:, text_len:].reshape(x.shape[0], grid_width, grid_width, *x.shape[2:])
    image = image.swapaxes(1, 2).reshape(x.shape[0], grid_width ** 2, *x.shape[2:])
    return jnp.concatenate([x[:, :text_len], image], axis=1)
