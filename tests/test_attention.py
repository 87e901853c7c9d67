"""Block-sparse attention equals the dense masked reference, values and gradients, for
causal, full and DALL·E's row / column / conv masks; KV-cache decoding equals the forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pixelgen.nn import attention
from pixelgen.nn.attention import MultiHeadAttention, dot_product_attention
from pixelgen.nn.block_sparse import block_sparse_attention, make_tiling
from pixelgen.nn.masks import CAUSAL, FULL, MaskSpec, dalle_mask_spec


def _qkv(length, seed=0, b=2, h=2, d=8):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (b, length, h, d)) for k in keys]


def _dense(q, k, v, mask):
    return dot_product_attention(q, k, v, jnp.asarray(mask.dense(q.shape[1]))[None, None])


# Causal trees: lengths that are and are not leaf · 2^L (padded), one leaf, and many levels.
@pytest.mark.slow
@pytest.mark.parametrize('length,block', [(16, 4), (37, 8), (5, 8), (24, 24), (64, 2)])
def test_causal_tree_equals_dense(length, block):
    q, k, v = _qkv(length)
    fast = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, CAUSAL, block))(q, k, v)
    np.testing.assert_allclose(fast, _dense(q, k, v, CAUSAL), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('length,block', [(20, 4), (33, 8)])
def test_causal_tree_gradients_equal_dense(length, block):
    q, k, v = _qkv(length, seed=1)
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    fast = jax.grad(loss(lambda q, k, v: block_sparse_attention(q, k, v, CAUSAL, block)),
                    argnums=(0, 1, 2))(q, k, v)
    slow = jax.grad(loss(lambda q, k, v: _dense(q, k, v, CAUSAL)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tiles_under_remat_and_scan_give_the_dense_gradients():
    """The hand-written backward pass also serves jax.checkpoint (remat) and lax.scan (scanned
    layer stacks): two stacked layers' gradients equal dense attention's."""
    layers = [_qkv(40, seed=s) for s in (3, 4)]
    stacked = [jnp.stack(xs) for xs in zip(*layers, strict=True)]  # q, k, v [2, b, n, h, d]

    def loss(attend):
        def total(q, k, v):
            def layer(carry, qkv):
                return carry + jnp.sum(jax.checkpoint(attend)(*qkv) ** 2), None
            return jax.lax.scan(layer, 0.0, (q, k, v))[0]
        return total

    fast = jax.grad(loss(lambda q, k, v: block_sparse_attention(q, k, v, CAUSAL, 8)),
                    argnums=(0, 1, 2))(*stacked)
    slow = jax.grad(loss(lambda q, k, v: _dense(q, k, v, CAUSAL)), argnums=(0, 1, 2))(*stacked)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('mask', [CAUSAL, MaskSpec('row', 3, 8)], ids=['causal', 'row'])
def test_tiles_in_bfloat16_keep_the_dtype_and_stay_close(mask):
    n = 64 if mask.kind == 'causal' else mask.sequence_length
    q, k, v = _qkv(n, seed=5)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]

    def loss(q, k, v):
        return jnp.sum(block_sparse_attention(q, k, v, mask, 8).astype(jnp.float32) ** 2)

    out = block_sparse_attention(*low, mask, 8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _dense(q, k, v, mask), atol=3e-2)
    grads, reference = jax.grad(loss, argnums=(0, 1, 2))(*low), jax.grad(
        lambda q, k, v: jnp.sum(_dense(q, k, v, mask) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, reference, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=0.1, rtol=0.05)


def test_a_mask_without_tiles_is_refused_by_name():
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match=r"MaskSpec\('full'\) at length 16 has no block-sparse"):
        block_sparse_attention(q, k, v, FULL, 8)


def test_causal_tree_skips_the_upper_triangle():
    tree = make_tiling(CAUSAL, 64, 8)  # 8 leaves of 8, 3 levels of halves
    assert (tree.padded, tree.block_size, len(tree.tiles)) == (64, 8, 4)
    assert tree.computed == 8 * 8 * 8 + 32 * 32 + 2 * 16 * 16 + 4 * 8 * 8
    assert tree.density == pytest.approx((64 * 64 / 2 + 64 * 8 / 2) / 64 ** 2)
    assert make_tiling(CAUSAL, 1000, 64).padded == 1008  # 16 leaves of 63
    assert make_tiling(FULL, 64, 8) is None               # nothing to skip


@pytest.mark.slow
def test_module_implementations_agree():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 19, 16))

    def build(impl):
        return MultiHeadAttention(16, 2, mask=CAUSAL, num_layers=1, attention_impl=impl,
                                  block_size=4, rngs=nnx.Rngs(0))

    np.testing.assert_allclose(build('block_sparse')(x), build('dense')(x), atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        build('flash')


def test_block_sparse_only_where_it_pays_off():
    def layer(mask, block):
        return MultiHeadAttention(16, 2, mask=mask, num_layers=1, block_size=block,
                                  rngs=nnx.Rngs(0))
    assert layer(CAUSAL, 64).tiling(1024).density < 0.54       # half, plus the leaves
    assert layer(CAUSAL, 128).tiling(100) is None               # one leaf: no skipping
    assert layer(FULL, 64).tiling(1024) is None                 # nothing to skip
    assert layer(DALLE_SPECS['row'], 64).tiling(40) is None     # not T + W²: dense


# DALL·E masks at tiny T and W: the real 11-wide conv window on an 8-wide grid, and a 3-wide
# one; block sizes that divide the length and ones that do not (67 = 3 + 8²).
DALLE_SPECS = {
    'row': MaskSpec('row', 3, 8), 'column': MaskSpec('column', 3, 8),
    'conv': MaskSpec('conv', 3, 8), 'conv3': MaskSpec('conv', 4, 6, conv_window=3),
    'conv5_wraparound': MaskSpec('conv', 3, 8, conv_window=5, conv_wraparound=True),
}


@functools.cache
def _sparse_fn(name, block):
    """Compiled once per (mask, block size): hypothesis calls it many times."""
    mask = DALLE_SPECS[name]
    return jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask, block))


@pytest.mark.slow
@pytest.mark.parametrize('name, block', [('row', 5), ('column', 8), ('conv', 5), ('conv3', 8),
                                         ('conv5_wraparound', 5)])
def test_dalle_masks_equal_dense_forward_and_gradients(name, block):
    mask = DALLE_SPECS[name]
    q, k, v = _qkv(mask.sequence_length, seed=2)
    weights = jax.random.normal(jax.random.PRNGKey(7), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    sparse = jax.jit(jax.value_and_grad(
        loss(lambda q, k, v: block_sparse_attention(q, k, v, mask, block)), argnums=(0, 1, 2)))
    dense = jax.jit(jax.value_and_grad(loss(lambda q, k, v: _dense(q, k, v, mask)),
                                       argnums=(0, 1, 2)))
    (fast_value, fast_grads), (slow_value, slow_grads) = sparse(q, k, v), dense(q, k, v)
    np.testing.assert_allclose(_sparse_fn(name, block)(q, k, v), _dense(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fast_value, slow_value, rtol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(DALLE_SPECS)), block=st.sampled_from([8, 5]),
       query=st.integers(0, 66), seed=st.integers(0, 2**16))
def test_no_query_sees_a_future_or_disallowed_key(name, block, query, seed):
    """Replacing every key and value that `query` may not see leaves its output unchanged."""
    mask = DALLE_SPECS[name]
    n = mask.sequence_length
    query = query % n
    q, k, v = _qkv(n, seed=seed % 7)
    hidden = ~mask.dense(n)[query]  # [n] keys query must not see (the future included)
    noise = jax.random.normal(jax.random.PRNGKey(seed), (2, *k.shape)) * 100
    k2, v2 = (jnp.where(hidden[None, :, None, None], z, x)
              for z, x in zip(noise, (k, v), strict=True))
    attention = _sparse_fn(name, block)
    np.testing.assert_array_equal(attention(q, k, v)[:, query], attention(q, k2, v2)[:, query])


def test_dalle_tilings_read_only_the_band():
    # Column-major, a column layer's image rows read only themselves (the transpose trick);
    # row layers read the row above too, conv layers the 5 rows above (11 x 11 window).
    tilings = {kind: make_tiling(dalle_mask_spec(kind, 256, 32), 1280)
               for kind in ('row', 'column', 'conv')}
    assert [t.tiles[-1].keys.offsets for t in tilings.values()] == [
        (0, 1), (0,), (0, 1, 2, 3, 4, 5)]
    assert tilings['column'].density < 0.23 and tilings['row'].density < 0.25
    assert tilings['conv'].density < 0.33
    causal = make_tiling(dalle_mask_spec('causal', 256, 32), 1280)
    assert causal.density > 0.5


@pytest.fixture(scope='module')
def dalle_modules():
    """name -> (module, x [2, n, 16], full forward y [2, n, 16]) for each DALL·E kind."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 67, 16))
    built = {}
    for name in ('row', 'column', 'conv', 'conv5_wraparound'):
        module = MultiHeadAttention(16, 2, mask=DALLE_SPECS[name], num_layers=1,
                                    block_size=8, rngs=nnx.Rngs(0))
        built[name] = module, x, module(x)
    return built


