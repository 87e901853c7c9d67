"""pixelgen.cpu.core_split: decoding with the weights split between two core clients."""

import concurrent.futures
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen import sampling
from pixelgen.cpu import core_split, decode_clients, native, packed_matmul
from pixelgen.models.dalle import DallE
from pixelgen.models.igpt import ImageGPT
from pixelgen.nn.decode_ops import DecodeOps
from pixelgen.nn.masks import CAUSAL
from pixelgen.nn.transformer import Block
from pixelgen.sampling import generate

pytestmark = [pytest.mark.native]


@pytest.fixture(scope='module')
def two_clients():
    """Two one-thread clients (on two cores where there are two)."""
    cores = sorted(os.sched_getaffinity(0))
    return decode_clients.one_thread_devices((cores * 2)[:2])


@pytest.fixture(scope='module')
def model():
    return ImageGPT(vocab_size=16, seq_len=32, num_layers=2, width=32, num_heads=4,
                    rngs=nnx.Rngs(0))


def test_the_library_builds_and_both_parties_get_the_same_sum(two_clients):
    assert native.library() is not None, 'g++ and the jaxlib headers build pair_sum.cc'
    halves = [np.arange(6, dtype=np.float32).reshape(2, 3) * (p + 1) + 0.1 for p in (0, 1)]

    def party_sums(x, party):
        def body(i, x):
            return core_split.pair_sum(x, party) * 0.5  # 0.5 (a + b) of the previous round
        return jax.lax.fori_loop(0, 5, body, x)

    runs = [jax.jit(functools.partial(party_sums, party=p)).lower(
        jax.device_put(halves[p], d)).compile() for p, d in enumerate(two_clients)]
    native.library().pixelgen_pair_sum_reset(core_split.TIMEOUT_MS)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda p: np.asarray(runs[p](jax.device_put(halves[p],
                                                                        two_clients[p]))),
                            (0, 1)))
    expected = (halves[0] + halves[1]) * 0.5  # round 1 sums both; then each sums equal values
    for _ in range(4):
        expected = (expected + expected) * 0.5
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_a_party_alone_times_out_with_a_clear_error(two_clients):
    lib = native.library()
    run = jax.jit(functools.partial(core_split.pair_sum, party=0)).lower(
        jax.device_put(np.ones(3, np.float32), two_clients[0])).compile()
    lib.pixelgen_pair_sum_reset(200)  # ms
    try:
        with pytest.raises(Exception, match='other party did not arrive'):
            np.asarray(run(jax.device_put(np.ones(3, np.float32), two_clients[0])))
    finally:
        lib.pixelgen_pair_sum_reset(core_split.TIMEOUT_MS)


def test_halves_split_heads_and_mlp_units_and_rejoin(model):
    state = nnx.split(model)[1]
    assert core_split.splits(state)
    parts = [core_split.half(state, p) for p in (0, 1)]
    attn, mlp = model.transformer.blocks[0].attn, model.transformer.blocks[0].mlp
    half_attn = parts[1]['transformer']['blocks'][0]['attn']
    assert half_attn['query']['kernel'].shape == (32, 2, 8)  # [width, heads / 2, head_dim]
    assert half_attn['out']['kernel'].shape == (2, 8, 32)
    np.testing.assert_array_equal(
        np.concatenate([p['transformer']['blocks'][0]['mlp']['fc']['kernel'][...]
                        for p in parts], axis=1), mlp.fc.kernel[...])
    np.testing.assert_array_equal(half_attn['key']['kernel'][...], attn.key.kernel[...][:, 2:])
    np.testing.assert_array_equal(parts[0]['wte']['embedding'][...],
                                  model.wte.embedding[...])  # not split


@pytest.mark.slow
def test_models_that_do_not_split_in_two_are_refused():
    odd = ImageGPT(vocab_size=16, seq_len=8, num_layers=1, width=24, num_heads=3,
                   mlp_ratio=1, rngs=nnx.Rngs(0))
    assert not core_split.splits(nnx.split(odd)[1])  # 3 heads
    scanned = ImageGPT(vocab_size=16, seq_len=8, num_layers=2, width=16, num_heads=2,
                       scan_layers=True, rngs=nnx.Rngs(0))
    assert not core_split.splits(nnx.split(scanned)[1])  # stacked layers


@pytest.mark.slow
@pytest.mark.parametrize('prompt_len', [0, 5])
def test_split_weights_draw_the_tokens_of_one_device(model, monkeypatch, prompt_len):
    prompt = jax.random.randint(jax.random.key(7), (3, prompt_len), 0, 16)
    draws = {}
    for mode in ('cores', 'rows', 'shared'):
        monkeypatch.setenv(decode_clients.ENV, mode)
        draws[mode] = np.asarray(sampling.sample(model, jax.random.key(3), batch_size=3,
                                                 prompt=prompt, num_tokens=20, top_k=8))
    np.testing.assert_array_equal(draws['cores'], draws['shared'])
    np.testing.assert_array_equal(draws['rows'], draws['shared'])
    np.testing.assert_array_equal(draws['cores'][:, :prompt_len], prompt)


