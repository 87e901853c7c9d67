"""Multi-head attention shared by Image GPT, DALL·E and CLIP.

Follows the original Image GPT (openai/image-gpt `src/model.py`): separate q, k, v and output
projections with no biases, logits scaled by 1/sqrt(head_dim), masked logits replaced by a large
negative number. The mask comes from a `MaskSpec`, so the same module serves causal, full and
DALL·E's sparse row / column / conv layers: block-sparse in the forward pass, and reading only
the text and the query's window (or column) of the KV cache when decoding.

Implementations of the forward pass (`attention_impl`):
  'block_sparse'  only the blocks the mask allows, as a few batched tiles with a hand-written
                  backward pass (pixelgen.nn.block_sparse), any device; masks without a
                  tiling (full) and short sequences are computed densely. Where the step is
                  lowered for the CPU, a layer given the CPU's fused kernel from outside
                  (`cpu_kernel`, pixelgen.cpu) runs that instead, for every mask
  'dense'         the reference: full [length, length] logits, masked
  'splash'        TPU splash attention kernel (pixelgen.nn.splash); interpret mode elsewhere
  'cudnn'         cuDNN flash attention on NVIDIA GPUs (jax.nn.dot_product_attention); causal
                  and full masks, bfloat16 or float16 compute, head_dim a multiple of 8 <= 128
  'auto'          per layer: splash on TPU; cudnn on GPU where it applies; else block_sparse
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.nn.block_sparse import (
    DEFAULT_CAUSAL_BLOCK,
    MASK_VALUE,
    Tiling,
    block_sparse_attention,
    make_tiling,
)
from pixelgen.nn.decode_ops import PLAIN, DecodeOps
from pixelgen.nn.masks import MaskSpec
from pixelgen.nn.matmul import projection_einsum
from pixelgen.nn.splash import DEFAULT_BLOCK_SIZE as SPLASH_BLOCK_SIZE
from pixelgen.nn.splash import check_block_size, splash_attention
from pixelgen.parallel import constrain

IMPLEMENTATIONS = ('block_sparse', 'dense', 'splash', 'cudnn', 'auto')
CUDNN_KINDS = ('causal', 'full')  # the masks cuDNN's fused kernel expresses (no bias array)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

FUSED_QKV_MAX_BYTES = 16 * 2 ** 20  # per layer; larger layers' decoding ops are not op-bound


def logical_init(initializer: nnx.Initializer, names: Sequence[str | None]) -> nnx.Initializer:
    """Wraps `initializer` so its parameter carries logical axis `names` as metadata only.

    The names land in the Variable's `out_sharding` metadata (read them with
    `nnx.get_partition_spec(state)`, under logical axis rules to map them onto a mesh).
    `eager_sharding=False` keeps them pure metadata: building a model needs no mesh.
    """
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
) -> jax.Array:
    """Dense reference attention.

    Args:
      q: [batch, q_length, heads, head_dim].
      k: [batch, kv_length, heads, head_dim].
      v: [batch, kv_length, heads, head_dim].
      mask: bool, broadcastable to [batch, heads, q_length, kv_length]; True = may attend.

    Returns:
      [batch, q_length, heads, head_dim] in q's dtype. Logits and softmax are float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits * scale, MASK_VALUE)  # [b, h, q, k]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


PLATFORMS = ('cpu', 'tpu', 'cuda')  # lowering platforms with a choice of their own


def host_platform() -> str:
    """The lowering platform of this host's default backend ('cpu', 'tpu', 'cuda', ...)."""
    backend = jax.default_backend()
    return 'cuda' if backend == 'gpu' else backend


def cudnn_unavailable(dtype: jnp.dtype) -> str | None:
    """Why cuDNN attention cannot run with compute `dtype` on this machine, or None if it
    can: the part of the check that a config alone decides. cuDNN lowers only where a GPU
    is present, so this reads the host's backend."""
    backend = jax.default_backend()
    if backend != 'gpu':
        return f'needs an NVIDIA GPU, but the JAX backend here is {backend!r}'
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        return (f'computes in bfloat16 or float16 only, not {jnp.dtype(dtype).name} (set '
                "model.dtype='bfloat16')")
    return None


