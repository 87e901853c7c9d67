"""Block-sparse attention equals the dense masked reference, values and gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen.nn.attention import MultiHeadAttention, dot_product_attention
from pixelgen.nn.block_sparse import block_sparse_attention, make_plan
from pixelgen.nn.masks import CAUSAL, FULL


@dataclasses.dataclass(frozen=True)
class Banded:
    """A causal local window: exercises groups of several query blocks and key gathers."""
    window: int

    def dense(self, length: int) -> np.ndarray:
        i, j = np.arange(length)[:, None], np.arange(length)[None]
        return (j <= i) & (i - j < self.window)


def _qkv(length, seed=0, b=2, h=2, d=8):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (b, length, h, d)) for k in keys]


def _dense(q, k, v, mask):
    return dot_product_attention(q, k, v, jnp.asarray(mask.dense(q.shape[1]))[None, None])


@pytest.mark.parametrize('mask', [CAUSAL, FULL, Banded(6)], ids=['causal', 'full', 'banded'])
@pytest.mark.parametrize('length,block', [(16, 4), (37, 8), (5, 8), (24, 24)])
def test_block_sparse_equals_dense(mask, length, block):
    q, k, v = _qkv(length)
    fast = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask, block))(q, k, v)
    np.testing.assert_allclose(fast, _dense(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mask', [CAUSAL, Banded(5)], ids=['causal', 'banded'])
def test_block_sparse_gradients_equal_dense(mask):
    q, k, v = _qkv(20, seed=1)
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    fast = jax.grad(loss(lambda q, k, v: block_sparse_attention(q, k, v, mask, 4)),
                    argnums=(0, 1, 2))(q, k, v)
    slow = jax.grad(loss(lambda q, k, v: _dense(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_plan_skips_masked_blocks():
    assert make_plan(FULL, 64, 8).density == 1.0
    assert make_plan(CAUSAL, 64, 8).density == pytest.approx((8 + 1) / (2 * 8))
    banded = make_plan(Banded(8), 64, 8)
    assert banded.density == pytest.approx(2 / 8 - 1 / 64)  # two blocks per row but the first
    assert max(len(g.query_blocks) for g in banded.groups) == 7  # one batched group


def test_module_implementations_agree():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 19, 16))

    def build(impl):
        return MultiHeadAttention(16, 2, mask=CAUSAL, num_layers=1, attention_impl=impl,
                                  block_size=4, rngs=nnx.Rngs(0))

    np.testing.assert_allclose(build('block_sparse')(x), build('dense')(x), atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        build('flash')


def test_block_sparse_only_where_it_pays_off():
    assert make_plan(CAUSAL, 1024, 128).pays_off      # 56% of dense
    assert not make_plan(CAUSAL, 400, 128).pays_off   # padding eats the saving
    assert not make_plan(FULL, 1024, 128).pays_off    # nothing to skip
