"""The fused native CPU attention kernel (pixelgen/cpu/native/block_attention.cc): its block plan
covers exactly the allowed logits, it equals dense masked attention in values and gradients
(causal, full, DALL·E's row / column / conv, odd lengths, under remat, scan and vmap; under
shard_map in tests/test_accel_attention.py), no query sees a key it may not, its slices stay
in bounds under sanitizers, and it runs where it should (float32 on the CPU, head dims that
are multiples of 32), XLA's tiles elsewhere."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen.cpu import native, native_attention
from pixelgen.cpu.backend import use_native_attention
from pixelgen.nn import block_sparse
from pixelgen.nn.attention import MultiHeadAttention, dot_product_attention
from pixelgen.nn.masks import CAUSAL, FULL, MaskSpec, dalle_mask_spec

pytestmark = [pytest.mark.native]

# Small masks whose length is a whole number of 32-blocks: T + W² = 32 + 64, and 28 + 36 for
# a 3-wide conv window; the real 11-wide one on the 8-wide grid.
MASKS = {'causal': CAUSAL, 'row': MaskSpec('row', 32, 8), 'column': MaskSpec('column', 32, 8),
         'conv': MaskSpec('conv', 32, 8), 'conv3': MaskSpec('conv', 28, 6, conv_window=3),
         'conv_odd': MaskSpec('conv', 4, 6),  # 40 tokens: padded to 64
         'full': FULL, 'row_other_length': MaskSpec('row', 4, 6)}  # (no XLA tiling for these)


def _length(mask: MaskSpec) -> int:
    return mask.sequence_length if mask.is_dalle else 128


def _qkv(length, seed=0, b=2, h=2, d=32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (b, length, h, d)) for k in keys]


def _dense(q, k, v, mask):
    return dot_product_attention(q, k, v, jnp.asarray(mask.dense(q.shape[1]))[None, None])


def _native(mask):
    return lambda q, k, v: native_attention.attend(q, k, v, mask)


def _value_and_grads(attend, weights):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights),
                                      argnums=(0, 1, 2)))


def _plan_as_dense(plan: native_attention.BlockPlan, every_pair_allows: bool = True
                   ) -> np.ndarray:
    """[padded, padded]: the logits the plan allows; with every_pair_allows, checks that no
    pair it lists is wholly masked (what skipping means)."""
    b = native_attention.BLOCK
    dense = np.zeros((plan.padded, plan.padded), bool)
    for i in range(len(plan.row_start) - 1):
        for e in range(plan.row_start[i], plan.row_start[i + 1]):
            j, mask_id = plan.key_block[e], plan.mask_id[e]
            block = np.ones((b, b), bool) if mask_id < 0 else plan.masks[mask_id].T > 0.5
            assert block.any() or not every_pair_allows
            dense[i * b:(i + 1) * b, j * b:(j + 1) * b] = block
    return dense


@pytest.mark.slow
def test_the_library_builds_here():
    """CI installs g++: the kernels below run natively, not on a fallback."""
    assert native.library() is not None


@pytest.mark.parametrize('kind', ['causal', 'row', 'column', 'conv'])
def test_plans_cover_exactly_the_allowed_logits(kind):
    spec = dalle_mask_spec(kind, 256, 32)
    plan = native_attention.native_plan(spec, 1280)
    np.testing.assert_array_equal(_plan_as_dense(plan),
                                  block_sparse.dense_in_tile_order(spec, 1280))
    assert plan.masks.shape[1:] == (32, 32) and set(np.unique(plan.masks)) <= {0.0, 1.0}
    # Fewer logits than XLA's tiles compute (which read a whole band of image rows).
    if kind != 'causal':
        assert plan.density < block_sparse.make_tiling(spec, 1280).density
    assert {'row': 0.25, 'column': 0.21, 'conv': 0.30, 'causal': 0.55}[kind] > plan.density


def test_a_plan_without_skipping_keeps_every_pair_and_still_equals_dense():
    mask = MASKS['conv']
    n = _length(mask)
    plan = native_attention.plan_from_dense(mask.dense(n), skip=False)
    assert len(plan.key_block) == (n // 32) ** 2
    np.testing.assert_array_equal(_plan_as_dense(plan, every_pair_allows=False), mask.dense(n))
    q, k, v = _qkv(n, seed=5)
    np.testing.assert_allclose(native_attention.attention(q, k, v, plan), _dense(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)


def test_plans_pad_odd_lengths_and_refuse_queries_without_keys():
    plan = native_attention.native_plan(CAUSAL, 100)
    assert (plan.length, plan.padded) == (100, 128)
    padded = _plan_as_dense(plan)
    np.testing.assert_array_equal(padded[:100, :100], CAUSAL.dense(100))
    assert not padded[:100, 100:].any()  # no real query sees a padding key
    assert padded[100:, 0].all() and not padded[100:, 1:].any()  # padding queries: key 0
    lonely = np.tril(np.ones((64, 64), bool))
    lonely[5] = False  # a query with no allowed key: dense attention averages all values
    assert native_attention.plan_from_dense(lonely) is None


@pytest.mark.slow
@pytest.mark.parametrize('name, d, length', [
    ('causal', 32, 128), ('causal', 64, 128), ('causal', 32, 100), ('row', 32, None),
    ('column', 32, None), ('conv', 32, None), ('conv3', 32, None), ('conv_odd', 32, None),
    ('full', 32, 70), ('row_other_length', 32, 50)])
def test_native_kernel_equals_dense_values_and_gradients(name, d, length):
    mask = MASKS[name]
    q, k, v = _qkv(length or _length(mask), seed=1, d=d)
    weights = jax.random.normal(jax.random.PRNGKey(7), q.shape)
    native_fn = _value_and_grads(_native(mask), weights)
    assert native_attention.FORWARD_TARGET in native_fn.lower(q, k, v).as_text()
    assert native_attention.BACKWARD_TARGET in native_fn.lower(q, k, v).as_text()
    (value, grads), (ref_value, ref_grads) = (
        native_fn(q, k, v), _value_and_grads(lambda *a: _dense(*a, mask), weights)(q, k, v))
    np.testing.assert_allclose(jax.jit(_native(mask))(q, k, v), _dense(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['row', 'conv'])
def test_no_query_sees_a_future_or_disallowed_key(name):
    """Replacing every key and value a query may not see (with large noise) leaves its
    output bit for bit unchanged: masked logits get exactly zero weight."""
    mask = MASKS[name]
    n = _length(mask)
    q, k, v = _qkv(n, seed=3)
    attend = jax.jit(_native(mask))
    for query in (0, 31, 32, 40, n - 1):
        hidden = ~mask.dense(n)[query]
        noise = jax.random.normal(jax.random.PRNGKey(query), (2, *k.shape)) * 100
        k2, v2 = (jnp.where(hidden[None, :, None, None], z, x)
                  for z, x in zip(noise, (k, v), strict=True))
        np.testing.assert_array_equal(attend(q, k, v)[:, query], attend(q, k2, v2)[:, query])


def test_native_kernel_under_remat_scan_and_vmap():
    layers = [_qkv(128, seed=s, b=1) for s in (4, 5)]
    stacked = [jnp.stack(xs) for xs in zip(*layers, strict=True)]  # q, k, v [2, 1, n, h, d]

    def loss(attend):
        def total(q, k, v):
            def body(carry, qkv):
                return carry + jnp.sum(jax.checkpoint(attend)(*qkv) ** 2), None
            return jax.lax.scan(body, 0.0, (q, k, v))[0]
        return total

    fast = jax.jit(jax.grad(loss(_native(CAUSAL)), argnums=(0, 1, 2)))(*stacked)
    slow = jax.grad(loss(lambda *a: _dense(*a, CAUSAL)), argnums=(0, 1, 2))(*stacked)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    batched = jax.vmap(_native(CAUSAL))(*stacked)  # vmap over the layer axis
    np.testing.assert_allclose(batched, jax.vmap(lambda *a: _dense(*a, CAUSAL))(*stacked),
                               atol=1e-5)


def test_the_kernel_runs_only_where_it_applies(monkeypatch):
    mask = MASKS['row']
    q, k, v = _qkv(_length(mask))

    def lowered(q, platform='cpu'):  # a new layer each time: the choice is made when traced
        layer = use_native_attention(MultiHeadAttention(
            q.shape[2] * q.shape[3], q.shape[2], mask=mask, num_layers=1,
            dtype=q.dtype, rngs=nnx.Rngs(0)))
        x = jnp.zeros((*q.shape[:2], q.shape[2] * q.shape[3]), q.dtype)
        if platform == 'cpu':
            return jax.jit(layer).lower(x).as_text()
        return jax.export.export(jax.jit(layer), platforms=[platform])(x).mlir_module()

    assert native_attention.FORWARD_TARGET in lowered(q)  # the default on the CPU
    assert native_attention.FORWARD_TARGET not in lowered(q, 'tpu')  # never lowered elsewhere
    assert native_attention.FORWARD_TARGET not in lowered(q, 'cuda')
    assert native_attention.FORWARD_TARGET not in lowered(q.astype(jnp.bfloat16))
    small = _qkv(_length(mask), d=8)
    assert native_attention.FORWARD_TARGET not in lowered(small[0])
    with pytest.raises(ValueError, match=r'native attention kernel cannot run this layer.*'
                                         r'head_dim a multiple of 32 \(here 8\)'):
        native_attention.attend(*small, mask)
    monkeypatch.setenv(native_attention.ENV, '0')
    assert native_attention.FORWARD_TARGET not in lowered(q)


@pytest.mark.parametrize('name', ['conv', 'full'])
def test_attention_module_uses_the_kernel_and_equals_dense(name):
    # Full masks have no XLA tiling (they would be dense), but the kernel serves every mask.
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 96, 64))
    layers = {impl: use_native_attention(MultiHeadAttention(
        64, 2, mask=MASKS[name], num_layers=1, attention_impl=impl, rngs=nnx.Rngs(0)))
        for impl in ('block_sparse', 'dense')}
    assert native_attention.FORWARD_TARGET in jax.jit(
        lambda x: layers['block_sparse'](x)).lower(x).as_text()
    np.testing.assert_allclose(layers['block_sparse'](x), layers['dense'](x), atol=1e-5)


def test_the_kernel_refuses_a_plan_for_another_length():
    q, k, v = _qkv(128)
    plan = native_attention.native_plan(CAUSAL, 64)
    with pytest.raises(Exception, match='the plan does not match the sequence length'):
        jax.block_until_ready(native_attention.attention(q, k, v, plan))


# The build for this CPU, and on x86 also the AVX2 one (8-wide vectors, 2 × 4 register blocks).
VECTOR_FLAGS = [[]] + ([['-mno-avx512f']] if platform.machine() in ('x86_64', 'AMD64') else [])


@pytest.mark.slow
@pytest.mark.parametrize('flags', VECTOR_FLAGS, ids=lambda f: ' '.join(f) or 'native')
def test_kernel_slices_are_exact_and_in_bounds_under_sanitizers(tmp_path, flags):
    """tests/native/block_attention_check.cc runs the kernel's slices without XLA against a
    float64 reference (forward and backward; head_dim 32, 64, 96; 3 heads), built with
    AddressSanitizer and UBSan: an access out of bounds fails even where no value shows it."""
    source = os.path.join(os.path.dirname(__file__), 'native', 'block_attention_check.cc')
    binary = str(tmp_path / 'block_attention_check')
    built = subprocess.run(
        [os.environ.get('CXX', 'g++'), '-O0', '-g', '-std=c++17', '-march=native', *flags, '-w',
         '-fsanitize=address,undefined', '-fno-sanitize-recover=all',
         '-I', jax.ffi.include_dir(), source, '-o', binary],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([binary], capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'ASAN_OPTIONS': 'detect_leaks=1'})
    assert ran.returncode == 0 and ran.stdout.strip() == 'ok', ran.stdout + ran.stderr[-3000:]


@pytest.mark.slow
def test_attention_kernels_benchmark_times_each_variant(monkeypatch, capsys):
    """benchmarks/attention_kernels.py at a tiny shape: every variant timed, the speed-ups
    are ratios of the medians, and tiles appear only for masks that have them."""
    path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'attention_kernels.py')
    spec = importlib.util.spec_from_file_location('attention_kernels', path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, 'CASES', {'conv': ((1, 96, 1, 32), MASKS['conv']),
                                          'full': ((1, 64, 1, 32), FULL)})
    script.main(['--rounds', '3'])
    conv, full = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert set(conv['median_ms']) == {'native', 'native_every_pair', 'tiles', 'dense'}
    assert set(full['median_ms']) == {'native', 'native_every_pair', 'dense'}  # no tiling
    assert conv['native_speedup']['dense'] == pytest.approx(
        conv['median_ms']['dense'] / conv['median_ms']['native'])
    with pytest.raises(SystemExit):
        script.main(['no_such_case'])
