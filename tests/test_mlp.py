"""The MLP's hand-written backward pass equals autodiff of the plain formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen.nn.transformer import ACTIVATIONS, MLP, mlp


def reference(x, w_in, w_out, biases, activation):
    b_in, b_out = biases if biases is not None else (0.0, 0.0)
    return ACTIVATIONS[activation](x @ w_in + b_in) @ w_out + b_out


def inputs(use_bias: bool):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (10, 8))
    w_in, w_out = (0.3 * jax.random.normal(keys[1], (8, 32)),
                   0.3 * jax.random.normal(keys[2], (32, 8)))
    biases = (jax.random.normal(keys[3], (32,)), jax.random.normal(keys[4], (8,))) \
        if use_bias else None
    cotangent = jax.random.normal(keys[5], (10, 8))
    return (x, w_in, w_out, biases), cotangent


@pytest.mark.slow
@pytest.mark.parametrize('activation,use_bias', [('quick_gelu', False), ('gelu', True)])
def test_values_and_gradients_equal_autodiff(activation, use_bias):
    args, cotangent = inputs(use_bias)

    def loss(fn, x, w_in, w_out, biases):
        return jnp.sum(fn(x, w_in, w_out, biases, activation) * cotangent)

    np.testing.assert_allclose(mlp(*args, activation), reference(*args, activation),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda *a: loss(mlp, *a), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_gradients_survive_rematerialisation():
    args, cotangent = inputs(False)

    def loss(x, w_in, w_out):
        return jnp.sum(mlp(x, w_in, w_out, None, 'quick_gelu') * cotangent)

    plain = jax.grad(loss, argnums=(0, 1, 2))(*args[:3])
    for policy in (None, jax.checkpoint_policies.dots_saveable):
        remat = jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1, 2))(*args[:3])
        for g, w in zip(remat, plain, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_module_on_batch_length_width_equals_the_plain_formula():
    module = MLP(8, mlp_ratio=4, use_bias=True, activation='gelu', rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    biases = (module.fc.bias[...], module.proj.bias[...])
    want = reference(x, module.fc.kernel[...], module.proj.kernel[...], biases, 'gelu')
    np.testing.assert_allclose(module(x), want, rtol=1e-5, atol=1e-5)
    graphdef, params = nnx.split(module, nnx.Param)
    got = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2), argnums=(0, 1))(
        params, x)

    def plain(p, x):
        m = nnx.merge(graphdef, p)
        return jnp.sum(reference(x, m.fc.kernel[...], m.proj.kernel[...],
                                 (m.fc.bias[...], m.proj.bias[...]), 'gelu') ** 2)

    want = jax.grad(plain, argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_module_gradients_reach_float32_parameters_in_bfloat16_compute():
    module = MLP(8, mlp_ratio=4, dtype=jnp.bfloat16, use_bias=True, activation='gelu',
                 rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    assert module(x).dtype == jnp.bfloat16
    graphdef, params = nnx.split(module, nnx.Param)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32)))(params)
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == jnp.float32 and float(jnp.abs(leaf).sum()) > 0
