"""DALL·E's discrete VAE (Ramesh et al. 2021, App. A), laid out as OpenAI's released `dall_e`.

    images [b, h, w, 3] in [0, 1] --map_pixels--> Encoder --> logits [b, h/f, w/f, K]
    codes (argmax) or a relaxed one-hot [b, h/f, w/f, K] --> Decoder --> stats [b, h, w, 6]
    stats = (mu, ln b) of a logit-Laplace per colour; image = unmap_pixels(sigmoid(mu))

Encoder: a 7x7 conv, then groups of residual blocks whose widths are the base width times
`width_multipliers` (1, 2, 4, 8), a 2x max-pool after every group but the last (f = 8 for 4
groups), then ReLU and a 1x1 conv to K logits. The decoder mirrors it: a 1x1 conv from the
one-hot codes, groups of widths 8, 4, 2, 1 x base with nearest 2x upsampling between them,
then ReLU and a 1x1 conv to 6 channels. Every residual branch is scaled by
post_gain = 1 / (number of blocks)^2, as in the release. Convs are NHWC; kernels
[k, k, in, out] carry the logical axis names ('embed', 'mlp') of their channel dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen import parallel
from pixelgen.nn.attention import logical_init

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: jax.Array) -> jax.Array:
    """[0, 1] -> [eps, 1 - eps]: keeps logit(x) finite for the logit-Laplace likelihood."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: jax.Array) -> jax.Array:
    return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def conv(n_in: int, n_out: int, kernel: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
         in_name: str = 'embed', out_name: str = 'mlp') -> nnx.Conv:
    """A 'same'-padded conv initialised as the release: w ~ N(0, 1/(n_in k^2)), b = 0."""
    return nnx.Conv(
        n_in, n_out, (kernel, kernel), padding='SAME', dtype=dtype, param_dtype=jnp.float32,
        kernel_init=logical_init(nnx.initializers.normal((n_in * kernel ** 2) ** -0.5),
                                 (None, None, in_name, out_name)),
        bias_init=logical_init(nnx.initializers.zeros, (out_name,)), rngs=rngs)


class ResBlock(nnx.Module):
    """id_path(x) + post_gain * res_path(x); res_path = 4 x (ReLU, conv) with n_out/4 inside.

    The encoder's kernels are 3, 3, 3, 1; the decoder's 1, 3, 3, 3 (as in the release).
    """

    def __init__(self, n_in: int, n_out: int, kernels: Sequence[int], post_gain: float, *,
                 dtype, rngs: nnx.Rngs):
        hidden = n_out // 4
        self.id_path = conv(n_in, n_out, 1, dtype=dtype, rngs=rngs) if n_in != n_out else None
        widths = [n_in, hidden, hidden, hidden, n_out]
        self.res_path = nnx.List([conv(widths[i], widths[i + 1], k, dtype=dtype, rngs=rngs)
                                  for i, k in enumerate(kernels)])
        self.post_gain = post_gain

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.res_path:
            h = layer(jax.nn.relu(h))
        identity = x if self.id_path is None else self.id_path(x)
        return identity + self.post_gain * h


