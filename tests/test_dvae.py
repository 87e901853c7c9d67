"""The dVAE: model shapes and ranges, the objective's pieces, training, the encode/decode jobs."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from pixelgen.config import ConfigError, parse_config_args
from pixelgen.tasks import dvae as task_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'dvae_shapes.py') + ':tiny'


def tiny_config(data_dir: str = '', *overrides: str):
    config, rest = parse_config_args(['--config', TINY, f'--config.data.data_dir={data_dir}',
                                      *overrides])
    assert not rest
    return config


@pytest.fixture(scope='module')
def model():
    return task_lib.build_model(tiny_config(), nnx.Rngs(0))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory) -> str:
    """A workdir trained for the tiny config's 6 steps by the generic trainer."""
    from pixelgen.trainer import train
    workdir = str(tmp_path_factory.mktemp('dvae'))
    train(tiny_config(data_dir), workdir)
    return workdir


@pytest.mark.slow
def test_encode_and_decode_shapes_types_and_ranges(model):
    images = jax.random.uniform(jax.random.PRNGKey(0), (3, 32, 32, 3))
    codes = model.encode(images)
    assert codes.shape == (3, 16, 16) and codes.dtype == jnp.int32
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    decoded = model.decode(codes)
    assert decoded.shape == (3, 32, 32, 3) and decoded.dtype == jnp.float32
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0
    assert model.logits(images).shape == (3, 16, 16, 32)


@pytest.mark.slow
def test_decoding_codes_equals_decoding_their_one_hot(model):
    codes = jax.random.randint(jax.random.PRNGKey(1), (2, 16, 16), 0, 32)
    np.testing.assert_allclose(model.decoder.from_codes(codes),
                               model.decoder(jax.nn.one_hot(codes, 32)), atol=1e-5)


def test_temperature_and_kl_weight_schedules_reach_their_endpoints():
    lo = tiny_config().loss
    lo.unlock()
    lo.temperature_steps, lo.kl_warmup_steps, lo.kl_weight = 100, 50, 6.6  # the paper's beta
    tau, beta = task_lib.temperature_schedule(lo), task_lib.kl_weight_schedule(lo)
    assert float(tau(0)) == pytest.approx(1.0)
    assert float(tau(50)) == pytest.approx((1 + 1 / 16) / 2)  # cosine: halfway at mid-point
    assert float(tau(100)) == pytest.approx(1 / 16) and float(tau(10**6)) == pytest.approx(1 / 16)
    assert float(beta(0)) == pytest.approx(0.0)
    assert float(beta(25)) == pytest.approx(3.3)
    assert float(beta(50)) == pytest.approx(6.6) and float(beta(10**6)) == pytest.approx(6.6)


@pytest.mark.slow
def test_kl_to_the_uniform_prior_is_zero_for_uniform_logits():
    assert float(jnp.max(jnp.abs(task_lib.kl_to_uniform(jnp.zeros((2, 3, 64)))))) < 1e-6
    assert float(jnp.max(jnp.abs(task_lib.kl_to_uniform(jnp.full((4, 64), 7.0))))) < 1e-6
    one_hot_like = jnp.zeros(64).at[3].set(100.0)
    assert float(task_lib.kl_to_uniform(one_hot_like)) == pytest.approx(math.log(64), rel=1e-4)


def test_logit_laplace_log_likelihood_matches_the_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.9, 50)
    mu, log_b = rng.normal(size=50), rng.normal(size=50)
    b = np.exp(log_b)
    expected = np.log(np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b) / (2 * b * x * (1 - x)))
    got = task_lib.logit_laplace_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32),
                                          jnp.asarray(log_b, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_codebook_usage_counts_perplexity_and_ignores_padding_rows():
    codes = jnp.array([[[0, 1], [2, 3]], [[5, 5], [5, 5]]])
    perplexity, used = task_lib.codebook_usage(codes, 8, weights=jnp.array([1.0, 0.0]))
    assert float(perplexity) == pytest.approx(4.0) and float(used) == 4.0


@pytest.mark.slow
def test_a_training_step_lowers_the_loss_on_a_fixed_batch():
    config = tiny_config()
    model = task_lib.build_model(config, nnx.Rngs(0))
    loss = task_lib.make_loss(config)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)}
    key = jax.random.PRNGKey(0)

    def objective(p):
        return loss.loss(nnx.merge(graphdef, p), batch, key, step=jnp.int32(0))[0]

    value_and_grad = jax.jit(jax.value_and_grad(objective))  # one compile serves both calls
    value, grads = value_and_grad(params)
    tx = optax.adam(1e-3)
    updates, _ = tx.update(grads, tx.init(params))
    assert float(value_and_grad(optax.apply_updates(params, updates))[0]) < float(value)


