"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): a ViT image encoder and a causal text transformer trained contrastively.

Follows openai/CLIP `clip/model.py` (and so HuggingFace's CLIPModel, whose weights load here):

    image:  x = [cls, patches @ W_patch] + pos;  x = ln_pre(x);  x = blocks(x)
            image_emb = ln_post(x[:, 0]) @ W_image                  (full attention)
    text:   x = token_embedding(t) + pos;  x = blocks(x)            (causal attention)
            text_emb = ln_final(x)[first end-of-text token] @ W_text
    logits = min(exp(logit_scale), 100) * normalise(image_emb) @ normalise(text_emb)^T

Blocks are the project's shared pre-norm blocks with CLIP's options: layer norm with bias,
biases in every projection, quick_gelu (OpenAI's models) or gelu.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixelgen.nn.attention import logical_init
from pixelgen.nn.masks import CAUSAL, FULL
from pixelgen.nn.transformer import Transformer, layer_norm
from pixelgen.parallel import constrain

# OpenAI's pixel statistics; images in [0, 1] are normalised with them inside the model.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0
POOLS = ('token', 'mean')  # a ViT's image vector: its class token's, or the patches' mean


def _normal(std: float, names: tuple[str | None, ...]):
    return logical_init(nnx.initializers.normal(std), names)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x [..., d] float32 -> x / |x| along the last axis."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class VisionTransformer(nnx.Module):
    """ViT (Dosovitskiy et al. 2021): square RGB images -> one vector per image.

        x = [cls, patches @ W_patch + b_patch] + pos;  x = blocks(ln_pre(x))
        pooled = ln_post(x)[:, 0]                     (pool='token': the class token)
               | mean over patches of ln_post(x)      (pool='mean': no class token)
        out = pooled @ W_proj                          (embed_dim=None: `pooled` itself)

    CLIP's image tower is the defaults (ln_pre, no patch bias, class token, projection); the
    ViT classifier (pixelgen.models.vit) has a patch bias, no ln_pre and no projection.
    """

    def __init__(self, *, image_size: int, patch_size: int, width: int, num_layers: int,
                 num_heads: int, embed_dim: int | None, mlp_ratio: int = 4,
                 activation: str = 'quick_gelu', dtype: Any = jnp.float32,
                 attention_impl: str = 'block_sparse', remat: str = 'none',
                 patch_bias: bool = False, pre_norm: bool = True, pool: str = 'token',
                 norm_eps: float = 1e-5, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f'image_size={image_size} is not divisible by '
                             f'patch_size={patch_size}; pick sizes whose ratio is a whole '
                             'number of patches.')
        if pool not in POOLS:
            raise ValueError(f'pool={pool!r}; expected one of {POOLS}.')
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.dtype = dtype
        self.pool = pool
        scale = width ** -0.5
        # The patch embedding is a stride-`patch_size` convolution, here a matmul on patches
        # flattened as (p1 p2 c); CLIP's has no bias, the ViT paper's has one.
        self.patch_embed = nnx.Linear(patch_size * patch_size * 3, width, use_bias=patch_bias,
                                      dtype=dtype, param_dtype=jnp.float32,
                                      kernel_init=_normal(0.02, (None, 'embed')),
                                      bias_init=logical_init(nnx.initializers.zeros,
                                                             ('embed',)), rngs=rngs)
        self.class_embedding = nnx.Param(_normal(scale, ('embed',))(
            rngs.params(), (width,), jnp.float32)) if pool == 'token' else None
        self.position_embedding = nnx.Param(_normal(scale, ('length', 'embed'))(
            rngs.params(), (self.grid ** 2 + (pool == 'token'), width), jnp.float32))
        self.ln_pre = layer_norm(width, dtype, rngs, eps=norm_eps) if pre_norm else None
        self.transformer = Transformer(num_layers=num_layers, width=width, num_heads=num_heads,
                                       mask=FULL, mlp_ratio=mlp_ratio, dtype=dtype,
                                       attention_impl=attention_impl, remat=remat, norm='layer',
                                       use_bias=True, activation=activation, norm_eps=norm_eps,
                                       rngs=rngs)
        self.ln_post = layer_norm(width, dtype, rngs, eps=norm_eps)
        self.proj = nnx.Linear(width, embed_dim, use_bias=False, dtype=dtype,
                               param_dtype=jnp.float32,
                               kernel_init=_normal(scale, ('embed', None)),
                               rngs=rngs) if embed_dim else None

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [batch, size, size, 3], normalised -> [batch, embed_dim or width] float32."""
        patches = einops.rearrange(pixels, 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)',
                                   p1=self.patch_size, p2=self.patch_size)
        x = self.patch_embed(patches.astype(self.dtype)).astype(jnp.float32)  # [b, grid², w]
        if self.pool == 'token':
            cls = jnp.broadcast_to(self.class_embedding[...], (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding[...]
        x = constrain(x.astype(self.dtype), ('batch', 'length', 'embed'))
        x = self.transformer(self.ln_pre(x) if self.ln_pre is not None else x)
        if self.pool == 'token':
            pooled = self.ln_post(x[:, 0])
        else:
            pooled = self.ln_post(x).astype(jnp.float32).mean(axis=1)
        pooled = pooled if self.proj is None else self.proj(pooled)
        return pooled.astype(jnp.float32)


class TextTransformer(nnx.Module):
    """Causal transformer: token ids -> one projected vector per text (its end-of-text token's)."""

    def __init__(self, *, vocab_size: int, context_length: int, width: int, num_layers: int,
                 num_heads: int, embed_dim: int, eot_id: int, mlp_ratio: int = 4,
                 activation: str = 'quick_gelu', dtype: Any = jnp.float32,
                 attention_impl: str = 'block_sparse', remat: str = 'none', rngs: nnx.Rngs):
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f'eot_id={eot_id} is not a token of a vocabulary of {vocab_size}.')
        self.context_length = context_length
        self.eot_id = eot_id
        self.dtype = dtype
        self.token_embedding = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=_normal(0.02, ('vocab', 'embed')),
                                         rngs=rngs)
        self.position_embedding = nnx.Param(_normal(0.01, ('length', 'embed'))(
            rngs.params(), (context_length, width), jnp.float32))
        self.transformer = Transformer(num_layers=num_layers, width=width, num_heads=num_heads,
                                       mask=CAUSAL, mlp_ratio=mlp_ratio, dtype=dtype,
                                       attention_impl=attention_impl, remat=remat, norm='layer',
                                       use_bias=True, activation=activation, rngs=rngs)
        self.ln_final = layer_norm(width, dtype, rngs)
        self.proj = nnx.Linear(width, embed_dim, use_bias=False, dtype=dtype,
                               param_dtype=jnp.float32,
                               kernel_init=_normal(width ** -0.5, ('embed', None)), rngs=rngs)

    def eot_positions(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length] -> int32 [batch]: the first end-of-text token of each row
        (the last position when a row has none)."""
        is_eot = tokens == self.eot_id
        first = jnp.argmax(is_eot, axis=1)
        return jnp.where(is_eot.any(axis=1), first, tokens.shape[1] - 1).astype(jnp.int32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length <= context_length] int32 -> [batch, embed_dim] float32."""
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.context_length:
            raise ValueError(f'tokens must be [batch, length] with 1 <= length <= '
                             f'context_length={self.context_length}; got shape {tokens.shape}.')
        x = self.token_embedding(tokens).astype(jnp.float32)
        x = x + self.position_embedding[:tokens.shape[1]]
        x = self.transformer(constrain(x.astype(self.dtype), ('batch', 'length', 'embed')))
        # Causal attention: the end-of-text token has seen the whole text and nothing after.
        features = jnp.take_along_axis(x, self.eot_positions(tokens)[:, None, None], axis=1)
        return self.proj(self.ln_final(features[:, 0])).astype(jnp.float32)


class CLIP(nnx.Module):
    """Image and text encoders into one embedding space, and the learned temperature."""

    def __init__(self, *, image_size: int, patch_size: int, vision_width: int,
                 vision_layers: int, vision_heads: int, vocab_size: int, context_length: int,
                 text_width: int, text_layers: int, text_heads: int, embed_dim: int,
                 eot_id: int, mlp_ratio: int = 4, activation: str = 'quick_gelu',
                 image_mean: tuple[float, ...] = OPENAI_MEAN,
                 image_std: tuple[float, ...] = OPENAI_STD, dtype: Any = jnp.float32,
                 attention_impl: str = 'block_sparse', remat: str = 'none', rngs: nnx.Rngs):
        """Args:
          image_size, patch_size: input side and ViT patch side (ViT-B/32: 224, 32).
          vision_*, text_*: width, layers and heads of the two transformers.
          vocab_size, context_length, eot_id: the text tokens (OpenAI: 49408, 77, 49407).
          embed_dim: the joint embedding size.
          activation: 'quick_gelu' (OpenAI's CLIP) or 'gelu'.
          image_mean, image_std: per-channel statistics that normalise images in [0, 1].
          dtype: compute dtype (parameters stay float32).
        """
        self.image_size = image_size
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        common = dict(mlp_ratio=mlp_ratio, activation=activation, dtype=dtype,
                      attention_impl=attention_impl, remat=remat, rngs=rngs)
        self.visual = VisionTransformer(image_size=image_size, patch_size=patch_size,
                                        width=vision_width, num_layers=vision_layers,
                                        num_heads=vision_heads, embed_dim=embed_dim, **common)
        self.text = TextTransformer(vocab_size=vocab_size, context_length=context_length,
                                    width=text_width, num_layers=text_layers,
                                    num_heads=text_heads, embed_dim=embed_dim, eot_id=eot_id,
                                    **common)
        # Temperature 0.07 at the start, as in the paper; stored as a log.
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [batch, image_size, image_size, 3] in [0, 1] (float, or uint8 in [0, 255])
        -> L2-normalised embeddings [batch, embed_dim] float32."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f'images must be [batch, {self.image_size}, {self.image_size}, 3]; '
                             f'got shape {images.shape}. Resize them first (pixelgen.rerank '
                             'does).')
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        pixels = (images.astype(jnp.float32) - jnp.asarray(self.image_mean)) / jnp.asarray(
            self.image_std)
        return l2_normalize(self.visual(pixels))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length] int32, each holding an end-of-text token -> L2-normalised
        embeddings [batch, embed_dim] float32."""
        return l2_normalize(self.text(tokens))

    def scale(self) -> jax.Array:
        """The logit scale exp(logit_scale), clamped at 100 (the paper's cap)."""
        return jnp.minimum(jnp.exp(self.logit_scale[...]), MAX_LOGIT_SCALE)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """-> logits [n_images, n_texts] float32: scaled cosine similarities."""
        return self.scale() * self.encode_image(images) @ self.encode_text(tokens).T


def contrastive_loss(logits: jax.Array, weights: jax.Array | None = None,
                     negatives: jax.Array | None = None,
                     negative_weights: jax.Array | None = None) -> jax.Array:
    """CLIP's symmetric cross-entropy over a [n, n] similarity matrix whose diagonal pairs match.

    The mean of the image->text (rows) and text->image (columns) cross-entropies. `weights`
    [n] (1 = real, 0 = padding) drops padded rows and keeps them out of the softmaxes.
    `negatives` [n, m]: logits of every image against m extra texts (hard negatives, as in
    NegCLIP), which join each image's softmax over texts and no text's softmax over images;
    `negative_weights` [m] (1 = real) keeps missing ones out. Under `jax.jit` the arrays are
    global, so the logits cover the whole global batch.
    """
    n = logits.shape[0]
    weights = jnp.ones(n, jnp.float32) if weights is None else weights.astype(jnp.float32)
    masked = jnp.where((weights[:, None] > 0) & (weights[None, :] > 0), logits, -1e9)
    labels = jnp.arange(n)
    rows = masked
    if negatives is not None:
        m = negatives.shape[1]
        keep = (jnp.ones(m, jnp.float32) if negative_weights is None
                else negative_weights.astype(jnp.float32))
        rows = jnp.concatenate([masked, jnp.where(keep[None, :] > 0, negatives, -1e9)], axis=1)
    per_image = optax.softmax_cross_entropy_with_integer_labels(rows, labels)
    per_text = optax.softmax_cross_entropy_with_integer_labels(masked.T, labels)
    count = jnp.maximum(weights.sum(), 1.0)
    return 0.5 * (jnp.sum(per_image * weights) + jnp.sum(per_text * weights)) / count
