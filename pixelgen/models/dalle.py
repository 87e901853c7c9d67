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

`generate` draws image codes from a caption (and, optionally, the first rows of an image)
with a KV cache in one compiled loop; every step uses the layer's sparse mask.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen import core_split, cpu_decode
from pixelgen.nn import packed_matmul
from pixelgen.nn.attention import logical_init
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
                 remat: str = 'none', rngs: nnx.Rngs):
        """Args:
          text_vocab_size: BPE vocabulary (16384 in the paper), special tokens included.
          image_vocab_size: dVAE codebook size (8192 in the paper).
          text_len: T, text positions (256 in the paper); at least 2.
          grid_size: W, the image is W × W codes (32 in the paper).
          num_layers, width, num_heads, mlp_ratio: transformer shape (12B: 64, 3968, 62, 4).
          layer_kinds: one of 'row', 'column', 'conv', 'causal' per layer; default the
            paper's schedule (`dalle_layer_kinds`). All 'causal' is the dense baseline.
          dtype, attention_impl, remat: as for the shared Transformer.
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
        masks = (dalle_layer_masks(num_layers, text_len, grid_size) if layer_kinds is None
                 else tuple(dalle_mask_spec(k, text_len, grid_size) for k in self.layer_kinds))

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
    def init_cache(self, batch_size: int) -> Cache:
        return self.transformer.init_cache(batch_size, self.seq_len)

    def decode_step(self, token: jax.Array, position: jax.Array,
                    cache: Cache) -> tuple[jax.Array, Cache]:
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
        h, cache = self.transformer.decode(h, cache, position)
        logits = packed_matmul.project(self.image_head, self.ln_f(h))[:, 0]
        return logits.astype(jnp.float32), cache


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """logits [b, v] -> logits / temperature with all but the top-k and/or the smallest
    nucleus of mass >= top_p set to -inf (the most likely token is always kept)."""
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def generate(model: DallE, rng: jax.Array, text: jax.Array, *,
             image_prompt: jax.Array | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Image codes for captions: text [b, T] token ids -> codes int32 [b, N].

    With image_prompt [b, P] the first P codes (e.g. the top rows of an image) are kept and
    the rest completed (the paper's image-to-image translation). One `lax.fori_loop` over
    the T + N - 1 positions with the KV cache; position i draws with fold_in(rng, i), the
    same however the work is split (on a multi-core CPU, over one-thread clients, one per
    core: the weights on 2 cores, `pixelgen.core_split`, else the rows, `pixelgen.cpu_decode`).
    The paper samples at temperature 1 without top-k or top-p (the defaults).
    """
    text = jnp.asarray(text, jnp.int32)
    if text.ndim != 2 or text.shape[1] != model.text_len:
        raise ValueError(f'text must be [batch, text_len={model.text_len}]; got {text.shape}.')
    batch = text.shape[0]
    if image_prompt is None:
        image_prompt = jnp.zeros((batch, 0), jnp.int32)
    image_prompt = jnp.asarray(image_prompt, jnp.int32)
    if (image_prompt.ndim != 2 or image_prompt.shape[0] != batch
            or image_prompt.shape[1] > model.num_image_tokens):
        raise ValueError(f'image_prompt must be [batch={batch}, P] with P <= '
                         f'{model.num_image_tokens}; got {image_prompt.shape}.')
    if not temperature > 0:
        raise ValueError(f'temperature={temperature} must be > 0; use top_k=1 for greedy.')
    if top_k is not None and not 1 <= top_k <= model.image_vocab_size:
        raise ValueError(f'top_k={top_k} must be in [1, {model.image_vocab_size}] (or None).')
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f'top_p={top_p} must be in (0, 1] (or None).')
    graphdef, state = nnx.split(model)
    run = functools.partial(_generate_jit, graphdef, batch_size=batch,
                            temperature=float(temperature), top_k=top_k, top_p=top_p)
    # On a 2-core CPU the weights are split between the cores (pixelgen.core_split); on other
    # CPUs the rows are decoded on one-thread clients, one per core (pixelgen.cpu_decode).
    if core_split.applies(state):
        return core_split.map_halves(run, state, [rng], [text, image_prompt], batch)
    return cpu_decode.map_rows(run, state, [rng], [text, image_prompt], batch, pack=True)


@functools.partial(jax.jit, static_argnames=('graphdef', 'batch_size', 'temperature', 'top_k',
                                             'top_p', 'row_count', 'party', 'packed'))
def _generate_jit(graphdef, state, rng, text, image_prompt, *, batch_size, temperature, top_k,
                  top_p, row_start, row_count, party=None, packed=False):
    """The codes of the batch's rows [row_start, row_start + row_count) (text and image_prompt
    hold only those); with `party`, from that party's half of the weights
    (`core_split.map_halves`); with `packed`, on packed weights (`pixelgen.nn.packed_matmul`)."""
    model: DallE = nnx.merge(graphdef, state)
    with core_split.as_party(model, party), packed_matmul.packing(model if packed else None):
        return _generate_codes(model, rng, text, image_prompt, batch_size, temperature, top_k,
                               top_p, row_start, row_count)


def _generate_codes(model, rng, text, image_prompt, batch_size, temperature, top_k, top_p,
                    row_start, row_count):
    batch, t, n = text.shape[0], model.text_len, model.num_image_tokens
    prompt_len = image_prompt.shape[1]
    noise = cpu_decode.gumbel_rows(rng, 0, t + n - 1, batch_size, row_start, row_count,
                                   model.image_vocab_size)
    sequence = jnp.zeros((batch, t + n), jnp.int32)
    sequence = jax.lax.dynamic_update_slice(sequence, text, (0, 0))
    sequence = jax.lax.dynamic_update_slice(sequence, image_prompt, (0, t))

    def step(position, carry):
        sequence, cache = carry
        token = jax.lax.dynamic_index_in_dim(sequence, position, axis=1, keepdims=False)
        logits, cache = model.decode_step(token, position, cache)  # next image code
        logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        drawn = jnp.argmax(logits + noise(position), axis=-1)  # jax.random.categorical's
        target = position + 1
        kept = jax.lax.dynamic_index_in_dim(sequence, target, axis=1, keepdims=False)
        code = jnp.where(target < t + prompt_len, kept, drawn.astype(jnp.int32))  # prompts stay
        return jax.lax.dynamic_update_slice(sequence, code[:, None], (0, target)), cache

    sequence, _ = jax.lax.fori_loop(0, t + n - 1, step, (sequence, model.init_cache(batch)))
    return sequence[:, t:]