def _loss_parts(model, *overrides):
    """(loss, metrics, logits) of the tiny config with `overrides`, on one fixed batch, at a
    step past every warm-up (so each weight is at its full value)."""
    config = tiny_config('', '--config.loss.code_entropy_weight=0.0',
                         '--config.loss.diversity_weight=0.0', *overrides)
    batch = {'image': np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)}
    loss, metrics = task_lib.make_loss(config).loss(model, batch, jax.random.PRNGKey(0),
                                                    step=jnp.int32(100))
    return float(loss), metrics, model.logits(task_lib.to_unit(batch['image']))


@pytest.mark.slow
def test_short_run_aids_add_exactly_their_terms(model):
    base, metrics, logits = _loss_parts(model)
    k = logits.shape[-1]
    per_latent_kl = float(metrics['kl'])
    entropy, _, _ = _loss_parts(model, '--config.loss.code_entropy_weight=0.5')
    assert entropy - base == pytest.approx(0.5 * (math.log(k) - per_latent_kl), rel=1e-4)
    diversity, _, _ = _loss_parts(model, '--config.loss.diversity_weight=0.5')
    assert diversity - base == pytest.approx(
        0.5 * float(task_lib.kl_to_uniform_of_mean(logits)), rel=1e-4)


def test_kl_of_the_batch_mean_posterior_is_zero_when_spread_and_log_k_when_collapsed():
    spread = jnp.eye(8)[None] * 50.0  # 8 positions, each sure of a different code
    collapsed = jnp.zeros((1, 8, 8)).at[..., 3].set(50.0)  # every position sure of code 3
    assert float(task_lib.kl_to_uniform_of_mean(spread)) == pytest.approx(0.0, abs=1e-5)
    assert float(task_lib.kl_to_uniform_of_mean(collapsed)) == pytest.approx(math.log(8),
                                                                              abs=1e-4)


@pytest.mark.slow
def test_straight_through_decodes_the_one_hot_sample_and_still_has_gradients(model):
    config = tiny_config('', '--config.loss.straight_through=True')
    loss = task_lib.make_loss(config)
    batch = {'image': np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)}
    key, step = jax.random.PRNGKey(3), jnp.int32(0)
    _, metrics = loss.loss(model, batch, key, step=step)
    x = task_lib.to_unit(batch['image'])
    logits = model.logits(x)
    sample = jnp.argmax(logits + jax.random.gumbel(key, logits.shape), -1)  # Gumbel-max
    hard_mse = jnp.mean(jnp.square(model.decode(sample) - x))
    assert float(metrics['mse']) == pytest.approx(float(hard_mse), rel=1e-4)
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda p: loss.loss(nnx.merge(graphdef, p), batch, key, step=step)[0])(
        params)
    encoder_grad = jax.tree.leaves(grads['encoder']['output'])
    assert all(float(jnp.abs(g).sum()) > 0 for g in encoder_grad)


def _assert_only_location_channels_learn(model, config, seed: int) -> None:
    """The decoder's ln b output channels get no gradient; its location channels do."""
    loss = task_lib.make_loss(config)
    batch = {'image': np.random.default_rng(seed).integers(0, 256, (2, 32, 32, 3))
             .astype(np.uint8)}
    graphdef, params = nnx.split(model, nnx.Param)
    key = jax.random.PRNGKey(0)
    grads = jax.grad(lambda p: loss.loss(nnx.merge(graphdef, p), batch, key)[0])(params)
    output_kernel = grads['decoder']['output']['kernel'][...]  # [1, 1, width, 6]
    assert float(jnp.abs(output_kernel[..., 3:]).max()) == 0.0
    assert float(jnp.abs(output_kernel[..., :3]).max()) > 0.0


@pytest.mark.slow
def test_a_fixed_laplace_scale_ignores_the_decoders_log_scale(model):
    _assert_only_location_channels_learn(
        model, tiny_config('', '--config.loss.likelihood=logit_laplace',
                           '--config.loss.laplace_scale=1.0'), seed=2)


