"""Attention mask descriptions.

A `MaskSpec` says which keys each query may attend to. From one description the attention
module derives the dense boolean mask used by the full forward pass and the incremental row
used by the KV-cache decoder; the two must always agree (`tests/test_igpt_model.py` checks it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

VALID_KINDS = ('causal', 'full')


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs may attend.

    Attributes:
      kind: 'causal' (query i sees keys j <= i, as in GPT / Image GPT) or 'full' (every query
        sees every key, as in BERT / CLIP).
    """

    kind: str

    def __post_init__(self):
        if self.kind not in VALID_KINDS:
            raise ValueError(
                f'MaskSpec kind={self.kind!r} is not supported; valid kinds are {VALID_KINDS}. '
                "Use 'causal' for autoregressive models and 'full' for bidirectional ones."
            )

    def dense(self, length: int) -> np.ndarray:
        """Dense mask, bool [length (query), length (key)]; True = may attend."""
        if self.kind == 'causal':
            return np.tril(np.ones((length, length), dtype=bool))
        return np.ones((length, length), dtype=bool)

    def allowed_keys(self, query_position: jax.Array, length: int) -> jax.Array:
        """Row `query_position` (may be traced) of `dense(length)`: bool [length]."""
        keys = jnp.arange(length)
        if self.kind == 'causal':
            return keys <= query_position
        return jnp.ones((length,), dtype=bool)


CAUSAL = MaskSpec('causal')
FULL = MaskSpec('full')
