"""Accelerator attention paths: splash (TPU kernel, here in interpret mode), cuDNN selection,
'auto', and bfloat16 compute."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, run_python
from flax import nnx

from pixelgen import trainer
from pixelgen.config import ConfigError, apply_override, load_config_file
from pixelgen.nn import attention
from pixelgen.nn.attention import MultiHeadAttention, dot_product_attention
from pixelgen.nn.masks import CAUSAL, FULL, dalle_mask, dalle_mask_spec
from pixelgen.nn.splash import splash_attention, splash_mask
from pixelgen.tasks import dalle, igpt

# DALL·E at a size splash's 128 blocks fit: 31 text + 15 x 15 image = 256 tokens.
TEXT, GRID = 31, 15
HEADS, HEAD_DIM = 2, 64


def _qkv(length: int, batch: int = 2):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, (batch, length, HEADS, HEAD_DIM))
                          for key in keys)
    return (q, k, v), cotangent


def _forward_and_grads(attend, qkv, cotangent):
    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)
    return out, grads


CASES = {  # name: (MaskSpec, dense reference mask [n, n])
    'causal': (CAUSAL, np.tril(np.ones((256, 256), bool))),
    'causal-padded': (CAUSAL, np.tril(np.ones((200, 200), bool))),
    'full': (FULL, np.ones((256, 256), bool)),
    'full-padded': (FULL, np.ones((200, 200), bool)),
    **{kind: (dalle_mask_spec(kind, TEXT, GRID), dalle_mask(kind, TEXT, GRID))
       for kind in ('row', 'column', 'conv')},
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CASES))
def test_splash_equals_dense_forward_and_gradients(name):
    spec, dense = CASES[name]
    qkv, cotangent = _qkv(len(dense))
    mask = jnp.asarray(dense)[None, None]
    out, grads = _forward_and_grads(lambda q, k, v: splash_attention(q, k, v, spec, 128,
                                                                     interpret=True),
                                    qkv, cotangent)
    ref_out, ref_grads = _forward_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, mask), qkv, cotangent)
    chex.assert_shape(out, qkv[0].shape)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-4)


def test_splash_column_layer_skips_blocks_in_column_major_order():
    """The paper's 256 + 32 x 32 column layer: raster order leaves splash nearly causal;
    column-major order lets it skip most image blocks."""
    spec, length = dalle_mask_spec('column', 256, 32), 1280

    def blocks(mask):
        return mask.reshape(10, 128, 10, 128).any(axis=(1, 3)).sum()

    raster = blocks(dalle_mask('column', 256, 32))
    column_major = blocks(splash_mask(spec, length, length).array)
    assert column_major < 0.5 * raster, (column_major, raster)


def test_splash_layer_equals_dense_layer():
    spec = dalle_mask_spec('conv', TEXT, GRID)
    x = jax.random.normal(jax.random.key(1), (2, 256, HEADS * HEAD_DIM))

    def layer(impl):
        return MultiHeadAttention(HEADS * HEAD_DIM, HEADS, mask=spec, num_layers=1,
                                  attention_impl=impl, rngs=nnx.Rngs(0))

    splash_layer = layer('splash')
    assert splash_layer.splash_block_size == 128
    np.testing.assert_allclose(splash_layer(x), layer('dense')(x), atol=1e-5)
    with pytest.raises(ValueError, match='block_size=64 must be a positive multiple of 128'):
        MultiHeadAttention(128, 2, mask=spec, num_layers=1, attention_impl='splash',
                           block_size=64, rngs=nnx.Rngs(0))


SHARDED_KERNELS = '''
import jax, jax.numpy as jnp, numpy as np
from pixelgen import parallel
from pixelgen.cpu import native_attention
from pixelgen.nn import block_sparse
from pixelgen.nn.attention import dot_product_attention
from pixelgen.nn.masks import dalle_mask, dalle_mask_spec
from pixelgen.nn.splash import splash_attention

mesh = parallel.make_mesh({'data': 2, 'tensor': 2})
q, k, v = jax.random.normal(jax.random.key(0), (3, 4, 128, 2, 64))  # 28 + 10 x 10 tokens
mask = dalle_mask_spec('row', 28, 10)
dense = jnp.asarray(dalle_mask('row', 28, 10))

def value_and_grads(attend):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2),
                                      argnums=(0, 1, 2)))

ref_value, ref_grads = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, dense))(
    q, k, v)
kernels = {'pixelgen_block_attention': lambda q, k, v: native_attention.attend(q, k, v, mask),
           'splash': lambda q, k, v: splash_attention(q, k, v, mask)}
for name, attend in kernels.items():
    fn = value_and_grads(attend)
    with parallel.activation_sharding(mesh, parallel.DEFAULT_RULES):
        value, grads = fn(q, k, v)
        text = fn.lower(q, k, v).as_text()
    assert 'sdy.manual_computation' in text and name in text, name  # under shard_map
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-4)
print('ok')
'''


@pytest.mark.slow
def test_kernels_xla_cannot_partition_run_per_device_under_shard_map():
    """XLA cannot partition a TPU kernel or a custom call: on 4 devices (data 2 x tensor 2)
    splash and the native CPU kernel each run under shard_map (`parallel.per_device_heads`),
    batch rows and heads split, and still equal dense attention."""
    assert 'ok' in run_python(SHARDED_KERNELS, devices=4)


def _selected(impl, mask=CAUSAL, dtype=jnp.bfloat16, head_dim=64):
    return attention.select_implementation(impl, mask, dtype, head_dim)


def test_auto_picks_block_sparse_on_cpu():
    assert jax.default_backend() == 'cpu'
    for mask in (CAUSAL, FULL, dalle_mask_spec('row', TEXT, GRID)):
        layer = MultiHeadAttention(32, 2, mask=mask, num_layers=1, attention_impl='auto',
                                   rngs=nnx.Rngs(0))
        assert layer.implementation() == 'block_sparse'
        assert layer.implementation('tpu') == 'splash'  # what a TPU executable built here runs


@pytest.mark.parametrize('backend, dtype, mask, head_dim, expected', [
    ('gpu', jnp.bfloat16, CAUSAL, 64, 'cudnn'),
    ('gpu', jnp.bfloat16, FULL, 128, 'cudnn'),
    ('gpu', jnp.float32, CAUSAL, 64, 'block_sparse'),        # cuDNN needs 16-bit compute
    ('gpu', jnp.bfloat16, CAUSAL, 36, 'block_sparse'),       # head_dim not a multiple of 8
    ('gpu', jnp.bfloat16, dalle_mask_spec('conv', TEXT, GRID), 64, 'block_sparse'),
    ('tpu', jnp.float32, CAUSAL, 64, 'splash'),
    ('tpu', jnp.bfloat16, dalle_mask_spec('column', TEXT, GRID), 64, 'splash'),
])
def test_auto_selection_per_backend(monkeypatch, backend, dtype, mask, head_dim, expected):
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    assert _selected('auto', mask, dtype, head_dim) == expected


def test_cudnn_without_gpu_fails_early_naming_the_fix():
    with pytest.raises(ValueError, match=r"needs an NVIDIA GPU.*'cpu'.*'auto'.*'block_sparse'"):
        MultiHeadAttention(32, 2, mask=CAUSAL, num_layers=1, attention_impl='cudnn',
                           rngs=nnx.Rngs(0))
    config = load_config_file(TINY)
    apply_override(config, 'model.attention', 'cudnn')
    with pytest.raises(ConfigError, match=r"model.attention='cudnn' needs an NVIDIA GPU.*auto"):
        igpt.validate_config(config)
    apply_override(config, 'model.attention', 'flash')
    with pytest.raises(ConfigError, match="model.attention='flash' must be one of"):
        igpt.validate_config(config)


def test_dalle_config_with_cudnn_names_its_sparse_layers():
    config = load_config_file(os.path.join(REPO, 'configs', 'dalle_shapes.py') + ':tiny')
    assert config.model.num_layers == 2  # the paper's schedule: row, then conv
    apply_override(config, 'model.attention', 'cudnn')
    with pytest.raises(ConfigError, match=r"not the \['conv', 'row'\] layers.*'auto'"):
        dalle.validate_config(config)


def test_cudnn_rejects_masks_and_dtypes_it_cannot_run(monkeypatch):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    with pytest.raises(ValueError, match=r"not this 'row' layer.*'splash'.*'auto'"):
        _selected('cudnn', dalle_mask_spec('row', TEXT, GRID))
    with pytest.raises(ValueError, match=r"bfloat16 or float16 only, not float32.*'auto'"):
        _selected('cudnn', CAUSAL, jnp.float32)
    assert _selected('cudnn') == 'cudnn'


@pytest.mark.parametrize('mask', [CAUSAL, FULL], ids=['causal', 'full'])
def test_cudnn_path_passes_layout_scale_and_mask_as_dense(monkeypatch, mask):
    """No GPU here: the cuDNN call is run by XLA's implementation of the same function, which
    checks what the layer passes (layout [b, l, heads, head_dim], default scale, is_causal)."""
    calls = []
    original = jax.nn.dot_product_attention

    def on_xla(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return original(*args, implementation='xla', **kwargs)

    x = jax.random.normal(jax.random.key(2), (2, 24, 32))
    cudnn = MultiHeadAttention(32, 2, mask=mask, num_layers=1, rngs=nnx.Rngs(0))
    cudnn.attention_impl = 'cudnn'  # past the GPU check, which this test is not about
    dense = MultiHeadAttention(32, 2, mask=mask, num_layers=1, attention_impl='dense',
                               rngs=nnx.Rngs(0))
    monkeypatch.setattr(jax.nn, 'dot_product_attention', on_xla)
    np.testing.assert_allclose(cudnn(x), dense(x), atol=1e-5)
    assert calls == ['cudnn']


@pytest.fixture(scope='module')
def bf16_and_fp32_models():
    def build(dtype):
        config = load_config_file(TINY)
        apply_override(config, 'model.dtype', dtype)
        return config, igpt.build_model(config, nnx.Rngs(0))
    return build('bfloat16'), build('float32')


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits(bf16_and_fp32_models):
    (_, bf16), (_, fp32) = bf16_and_fp32_models
    for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
        assert leaf.dtype == jnp.float32
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 64), np.int32))
    logits, reference = bf16(tokens), fp32(tokens)
    chex.assert_type(logits, jnp.float32)
    chex.assert_shape(logits, (2, 64, 16))
    # bf16 keeps ~3 significant digits; the tiny model's logits are O(1).
    np.testing.assert_allclose(logits, reference, atol=5e-2)


@pytest.mark.slow
def test_bfloat16_train_step(bf16_and_fp32_models):
    (config, model), _ = bf16_and_fp32_models
    tx, schedule = trainer.make_optimizer(config.optimizer, config.total_steps)
    graphdef, rest, state = trainer.init_state(model, tx, seed=0)
    step = jax.jit(trainer.make_train_step(igpt.make_loss(config), graphdef, rest, tx,
                                           schedule))
    batch = {'tokens': np.random.default_rng(0).integers(0, 16, (4, 64)).astype(np.int32)}
    new_state, metrics = step(*step(state, batch)[:1], batch)  # step 0 has learning rate 0
    assert np.log(16) - 1 < float(metrics['loss']) < np.log(16) + 1  # near uniform at init
    assert 0 < float(metrics['grad_norm']) < np.inf
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new_state['params']), jax.tree.leaves(state['params']), strict=True)]
    assert any(changed)
    for leaf in jax.tree.leaves(new_state['params']):
        assert leaf.dtype == jnp.float32