@pytest.mark.slow
def test_sampling_takes_the_split_path_on_two_cores(model, monkeypatch):
    calls = []
    original = core_split.map_halves
    monkeypatch.setattr(core_split, 'map_halves',
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv(decode_clients.ENV, 'cores')
    sampling.sample(model, jax.random.key(0), batch_size=1, num_tokens=4)
    assert calls == ([1] if len(decode_clients.core_devices()) == 2 else [])
    monkeypatch.setenv(decode_clients.ENV, 'rows')
    sampling.sample(model, jax.random.key(0), batch_size=1, num_tokens=4)
    assert len(calls) <= 1


def test_a_blocks_sublayer_outputs_pass_through_the_steps_combine():
    block = Block(32, 2, mask=CAUSAL, num_layers=1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 1, 32))
    cache = block.init_cache(2, 4)
    plain, _ = block.decode(x, cache, 0)
    dropped, _ = block.decode(x, cache, 0, DecodeOps(combine=lambda a: a * 0))
    np.testing.assert_array_equal(dropped, x)  # both sums dropped: the residual alone
    assert not np.allclose(plain, x)


def test_a_missing_compiler_falls_back_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert native.build(str(tmp_path / 'x.so'), compiler='no-such-compiler') is None
    assert 'could not build' in caplog.text and not list(tmp_path.iterdir())


def test_halves_are_placed_once_per_set_of_parameters(model, two_clients):
    first = core_split._halves_on(nnx.split(model)[1], two_clients)
    assert core_split._halves_on(nnx.split(model)[1], two_clients) is first  # same arrays
    state = nnx.split(model)[1]
    changed = jax.tree.map(lambda x: x * 2, state)
    second = core_split._halves_on(changed, two_clients)
    assert second is not first
    np.testing.assert_array_equal(second[0]['wte']['embedding'][...],
                                  2 * np.asarray(model.wte.embedding[...]))
    assert second[1]['wte']['embedding'][...].devices() == {two_clients[1]}


@pytest.mark.slow
def test_dalle_generates_the_same_codes_with_split_weights(monkeypatch):
    model = DallE(text_vocab_size=20, image_vocab_size=12, text_len=4, grid_size=3,
                  num_layers=2, width=16, num_heads=2, rngs=nnx.Rngs(0))
    model.image_head.kernel[...] = jax.random.normal(jax.random.key(2),
                                                     model.image_head.kernel.shape)
    assert core_split.splits(nnx.split(model)[1])
    text = np.random.default_rng(1).integers(0, 20, (3, 4), np.int32)
    prompt = np.random.default_rng(2).integers(0, 12, (3, 2), np.int32)
    calls, original = [], core_split.map_halves
    monkeypatch.setattr(core_split, 'map_halves',
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    codes = {}
    for mode in ('cores', 'shared'):
        monkeypatch.setenv(decode_clients.ENV, mode)
        codes[mode] = np.asarray(generate(model, jax.random.key(3), text, image_prompt=prompt))
    np.testing.assert_array_equal(codes['cores'], codes['shared'])
    assert calls == ([1] if len(decode_clients.core_devices()) == 2 else [])


class _Kernel(nnx.Module):
    def __init__(self, kernel):
        self.kernel = nnx.Param(kernel)


@pytest.mark.slow
@pytest.mark.parametrize('rows, k, n', [(4, 64, 128), (1, 7, 5), (6, 33, 200), (9, 256, 384)])
def test_packed_matmul_equals_the_product(rows, k, n):
    panel = native.panel()
    x = jax.random.normal(jax.random.key(0), (rows, k))
    kernel = jax.random.normal(jax.random.key(1), (k, n))
    assert packed_matmul.pack(kernel, 1, panel).shape == (-(-n // panel), k, panel)

    @jax.jit
    def product(x, kernel):
        module = _Kernel(kernel)
        packed = packed_matmul.PackedWeights(module, panel)
        return packed.matmul(x, module.kernel[...], 1, fallback=lambda: None)
    np.testing.assert_allclose(product(x, kernel), x @ kernel, rtol=2e-5, atol=2e-5 * k)


def test_packed_matmul_contracts_leading_axes_and_falls_back_on_unpacked_arrays():
    x = jax.random.normal(jax.random.key(0), (3, 1, 4, 8))  # [b, 1, heads, head_dim]
    kernel = jax.random.normal(jax.random.key(1), (4, 8, 16))  # [heads, head_dim, width]
    expected = jnp.einsum('blhk,hkd->bld', x, kernel)

    @jax.jit
    def f(x, kernel):
        module = _Kernel(kernel)
        weights = packed_matmul.PackedWeights(module, native.panel())
        packed = weights.matmul(x, module.kernel[...], 2, lambda: 'not packed')
        unpacked = weights.matmul(x, kernel + 1, 2, lambda: jnp.zeros(3))
        return packed, unpacked
    packed, unpacked = f(x, kernel)
    np.testing.assert_allclose(packed, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(unpacked, np.zeros(3))  # an array made inside: not packed


@pytest.mark.parametrize('party', [0, None])  # the weight split, the row split
def test_decoding_on_core_clients_runs_every_matmul_on_packed_weights(model, party):
    graphdef, state = nnx.split(model)
    assert native.library() is not None  # registers the kernels
    device = jax.devices()[0]
    params = core_split.half(state, party) if party is not None else state
    prompt = jax.device_put(np.zeros((2, 0), np.int32), device)
    lowered = sampling._sample_jit.lower(
        graphdef, jax.device_put(params, device), jax.random.key(0), prompt, batch_size=2,
        temperature=1.0, top_k=None, top_p=None, phase_ends=(8,),
        row_start=jax.device_put(np.int32(0), device), row_count=2, party=party, packed=True)
    text = lowered.as_text()
    # Per layer q, k, v, out, fc and proj, then the head; the only other products are the
    # attention's two over the KV cache, per layer.
    assert text.count(f'custom_call @{packed_matmul.TARGET}') == 6 * 2 + 1
    assert text.count('stablehlo.dot_general') == 2 * 2