@pytest.mark.slow
@pytest.mark.parametrize('name', ['row', 'column', 'conv', 'conv5_wraparound'])
def test_dalle_module_block_sparse_equals_dense_and_decoding(name, dalle_modules):
    module, x, y = dalle_modules[name]
    dense = nnx.merge(*nnx.split(module))
    dense.attention_impl = 'dense'
    np.testing.assert_allclose(y, dense(x), atol=1e-5)
    graphdef, state = nnx.split(module)

    @jax.jit
    def step(state, token, cache, position):
        return nnx.merge(graphdef, state).decode(token, cache, position)

    cache = module.init_cache(2, x.shape[1])
    for position in range(x.shape[1]):
        out, cache = step(state, x[:, position:position + 1], cache, jnp.int32(position))
        np.testing.assert_allclose(out[:, 0], y[:, position], atol=1e-5)


@pytest.mark.slow
def test_small_layers_decode_with_one_fused_qkv_matmul(dalle_modules, monkeypatch):
    module, x, y = dalle_modules['row']
    cache = module.init_cache(2, x.shape[1])
    assert cache['qkv'].shape == (module.width, 3 * module.width)  # made once, outside loops
    monkeypatch.setattr(attention, 'FUSED_QKV_MAX_BYTES', 0)
    plain = module.init_cache(2, x.shape[1])
    assert set(plain) == {'k', 'v'}
    for position in range(3):
        token = x[:, position:position + 1]
        fused_out, cache = module.decode(token, cache, jnp.int32(position))
        plain_out, plain = module.decode(token, plain, jnp.int32(position))
        np.testing.assert_allclose(fused_out, plain_out, atol=1e-6)
        np.testing.assert_allclose(fused_out[:, 0], y[:, position], atol=1e-5)
    np.testing.assert_allclose(cache['k'], plain['k'], atol=1e-6)
