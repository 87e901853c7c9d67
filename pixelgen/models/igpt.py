"""Image GPT (Chen et al. 2020, "Generative Pretraining from Pixels").

Follows openai/image-gpt `src/model.py`:

    h_0 = concat(sos, wte[x_0 .. x_{n-2}]) + wpe[0 .. n-1]
    h_l = block_l(h_{l-1})                      (pre-norm, causal, no biases)
    logits = ln_f(h_L) @ head                    (head untied from wte and zero-initialised)

so logits[:, i] predicts token x_i from x_{<i}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.nn.attention import logical_init
from pixelgen.nn.masks import CAUSAL
from pixelgen.nn.transformer import LayerCache, Transformer, rms_norm
from pixelgen.parallel import constrain

Cache = tuple[LayerCache, ...]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'ImageGPT {name}={value!r} must be a positive integer.')


class ImageGPT(nnx.Module):
    """Image GPT (Chen et al. 2020): a causal transformer over palette-index sequences.

    Parameters are float32; `dtype` is the compute dtype. Logits are always float32.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, num_layers: int, width: int,
                 num_heads: int, mlp_ratio: int = 4, dtype: Any = jnp.float32,
                 attention_impl: str = 'block_sparse', remat: str = 'none',
                 rngs: nnx.Rngs):
        """Args:
          vocab_size: palette size (512 in the paper); sos is a separate vector, not a token.
          seq_len: number of pixels, e.g. 32 * 32 = 1024.
          num_layers, width, num_heads, mlp_ratio: transformer shape (iGPT-S: 24, 512, 8, 4).
          dtype: compute dtype, e.g. jnp.bfloat16.
          attention_impl: 'block_sparse' (fast, skips masked blocks) or 'dense' (reference).
          remat: recompute blocks in the backward pass: 'none', 'full' or 'dots'.
          rngs: parameter rngs.
        """
        _check_positive(vocab_size=vocab_size, seq_len=seq_len, num_layers=num_layers,
                        width=width, num_heads=num_heads, mlp_ratio=mlp_ratio)
        if width % num_heads:
            raise ValueError(
                f'ImageGPT num_heads={num_heads} must divide width={width}; change width to a '
                f'multiple of {num_heads} or num_heads to a divisor of {width}.'
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.width = width
        self.dtype = dtype

        self.wte = nnx.Embed(
            vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=logical_init(nnx.initializers.normal(0.02), ('vocab', 'embed')),
            rngs=rngs)
        self.wpe = nnx.Param(logical_init(nnx.initializers.normal(0.01), ('length', 'embed'))(
            rngs.params(), (seq_len, width), jnp.float32))
        self.sos = nnx.Param(logical_init(nnx.initializers.normal(0.02), ('embed',))(
            rngs.params(), (width,), jnp.float32))
        self.transformer = Transformer(num_layers=num_layers, width=width, num_heads=num_heads,
                                       mask=CAUSAL, mlp_ratio=mlp_ratio, dtype=dtype,
                                       attention_impl=attention_impl, remat=remat, rngs=rngs)
        self.ln_f = rms_norm(width, dtype, rngs)
        self.head = nnx.Linear(
            width, vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            preferred_element_type=jnp.float32,
            kernel_init=logical_init(nnx.initializers.zeros, ('embed', 'vocab')), rngs=rngs)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length] -> shifted input embeddings [batch, length, width]."""
        batch, length = tokens.shape
        sos = jnp.broadcast_to(self.sos[...], (batch, 1, self.width))
        h = jnp.concatenate([sos, self.wte(tokens[:, :-1]).astype(jnp.float32)], axis=1)
        h = h + self.wpe[:length]
        return constrain(h.astype(self.dtype), ('batch', 'length', 'embed'))

    def _check_tokens(self, tokens: jax.Array) -> None:
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.seq_len:
            raise ValueError(
                f'tokens must be [batch, length] with 1 <= length <= seq_len={self.seq_len}; '
                f'got shape {tokens.shape}.'
            )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length<=seq_len] int32 palette indices -> logits [batch, length,
        vocab_size] float32. Position i is predicted from tokens < i: the input is
        concat(sos, embed(tokens[:, :-1])) + position embedding."""
        self._check_tokens(tokens)
        h = self.transformer(self._embed(tokens))
        logits = self.head(self.ln_f(h)).astype(jnp.float32)
        return constrain(logits, ('batch', 'length', 'vocab'))

    def hidden_features(self, tokens: jax.Array) -> jax.Array:
        """Linear-probe features: for every layer l, mean over the sequence of norm1(h_l).

        tokens [batch, length] -> [num_layers, batch, width] float32 (P2 §2.4).
        """
        self._check_tokens(tokens)
        _, features = self.transformer(self._embed(tokens), return_features=True)
        return jnp.stack([f.astype(jnp.float32).mean(axis=1) for f in features])

    def init_cache(self, batch_size: int, length: int | None = None) -> Cache:
        """Empty KV cache for `decode_step`: per-layer k, v [batch, length, heads, head_dim];
        `length` (default seq_len) bounds the positions that can be decoded."""
        return self.transformer.init_cache(batch_size, length or self.seq_len)

    def decode_step(self, prev_tokens: jax.Array, position: jax.Array,
                    cache: Cache) -> tuple[jax.Array, Cache]:
        """prev_tokens [batch] int32 = tokens[:, position-1] (ignored at position 0, where the
        sos vector is used); returns logits [batch, vocab_size] float32 for tokens[:, position],
        and the new cache."""
        position = jnp.asarray(position, jnp.int32)
        tok = self.wte(prev_tokens).astype(jnp.float32)  # [b, width]
        h = jnp.where(position == 0, self.sos[...][None], tok) + self.wpe[position]
        h, cache = self.transformer.decode(h[:, None, :].astype(self.dtype), cache, position)
        logits = self.head(self.ln_f(h))[:, 0]  # [b, vocab]
        return logits.astype(jnp.float32), cache
