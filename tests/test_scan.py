"""Scanned layers (`scan_layers=True`): the same function as the Python loop over blocks, a
stacked parameter layout with a leading 'layers' axis, KV-cache decoding, training and
resuming, and a clear refusal of a checkpoint in the other layout (tiny shapes; CPU)."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

import pixelgen
from pixelgen import checkpoint, trainer
from pixelgen.models.igpt import ImageGPT
from pixelgen.nn.masks import CAUSAL, FULL
from pixelgen.nn.transformer import Transformer
from pixelgen.tasks import igpt as task_lib

LAYERS = 3
CONFIG = dict(vocab_size=16, seq_len=16, num_layers=LAYERS, width=32, num_heads=2)
BLOCKS = ('transformer', 'blocks')


def random_params(model: nnx.Module, seed: int = 0) -> None:
    """Every parameter random (the head is zero-initialised), so logits and gradients vary."""
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape),
                                   state))


def stacked_like_loop(loop: ImageGPT, scan: ImageGPT) -> None:
    """Copies the looped model's weights into the scanned one: blocks/<i>/x -> blocks/x[i]."""
    looped = dict(nnx.to_flat_state(nnx.state(loop)))
    flat = []
    for path, variable in nnx.to_flat_state(nnx.state(scan)):
        if path[:2] == BLOCKS:
            value = jnp.stack([looped[BLOCKS + (i,) + path[2:]][...] for i in range(LAYERS)])
        else:
            value = looped[path][...]
        flat.append((path, variable.replace(value=value)))
    nnx.update(scan, nnx.from_flat_state(flat))


@pytest.fixture(scope='module')
def tokens():
    return jax.random.randint(jax.random.key(1), (2, CONFIG['seq_len']), 0,
                              CONFIG['vocab_size'], dtype=jnp.int32)


def model_pair(remat: str) -> tuple[ImageGPT, ImageGPT]:
    loop = ImageGPT(**CONFIG, remat=remat, rngs=nnx.Rngs(0))
    random_params(loop)
    scan = ImageGPT(**CONFIG, remat=remat, scan_layers=True, rngs=nnx.Rngs(1))
    stacked_like_loop(loop, scan)
    return loop, scan


def loss_and_grads(model: ImageGPT, tokens: jax.Array):
    graphdef, params = nnx.split(model, nnx.Param)
    loss = task_lib.ImageGPTLoss()

    @jax.jit
    def run(params):
        def loss_fn(params):
            return loss.loss(nnx.merge(graphdef, params), {'tokens': tokens},
                             jax.random.key(0))[0]
        logits = nnx.merge(graphdef, params)(tokens)
        return logits, *jax.value_and_grad(loss_fn)(params)
    return run(params)


def primitives_inside_scan(jaxpr, inside: bool = False) -> set[str]:
    """Names of the primitives that run inside a `scan` of `jaxpr` (at any depth)."""
    names = set()
    for eqn in jaxpr.eqns:
        if inside:
            names.add(eqn.primitive.name)
        for value in eqn.params.values():
            sub = getattr(value, 'jaxpr', value)  # ClosedJaxpr -> Jaxpr
            if hasattr(sub, 'eqns'):
                names |= primitives_inside_scan(sub, inside or eqn.primitive.name == 'scan')
    return names


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_remat_policy_is_applied_inside_the_scanned_layer(remat, tokens):
    model = ImageGPT(**CONFIG, remat=remat, scan_layers=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda params: nnx.merge(graphdef, params)(tokens).sum())(params)
    inside = primitives_inside_scan(jaxpr.jaxpr)
    assert 'dot_general' in inside  # the layers run inside the scan
    assert ('remat2' in inside) == (remat == 'full')  # jax.checkpoint's primitive


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scan_gives_the_loops_logits_loss_and_gradients(remat, tokens):
    loop, scan = model_pair(remat)
    loop_logits, loop_loss, loop_grads = loss_and_grads(loop, tokens)
    scan_logits, scan_loss, scan_grads = loss_and_grads(scan, tokens)
    assert float(jnp.abs(loop_logits).max()) > 0.1  # the weights are not trivial
    np.testing.assert_allclose(scan_logits, loop_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scan_loss, loop_loss, atol=1e-5, rtol=1e-5)
    looped = dict(nnx.to_flat_state(loop_grads))
    for path, grad in nnx.to_flat_state(scan_grads):
        expected = (jnp.stack([looped[BLOCKS + (i,) + path[2:]][...] for i in range(LAYERS)])
                    if path[:2] == BLOCKS else looped[path][...])
        np.testing.assert_allclose(grad[...], expected, atol=1e-5, rtol=1e-5, err_msg=str(path))


