"""Attention mask descriptions.

A `MaskSpec` says which keys each query may attend to. From one description the attention
module derives the dense boolean mask used by the reference forward pass, the block-sparse plan
(`pixelgen.nn.block_sparse`) and the incremental row used by the KV-cache decoder. `dense` and
`allowed_keys` evaluate the same rule (`_allowed`), so they always agree.

Kinds:
- 'causal': query i sees keys j <= i (GPT, Image GPT).
- 'full': every query sees every key (BERT, CLIP).
- 'row', 'column', 'conv': DALL·E's sparse layers (arXiv:2102.12092, App. B.1) over a sequence
  of `text_len` text tokens followed by a `grid_width` × `grid_width` image in raster order.
  With T = text_len, W = grid_width and image indices p = i − T, q = j − T of query i and key j,
  key j is allowed iff `j <= i and (j < T or rule(p, q))`: text→text is causal, image→text is
  full, and image→image follows the rule
    row:    p − q <= W                     (the previous W image tokens and self: the window
                                            reaches the same column of the previous row)
    column: (p − q) mod W == 0             (same column, all rows above, and self)
    conv:   |Δrow| <= 5 and |Δcol| <= 5    (an 11×11 window centred on the query, causal).

  By default columns do not wrap around the image edge: a query near the left edge sees fewer
  keys, and never keys from the far right of the image (ru-dalle's `hf_version='v3'`; its
  older 'v2' wrapped both coordinates modulo W, a torus).

  With conv_wraparound, the paper's Fig. 11 caption ("causal convolutional attention pattern
  with wraparound behavior (similar to the row attention)"): the window is taken in raster
  order, as the row mask's window is, so a column offset past the left edge continues at the
  end of the row above, and one past the right edge at the start of the row below. With
  d = p − q = dr·W + dc, dc in [−half, half] (unique for W > 2·half), the rule is
    conv_wraparound: 0 <= dr <= half and |dc| <= half   (dr = ⌊(d + half) / W⌋).
  It keeps the window's size, 5·11 + 6 = 61 keys for every query past the first rows, where
  the clipped window has fewer near the left and right edges. The caption gives no formula
  and the figure is 3 × 3 on a 4 × 4 grid; both readings are offered, clipped is the default.

Positions beyond text_len + W² follow the same formulas (their rows lie below the grid), so a
DALL·E mask is defined at any length; the model uses length text_len + W².
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VALID_KINDS = ('causal', 'full', 'row', 'column', 'conv')
DALLE_KINDS = ('row', 'column', 'conv', 'causal')  # what `dalle_mask` accepts


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs may attend.

    Attributes:
      kind: one of VALID_KINDS (see the module docstring).
      text_len: T, the text prefix of a DALL·E sequence (row, column, conv only).
      grid_width: W, the image grid is W × W tokens after the text (row, column, conv only).
      conv_window: side of the conv kind's window, odd (11 in the paper).
      conv_wraparound: the conv window in raster order, wrapping across rows (see above).
    """

    kind: str
    text_len: int = 0
    grid_width: int = 0
    conv_window: int = 11
    conv_wraparound: bool = False

    def __post_init__(self):
        if self.kind not in VALID_KINDS:
            raise ValueError(
                f'MaskSpec kind={self.kind!r} is not supported; valid kinds are {VALID_KINDS}. '
                "Use 'causal' for autoregressive models, 'full' for bidirectional ones, and "
                "'row', 'column' or 'conv' (with text_len and grid_width) for DALL·E layers."
            )
        if self.is_dalle:
            if self.grid_width < 1 or self.text_len < 0:
                raise ValueError(
                    f'MaskSpec({self.kind!r}) needs grid_width >= 1 and text_len >= 0; got '
                    f'grid_width={self.grid_width}, text_len={self.text_len}. Pass the image '
                    'grid width W (32 for a 32×32 grid) and the text length T.')
            if self.conv_window < 1 or self.conv_window % 2 == 0:
                raise ValueError(f'conv_window={self.conv_window} must be odd and >= 1 (the '
                                 'window is centred on the query); the paper uses 11.')
            if self.conv_wraparound and self.grid_width < self.conv_window:
                raise ValueError(f'conv_wraparound needs an image at least as wide as the '
                                 f'conv window ({self.conv_window}); grid_width='
                                 f'{self.grid_width}. Use the clipped window '
                                 '(conv_wraparound=False) for so small a grid.')

    @property
    def is_dalle(self) -> bool:
        """Whether this is one of DALL·E's text + image sparse kinds."""
        return self.kind in ('row', 'column', 'conv')

    @property
    def sequence_length(self) -> int:
        """T + W², the DALL·E sequence this mask is made for (row, column, conv only)."""
        if not self.is_dalle:
            raise ValueError(f'MaskSpec({self.kind!r}) has no fixed sequence length.')
        return self.text_len + self.grid_width ** 2

    def dense(self, length: int) -> np.ndarray:
        """Dense mask, bool [length (query), length (key)]; True = may attend."""
        positions = np.arange(length)
        return np.asarray(self._allowed(positions[:, None], positions[None, :], np))

    def allowed_keys(self, query_position: jax.Array, length: int) -> jax.Array:
        """Row `query_position` (may be traced) of `dense(length)`: bool [length]."""
        query = jnp.asarray(query_position, jnp.int32)
        return jnp.broadcast_to(self._allowed(query, jnp.arange(length), jnp), (length,))

    def decode_keys(self, query_position: jax.Array,
                    length: int) -> tuple[jax.Array, jax.Array] | None:
        """The keys one decoding step at `query_position` (may be traced) needs to read:
        (positions int [K], allowed bool [K]), K = T + W + 1 (row), T + W (column) or
        T + 5·W + 6 (conv), a superset of the allowed keys. None where the whole row of
        `length` keys must be read: causal and full, or a cache not of length T + W²."""
        if not self.is_dalle or length != self.sequence_length:
            return None
        t, w = self.text_len, self.grid_width
        query = jnp.asarray(query_position, jnp.int32)
        text = jnp.arange(t, dtype=jnp.int32)
        if self.kind == 'column':  # the query's column, every row (text queries: none allowed)
            image = t + (query - t) % w + w * jnp.arange(w, dtype=jnp.int32)
        else:  # the raster-order window that ends at the query
            half = self.conv_window // 2
            size = w + 1 if self.kind == 'row' else half * w + half + 1
            if size > w * w:
                return None
            start = jnp.clip(query - (size - 1), t, length - size)
            image = start + jnp.arange(size, dtype=jnp.int32)
        keys = jnp.concatenate([text, image])
        return keys, self._allowed(query, keys, jnp)

    def column_major(self, length: int) -> bool:
        """Whether the block-sparse path should transpose the image to column-major order
        (the paper's trick for column layers: the mask becomes W × W lower-triangular blocks
        on the diagonal). Only at the full length T + W²."""
        return self.kind == 'column' and length == self.sequence_length

    def _allowed(self, i: Any, j: Any, xp: Any) -> Any:
        """The rule, elementwise over broadcast query positions i and key positions j; xp is
        numpy (dense) or jax.numpy (traced decoding positions)."""
        if self.kind == 'full':
            return xp.ones(xp.broadcast_shapes(xp.shape(i), xp.shape(j)), dtype=bool)
        causal = j <= i
        if self.kind == 'causal':
            return causal
        t, w = self.text_len, self.grid_width
        p, q = i - t, j - t  # image indices (negative for text; text keys pass by j < T)
        if self.kind == 'row':
            rule = p - q <= w
        elif self.kind == 'column':
            rule = (p - q) % w == 0
        elif self.conv_wraparound:  # the window in raster order: offsets d = dr·W + dc
            half = self.conv_window // 2
            rows_up = (p - q + half) // w
            rule = (rows_up >= 0) & (rows_up <= half) & (xp.abs(p - q - rows_up * w) <= half)
        else:  # conv, clipped at the image's edges
            half = self.conv_window // 2
            rule = (xp.abs(p // w - q // w) <= half) & (xp.abs(p % w - q % w) <= half)
        return causal & ((j < t) | rule)


CAUSAL = MaskSpec('causal')
FULL = MaskSpec('full')


def dalle_mask(kind: str, text_len: int, grid_width: int, *,
               conv_wraparound: bool = False) -> np.ndarray:
    """DALL·E's dense mask of `kind` (row, column, conv or causal), bool [n, n] (query, key),
    n = text_len + grid_width**2."""
    return dalle_mask_spec(kind, text_len, grid_width, conv_wraparound=conv_wraparound).dense(
        text_len + grid_width ** 2)


def dalle_mask_spec(kind: str, text_len: int, grid_width: int, *,
                    conv_wraparound: bool = False) -> MaskSpec:
    """The MaskSpec of a DALL·E layer of `kind` (row, column, conv or causal);
    conv_wraparound applies to conv layers."""
    if kind not in DALLE_KINDS:
        raise ValueError(f'DALL·E mask kind={kind!r} is not supported; valid kinds are '
                         f'{DALLE_KINDS} (the paper uses row, column and conv; causal is the '
                         'dense baseline).')
    if kind == 'causal':
        if grid_width < 1 or text_len < 0:
            raise ValueError(f'grid_width={grid_width} must be >= 1 and text_len={text_len} '
                             '>= 0.')
        return CAUSAL
    return MaskSpec(kind, text_len, grid_width,
                    conv_wraparound=conv_wraparound and kind == 'conv')


def dalle_layer_kinds(num_layers: int) -> tuple[str, ...]:
    """The paper's schedule: for 1-based layer i of L, layer L is 'conv'; otherwise 'column'
    if (i − 2) mod 4 == 0, else 'row' (so the first four are row, column, row, row)."""
    if num_layers < 1:
        raise ValueError(f'num_layers={num_layers} must be >= 1.')
    return tuple('conv' if i == num_layers else 'column' if (i - 2) % 4 == 0 else 'row'
                 for i in range(1, num_layers + 1))


def dalle_layer_masks(num_layers: int, text_len: int, grid_width: int, *,
                      conv_wraparound: bool = False) -> tuple[MaskSpec, ...]:
    """One MaskSpec per layer following `dalle_layer_kinds`, for `Transformer(mask=...)`."""
    return tuple(dalle_mask_spec(kind, text_len, grid_width, conv_wraparound=conv_wraparound)
                 for kind in dalle_layer_kinds(num_layers))
