"""KV-cache decoding and sampling tests for Image GPT (tiny shapes; CPU)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen import sampling
from pixelgen.models.igpt import ImageGPT
from pixelgen.sampling import sample

CONFIG = dict(vocab_size=16, seq_len=16, num_layers=2, width=32, num_heads=4)
SEQ_LEN, VOCAB = CONFIG['seq_len'], CONFIG['vocab_size']
BATCH = 3


@pytest.fixture(scope='module')
def model():
    """A tiny model whose zero-initialised head is replaced by random values, so logits vary."""
    model = ImageGPT(**CONFIG, rngs=nnx.Rngs(0))
    kernel = model.head.kernel
    kernel[...] = jax.random.normal(jax.random.key(100), kernel.shape)
    return model


@pytest.fixture(scope='module')
def forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens))


@pytest.fixture(scope='module')
def samples(model):
    return sample(model, jax.random.key(0), batch_size=BATCH)


@pytest.mark.slow
def test_cached_decode_step_matches_full_forward_at_every_position(model, forward):
    tokens = np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ_LEN), np.int32)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda prev, position, cache:
                   nnx.merge(graphdef, state).decode_step(prev, position, cache))
    full = forward(tokens)
    cache = jax.jit(model.init_cache, static_argnums=0)(BATCH)
    for position in range(SEQ_LEN):
        prev = tokens[:, max(position - 1, 0)]
        logits, cache = step(prev, np.int32(position), cache)
        chex.assert_shape(logits, (BATCH, VOCAB))
        chex.assert_type(logits, jnp.float32)
        np.testing.assert_allclose(logits, full[:, position], atol=1e-5, rtol=1e-5,
                                   err_msg=f'position {position}')


def test_sample_returns_int32_tokens_in_vocab(samples):
    chex.assert_shape(samples, (BATCH, SEQ_LEN))
    chex.assert_type(samples, jnp.int32)
    assert samples.min() >= 0 and samples.max() < VOCAB


def test_same_rng_repeats_and_different_rng_differs(model, samples):
    np.testing.assert_array_equal(sample(model, jax.random.key(0), batch_size=BATCH), samples)
    other = sample(model, jax.random.key(1), batch_size=BATCH)
    assert (np.asarray(other) != np.asarray(samples)).any()


def test_repeated_calls_reuse_the_compiled_sampler(model, samples):
    size = sampling._sample_jit._cache_size()
    sample(model, jax.random.key(5), batch_size=BATCH)
    assert sampling._sample_jit._cache_size() == size


@pytest.mark.slow
def test_top_k_1_completes_the_prompt_greedily(model, forward):
    prompt_len = 6
    prompt = np.random.default_rng(2).integers(0, VOCAB, (BATCH, prompt_len), np.int32)
    out = sample(model, jax.random.key(0), batch_size=BATCH, prompt=prompt, top_k=1)
    chex.assert_shape(out, (BATCH, SEQ_LEN))
    np.testing.assert_array_equal(out[:, :prompt_len], prompt)
    greedy = np.zeros((BATCH, SEQ_LEN), np.int32)
    greedy[:, :prompt_len] = prompt
    for position in range(prompt_len, SEQ_LEN):  # the argmax of repeated full forwards
        greedy[:, position] = np.argmax(forward(jnp.asarray(greedy))[:, position], axis=-1)
    np.testing.assert_array_equal(out, greedy)


def test_a_row_range_draws_those_rows_of_the_whole_batch(model, samples):
    """How a multi-host job splits one batch: each process draws its rows, the same ones."""
    for rows in ((0, 1), (1, 3), (2, 2)):
        part = sample(model, jax.random.key(0), batch_size=BATCH, rows=rows)
        np.testing.assert_array_equal(part, np.asarray(samples)[rows[0]:rows[1]])
    with pytest.raises(ValueError, match='rows'):
        sample(model, jax.random.key(0), batch_size=BATCH, rows=(2, 4))


@pytest.mark.parametrize('kwargs, message', [
    (dict(temperature=0.0), 'temperature'),
    (dict(top_k=0), 'top_k=0'),
    (dict(top_k=VOCAB + 1), 'top_k=17'),
    (dict(prompt=jnp.zeros((BATCH, SEQ_LEN + 1), jnp.int32)), 'prompt'),
    (dict(prompt=jnp.zeros((BATCH + 1, 2), jnp.int32)), 'prompt'),
])
def test_bad_sampling_arguments_raise(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(model, jax.random.key(0), batch_size=BATCH, **kwargs)


@pytest.mark.slow
def test_num_tokens_generates_a_prefix_with_a_shorter_cache(model):
    rng = jax.random.PRNGKey(4)
    full = sampling.sample(model, rng, batch_size=2, top_k=1)
    prefix = sampling.sample(model, rng, batch_size=2, top_k=1, num_tokens=6)
    assert prefix.shape == (2, 6)
    np.testing.assert_array_equal(prefix, full[:, :6])  # greedy: the same first tokens
    with pytest.raises(ValueError, match='num_tokens'):
        sampling.sample(model, rng, batch_size=2, num_tokens=model.seq_len + 1)


def test_phases_cover_the_tokens_in_order():
    assert sampling._phase_ends(10) == (10,)  # shorter than one phase: a single loop
    for num_tokens in (64, 100, 256, 1000, 1024):
        ends = sampling._phase_ends(num_tokens)
        assert ends[-1] == num_tokens and list(ends) == sorted(set(ends))
        assert len(ends) <= sampling.MAX_PHASES
        assert all(b - a >= sampling.MIN_PHASE for a, b in zip([0, *ends[:-1]], ends, strict=True))


@pytest.mark.slow
def test_phased_decoding_samples_what_one_loop_samples(model, monkeypatch):
    """The sampler grows its cache between phases; the samples must not change."""
    def draw():
        return sample(model, jax.random.key(7), batch_size=BATCH, prompt=np.zeros((BATCH, 3)))

    monkeypatch.setattr(sampling, 'MIN_PHASE', 4)
    assert sampling._phase_ends(SEQ_LEN) == (4, 8, 12, 16)
    phased = draw()
    monkeypatch.setattr(sampling, 'MAX_PHASES', 1)
    np.testing.assert_array_equal(phased, draw())
