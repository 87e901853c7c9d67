"""Image GPT model, attention and mask tests (tiny shapes; CPU)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelgen.models.igpt import ImageGPT
from pixelgen.nn.attention import dot_product_attention
from pixelgen.nn.masks import CAUSAL, FULL, MaskSpec

CONFIG = dict(vocab_size=16, seq_len=16, num_layers=2, width=32, num_heads=4)
BATCH = 3


def make_model(dtype=jnp.float32, seed=0) -> ImageGPT:
    """A tiny model whose zero-initialised head is replaced by random values, so logits vary."""
    model = ImageGPT(**CONFIG, dtype=dtype, rngs=nnx.Rngs(seed))
    kernel = model.head.kernel
    kernel[...] = jax.random.normal(jax.random.key(seed + 100), kernel.shape) * 0.5
    return model


@pytest.fixture(scope='module')
def model():
    return make_model()


@pytest.fixture(scope='module')
def tokens():
    return jax.random.randint(jax.random.key(1), (BATCH, CONFIG['seq_len']), 0,
                              CONFIG['vocab_size'], dtype=jnp.int32)


@pytest.fixture(scope='module')
def forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens))


@pytest.mark.slow
def test_forward_returns_float32_logits_per_position(model, tokens, forward):
    logits = forward(tokens)
    chex.assert_shape(logits, (BATCH, CONFIG['seq_len'], CONFIG['vocab_size']))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    short = forward(tokens[:, :5])
    chex.assert_shape(short, (BATCH, 5, CONFIG['vocab_size']))
    np.testing.assert_allclose(short, logits[:, :5], atol=1e-5)


def test_hidden_features_are_per_layer_means_of_attention_inputs(model, tokens):
    graphdef, state = nnx.split(model)

    def features_and_first(tokens):
        model = nnx.merge(graphdef, state)
        first = model.transformer.blocks[0].norm1(model._embed(tokens)).mean(axis=1)
        return model.hidden_features(tokens), first

    features, first = jax.jit(features_and_first)(tokens)
    chex.assert_shape(features, (CONFIG['num_layers'], BATCH, CONFIG['width']))
    chex.assert_type(features, jnp.float32)
    np.testing.assert_allclose(features[0], first, atol=1e-6)


@pytest.mark.parametrize('t', [0, 7, 15])
def test_changing_token_t_leaves_logits_up_to_t_unchanged(tokens, forward, t):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CONFIG['vocab_size'])
    before, after = forward(tokens), forward(changed)
    # logits[:, i] predicts token i from tokens < i, so positions 0..t cannot see token t.
    np.testing.assert_allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)
    if t + 1 < CONFIG['seq_len']:
        assert np.abs(before[:, t + 1:] - after[:, t + 1:]).max() > 1e-4


def test_first_logits_depend_only_on_sos(forward, tokens):
    other = jnp.zeros_like(tokens)
    np.testing.assert_allclose(forward(tokens)[:, 0], forward(other)[:, 0], atol=1e-6)
    np.testing.assert_allclose(forward(tokens)[0, 0], forward(tokens)[1, 0], atol=1e-6)


@pytest.mark.parametrize('spec', [CAUSAL, FULL], ids=lambda s: s.kind)
def test_mask_dense_rows_equal_allowed_keys(spec):
    length = 9
    dense = spec.dense(length)
    chex.assert_shape(dense, (length, length))
    assert dense.dtype == bool
    row_fn = jax.jit(lambda p: spec.allowed_keys(p, length))
    for position in range(length):
        np.testing.assert_array_equal(row_fn(jnp.int32(position)), dense[position])
        np.testing.assert_array_equal(spec.allowed_keys(position, length), dense[position])


def test_causal_mask_is_lower_triangular():
    np.testing.assert_array_equal(CAUSAL.dense(4), np.tril(np.ones((4, 4), bool)))
    assert FULL.dense(4).all()


def test_mask_spec_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"'diagonal'.*causal.*full"):
        MaskSpec('diagonal')


def _numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum('bhqk,bkhd->bqhd', weights, v)


def test_dot_product_attention_matches_numpy_softmax():
    b, lq, lk, h, d = 2, 5, 7, 3, 8
    rng = np.random.default_rng(0)
    q = rng.normal(size=(b, lq, h, d)).astype(np.float32)
    k, v = rng.normal(size=(2, b, lk, h, d)).astype(np.float32)
    mask = rng.random((b, h, lq, lk)) < 0.6
    mask[..., 0] = True  # every row has an allowed key
    attention = jax.jit(dot_product_attention)
    out = attention(q, k, v, mask)
    chex.assert_shape(out, (b, lq, h, d))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask), atol=1e-5)
    # A mask [lq, lk] broadcasts over batch and heads.
    causal = CAUSAL.dense(lk)[-lq:]
    np.testing.assert_allclose(attention(q, k, v, causal), _numpy_attention(q, k, v, causal),
                               atol=1e-5)


def test_fully_masked_row_is_finite():
    q = k = v = np.ones((1, 2, 1, 4), np.float32)
    mask = np.array([[False, False], [True, True]])
    chex.assert_tree_all_finite(jax.jit(dot_product_attention)(q, k, v, mask))


@pytest.mark.slow
def test_gradients_are_finite_and_nonzero_after_adam_steps(tokens):
    graphdef, params = nnx.split(ImageGPT(**CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
    optimizer = optax.adam(1e-2, b2=0.95)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(4):
        params, opt_state, loss, grads = train_step(params, opt_state)
        losses.append(float(loss))
    # The zero-initialised head makes every other gradient zero at step 0; after a step
    # every parameter must receive a finite, nonzero gradient.
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(grad).all(), jax.tree_util.keystr(path)
        assert np.abs(grad).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(losses[0], np.log(CONFIG['vocab_size']), rtol=1e-5)
    assert losses[-1] < losses[0]


def test_params_are_float32_and_carry_logical_axes(model):
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    for (path, param), spec in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree_util.tree_leaves(specs), strict=True):
        assert param.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert len(spec) == param.ndim and all(spec), (jax.tree_util.keystr(path), spec)


def test_num_heads_not_dividing_width_raises_naming_both():
    with pytest.raises(ValueError, match=r'num_heads=5.*width=32'):
        ImageGPT(**{**CONFIG, 'num_heads': 5}, rngs=nnx.Rngs(0))


def test_nonpositive_size_raises():
    with pytest.raises(ValueError, match='vocab_size=0'):
        ImageGPT(**{**CONFIG, 'vocab_size': 0}, rngs=nnx.Rngs(0))


def test_tokens_longer_than_seq_len_raise(model):
    with pytest.raises(ValueError, match='seq_len=16'):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.slow
def test_bfloat16_compute_gives_float32_logits_close_to_float32(tokens, forward):
    model = make_model(jnp.bfloat16)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(tokens):
        model = nnx.merge(graphdef, state)
        return model(tokens), model.decode_step(tokens[:, 0], 0, model.init_cache(BATCH))[0]

    logits, step_logits = run(tokens)
    chex.assert_shape(logits, (BATCH, CONFIG['seq_len'], CONFIG['vocab_size']))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    np.testing.assert_allclose(logits, forward(tokens), atol=0.1)
    chex.assert_type(step_logits, jnp.float32)
    np.testing.assert_allclose(step_logits, logits[:, 0], atol=0.05)
