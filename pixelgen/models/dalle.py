"""The DALL·E transformer (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation").

One stream of T text tokens followed by the W × W image codes of a dVAE, in raster order:

    h[k]     = text_embed[x_k] + text_pos[k]                      k < T   (text)
    h[T + p] = image_embed[c_p] + row_embed[p // W] + col_embed[p % W]   (image token p)
    h        = transformer(h)     layer masks: row / column / conv (pixelgen.nn.masks), each
                                  with causal text->text and full image->text attention
    text_logits[k]  = text_head(ln_f(h[k]))       k = 0 .. T-2   predicts x_{k+1}
    image_logits[p] = image_head(ln_f(h[T-1+p]))  p = 0 .. N-1   predicts c_p

Padding (the paper's §2.2): the pad id at text position k is replaced by its own token
`text_vocab_size + k`, so each of the T positions has a distinct learned pad embedding.
Pads are never predicted: the text head covers only the text vocabulary.

`decode_step` is one step of a KV-cache decoding loop that reads only the keys each layer's
sparse mask allows; `pixelgen.sampling.generate` draws image codes from a caption with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.nn.attention import logical_init
from pixelgen.nn.decode_ops import PLAIN, DecodeOps
from pixelgen.nn.masks import dalle_layer_kinds, dalle_layer_masks, dalle_mask_spec
from pixelgen.nn.matmul import linear_dot_general
from pixelgen.nn.transformer import LayerCache, Transformer, rms_norm
from pixelgen.parallel import constrain

Cache = tuple[LayerCache, ...]
PAD_ID = 0  # pixelgen.data.text puts '[PAD]' first


class DallE(nnx.Module):
    """Text + image-code transformer with DALL·E's sparse masks. Parameters are float32;
    `dtype` is the compute dtype; logits are float32."""

    def __init__(self, *, text_vocab_size: int, image_vocab_size: int, text_len: int,
                 grid_size: int, num_layers: int, width: int, num_heads: int,
                 mlp_ratio: int = 4, layer_kinds: tuple[str, ...] | None = None,
                 dtype: Any = jnp.float32, attention_impl: str = 'block_sparse',
                 remat: str = 'none', conv_wraparound: bool = False, rngs: nnx.Rngs):
        """Args:
          text_vocab_size: BPE vocabulary (16384 in the paper), special tokens included.
          image_vocab_size: dVAE codebook size (8192 in the paper).
          text_len: T, text positions (256 in the paper); at least 2.
          grid_size: W, the image is W × W codes (32 in the paper).
          num_layers, width, num_heads, mlp_ratio: transformer shape (12B: 64, 3968, 62, 4).
          layer_kinds: one of 'row', 'column', 'conv', 'causal' per layer; default the
            paper's schedule (`dalle_layer_kinds`). All 'causal' is the dense baseline.
          dtype, attention_impl, remat: as for the shared Transformer.
          conv_wraparound: conv layers' window in raster order, wrapping across rows
            (`pixelgen.nn.masks`); default the window clipped at the image's edges.
        """
        for name, value in dict(text_vocab_size=text_vocab_size,
                                image_vocab_size=image_vocab_size, grid_size=grid_size,
                                num_layers=num_layers, width=width, num_heads=num_heads).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'DallE {name}={value!r} must be a positive integer.')
        if text_len < 2:
            raise ValueError(f'DallE text_len={text_len} must be at least 2.')
        self.text_vocab_size, self.image_vocab_size = text_vocab_size, image_vocab_size
        self.text_len, self.grid_size = text_len, grid_size
        self.num_image_tokens = grid_size * grid_size
        self.seq_len = text_len + self.num_image_tokens
        self.width, self.dtype = width, dtype
        self.layer_kinds = tuple(layer_kinds or dalle_layer_kinds(num_layers))
        if len(self.layer_kinds) != num_layers:
            raise ValueError(f'layer_kinds has {len(self.layer_kinds)} entries; expected one per '
                             f'layer (num_layers={num_layers}).')
        masks = (dalle_layer_masks(num_layers, text_len, grid_size,
                                   conv_wraparound=conv_wraparound) if layer_kinds is None
                 else tuple(dalle_mask_spec(k, text_len, grid_size,
                                            conv_wraparound=conv_wraparound)
                            for k in self.layer_kinds))

        def param(shape, names, std):
            return nnx.Param(logical_init(nnx.initializers.normal(std), names)(
                rngs.params(), shape, jnp.float32))

        def embed(num, names=('vocab', 'embed')):
            return nnx.Embed(num, width, dtype=dtype, param_dtype=jnp.float32,
                             embedding_init=logical_init(nnx.initializers.normal(0.02), names),
                             rngs=rngs)

        self.text_embed = embed(text_vocab_size + text_len)  # + one pad per position
        self.text_pos = param((text_len, width), ('length', 'embed'), 0.01)
        self.image_embed = embed(image_vocab_size)
        self.row_embed = param((grid_size, width), (None, 'embed'), 0.01)
        self.col_embed = param((grid_size, width), (None, 'embed'), 0.01)
        self.transformer = Transformer(num_layers=num_layers, width=width, num_heads=num_heads,
                                       mask=masks, mlp_ratio=mlp_ratio, dtype=dtype,
                                       attention_impl=attention_impl, remat=remat, rngs=rngs)
        self.ln_f = rms_norm(width, dtype, rngs)

        def head(vocab):  # zero-initialised like Image GPT's: the first loss is log(vocab)
            return nnx.Linear(width, vocab, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                              preferred_element_type=jnp.float32, dot_general=linear_dot_general,
                              kernel_init=logical_init(nnx.initializers.zeros,
                                                       ('embed', 'vocab')), rngs=rngs)
        self.text_head = head(text_vocab_size)
        self.image_head = head(image_vocab_size)

    # Embeddings ------------------------------------------------------------------------
    def _text_ids(self, text: jax.Array, positions: jax.Array) -> jax.Array:
        """Pads -> the per-position pad tokens text_vocab_size + k."""
        return jnp.where(text == PAD_ID, self.text_vocab_size + positions, text)

    def embed(self, text: jax.Array, image: jax.Array) -> jax.Array:
        """text [b, T], image [b, N] int -> input embeddings [b, T + N, width]."""
        positions = jnp.arange(self.text_len)
        h_text = self.text_embed(self._text_ids(text, positions)).astype(jnp.float32)
        h_text = h_text + self.text_pos[...]
        grid = (self.row_embed[...][:, None] + self.col_embed[...][None, :]).reshape(
            self.num_image_tokens, self.width)  # broadcast row + column embeddings
        h_image = self.image_embed(image).astype(jnp.float32) + grid
        h = jnp.concatenate([h_text, h_image], axis=1)
        return constrain(h.astype(self.dtype), ('batch', 'length', 'embed'))

    def _check(self, text: jax.Array, image: jax.Array) -> None:
        if text.ndim != 2 or text.shape[1] != self.text_len:
            raise ValueError(f'text must be [batch, text_len={self.text_len}] token ids; got '
                             f'shape {text.shape}.')
        if image.shape != (text.shape[0], self.num_image_tokens):
            raise ValueError(f'image must be [batch={text.shape[0]}, {self.num_image_tokens}] '
                             f'codes (a {self.grid_size}x{self.grid_size} grid, raster order); '
                             f'got shape {image.shape}.')

    def __call__(self, text: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """text [b, T] ids (pads = 0), image [b, N] codes -> (text_logits [b, T-1,
        text_vocab] predicting text[:, 1:], image_logits [b, N, image_vocab] predicting
        image), both float32. Position i's logits depend only on tokens before it."""
        self._check(text, image)
        h = self.ln_f(self.transformer(self.embed(text, image)))  # [b, T + N, width]
        t = self.text_len
        text_logits = self.text_head(h[:, :t - 1]).astype(jnp.float32)
        image_logits = self.image_head(h[:, t - 1:self.seq_len - 1]).astype(jnp.float32)
        return (constrain(text_logits, ('batch', 'length', 'vocab')),
                constrain(image_logits, ('batch', 'length', 'vocab')))

    # Decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, ops: DecodeOps = PLAIN) -> Cache:
        return self.transformer.init_cache(batch_size, self.seq_len, ops)

    def decode_step(self, token: jax.Array, position: jax.Array, cache: Cache,
                    ops: DecodeOps = PLAIN) -> tuple[jax.Array, Cache]:
        """token [b] int: the sequence's token at `position` (a text id if position < T, else
        an image code). Returns the logits [b, image_vocab] of the next image code (meaningful
        from position T-1 on) and the new cache."""
        position = jnp.asarray(position, jnp.int32)
        t = self.text_len
        text_pos = jnp.minimum(position, t - 1)
        text_id = jnp.clip(self._text_ids(token, text_pos), 0, self.text_embed.num_embeddings - 1)
        h_text = self.text_embed(text_id).astype(jnp.float32) + self.text_pos[text_pos]
        p = jnp.clip(position - t, 0, self.num_image_tokens - 1)
        h_image = (self.image_embed(jnp.clip(token, 0, self.image_vocab_size - 1))
                   .astype(jnp.float32)
                   + self.row_embed[p // self.grid_size] + self.col_embed[p % self.grid_size])
        h = jnp.where(position < t, h_text, h_image)[:, None, :].astype(self.dtype)
        h, cache = self.transformer.decode(h, cache, position, ops)
        logits = ops.project(self.image_head, self.ln_f(h))[:, 0]
        return logits.astype(jnp.float32), cache