@pytest.mark.slow
def test_gaussian_likelihood_matches_the_formula_and_leaves_ln_b_unused(model):
    rng = np.random.default_rng(4)
    x, mu = rng.uniform(0.1, 0.9, 50), rng.normal(size=50)
    mean = 1 / (1 + np.exp(-mu))
    expected = -0.5 * ((x - mean) / 0.05) ** 2 - np.log(0.05 * np.sqrt(2 * np.pi))
    got = task_lib.gaussian_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32),
                                     0.05)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    config = tiny_config('', "--config.loss.likelihood=gaussian",
                         '--config.loss.gaussian_scale=0.05')
    _assert_only_location_channels_learn(model, config, seed=5)
    loss = task_lib.make_loss(config)
    batch = {'image': np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)}
    key = jax.random.PRNGKey(0)
    laplace = tiny_config('', '--config.loss.likelihood=logit_laplace')
    laplace_loss = task_lib.make_loss(laplace).loss(model, batch, key)[0]
    assert float(loss.loss(model, batch, key)[0]) != pytest.approx(float(laplace_loss))


def test_an_unknown_likelihood_or_a_gaussian_without_scale_is_refused():
    with pytest.raises(ConfigError, match="loss.likelihood='poisson' is not one of"):
        task_lib.build_model(tiny_config('', '--config.loss.likelihood=poisson'), nnx.Rngs(0))
    with pytest.raises(ConfigError, match='needs loss.gaussian_scale > 0'):
        task_lib.build_model(tiny_config('', '--config.loss.likelihood=gaussian',
                                         '--config.loss.gaussian_scale=0.0'), nnx.Rngs(0))
    with pytest.raises(ConfigError, match='loss.laplace_scale=0.1 has no effect'):
        task_lib.build_model(tiny_config('', '--config.loss.laplace_scale=0.1'), nnx.Rngs(0))


def test_negative_loss_weights_are_refused():
    for key in ('code_entropy_weight', 'diversity_weight', 'laplace_scale', 'kl_weight'):
        with pytest.raises(ConfigError, match=f'loss.{key}=-1'):
            task_lib.build_model(tiny_config('', f'--config.loss.{key}=-1.0'), nnx.Rngs(0))


def test_an_image_size_the_encoder_cannot_downsample_is_refused():
    config = tiny_config('', '--config.data.image_size=33')
    with pytest.raises(ConfigError, match='data.image_size=33 is not divisible'):
        task_lib.build_model(config, nnx.Rngs(0))
    with pytest.raises(ConfigError, match='data.image_size'):
        task_lib.Task(config, '/nonexistent')


@pytest.mark.slow
def test_training_logs_metrics_and_writes_a_reconstruction_grid(trained):
    import json
    lines = [json.loads(line) for line in open(os.path.join(trained, 'metrics.jsonl'))]
    train_keys = set().union(*(line.keys() for line in lines))
    for key in ('train/loss', 'train/mse', 'train/psnr', 'train/kl', 'train/perplexity',
                'train/codes_used', 'train/temperature', 'train/kl_weight', 'test/psnr'):
        assert key in train_keys, key
    grid = np.asarray(Image.open(os.path.join(trained, 'samples', 'reconstructions_0000006.png')))
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2 rows (originals, reconstructions)


@pytest.mark.slow
def test_encode_job_writes_codes_that_open_codes_reads_back(trained, data_dir, tmp_path,
                                                           capsys):
    import pixelgen
    from pixelgen import dvae
    from pixelgen.data import codes as codes_lib
    from pixelgen.data import pipeline

    out = str(tmp_path / 'codes')
    command = ['encode', '--workdir', trained, '--dataset', 'shapes', '--out', out, '--split',
               'test', '--data_dir', data_dir, '--num_examples', '10', '--batch_size', '4',
               '--chunk_size', '3']
    assert dvae.main(command) == 0
    info = codes_lib.codes_info(out)
    assert (info['grid_size'], info['codebook_size'], info['splits']) == (16, 32, {'test': 10})
    shards = sorted(f for f in os.listdir(out) if f.startswith('codes-test'))
    assert len(shards) == 4 and shards[-1].endswith('-00003-of-00004')  # chunks of 3, 3, 3, 1
    # The same command again finds the split complete and skips it; --overwrite redoes it.
    capsys.readouterr()
    assert dvae.main(command) == 0
    assert "already holds 'test', encoded by this dVAE checkpoint" in capsys.readouterr().out
    assert dvae.main(command + ['--overwrite']) == 0
    assert 'wrote 10 examples' in capsys.readouterr().out
    # --exclude_phrases leaves the pairs out of split train only, and says so in the metadata.
    assert dvae.main(command[:command.index('--split')] + [
        '--split', 'train', '--data_dir', data_dir, '--num_examples', '60', '--batch_size', '20',
        '--exclude_phrases', 'red star,Blue Circle']) == 0
    kept = codes_lib.open_codes(out, 'train')
    assert len(kept) == 60 and not any(p in kept[i]['caption'] for i in range(60)
                                       for p in ('red star', 'blue circle'))
    assert codes_lib.codes_info(out)['metadata']['train_excluded_phrases'] == [
        'red star', 'Blue Circle']
    read = codes_lib.open_codes(out, 'test')
    source = pipeline.open_source('shapes', 'test', data_dir)
    images = np.stack([pipeline.image_example(32)(source[i])['image'] for i in range(10)])
    expected = np.asarray(pixelgen.load(trained).model.encode(images.astype(np.float32) / 255.0))
    for i in range(10):
        np.testing.assert_array_equal(read[i]['codes'], expected[i])
        assert read[i]['caption'] == source[i]['caption'].decode()
        assert read[i]['label'] == int(source[i]['label'])

    png = str(tmp_path / 'decoded.png')
    assert dvae.main(['decode', '--workdir', trained, '--codes', out, '--out', png,
                      '--num', '10']) == 0
    assert np.asarray(Image.open(png)).shape == (2 * 66 + 2, 8 * 66 + 2, 3)


