"""Pre-norm transformer stack shared by Image GPT, DALL·E and CLIP.

As in the original Image GPT: RMS norm without bias, bias-free MLP with quick_gelu, and
`x = x + attn(norm1(x)); x = x + mlp(norm2(x))` in every block.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from pixelgen.nn.attention import MultiHeadAttention, logical_init
from pixelgen.nn.decode_ops import PLAIN, DecodeOps, layer_projection
from pixelgen.nn.masks import MaskSpec
from pixelgen.nn.matmul import rows_t_times
from pixelgen.parallel import constrain

LayerCache = dict[str, jax.Array]
# A Transformer's KV cache: one LayerCache per layer, or (scan_layers) one stacked on [layers].
Cache = tuple[LayerCache, ...] | LayerCache

# Stacked (scanned) layers carry this leading logical axis on every parameter.
LAYERS_AXIS = {nnx.PARTITION_NAME: 'layers'}


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), the `gelu2` of Image GPT."""
    return x * jax.nn.sigmoid(1.702 * x)


def rms_norm(width: int, dtype: Any, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.RMSNorm:
    """Image GPT's norm: x * rsqrt(mean(x^2) + eps) * g, no mean-centring, no bias."""
    return nnx.RMSNorm(width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=logical_init(nnx.initializers.ones, ('embed',)), rngs=rngs)


def layer_norm(width: int, dtype: Any, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.LayerNorm:
    """CLIP's norm: (x - mean) * rsqrt(var + eps) * g + b (eps 1e-5; HF's ViT: 1e-12)."""
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                         scale_init=logical_init(nnx.initializers.ones, ('embed',)),
                         bias_init=logical_init(nnx.initializers.zeros, ('embed',)), rngs=rngs)


# Options of the shared blocks; the first of each is Image GPT's (the default).
NORMS = {'rms': rms_norm, 'layer': layer_norm}
ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': lambda x: jax.nn.gelu(x, approximate=False)}


class MLP(nnx.Module):
    """width -> mlp_ratio * width -> width; by default no biases and quick_gelu."""

    def __init__(self, width: int, *, mlp_ratio: int = 4, dtype: Any = jnp.float32,
                 use_bias: bool = False, activation: str = 'quick_gelu', rngs: nnx.Rngs):
        hidden = mlp_ratio * width
        init = nnx.initializers.normal(0.02)
        self.activation = activation
        self.fc = nnx.Linear(width, hidden, use_bias=use_bias, dtype=dtype,
                             param_dtype=jnp.float32,
                             kernel_init=logical_init(init, ('embed', 'mlp')),
                             bias_init=logical_init(nnx.initializers.zeros, ('mlp',)), rngs=rngs)
        self.proj = nnx.Linear(hidden, width, use_bias=use_bias, dtype=dtype,
                               param_dtype=jnp.float32,
                               kernel_init=logical_init(init, ('mlp', 'embed')),
                               bias_init=logical_init(nnx.initializers.zeros, ('embed',)),
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., width] -> [..., width]."""
        dtype = self.fc.dtype or x.dtype
        biases = (self.fc.bias[...].astype(dtype), self.proj.bias[...].astype(dtype)) \
            if self.fc.bias is not None else None
        rows = x.reshape(-1, x.shape[-1]).astype(dtype)  # [batch * length, width]: see `mlp`
        y = mlp(rows, self.fc.kernel[...].astype(dtype), self.proj.kernel[...].astype(dtype),
                biases, self.activation)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def decode(self, x: jax.Array, ops: DecodeOps = PLAIN) -> jax.Array:
        """A decoding step's few rows x [..., width] -> [..., width], by `ops.project` where
        the step supplies its own projections (bias-free layers), else as `__call__`."""
        if ops.project is layer_projection or self.fc.bias is not None:
            return self(x)
        rows = x.reshape(-1, x.shape[-1]).astype(self.fc.dtype or x.dtype)
        y = ops.project(self.proj, ACTIVATIONS[self.activation](ops.project(self.fc, rows)))
        return y.reshape(*x.shape[:-1], y.shape[-1])


ROWS_MLP = ('batch', 'mlp')  # batch * length rows: sharded like the batch


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def mlp(x: jax.Array, w_in: jax.Array, w_out: jax.Array,
        biases: tuple[jax.Array, jax.Array] | None, activation: str) -> jax.Array:
    """act(x w_in + b_in) w_out + b_out for x [rows, width], with a hand-written backward.

    Why: on [batch, length, width] inputs, differentiated automatically, XLA:CPU lays the
    activation gradient out transposed for the weight-gradient matmul (a slow strided copy),
    and the MLP's forward + backward ran 2-3x slower (benchmarks/mlp_backward.py). 2-D rows
    and this backward pass, which saves x and the pre-activation and recomputes act and its
    slope elementwise, were fastest together. It is the standard backward (dx = d_pre ·
    w_inᵀ, dw = xᵀ · d_pre), so every platform runs it; only its layout fences are CPU-only
    (`rows_t_times`)."""
    return _mlp_fwd(x, w_in, w_out, biases, activation)[0]


def _mlp_fwd(x, w_in, w_out, biases, activation):
    pre = x @ w_in + (biases[0] if biases is not None else 0)
    pre = constrain(pre, ROWS_MLP)
    y = ACTIVATIONS[activation](pre) @ w_out + (biases[1] if biases is not None else 0)
    return y, (x, w_in, w_out, pre, biases)


def _mlp_bwd(activation, residuals, dy):
    x, w_in, w_out, pre, biases = residuals
    act, slope = jax.jvp(ACTIVATIONS[activation], (pre,), (jnp.ones_like(pre),))
    d_pre = constrain((dy @ w_out.T) * slope, ROWS_MLP)
    d_w_out = rows_t_times(dy, act).T.astype(w_out.dtype)  # transposes the narrower dy
    d_w_in = rows_t_times(x, d_pre).astype(w_in.dtype)
    d_biases = (d_pre.sum(0), dy.sum(0)) if biases is not None else None
    return d_pre @ w_in.T, d_w_in, d_w_out, d_biases


mlp.defvjp(_mlp_fwd, _mlp_bwd)



class Block(nnx.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, width: int, num_heads: int, *, mask: MaskSpec, num_layers: int,
                 mlp_ratio: int = 4, dtype: Any = jnp.float32,
                 attention_impl: str = 'block_sparse', norm: str = 'rms', use_bias: bool = False,
                 activation: str = 'quick_gelu', norm_eps: float = 1e-5, rngs: nnx.Rngs):
        """`norm` ('rms' | 'layer'), `use_bias` (in every projection) and `activation`
        ('quick_gelu' | 'gelu') default to Image GPT's choices; CLIP uses layer norm and biases.
        `norm_eps` is the norms' epsilon."""
        self.norm1 = NORMS[norm](width, dtype, rngs, eps=norm_eps)
        self.attn = MultiHeadAttention(width, num_heads, mask=mask, num_layers=num_layers,
                                       dtype=dtype, attention_impl=attention_impl,
                                       use_bias=use_bias, rngs=rngs)
        self.norm2 = NORMS[norm](width, dtype, rngs, eps=norm_eps)
        self.mlp = MLP(width, mlp_ratio=mlp_ratio, dtype=dtype, use_bias=use_bias,
                       activation=activation, rngs=rngs)

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        """x [batch, length, width] -> y [batch, length, width].

        With `return_features=True` returns (y, norm1(x)); norm1(x) [batch, length, width] is the
        attention input whose sequence mean is the Image GPT linear-probe feature.
        """
        h = self.norm1(x)
        x = x + self.attn(h)
        x = x + self.mlp(self.norm2(x))
        return (x, h) if return_features else x

    def init_cache(self, batch_size: int, max_length: int,
                   ops: DecodeOps = PLAIN) -> LayerCache:
        return self.attn.init_cache(batch_size, max_length, ops)

    def decode(self, x: jax.Array, cache: LayerCache, position: jax.Array,
               ops: DecodeOps = PLAIN) -> tuple[jax.Array, LayerCache]:
        """x [batch, 1, width] at `position` -> (y [batch, 1, width], new cache); each
        sublayer's output passes through `ops.combine` (partial sums of split weights)."""
        a, cache = self.attn.decode(self.norm1(x), cache, position, ops)
        x = x + ops.combine(a)
        x = x + ops.combine(self.mlp.decode(self.norm2(x), ops))
        return x, cache


# Rematerialisation: what the backward pass may keep from the forward pass of each block.
REMAT_POLICIES = {
    'none': None,  # keep everything (fastest, most memory)
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute each block (least memory)
    'dots': jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs only
}


class Transformer(nnx.Module):
    """A stack of `num_layers` Blocks (no embeddings, no final norm).

    With `scan_layers=True` the blocks are one Block whose parameters are stacked on a
    leading 'layers' axis [num_layers, ...] (logical name 'layers'), and every method scans
    over it: one layer is traced and compiled, whatever the depth. That needs the
    same mask in every layer (not DALL·E's). The looped and scanned layouts compute the same
    function; their checkpoints differ (`blocks/<i>/...` against stacked `blocks/...`).
    """

    def __init__(self, *, num_layers: int, width: int, num_heads: int,
                 mask: MaskSpec | Sequence[MaskSpec], mlp_ratio: int = 4,
                 dtype: Any = jnp.float32, attention_impl: str = 'block_sparse',
                 remat: str = 'none', norm: str = 'rms', use_bias: bool = False,
                 activation: str = 'quick_gelu', scan_layers: bool = False,
                 norm_eps: float = 1e-5, rngs: nnx.Rngs):
        """Args:
          mask: one MaskSpec for every layer, or a sequence of `num_layers` MaskSpecs.
          remat: 'none', 'full' or 'dots' (see REMAT_POLICIES): trades compute for memory.
          norm, use_bias, activation, norm_eps: see `Block` (defaults: Image GPT's).
          scan_layers: stack the layers' parameters and scan over them (needs one mask).
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f'remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}.')
        self.remat = remat
        masks = [mask] * num_layers if isinstance(mask, MaskSpec) else list(mask)
        if len(masks) != num_layers or not all(isinstance(m, MaskSpec) for m in masks):
            raise ValueError(
                f'mask must be a MaskSpec or a sequence of num_layers={num_layers} MaskSpecs; '
                f'got {mask!r}. Pass one MaskSpec per layer.'
            )
        if scan_layers and len(set(masks)) > 1:
            raise ValueError(
                f'scan_layers=True runs one layer {num_layers} times, so every layer needs the '
                f'same mask; got {len(set(masks))} different ones. Pass scan_layers=False '
                '(a Python loop over the layers) for models with per-layer masks.'
            )
        self.num_layers = num_layers
        self.scan_layers = scan_layers

        def block(m: MaskSpec, rngs: nnx.Rngs) -> Block:
            return Block(width, num_heads, mask=m, num_layers=num_layers, mlp_ratio=mlp_ratio,
                         dtype=dtype, attention_impl=attention_impl, norm=norm,
                         use_bias=use_bias, activation=activation, norm_eps=norm_eps,
                         rngs=rngs)

        if scan_layers:
            # One independent initialisation per layer, stacked on a new leading axis.
            stacked = nnx.split_rngs(splits=num_layers)(nnx.vmap(
                lambda rngs: block(masks[0], rngs), in_axes=0, out_axes=0,
                transform_metadata=LAYERS_AXIS))
            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([block(m, rngs) for m in masks])

    def _remat(self, fn):
        """`fn` recomputed in the backward pass under the config's policy (or `fn` itself)."""
        if self.remat == 'none':
            return fn
        if self.scan_layers:  # a plain-JAX scan body; inside a scan CSE cannot merge it away
            return jax.checkpoint(fn, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        return nnx.remat(fn, policy=REMAT_POLICIES[self.remat])

    def _scan(self, fn, carry, xs=None):
        """fn(block, carry, x) -> (carry, y) over the stacked layers: (final carry, ys stacked
        on [layers]). Plain `jax.lax.scan` over the split parameters rather than `nnx.scan`,
        so that it also runs inside other JAX loops (sampling's `fori_loop`) on a model that
        was merged outside them; the blocks hold no state that a layer could update."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(carry, inputs):
            params, x = inputs  # one layer's slice; its metadata still names 'layers' first
            params = spmd.remove_axis(params, 0, LAYERS_AXIS)
            return fn(nnx.merge(graphdef, params), carry, x)
        return jax.lax.scan(self._remat(layer), carry, (stacked, xs))

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        """x [batch, length, width] -> [batch, length, width].

        With `return_features=True` returns (y, features), features norm1(input of each
        layer): a list over layers of [batch, length, width], or with `scan_layers` one
        array [num_layers, batch, length, width] (iterating either gives the layers).
        """
        if self.scan_layers:
            def layer(block: Block, x: jax.Array, _):
                y, h = block(x, return_features=True)
                return y, (h if return_features else None)
            x, features = self._scan(layer, x)
            return (x, features) if return_features else x
        features = []
        for block in self.blocks:
            if return_features:
                x, h = block(x, return_features=True)
                features.append(h)
            else:
                x = self._remat(lambda block, x: block(x))(block, x)
        return (x, features) if return_features else x

    def init_cache(self, batch_size: int, max_length: int, ops: DecodeOps = PLAIN) -> Cache:
        """Per-layer caches (see `MultiHeadAttention.init_cache`): a tuple of them, or with
        `scan_layers` one cache whose arrays have a leading [num_layers] axis."""
        if self.scan_layers:
            one = self.blocks.init_cache(batch_size, max_length, ops)  # shapes only
            return jax.tree.map(lambda c: jnp.zeros((self.num_layers, *c.shape), c.dtype), one)
        return tuple(block.init_cache(batch_size, max_length, ops) for block in self.blocks)

    def decode(self, x: jax.Array, cache: Cache, position: jax.Array,
               ops: DecodeOps = PLAIN) -> tuple[jax.Array, Cache]:
        """x [batch, 1, width] at `position` -> (y [batch, 1, width], new cache)."""
        if self.scan_layers:
            return self._scan(lambda block, x, layer_cache: block.decode(x, layer_cache,
                                                                          position, ops),
                              x, cache)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.decode(x, layer_cache, position, ops)
            new_cache.append(layer_cache)
        return x, tuple(new_cache)
