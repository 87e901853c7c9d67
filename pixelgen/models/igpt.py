"""Image GPT (Chen et al. 2020, "Generative Pretraining from Pixels").

Follows openai/image-gpt `src/model.py`:

    h_0 = concat(sos, wte[x_0 .. x_{n-2}]) + wpe[0 .. n-1]
    h_l = block_l(h_{l-1})                      (pre-norm, causal, no biases)
    logits = ln_f(h_L) @ head                    (head untied from wte and zero-initialised)

so logits[:, i] predicts token x_i from x_{<i}.

With `objective='bert'` (the paper's BERT variant) there is no sos and no shift: the input is
`wte[x'] + wpe`, where x' has about 15% of its tokens replaced by a mask token (one extra row
of `wte`), attention is bidirectional, and logits[:, i] predicts the original x_i.

With `num_classes > 0` a bias-free classification head reads the sequence average of
ln_f(h_L) (fine-tuning, as in the paper): `class_logits = mean_i ln_f(h_L)_i @ clf`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.nn.attention import logical_init
from pixelgen.nn.decode_ops import PLAIN, DecodeOps
from pixelgen.nn.masks import CAUSAL, FULL
from pixelgen.nn.matmul import linear_dot_general
from pixelgen.nn.transformer import Cache, Transformer, rms_norm
from pixelgen.parallel import constrain

OBJECTIVES = ('ar', 'bert')
BERT_MASK_RATE = 0.15  # P2 §3.2 (20% was equivalent, 25-35% worse)


def bert_mask(tokens: jax.Array, rng: jax.Array, mask_token: int,
              rate: float = BERT_MASK_RATE) -> tuple[jax.Array, jax.Array]:
    """Replaces each token by `mask_token` with probability `rate` (as openai/image-gpt:
    keep where uniform > rate). tokens [batch, length] -> (inputs [batch, length],
    is_masked bool [batch, length])."""
    is_masked = jax.random.uniform(rng, tokens.shape) < rate
    return jnp.where(is_masked, mask_token, tokens).astype(tokens.dtype), is_masked


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
                 objective: str = 'ar', num_classes: int = 0, scan_layers: bool = False,
                 rngs: nnx.Rngs):
        """Args:
          vocab_size: palette size (512 in the paper); sos is a separate vector, not a token.
          seq_len: number of pixels, e.g. 32 * 32 = 1024.
          num_layers, width, num_heads, mlp_ratio: transformer shape (iGPT-S: 24, 512, 8, 4).
          dtype: compute dtype, e.g. jnp.bfloat16.
          attention_impl: 'block_sparse' (fast, skips masked blocks) or 'dense' (reference).
          remat: recompute blocks in the backward pass: 'none', 'full' or 'dots'.
          objective: 'ar' (causal, next pixel) or 'bert' (bidirectional, masked pixels; the
            mask token is id `vocab_size`).
          num_classes: > 0 adds the bias-free, zero-initialised classification head.
          scan_layers: stack the blocks' parameters on a leading 'layers' axis and scan over
            them (one layer is compiled whatever the depth; see `Transformer`).
          rngs: parameter rngs.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f'ImageGPT objective={objective!r} must be one of {OBJECTIVES}.')
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'ImageGPT num_classes={num_classes!r} must be an integer >= 0 '
                             '(0: no classification head).')
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
        self.objective = objective
        self.num_classes = num_classes
        bert = objective == 'bert'
        self.mask_token = vocab_size if bert else None

        self.wte = nnx.Embed(
            vocab_size + 1 if bert else vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=logical_init(nnx.initializers.normal(0.02), ('vocab', 'embed')),
            rngs=rngs)
        self.wpe = nnx.Param(logical_init(nnx.initializers.normal(0.01), ('length', 'embed'))(
            rngs.params(), (seq_len, width), jnp.float32))
        self.sos = None if bert else nnx.Param(logical_init(
            nnx.initializers.normal(0.02), ('embed',))(rngs.params(), (width,), jnp.float32))
        self.transformer = Transformer(num_layers=num_layers, width=width, num_heads=num_heads,
                                       mask=FULL if bert else CAUSAL, mlp_ratio=mlp_ratio,
                                       dtype=dtype, attention_impl=attention_impl,
                                       remat=remat, scan_layers=scan_layers, rngs=rngs)
        self.ln_f = rms_norm(width, dtype, rngs)
        self.head = nnx.Linear(
            width, vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            preferred_element_type=jnp.float32, dot_general=linear_dot_general,
            kernel_init=logical_init(nnx.initializers.zeros, ('embed', 'vocab')), rngs=rngs)
        self.clf = nnx.Linear(  # zero-initialised like openai/image-gpt's wclf
            width, num_classes, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            preferred_element_type=jnp.float32,
            kernel_init=logical_init(nnx.initializers.zeros, ('embed', None)),
            rngs=rngs) if num_classes else None

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length] -> input embeddings [batch, length, width]: shifted behind
        sos for 'ar', in place (mask tokens included) for 'bert'."""
        batch, length = tokens.shape
        if self.objective == 'bert':
            h = self.wte(tokens).astype(jnp.float32)
        else:
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
        vocab_size] float32. 'ar': position i is predicted from tokens < i (the input is
        concat(sos, embed(tokens[:, :-1])) + position embedding). 'bert': from every
        position of `tokens`, which carry mask tokens where the pixel is to be predicted."""
        return self.logits_and_class_logits(tokens)[0]

    def logits_and_class_logits(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """tokens [batch, length] -> (logits [batch, length, vocab_size], class logits
        [batch, num_classes] or None without a classification head), from one forward pass."""
        self._check_tokens(tokens)
        final = self.ln_f(self.transformer(self._embed(tokens)))  # [b, l, width]
        logits = constrain(self.head(final).astype(jnp.float32), ('batch', 'length', 'vocab'))
        if self.clf is None:
            return logits, None
        pooled = final.astype(jnp.float32).mean(axis=1)  # average pool over the sequence
        return logits, self.clf(pooled).astype(jnp.float32)

    def hidden_features(self, tokens: jax.Array) -> jax.Array:
        """Linear-probe features: for every layer l, mean over the sequence of norm1(h_l).

        tokens [batch, length] -> [num_layers, batch, width] float32 (P2 §2.4).
        """
        self._check_tokens(tokens)
        _, features = self.transformer(self._embed(tokens), return_features=True)
        if isinstance(features, list):  # looped layers: one [b, l, width] array each
            return jnp.stack([f.astype(jnp.float32).mean(axis=1) for f in features])
        return features.astype(jnp.float32).mean(axis=2)  # scanned: [layers, b, l, width]

    def init_cache(self, batch_size: int, length: int | None = None,
                   ops: DecodeOps = PLAIN) -> Cache:
        """Empty KV cache for `decode_step`: per-layer k, v [batch, heads, length, head_dim]
        (with scan_layers one cache stacked on a leading [num_layers] axis); `length`
        (default seq_len) bounds the positions that can be decoded."""
        self._check_autoregressive()
        return self.transformer.init_cache(batch_size, length or self.seq_len, ops)

    def decode_step(self, prev_tokens: jax.Array, position: jax.Array, cache: Cache,
                    ops: DecodeOps = PLAIN) -> tuple[jax.Array, Cache]:
        """prev_tokens [batch] int32 = tokens[:, position-1] (ignored at position 0, where the
        sos vector is used); returns logits [batch, vocab_size] float32 for tokens[:, position],
        and the new cache. `ops`: the step's projections and partial sums (`DecodeOps`)."""
        self._check_autoregressive()
        position = jnp.asarray(position, jnp.int32)
        tok = self.wte(prev_tokens).astype(jnp.float32)  # [b, width]
        h = jnp.where(position == 0, self.sos[...][None], tok) + self.wpe[position]
        h, cache = self.transformer.decode(h[:, None, :].astype(self.dtype), cache, position,
                                           ops)
        logits = ops.project(self.head, self.ln_f(h))[:, 0]  # [b, vocab]
        return logits.astype(jnp.float32), cache

    def _check_autoregressive(self) -> None:
        if self.objective != 'ar':
            raise ValueError(f"A {self.objective!r} Image GPT is not autoregressive: it cannot "
                             'decode pixel by pixel. Sample from an objective=ar model, or '
                             'fill in masked pixels with model(tokens).')