@pytest.mark.slow
def test_a_killed_encoding_resumes_and_equals_an_uninterrupted_one(trained, data_dir, tmp_path,
                                                                   monkeypatch, capsys):
    from pixelgen import dvae
    from pixelgen.data import codes as codes_lib

    def encode(out, *extra):
        return dvae.main(['encode', '--workdir', trained, '--dataset', 'shapes', '--out', out,
                          '--split', 'test', '--data_dir', data_dir, '--num_examples', '11',
                          '--batch_size', '4', '--chunk_size', '3', *extra])

    whole = str(tmp_path / 'whole')
    assert encode(whole) == 0
    write_chunk, calls = codes_lib._write_chunk, []

    def killed_at_the_third_chunk(*args, **kwargs):
        calls.append(kwargs['first'])
        if len(calls) == 3:
            raise KeyboardInterrupt('killed')
        return write_chunk(*args, **kwargs)

    resumed = str(tmp_path / 'resumed')
    monkeypatch.setattr(codes_lib, '_write_chunk', killed_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        encode(resumed)
    monkeypatch.setattr(codes_lib, '_write_chunk', write_chunk)
    capsys.readouterr()
    assert encode(resumed) == 0
    assert 'resuming after 6 examples in 2 chunk(s)' in capsys.readouterr().out
    a, b = codes_lib.open_codes(whole, 'test'), codes_lib.open_codes(resumed, 'test')
    assert len(a) == len(b) == 11
    for i in range(11):
        np.testing.assert_array_equal(a[i]['codes'], b[i]['codes'])
        assert a[i]['caption'] == b[i]['caption']


@pytest.mark.slow
def test_reconstruction_evaluator_reports_quality_and_usage(trained, tmp_path):
    import pixelgen
    from pixelgen.evaluators import EvalContext, dvae

    loaded = pixelgen.load(trained)
    scores = dvae.EVALUATORS['reconstruction'](EvalContext(loaded, str(tmp_path),
                                                           num_examples=20))
    assert scores['examples'] == 20 and 1 <= scores['codes_used'] <= 32
    assert scores['psnr'] == pytest.approx(-10 * math.log10(scores['mse']))
    assert os.path.isfile(tmp_path / 'reconstructions_0000006.png')
    # shapes reconstructions are judged by the DALL·E attribute classifier
    assert 0 < scores['judged_examples'] <= 20
    assert all(0 <= scores[f'{a}_accuracy'] <= 1 for a in ('color', 'shape', 'both'))
    by_size = [k for k in scores if k.startswith(('small_', 'large_'))]
    assert by_size and all(0 <= scores[k] <= 1 for k in by_size)


@pytest.mark.slow
def test_a_moving_average_is_what_load_encode_and_decode_use(data_dir, trained, tmp_path):
    """optimizer.ema_decay keeps the parameters' moving average in the checkpoint, and
    pixelgen.load (so encode, decode and DALL·E's decoding) runs with it. With a decay near 1
    the average stays at the initial weights, while the trained ones move away."""
    import numpy as np

    import pixelgen
    from pixelgen.trainer import train
    workdir = str(tmp_path / 'ema')
    config = tiny_config(data_dir, '--config.optimizer.ema_decay=0.999999')
    train(config, workdir)
    initial = nnx.state(task_lib.build_model(config, nnx.Rngs(config.seed)), nnx.Param)
    averaged = nnx.state(pixelgen.load(workdir).model, nnx.Param)
    trained_params = nnx.state(pixelgen.load(trained).model, nnx.Param)  # no EMA: the weights
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(initial), jax.tree.leaves(trained_params), strict=True))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(averaged), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ConfigError, match='ema_decay'):
        task_lib.validate_config(tiny_config(data_dir, '--config.optimizer.ema_decay=1.0'))
