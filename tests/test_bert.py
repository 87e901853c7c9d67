"""The BERT objective of Image GPT: masking, loss on masked pixels only, bidirectional
attention, the 5-mask evaluation ensemble and the probe features (tiny shapes; CPU)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from pixelgen import checkpoint, pretrained, trainer
from pixelgen.config import ConfigError
from pixelgen.models.igpt import BERT_MASK_RATE, ImageGPT, bert_mask
from pixelgen.tasks import igpt as task_lib

SHAPE = dict(vocab_size=16, seq_len=16, num_layers=2, width=32, num_heads=4)
BATCH = 4


def make_model(objective: str, num_classes: int = 0, seed: int = 0) -> ImageGPT:
    """A tiny model whose zero-initialised heads get random values, so that logits vary."""
    model = ImageGPT(**SHAPE, objective=objective, num_classes=num_classes, rngs=nnx.Rngs(seed))
    for i, head in enumerate(h for h in (model.head, model.clf) if h is not None):
        head.kernel[...] = jax.random.normal(jax.random.key(seed + 100 + i),
                                             head.kernel.shape) * 0.5
    return model


@pytest.fixture(scope='module')
def bert():
    return make_model('bert', num_classes=3)


@pytest.fixture(scope='module')
def tokens():
    return jax.random.randint(jax.random.key(1), (BATCH, SHAPE['seq_len']), 0,
                              SHAPE['vocab_size'], dtype=jnp.int32)


@pytest.mark.slow
def test_masking_replaces_about_15_percent_by_the_extra_token():
    tokens = jnp.zeros((64, 1024), jnp.int32) + 3
    inputs, is_masked = bert_mask(tokens, jax.random.key(0), mask_token=16)
    assert abs(float(is_masked.mean()) - BERT_MASK_RATE) < 0.005
    np.testing.assert_array_equal(inputs, np.where(is_masked, 16, 3))
    again, _ = bert_mask(tokens, jax.random.key(0), mask_token=16)
    np.testing.assert_array_equal(inputs, again)  # a key gives its mask
    model = make_model('bert')
    assert model.mask_token == SHAPE['vocab_size']
    assert model.wte.embedding.shape == (SHAPE['vocab_size'] + 1, SHAPE['width'])
    assert model.sos is None and make_model('ar').sos is not None


@pytest.mark.slow
def test_loss_counts_only_masked_positions(bert, tokens):
    loss_fn = task_lib.ImageGPTLoss('bert', classifier_loss_weight=0.0)
    rng = jax.random.key(7)
    loss, metrics = loss_fn.loss(bert, {'tokens': tokens, 'label': jnp.zeros(BATCH, int)}, rng)
    inputs, is_masked = bert_mask(tokens, rng, bert.mask_token)
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(bert(inputs), tokens))
    masked = np.asarray(is_masked)
    assert 0 < masked.sum() < masked.size
    np.testing.assert_allclose(metrics['gen_loss'], nll[masked].mean(), rtol=1e-5)
    assert not np.isclose(nll[masked].mean(), nll.mean(), rtol=1e-3)  # would catch all-position
    # The masks come from the step's key (the trainer folds the step into its saved key), so a
    # step is reproducible and a resumed run draws the same masks.
    batch = {'tokens': tokens, 'label': jnp.zeros(BATCH, int)}
    assert loss_fn.loss(bert, batch, rng)[0] == loss
    assert loss_fn.loss(bert, batch, jax.random.key(8))[0] != loss


@pytest.mark.slow
def test_unmasked_targets_do_not_enter_the_loss(bert, tokens):
    """The loss is a function of the masked targets only (given the same inputs)."""
    rng = jax.random.key(3)
    inputs, is_masked = bert_mask(tokens, rng, bert.mask_token)
    logits = bert(inputs)
    total, count = task_lib.token_loss(logits, tokens, is_masked.astype(jnp.float32))
    flipped = jnp.where(is_masked, tokens, (tokens + 5) % SHAPE['vocab_size'])
    total_flipped, _ = task_lib.token_loss(logits, flipped, is_masked.astype(jnp.float32))
    np.testing.assert_allclose(total, total_flipped, rtol=1e-6)
    assert count == is_masked.sum()


@pytest.mark.parametrize('objective', ['ar', 'bert'])
def test_a_later_token_changes_earlier_logits_only_under_bert(objective, tokens):
    model = make_model(objective)
    changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % SHAPE['vocab_size'])
    before, after = model(tokens)[:, :12], model(changed)[:, :12]
    moved = float(jnp.abs(before - after).max())
    if objective == 'bert':
        assert moved > 1e-3
    else:
        assert moved < 1e-6


def test_ar_model_cannot_be_decoded_as_bert_and_vice_versa():
    with pytest.raises(ValueError, match='not autoregressive'):
        make_model('bert').init_cache(2)
    with pytest.raises(ValueError, match="objective='foo'"):
        ImageGPT(**SHAPE, objective='foo', rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_probe_features_average_five_maskings_deterministically(bert, tokens):
    rng = jax.random.key(5)
    features = task_lib.probe_features(bert, tokens, objective='bert', rng=rng)
    assert features.shape == (SHAPE['num_layers'], BATCH, SHAPE['width'])
    inputs, _ = task_lib.ensemble_masks(tokens, rng, bert.mask_token)
    assert inputs.shape == (task_lib.BERT_EVAL_MASKS, BATCH, SHAPE['seq_len'])
    manual = np.mean([bert.hidden_features(x) for x in inputs], axis=0)
    np.testing.assert_allclose(features, manual, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        features, task_lib.probe_features(bert, tokens, objective='bert', rng=rng))
    other = task_lib.probe_features(bert, tokens, objective='bert', rng=jax.random.key(6))
    assert not np.allclose(features, other)
    # An example's masks do not depend on the batch it comes in.
    np.testing.assert_allclose(
        task_lib.probe_features(bert, tokens[2:], objective='bert', rng=rng), features[:, 2:],
        rtol=1e-5, atol=1e-6)
    # The five maskings differ from each other.
    assert len({np.asarray(x).tobytes() for x in inputs}) == task_lib.BERT_EVAL_MASKS
    ar = make_model('ar')
    np.testing.assert_array_equal(task_lib.probe_features(ar, tokens, objective='ar', rng=rng),
                                  ar.hidden_features(tokens))
    with pytest.raises(ValueError, match='trained with'):
        task_lib.probe_features(ar, tokens, objective='bert', rng=rng)


@pytest.mark.slow
def test_eval_ensemble_is_deterministic_and_votes_the_modal_class(bert, tokens, data_dir):
    task = task_lib.ImageGPTLoss.__new__(task_lib.ImageGPTTask)  # metrics only, no data
    task_lib.ImageGPTLoss.__init__(task, 'bert')
    task.config = tiny_config(data_dir, '--config.objective=bert')
    batch = {'tokens': tokens, 'label': jnp.array([0, 1, 2, 0]),
             'mask': jnp.array([1.0, 1.0, 1.0, 0.0])}
    sums = task.eval_sums(bert, batch)
    again = task.eval_sums(bert, batch)
    for key in sums:
        np.testing.assert_array_equal(sums[key], again[key])
    inputs, is_masked = task_lib.ensemble_masks(tokens, jax.random.PRNGKey(0), bert.mask_token)
    nll = np.stack([optax.softmax_cross_entropy_with_integer_labels(bert(x), tokens)
                    for x in inputs])
    rows = np.asarray(is_masked) & (np.asarray(batch['mask']) > 0)[None, :, None]
    np.testing.assert_allclose(sums['nll_sum'] / sums['count'], nll[rows].mean(), rtol=1e-5)
    votes = np.stack([np.argmax(bert.logits_and_class_logits(x)[1], -1) for x in inputs])
    modal = [np.bincount(votes[:, i], minlength=3).argmax() for i in range(BATCH)]
    expected = sum(modal[i] == int(batch['label'][i]) for i in range(3))
    assert sums['correct'] == expected and sums['examples'] == 3
    summary = task.eval_summary(jax.device_get(sums))
    assert summary['accuracy'] == pytest.approx(expected / 3)


@pytest.mark.slow
def test_config_errors_name_the_key(data_dir):
    with pytest.raises(ConfigError, match="objective='foo'"):
        task_lib.build_model(tiny_config(data_dir, '--config.objective=foo'), nnx.Rngs(0))
    with pytest.raises(ConfigError, match='num_classes=-1 is resolved from the dataset'):
        task_lib.build_model(tiny_config(data_dir, '--config.model.num_classes=-1'),
                             nnx.Rngs(0))


@pytest.mark.slow
def test_checkpoint_signature_has_objective_and_classes(data_dir):
    ar, bert = tiny_config(data_dir), tiny_config(data_dir, '--config.objective=bert')
    assert 'objective' not in checkpoint.describe(ar)  # unchanged for AR checkpoints
    assert checkpoint.describe(bert)['objective'] == 'bert'
    clf = tiny_config(data_dir, '--config.model.num_classes=6')
    assert checkpoint.describe(clf)['model']['num_classes'] == 6
    assert 'num_classes' not in checkpoint.describe(ar)['model']


@pytest.mark.slow
def test_bert_training_writes_fill_ins_and_loads(data_dir, tmp_path):
    config = tiny_config(data_dir, '--config.objective=bert', '--config.sample_every_steps=3',
                         '--config.eval_every_steps=0')
    workdir = str(tmp_path / 'bert')
    trainer.train(config, workdir, stop_after=3)  # stops before the whole-split test eval
    assert os.path.isfile(os.path.join(workdir, 'samples', 'completions_0000003.png'))
    loaded = pretrained.load(workdir)
    assert loaded.model.objective == 'bert' and loaded.step == 3
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        losses = [json.loads(line)['train/loss'] for line in f]
    assert all(np.isfinite(losses))
    # A BERT checkpoint is refused by an AR config.
    with pytest.raises(checkpoint.CheckpointMismatchError, match='objective'):
        trainer.train(tiny_config(data_dir), workdir)
