"""ViT classifier (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale"), eqs. 1-4:

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          (patch embedding, with a bias)
    z_l = blocks(z_{l-1})                                  (pre-norm, full attention, GELU)
    y = LN(z_L^0)                                          (class token; or the patches' mean)
    logits = y @ W_head + b_head                           (fine-tuning head: one linear layer)

The encoder is CLIP's image tower (`pixelgen.models.clip.VisionTransformer`) without its
ln_pre and projection. The paper's pre-training head, "a MLP with one hidden layer", is
`representation_size` > 0: y -> tanh(y W + b) before the linear layer, as in big_vision.
The head starts at zero (the paper's zero-initialised D x K layer). Images in [0, 1] are
normalised inside the model with its own mean and std, as CLIP's `encode_image` does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.models.clip import POOLS, VisionTransformer
from pixelgen.nn.attention import logical_init


class ViT(nnx.Module):
    """Square RGB images -> class logits."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, num_layers: int,
                 num_heads: int, num_classes: int, mlp_ratio: int = 4, pool: str = 'token',
                 representation_size: int = 0, image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 image_std: tuple[float, ...] = (0.5, 0.5, 0.5), norm_eps: float = 1e-6,
                 activation: str = 'gelu', dtype: Any = jnp.float32,
                 attention_impl: str = 'block_sparse', remat: str = 'none', rngs: nnx.Rngs):
        """Args:
          image_size, patch_size: input side and patch side (ViT-B/16: 224, 16).
          width, num_layers, num_heads, mlp_ratio: the encoder (ViT-B: 768, 12, 12, 4).
          num_classes: the head's outputs.
          pool: 'token' (a class token, the paper's) or 'mean' (no class token; the patches'
            mean after the final norm, big_vision's 'gap').
          representation_size: 0 for one linear head, else the pre-training MLP head's width.
          image_mean, image_std: per-channel statistics that normalise images in [0, 1].
          norm_eps: the layer norms' epsilon (big_vision 1e-6, HuggingFace 1e-12).
          dtype: compute dtype (parameters stay float32).
        """
        if num_classes < 1:
            raise ValueError(f'num_classes={num_classes}; a classifier needs at least 1.')
        if pool not in POOLS:
            raise ValueError(f'pool={pool!r}; expected one of {POOLS}.')
        self.image_size = image_size
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.dtype = dtype
        self.encoder = VisionTransformer(
            image_size=image_size, patch_size=patch_size, width=width, num_layers=num_layers,
            num_heads=num_heads, embed_dim=None, mlp_ratio=mlp_ratio, activation=activation,
            dtype=dtype, attention_impl=attention_impl, remat=remat, patch_bias=True,
            pre_norm=False, pool=pool, norm_eps=norm_eps, rngs=rngs)
        zeros = nnx.initializers.zeros
        self.pre_logits = nnx.Linear(
            width, representation_size, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=logical_init(nnx.initializers.lecun_normal(), ('embed', 'mlp')),
            bias_init=logical_init(zeros, ('mlp',)), rngs=rngs) if representation_size else None
        self.head = nnx.Linear(representation_size or width, num_classes, dtype=dtype,
                               param_dtype=jnp.float32,
                               kernel_init=logical_init(zeros, (None, 'vocab')),
                               bias_init=logical_init(zeros, ('vocab',)), rngs=rngs)

    def normalise(self, images: jax.Array) -> jax.Array:
        """images [batch, size, size, 3] in [0, 1] (float, or uint8 in [0, 255]) -> the
        encoder's input, (x - mean) / std, float32."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f'images must be [batch, {self.image_size}, {self.image_size}, 3]; '
                             f'got shape {images.shape}. Resize them first '
                             '(pixelgen.data.pipeline.to_rgb_square).')
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        return (images.astype(jnp.float32) - jnp.asarray(self.image_mean)) / jnp.asarray(
            self.image_std)

    def features(self, images: jax.Array) -> jax.Array:
        """images [batch, size, size, 3] in [0, 1] -> what the head sees [batch, width or
        representation_size] float32."""
        y = self.encoder(self.normalise(images))
        if self.pre_logits is not None:
            y = jnp.tanh(self.pre_logits(y.astype(self.dtype))).astype(jnp.float32)
        return y

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [batch, size, size, 3] in [0, 1] -> logits [batch, num_classes] float32."""
        return self.head(self.features(images).astype(self.dtype)).astype(jnp.float32)


def resample_position_embedding(posemb: jax.Array, grid: int, *, class_token: bool
                                ) -> jax.Array:
    """Position embeddings [(1 +) g*g, width] of a g x g patch grid -> [(1 +) grid*grid, width]
    for a grid x grid one: the patch part is resized bilinearly (half-pixel centres) as a
    g x g image of `width` channels, like big_vision's `resample_posemb` (a linear zoom;
    transformers' `interpolate_pos_encoding` is bicubic); the class token's row is kept.
    Used to fine-tune at another resolution (paper §3.2)."""
    extra, patches = (posemb[:1], posemb[1:]) if class_token else (posemb[:0], posemb)
    old = int(round(patches.shape[0] ** 0.5))
    if old * old != patches.shape[0]:
        raise ValueError(f'{patches.shape[0]} position embeddings are not a square grid.')
    image = patches.reshape(old, old, -1).astype(jnp.float32)
    resized = jax.image.resize(image, (grid, grid, image.shape[-1]), method='bilinear',
                               antialias=False)
    return jnp.concatenate([extra.astype(jnp.float32), resized.reshape(grid * grid, -1)]
                           ).astype(posemb.dtype)