def max_pool_2x(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def upsample_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling, [b, h, w, c] -> [b, 2h, 2w, c]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _constrain(x: jax.Array) -> jax.Array:
    return parallel.constrain(x, ('batch', None, None, None))


class Encoder(nnx.Module):
    def __init__(self, *, width: int, multipliers: Sequence[int], blocks_per_group: int,
                 codebook_size: int, dtype=jnp.float32, rngs: nnx.Rngs):
        post_gain = 1 / (len(multipliers) * blocks_per_group) ** 2
        self.input = conv(3, width * multipliers[0], 7, dtype=dtype, rngs=rngs)
        groups, n_in = [], width * multipliers[0]
        for mult in multipliers:
            blocks = []
            for _ in range(blocks_per_group):
                blocks.append(ResBlock(n_in, width * mult, (3, 3, 3, 1), post_gain, dtype=dtype,
                                       rngs=rngs))
                n_in = width * mult
            groups.append(nnx.List(blocks))
        self.groups = nnx.List(groups)
        # Logits in float32, as the release (its output conv never runs in fp16).
        self.output = conv(n_in, codebook_size, 1, rngs=rngs, out_name='vocab')

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [b, h, w, 3] in [0, 1] -> logits [b, h/f, w/f, K] (float32)."""
        x = _constrain(self.input(map_pixels(images.astype(jnp.float32))))
        for i, group in enumerate(self.groups):
            for block in group:
                x = _constrain(block(x))
            if i < len(self.groups) - 1:
                x = max_pool_2x(x)
        return self.output(jax.nn.relu(x).astype(jnp.float32))


class Decoder(nnx.Module):
    def __init__(self, *, width: int, init_width: int, multipliers: Sequence[int],
                 blocks_per_group: int, codebook_size: int, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        post_gain = 1 / (len(multipliers) * blocks_per_group) ** 2
        self.input = conv(codebook_size, init_width, 1, rngs=rngs, in_name='vocab',
                          out_name='embed')
        groups, n_in = [], init_width
        for mult in reversed(multipliers):
            blocks = []
            for _ in range(blocks_per_group):
                blocks.append(ResBlock(n_in, width * mult, (1, 3, 3, 3), post_gain, dtype=dtype,
                                       rngs=rngs))
                n_in = width * mult
            groups.append(nnx.List(blocks))
        self.groups = nnx.List(groups)
        self.output = conv(n_in, 6, 1, dtype=dtype, rngs=rngs)

    def __call__(self, codes_one_hot: jax.Array) -> jax.Array:
        """A (relaxed) one-hot [b, gh, gw, K] -> stats [b, f*gh, f*gw, 6] (float32)."""
        return self._blocks(self.input(codes_one_hot.astype(jnp.float32)))

    def from_codes(self, codes: jax.Array) -> jax.Array:
        """Integer codes [b, gh, gw] -> stats; a row lookup equals the 1x1 conv of a one-hot."""
        return self._blocks(self.input.kernel[0, 0][codes] + self.input.bias)

    def _blocks(self, x: jax.Array) -> jax.Array:
        x = _constrain(x)
        for i, group in enumerate(self.groups):
            for block in group:
                x = _constrain(block(x))
            if i < len(self.groups) - 1:
                x = upsample_2x(x)
        return self.output(jax.nn.relu(x)).astype(jnp.float32)


def stats_to_images(stats: jax.Array) -> jax.Array:
    """Decoder stats [..., 6] -> images [..., 3] in [0, 1]: the mean of the logit-Laplace's
    location, unmapped (as the release's usage notebook)."""
    return unmap_pixels(jax.nn.sigmoid(stats[..., :3]))


class DVAE(nnx.Module):
    """The encoder and decoder of DALL·E's dVAE.

    encode(images [b, h, w, 3] in [0, 1]) -> int32 codes [b, h/f, w/f]  (argmax, as the paper)
    decode(codes) -> float32 images [b, h, w, 3] in [0, 1]
    """

    def __init__(self, *, codebook_size: int, encoder_width: int, decoder_width: int,
                 decoder_init_width: int, width_multipliers: Sequence[int],
                 blocks_per_group: int, dtype=jnp.float32, rngs: nnx.Rngs):
        self.codebook_size = codebook_size
        self.downsampling = 2 ** (len(width_multipliers) - 1)
        self.encoder = Encoder(width=encoder_width, multipliers=width_multipliers,
                               blocks_per_group=blocks_per_group, codebook_size=codebook_size,
                               dtype=dtype, rngs=rngs)
        self.decoder = Decoder(width=decoder_width, init_width=decoder_init_width,
                               multipliers=width_multipliers, blocks_per_group=blocks_per_group,
                               codebook_size=codebook_size, dtype=dtype, rngs=rngs)

    def logits(self, images: jax.Array) -> jax.Array:
        """images [b, h, w, 3] in [0, 1] -> logits [b, h/f, w/f, K]."""
        return self.encoder(images)

    def encode(self, images: jax.Array) -> jax.Array:
        return jnp.argmax(self.encoder(images), axis=-1).astype(jnp.int32)

    def decode(self, codes: jax.Array) -> jax.Array:
        return stats_to_images(self.decoder.from_codes(codes))