def _cudnn_layer_unavailable(mask: MaskSpec, dtype: jnp.dtype, head_dim: int) -> str | None:
    if mask.kind not in CUDNN_KINDS:
        return (f'expresses only {CUDNN_KINDS} masks, not this {mask.kind!r} layer (DALL·E\'s '
                "sparse layers need 'splash' on TPU or 'block_sparse')")
    if head_dim % 8 or head_dim > 128:
        return f'needs head_dim a multiple of 8 and at most 128, not {head_dim}'
    return cudnn_unavailable(dtype)


def select_implementation(attention_impl: str, mask: MaskSpec, dtype: jnp.dtype,
                          head_dim: int, platform: str | None = None) -> str:
    """The implementation a layer runs when lowered for `platform` (None: this host's):
    `attention_impl`, or for 'auto' splash on TPU, cuDNN on CUDA where it applies (else
    block_sparse), block_sparse elsewhere. An explicit 'cudnn' that cannot run raises,
    naming the reason and the fix."""
    if attention_impl not in IMPLEMENTATIONS:
        raise ValueError(f'attention_impl={attention_impl!r}; expected one of '
                         f'{IMPLEMENTATIONS}.')
    platform = platform or host_platform()
    cudnn_problem = _cudnn_layer_unavailable(mask, dtype, head_dim)
    if attention_impl == 'auto':
        if platform == 'tpu':
            return 'splash'
        return 'cudnn' if platform == 'cuda' and not cudnn_problem else 'block_sparse'
    if attention_impl == 'cudnn' and cudnn_problem:
        raise ValueError(f"attention_impl='cudnn' {cudnn_problem}. Use attention_impl='auto' "
                         "(cuDNN wherever it applies, the best other path elsewhere) or "
                         "'block_sparse' (--config.model.attention=auto).")
    return attention_impl