@pytest.mark.slow
def test_hidden_features_equal_the_loops(tokens):
    loop, scan = model_pair('none')
    features = scan.hidden_features(tokens)
    assert features.shape == (LAYERS, 2, CONFIG['width'])
    np.testing.assert_allclose(features, loop.hidden_features(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_kv_cache_decoding_equals_the_full_forward(tokens):
    _, scan = model_pair('none')
    cache = scan.init_cache(2)
    assert cache['k'].shape == (LAYERS, 2, 2, CONFIG['seq_len'], 16)  # [layers, b, h, l, d]
    graphdef, state = nnx.split(scan)

    @jax.jit
    def decode_all(tokens, cache):
        def step(cache, position):
            previous = tokens[:, jnp.maximum(position - 1, 0)]
            logits, cache = nnx.merge(graphdef, state).decode_step(previous, position, cache)
            return cache, logits
        return jax.lax.scan(step, cache, jnp.arange(CONFIG['seq_len']))[1]

    decoded = jnp.swapaxes(decode_all(tokens, cache), 0, 1)  # [b, l, vocab]
    np.testing.assert_allclose(decoded, scan(tokens), atol=1e-5, rtol=1e-5)


def test_stacked_parameters_carry_a_leading_layers_axis():
    scan = nnx.eval_shape(lambda: ImageGPT(**CONFIG, scan_layers=True, rngs=nnx.Rngs(0)))
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(scan))))
    shapes = dict(nnx.to_flat_state(nnx.state(scan)))
    blocks = [path for path in shapes if path[:2] == BLOCKS]
    assert len(blocks) == 8  # norm1, q, k, v, out, norm2, fc, proj: one array each
    for path in blocks:
        assert shapes[path].shape[0] == LAYERS, path
        assert tuple(specs[path])[0] == 'layers', path
    assert tuple(specs[BLOCKS + ('attn', 'query', 'kernel')]) == (
        'layers', 'embed', 'heads', 'kv')
    assert tuple(specs[('wte', 'embedding')]) == ('vocab', 'embed')  # outside: unchanged


def test_scan_refuses_different_masks_per_layer():
    with pytest.raises(ValueError, match='same mask.*scan_layers=False'):
        Transformer(num_layers=2, width=8, num_heads=2, mask=[CAUSAL, FULL], scan_layers=True,
                    rngs=nnx.Rngs(0))
    nnx.eval_shape(lambda: Transformer(num_layers=2, width=8, num_heads=2,
                                       mask=[CAUSAL, CAUSAL], scan_layers=True,
                                       rngs=nnx.Rngs(0)))  # one mask, given per layer: fine


def scan_config(data_dir: str, scan_layers: bool, *overrides: str):
    config = tiny_config(data_dir, '--config.sample_every_steps=0', *overrides)
    with config.unlocked():  # configs/igpt_shapes.py predates the key (default False)
        config.model.scan_layers = scan_layers
    return config


@pytest.fixture(scope='module')
def scanned_run(data_dir, tmp_path_factory):
    """A scanned tiny run stopped at step 6 and resumed to 12."""
    workdir = str(tmp_path_factory.mktemp('scanned'))
    first = trainer.train(scan_config(data_dir, True), workdir, stop_after=6)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        second = trainer.train(scan_config(data_dir, True), workdir)
    return workdir, first, second, output.getvalue()


@pytest.mark.slow
def test_scanned_training_runs_and_resumes(scanned_run):
    workdir, first, second, output = scanned_run
    assert 'test/loss' not in first and np.isfinite(second['test/loss'])
    assert f'resumed from {checkpoint.checkpoint_dir(workdir)}/6' in output
    assert checkpoint.make_manager(workdir).all_steps() == [6, 12]
    loaded = pixelgen.load(workdir)
    assert loaded.step == 12 and loaded.config.model.scan_layers
    kernel = loaded.model.transformer.blocks.attn.query.kernel
    assert kernel.shape[0] == loaded.config.model.num_layers
    side = loaded.config.data.image_size
    assert loaded.model(np.zeros((1, side * side), np.int32)).shape[:2] == (1, side * side)


@pytest.mark.slow
def test_resuming_in_the_other_layout_is_refused_naming_the_key(scanned_run, data_dir):
    workdir = scanned_run[0]
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r'model\.scan_layers'):
        trainer.train(scan_config(data_dir, False, '--config.total_steps=24'), workdir)
