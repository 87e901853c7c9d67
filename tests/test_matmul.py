"""rows_t_times, nnx.Linear's linear_dot_general and nnx.Einsum's projection_einsum equal the
plain formulas and their autodiff, and their products reach XLA:CPU in the canonical
(non-Eigen) form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen.nn.matmul import linear_dot_general, projection_einsum, rows_t_times


@pytest.mark.slow
def test_rows_t_times_equals_transpose_product():
    a = jax.random.normal(jax.random.key(0), (2, 3, 12, 4))
    b = jax.random.normal(jax.random.key(1), (2, 3, 12, 5))
    got = jax.jit(lambda a, b: rows_t_times(a, b, batch='xy'))(a, b)
    assert got.shape == (2, 3, 4, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, jnp.swapaxes(a, -1, -2) @ b, rtol=1e-5, atol=1e-5)


def test_rows_t_times_keeps_the_canonical_product():
    """Without the barriers XLA folds the transpose into the dot and contracts the left
    operand's major axis; the optimised HLO must not contain that form."""
    a, b = jnp.ones((64, 8)), jnp.ones((64, 32))
    hlo = jax.jit(rows_t_times).lower(a, b).compile().as_text()
    folded = jax.jit(lambda a, b: a.T @ b).lower(a, b).compile().as_text()
    assert 'lhs_contracting_dims={0}' in folded  # the form this module avoids
    assert 'lhs_contracting_dims={0}' not in hlo


def linear(dot_general, dtype=jnp.float32):
    return nnx.Linear(6, 10, use_bias=False, dtype=dtype, preferred_element_type=jnp.float32,
                      dot_general=dot_general, rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_linear_values_and_gradients_equal_autodiff(dtype, tol):
    x = jax.random.normal(jax.random.key(2), (2, 7, 6))
    cotangent = jax.random.normal(jax.random.key(3), (2, 7, 10))
    fast, plain = linear(linear_dot_general, dtype), linear(jax.lax.dot_general, dtype)

    plain.kernel[...] = fast.kernel[...]

    def loss(layer, x):
        y = layer(x)
        assert y.dtype == jnp.float32  # preferred_element_type is honoured
        return jnp.sum(y * cotangent)

    (got_kernel, got_x), (want_kernel, want_x) = (
        nnx.grad(loss, argnums=(0, 1))(layer, x) for layer in (fast, plain))
    for g, w in ((got_kernel['kernel'][...], want_kernel['kernel'][...]), (got_x, want_x)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol)


@pytest.mark.slow
def test_other_contractions_fall_through():
    """A batched contraction is not a linear layer: plain dot_general computes it."""
    a = jax.random.normal(jax.random.key(4), (3, 4, 5))
    b = jax.random.normal(jax.random.key(5), (3, 5, 2))
    numbers = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(linear_dot_general(a, b, numbers),
                               jax.lax.dot_general(a, b, numbers), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('spec,x_shape,kernel_shape', [
    ('bld,dhk->blhk', (2, 5, 8), (8, 2, 4)),      # attention's q, k, v
    ('blhk,hkd->bld', (2, 5, 2, 4), (2, 4, 8)),   # and its output
    ('bld,hdk->blhk', (2, 5, 8), (2, 8, 4)),      # not a flat projection: plain einsum
])
def test_projection_einsum_values_and_gradients_equal_einsum(spec, x_shape, kernel_shape):
    x = jax.random.normal(jax.random.key(6), x_shape)
    kernel = jax.random.normal(jax.random.key(7), kernel_shape)
    cotangent = jax.random.normal(jax.random.key(8), jnp.einsum(spec, x, kernel).shape)

    def loss(einsum, x, kernel):
        return jnp.sum(einsum(spec, x, kernel) * cotangent)

    got = jax.grad(lambda *a: loss(projection_einsum, *a), argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda *a: loss(jnp.einsum, *a), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(projection_einsum(spec, x, kernel), jnp.einsum(spec, x, kernel),
                               rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)

