"""Decoding on one-thread CPU clients, the batch's rows split between them
(pixelgen.cpu.decode_clients):
it must draw token for token what decoding the whole batch on the main client draws."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen import sampling
from pixelgen.cpu import decode_clients
from pixelgen.models.dalle import DallE
from pixelgen.models.igpt import ImageGPT
from pixelgen.sampling import generate, sample


@pytest.fixture(autouse=True)
def cores_mode(monkeypatch):
    """The default mode (conftest sets 'shared' for the other tests)."""
    monkeypatch.setenv(decode_clients.ENV, 'cores')


@pytest.fixture(scope='module')
def two_devices() -> tuple[jax.Device, ...]:
    """Two one-thread clients' devices: one per core, or both on this process's only core
    (a 1-core machine still tests the split)."""
    devices = decode_clients.core_devices()
    if len(devices) >= 2:
        return devices[:2]
    core = sorted(os.sched_getaffinity(0))[0]
    return decode_clients.one_thread_devices([core, core])


@pytest.fixture
def on_two_devices(monkeypatch, two_devices):
    monkeypatch.setattr(decode_clients, 'core_devices', lambda: two_devices)
    return two_devices


@pytest.fixture(scope='module')
def igpt() -> ImageGPT:
    model = ImageGPT(vocab_size=16, seq_len=16, num_layers=2, width=32, num_heads=4,
                     rngs=nnx.Rngs(0))
    model.head.kernel[...] = jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    return model


def shared_and_split(monkeypatch, draw):
    """draw() on the main client (PIXELGEN_CPU_DECODE=shared), then with the rows split over
    the cores (=rows: never the weights, which tests/test_core_split.py covers)."""
    monkeypatch.setenv(decode_clients.ENV, 'shared')
    whole = np.asarray(draw())
    monkeypatch.setenv(decode_clients.ENV, 'rows')
    return whole, draw()


def test_one_thread_clients_are_separate_single_devices(two_devices):
    assert len({d.client for d in two_devices}) == 2
    assert all(d.platform == 'cpu' and d not in jax.devices() for d in two_devices)


@pytest.mark.parametrize('batch', [1, 3, 4])
def test_split_covers_the_rows_in_order(batch):
    for parts in range(1, batch + 1):
        ranges = decode_clients.split(batch, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [stop - start for start, stop in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.slow
@pytest.mark.parametrize('kwargs', [{}, {'top_k': 3, 'temperature': 0.7}],
                         ids=['plain', 'top_k'])
def test_igpt_rows_split_over_cores_sample_what_the_whole_batch_samples(
        monkeypatch, on_two_devices, igpt, kwargs):
    prompt = np.random.default_rng(0).integers(0, 16, (3, 5), np.int32)
    assert decode_clients.decode_devices(nnx.state(igpt), 3) == on_two_devices

    def draw():
        return sample(igpt, jax.random.key(7), batch_size=3, prompt=prompt, **kwargs)
    whole, split = shared_and_split(monkeypatch, draw)
    np.testing.assert_array_equal(split, whole)
    np.testing.assert_array_equal(whole[:, :5], prompt)
    assert split.devices() == set(jax.devices()[:1])  # back on the parameters' device


@pytest.mark.slow
def test_dalle_rows_split_over_cores_generate_what_the_whole_batch_generates(
        monkeypatch, on_two_devices):
    model = DallE(text_vocab_size=20, image_vocab_size=12, text_len=4, grid_size=3,
                  num_layers=2, width=16, num_heads=2, rngs=nnx.Rngs(0))
    model.image_head.kernel[...] = jax.random.normal(jax.random.key(2),
                                                     model.image_head.kernel.shape)
    text = np.random.default_rng(1).integers(0, 20, (3, 4), np.int32)
    prompt = np.random.default_rng(2).integers(0, 12, (3, 2), np.int32)

    def draw():
        return generate(model, jax.random.key(3), text, image_prompt=prompt)
    whole, split = shared_and_split(monkeypatch, draw)
    np.testing.assert_array_equal(split, whole)
    np.testing.assert_array_equal(whole[:, :2], prompt)


@pytest.mark.slow
@pytest.mark.parametrize('drawn_first', [True, False], ids=['before_the_loop', 'per_token'])
def test_gumbel_rows_add_what_jax_random_categorical_adds(monkeypatch, drawn_first):
    if not drawn_first:
        monkeypatch.setattr(sampling, 'MAX_NOISE_BYTES', 0)
    rng, rows, batch, vocab = jax.random.key(4), (1, 3), 4, 10
    logits = jax.random.normal(jax.random.key(5), (batch, vocab))
    noise = jax.jit(lambda position, start: sampling.gumbel_rows(
        rng, 2, 6, batch, start, rows[1] - rows[0], vocab)(position))(
            jnp.int32(4), jnp.int32(rows[0]))  # [rows, vocab] at position 4, traced as in a loop
    expected = jax.random.categorical(jax.random.fold_in(rng, 4), logits)[rows[0]:rows[1]]
    drawn = jnp.argmax(logits[rows[0]:rows[1]] + noise, axis=-1)
    np.testing.assert_array_equal(drawn, expected)


def test_params_traced_sharded_or_large_decode_where_they_are(monkeypatch, two_devices, igpt):
    monkeypatch.setattr(decode_clients, 'core_devices', lambda: two_devices)
    state = nnx.state(igpt)
    assert decode_clients.decode_devices(state, 1) == two_devices[:1]
    assert jax.jit(lambda s: len(decode_clients.decode_devices(s, 2)))(state) == 0
    leaves = jax.tree.leaves(state)
    spread = [jax.device_put(leaves[0], two_devices[0]), *leaves[1:]]
    assert decode_clients.decode_devices(spread, 2) == ()
    monkeypatch.setattr(decode_clients, 'MAX_PARAM_BYTES', 0)
    assert decode_clients.decode_devices(state, 2) == ()


def test_a_bad_mode_names_the_choices(monkeypatch, igpt):
    monkeypatch.setenv(decode_clients.ENV, 'both')
    with pytest.raises(ValueError, match='PIXELGEN_CPU_DECODE=.both.*cores.*rows.*shared'):
        sample(igpt, jax.random.key(0), batch_size=2)


def test_ranges_of_one_size_compile_once_and_load_on_the_other_clients(monkeypatch,
                                                                       on_two_devices):
    loads, load = [], decode_clients.serialize_executable.deserialize_and_load

    def counted_load(*args, **kwargs):
        loads.append(kwargs['execution_devices'])
        return load(*args, **kwargs)

    monkeypatch.setattr(decode_clients.serialize_executable, 'deserialize_and_load', counted_load)

    @functools.partial(jax.jit, static_argnames='row_count')
    def scaled_plus_start(params, x, *, row_start, row_count):
        assert x.shape[0] == row_count
        return x * params + row_start

    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    expected = x * 2 + np.array([[0], [0], [2], [2]], np.float32)  # each range's own start
    for _ in range(2):  # the second call reuses both executables
        out = decode_clients.map_rows(scaled_plus_start, jnp.float32(2), [], [x], 4)
        np.testing.assert_array_equal(out, expected)
    assert loads == [[on_two_devices[1]]]


@pytest.mark.slow
def test_rows_on_the_core_clients_decode_on_packed_weights(monkeypatch, on_two_devices, igpt):
    monkeypatch.setenv(decode_clients.ENV, 'rows')
    seen = []
    original = decode_clients._executable
    monkeypatch.setattr(decode_clients, '_executable',
                        lambda run, *a: seen.append(run.keywords.get('packed')) or
                        original(run, *a))
    sample(igpt, jax.random.key(7), batch_size=2, num_tokens=4)
    assert seen == [True, True]  # one row range per core client, both packed
