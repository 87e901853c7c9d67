"""The train step: gradient accumulation and rematerialisation change memory, not results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelgen import trainer
from pixelgen.models.igpt import ImageGPT


class _Task:
    def loss(self, model, batch, rng, step=None):
        logits = model(batch['tokens'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['tokens']).mean()
        return loss, {'loss': loss}


def _step(grad_accum_steps=1, remat='none', concurrent_microbatches=1):
    model = ImageGPT(vocab_size=16, seq_len=12, num_layers=2, width=32, num_heads=2,
                     remat=remat, rngs=nnx.Rngs(0))
    tx = optax.adamw(1e-2)
    graphdef, rest, state = trainer.init_state(model, tx, 0)
    state['params']['head']['kernel'][...] = jax.random.normal(jax.random.PRNGKey(1),
                                                                (32, 16)) * 0.1
    step = trainer.make_train_step(_Task(), graphdef, rest, tx, lambda s: 1e-2,
                                   grad_accum_steps, concurrent_microbatches)
    tokens = np.random.default_rng(0).integers(0, 16, (8, 12)).astype(np.int32)
    return jax.jit(step)(state, {'tokens': tokens})


@pytest.fixture(scope='module')
def reference():
    return _step()


@pytest.mark.slow
@pytest.mark.parametrize('kwargs', [dict(grad_accum_steps=2), dict(grad_accum_steps=4),
                                    dict(concurrent_microbatches=2),
                                    dict(grad_accum_steps=2, concurrent_microbatches=2),
                                    dict(remat='full'), dict(remat='dots')],
                         ids=['accum2', 'accum4', 'concurrent2', 'accum2-concurrent2',
                              'remat-full', 'remat-dots'])
def test_same_update_as_the_plain_step(reference, kwargs):
    ref_state, ref_metrics = reference
    state, metrics = _step(**kwargs)
    assert float(metrics['loss']) == pytest.approx(float(ref_metrics['loss']), rel=1e-6)
    assert float(metrics['grad_norm']) == pytest.approx(float(ref_metrics['grad_norm']),
                                                        rel=1e-5)
    for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(ref_state['params']),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)  # Adam's first step amplifies ~1e-9 grads


def test_unknown_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat='some'"):
        ImageGPT(vocab_size=4, seq_len=4, num_layers=1, width=8, num_heads=2, remat='some',
                 rngs=nnx.Rngs(0))


def test_remat_really_recomputes_the_blocks():
    import jax.numpy as jnp

    def backward_jaxpr(remat):
        model = ImageGPT(vocab_size=8, seq_len=8, num_layers=2, width=16, num_heads=2,
                         remat=remat, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        loss = lambda p, t: nnx.merge(graphdef, p)(t).sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params, jnp.zeros((2, 8), jnp.int32)))

    assert backward_jaxpr('full').count('remat') == 2  # one per block
    assert 'remat' not in backward_jaxpr('none')


class _PoisonTask(_Task):
    """NaN loss (and gradients) for a batch flagged 'poison'."""

    def loss(self, model, batch, rng, step=None):
        loss, metrics = super().loss(model, batch, rng, step)
        loss = loss * jnp.where(batch['poison'], jnp.nan, 1.0)
        return loss, {'loss': loss}


@pytest.mark.slow
@pytest.mark.parametrize('skip', [3, 0], ids=['skip', 'stop'])
def test_nonfinite_gradients_are_skipped_or_propagate(skip):
    import ml_collections
    opt = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, warmup_steps=0, min_learning_rate_ratio=0.0, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, skip_nonfinite_updates=skip))
    tx, schedule = trainer.make_optimizer(opt, total_steps=10)
    model = ImageGPT(vocab_size=8, seq_len=8, num_layers=1, width=16, num_heads=2,
                     rngs=nnx.Rngs(0))
    graphdef, rest, state = trainer.init_state(model, tx, 0)
    step = jax.jit(trainer.make_train_step(_PoisonTask(), graphdef, rest, tx, schedule))
    tokens = np.zeros((2, 8), np.int32)
    before = jax.tree.leaves(state['params'])
    state, metrics = step(state, {'tokens': tokens, 'poison': np.array(True)})
    after = jax.tree.leaves(state['params'])
    if skip:
        assert float(metrics['skipped_steps']) == 1 and float(metrics['params_finite']) == 1
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
        state, metrics = step(state, {'tokens': tokens, 'poison': np.array(False)})
        assert float(metrics['nonfinite_streak']) == 0 and np.isfinite(float(metrics['loss']))
    else:
        assert float(metrics['params_finite']) == 0


def test_concurrent_passes_are_independent_in_the_program():
    """Two passes: the forward of one does not wait for the other (XLA may run them side by
    side), so the lowered step computes the model twice on half-batches."""
    model = ImageGPT(vocab_size=16, seq_len=12, num_layers=1, width=32, num_heads=2,
                     rngs=nnx.Rngs(0))
    tx = optax.adamw(1e-2)
    graphdef, rest, state = trainer.init_state(model, tx, 0)
    step = trainer.make_train_step(_Task(), graphdef, rest, tx, lambda s: 1e-2,
                                   concurrent_microbatches=2)
    tokens = np.zeros((8, 12), np.int32)
    text = jax.jit(step).lower(state, {'tokens': tokens}).as_text()
    assert 'while' not in text  # unrolled, not a sequential loop
    assert text.count('tensor<4x12x16xf32>') > 0 and 'tensor<8x12x16xf32>' not in text