class MultiHeadAttention(nnx.Module):
    """Bias-free multi-head self-attention with a `MaskSpec` and a KV-cache decoder."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        mask: MaskSpec,
        num_layers: int,
        dtype: jnp.dtype = jnp.float32,
        attention_impl: str = 'block_sparse',
        block_size: int | None = None,
        use_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        """Args:
          width: model width d.
          num_heads: number of heads; must divide `width`.
          mask: which keys each query may attend to.
          num_layers: depth of the whole stack; scales the output projection's init.
          dtype: compute dtype (parameters stay float32).
          attention_impl: one of IMPLEMENTATIONS (see the module docstring); 'block_sparse'
            computes only the blocks the mask allows where that saves at least a quarter of
            the work, else dense. 'auto' is resolved here, once, for this machine.
          block_size: the causal tree's leaf size for 'block_sparse' (None:
            `DEFAULT_CAUSAL_BLOCK`; DALL·E layers tile by image rows) and the block size of
            'splash' (a multiple of 128; None: 128).
          rngs: parameter rngs.
        """
        if width % num_heads:
            raise ValueError(
                f'num_heads={num_heads} must divide width={width}; choose a width that is a '
                f'multiple of num_heads (e.g. {num_heads * max(1, width // num_heads)}) or a '
                'num_heads that divides width.'
            )
        self.width = width
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.mask = mask
        self.dtype = dtype
        select_implementation(attention_impl, mask, dtype, self.head_dim)  # checks it here
        self.attention_impl = attention_impl
        self.block_size = block_size or DEFAULT_CAUSAL_BLOCK  # the causal tree's leaves
        self.splash_block_size = (block_size if block_size and attention_impl == 'splash'
                                  else SPLASH_BLOCK_SIZE)
        check_block_size(self.splash_block_size)
        # The CPU's own kernel for the 'block_sparse' path, given from outside
        # (`pixelgen.cpu.use_native_attention`): kernel.runs(q, mask) says where it applies,
        # kernel(q, k, v, mask) computes it. It runs only where the step is lowered for the CPU.
        self.cpu_kernel = None
        qkv_init = logical_init(nnx.initializers.normal(1.0 / math.sqrt(width)),
                                ('embed', 'heads', 'kv'))
        out_init = logical_init(nnx.initializers.normal(1.0 / math.sqrt(width * num_layers)),
                                ('heads', 'kv', 'embed'))
        qkv_shape = (width, num_heads, self.head_dim)

        # use_bias (CLIP): biases on q, k, v [heads, head_dim] and on the output [width].
        zeros = nnx.initializers.zeros

        def qkv():
            return nnx.Einsum('bld,dhk->blhk', qkv_shape,
                              (num_heads, self.head_dim) if use_bias else None, dtype=dtype,
                              param_dtype=jnp.float32, kernel_init=qkv_init,
                              bias_init=logical_init(zeros, ('heads', 'kv')),
                              einsum_op=projection_einsum, rngs=rngs)

        self.query = qkv()
        self.key = qkv()
        self.value = qkv()
        self.out = nnx.Einsum('blhk,hkd->bld', (num_heads, self.head_dim, width),
                              (width,) if use_bias else None, dtype=dtype,
                              param_dtype=jnp.float32, kernel_init=out_init,
                              bias_init=logical_init(zeros, ('embed',)),
                              einsum_op=projection_einsum, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, length, width] -> [batch, length, width]."""
        q, k, v = (constrain(p(x), ('batch', 'length', 'heads', 'kv'))
                   for p in (self.query, self.key, self.value))  # [b, l, heads, head_dim]
        return self.out(self._attend(q, k, v))

    def implementation(self, platform: str | None = None) -> str:
        """What this layer runs when lowered for `platform` (None: this host's backend)."""
        return select_implementation(self.attention_impl, self.mask, self.dtype, self.head_dim,
                                     platform)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q, k, v [b, l, heads, head_dim] -> [b, l, heads, head_dim] by this layer's
        implementation for the platform the step is lowered for: each platform's variant is
        traced, and `jax.lax.platform_dependent` lowers only the one of the platform compiled
        for, so a TPU or GPU executable built on a CPU host holds no CPU-only custom call."""
        variants = {p: self._variant(p, q) for p in (*PLATFORMS, 'other')}
        run = {v: functools.partial(self._run, v) for v in set(variants.values())}
        if len(run) == 1:
            return next(iter(run.values()))(q, k, v)
        return jax.lax.platform_dependent(
            q, k, v, cpu=run[variants['cpu']], tpu=run[variants['tpu']],
            cuda=run[variants['cuda']], default=run[variants['other']])

    def _variant(self, platform: str, q: jax.Array) -> str:
        """The computation `_run` does for this layer on `platform`."""
        impl = self.attention_impl  # an explicit choice was checked when the layer was built
        if impl == 'auto':
            impl = self.implementation(platform)
        length = q.shape[1]
        if impl == 'splash':
            return 'splash' if platform == 'tpu' else 'splash_interpreted'
        if impl == 'block_sparse':
            if (platform == 'cpu' and self.cpu_kernel is not None
                    and self.cpu_kernel.runs(q, self.mask)):
                return 'native'
            return 'tiles' if self.tiling(length) is not None else 'dense'
        return impl

    def _run(self, variant: str, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if variant in ('splash', 'splash_interpreted'):
            return splash_attention(q, k, v, self.mask, self.splash_block_size,
                                    interpret=variant == 'splash_interpreted')
        if variant == 'cudnn':  # same layout [b, l, heads, head_dim] and scale
            return jax.nn.dot_product_attention(q, k, v, is_causal=self.mask.kind == 'causal',
                                                implementation='cudnn')
        if variant == 'native':
            return self.cpu_kernel(q, k, v, self.mask)
        if variant == 'tiles':
            return block_sparse_attention(q, k, v, self.mask, self.block_size)
        mask = jnp.asarray(self.mask.dense(q.shape[1]))[None, None]  # [1, 1, l, l]
        return dot_product_attention(q, k, v, mask)

    def tiling(self, length: int) -> Tiling | None:
        """The XLA tiling this layer computes at `length` where the native CPU kernel does not
        run, or None where it then computes densely (no tiling, or one that would not save
        enough to pay for its smaller ops)."""
        tiling = make_tiling(self.mask, length, self.block_size)
        return tiling if tiling is not None and tiling.pays_off else None

    def init_cache(self, batch_size: int, max_length: int,
                   ops: DecodeOps = PLAIN) -> dict[str, jax.Array]:
        """Empty KV cache: k, v [batch, heads, max_length, head_dim] in the compute dtype.

        Heads-major, so each decoding step reads the cache as it lies; a length-major cache
        would be transposed whole at every step. For small bias-free layers it also holds
        `qkv`, the query, key and value kernels side by side as one matrix [width, 3 · heads ·
        head_dim], made once here, outside the decoding loop: a small model's decoding step is
        bound by its number of ops, and one matmul instead of three saves two per layer. Not
        where `ops` reads the kernels as they are (`DecodeOps.fuse_qkv`)."""
        shape = (batch_size, self.num_heads, max_length, self.head_dim)
        cache = dict(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype))
        kernels = [p.kernel[...] for p in (self.query, self.key, self.value)]
        if (self.query.bias is None and kernels[0].ndim == 3 and ops.fuse_qkv
                and 3 * kernels[0].nbytes <= FUSED_QKV_MAX_BYTES):
            cache['qkv'] = jnp.stack(kernels, axis=1).reshape(kernels[0].shape[0], -1)
        return cache

    def decode(
        self, x: jax.Array, cache: dict[str, jax.Array], position: jax.Array,
        ops: DecodeOps = PLAIN,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One decoding step.

        Args:
          x: [batch, 1, width], the input at `position`.
          cache: from `init_cache` (or a previous `decode`), holding k, v for positions < position.
          position: int scalar (may be traced), the index of `x` in the sequence.
          ops: the step's projections (`DecodeOps.project`).

        Returns:
          y [batch, 1, width] and the cache with k, v written at `position`.
        """
        max_length = cache['k'].shape[2]
        position = jnp.asarray(position, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, position, zero)

        def heads_major(t):  # [b, 1, heads, head_dim] -> [b, heads, 1, head_dim]
            return t.transpose(0, 2, 1, 3).astype(cache['k'].dtype)

        if 'qkv' in cache:  # one [b, width] x [width, 3 · heads · head_dim] matmul
            qkv = x[:, 0].astype(self.dtype) @ cache['qkv'].astype(self.dtype)
            heads = cache['k'].shape[1]
            q, k_new, v_new = (part.reshape(-1, 1, heads, self.head_dim)
                               for part in jnp.split(qkv, 3, axis=-1))
        else:
            q, k_new, v_new = (ops.project(p, x)  # [b, 1, heads, head_dim]
                               for p in (self.query, self.key, self.value))
        k = jax.lax.dynamic_update_slice(cache['k'], heads_major(k_new), start)
        v = jax.lax.dynamic_update_slice(cache['v'], heads_major(v_new), start)
        sparse = self.mask.decode_keys(position, max_length)
        if sparse is None:  # read the whole cache
            keys, values = k, v
            allowed = self.mask.allowed_keys(position, max_length)  # [max_length]
        else:  # DALL·E layers read only the text and the window (or column) of the query
            indices, allowed = sparse  # [K]
            keys, values = (_read_keys(c, self.mask, indices) for c in (k, v))  # [b, h, K, d]
        logits = jnp.einsum('bqhd,bhkd->bhqk', q, keys, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed, logits / math.sqrt(self.head_dim), MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        out = jnp.einsum('bhqk,bhkd->bqhd', probs, values, preferred_element_type=jnp.float32)
        y = ops.project(self.out, out.astype(q.dtype), 2)
        return y, {**cache, 'k': k, 'v': v}


def _read_keys(cache: jax.Array, mask: MaskSpec, indices: jax.Array) -> jax.Array:
    """cache [b, h, T + W², d] at `indices` from `mask.decode_keys`: [b, h, K, d].

    Slices instead of a gather (a gather of a few hundred rows per step costs more than
    reading the whole cache): the text, then the window (one dynamic slice) or the column
    (a dynamic index into the cache viewed as [.., W rows, W columns, d])."""
    t, w = mask.text_len, mask.grid_width
    if mask.kind == 'column':
        grid = cache[:, :, t:].reshape(*cache.shape[:2], w, w, cache.shape[-1])
        image = jax.lax.dynamic_index_in_dim(grid, indices[t] - t, axis=3, keepdims=False)
    else:
        image = jax.lax.dynamic_slice_in_dim(cache, indices[t], len(indices) - t, axis=2)
    return jnp.concatenate([cache[:, :, :t], image], axis=2)
