"""AdamW's weight decay reaches kernels and embeddings only: not norms' scales, biases, CLIP's
logit scale or other vectors, in the looped and the scanned layer layout (tiny shapes; CPU)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, tiny_config
from flax import nnx

from pixelgen import tasks, trainer
from pixelgen.config import load_config_file
from pixelgen.models.igpt import ImageGPT

LEARNING_RATE, WEIGHT_DECAY = 0.01, 0.5
# By parameter name (the last key of its path): decayed or not, whatever its layout.
DECAYED = {'kernel', 'embedding', 'wpe', 'position_embedding'}
KEPT = {'scale', 'bias', 'logit_scale', 'sos', 'class_embedding'}


def one_step_with_zero_gradients(config):
    """(params before, params after) one optimizer step whose gradients are all zero: Adam's
    update is 0, so all that moves a parameter is the decoupled weight decay."""
    with config.unlocked():
        config.optimizer.update(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                warmup_steps=0)
    tx, schedule = trainer.make_optimizer(config.optimizer, config.total_steps)
    assert float(schedule(0)) == pytest.approx(LEARNING_RATE)
    model = tasks.model_builder(config)(nnx.Rngs(config.seed))
    _, _, state = trainer.init_state(model, tx, config.seed)
    params = jax.tree.map(lambda x: jnp.full_like(x, 0.5), state['params'])  # heads start at 0

    @jax.jit
    def step(params, opt_state):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        return optax.apply_updates(params, updates)
    return params, step(params, state['opt_state'])


def check_decay(config, expected_names: set[str]) -> None:
    before, after = one_step_with_zero_gradients(config)
    seen = set()
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                jax.tree.leaves(after), strict=True):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        assert name in DECAYED | KEPT, f'{jax.tree_util.keystr(path)}: decay it or not?'
        shrink = 1 - LEARNING_RATE * WEIGHT_DECAY if name in DECAYED else 1
        np.testing.assert_allclose(new, old * shrink, rtol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
        seen.add(name)
    assert expected_names <= seen, expected_names - seen


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_igpt_decays_kernels_and_embeddings_only(data_dir, scan_layers):
    config = tiny_config(data_dir)
    with config.unlocked():  # configs/igpt_shapes.py predates the key (default False)
        config.model.scan_layers = scan_layers
    check_decay(config, {'kernel', 'embedding', 'wpe', 'scale', 'sos'})


def test_clip_keeps_gains_biases_and_logit_scale():  # its attention biases are [heads, dim]
    check_decay(load_config_file(os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny'),
                {'kernel', 'embedding', 'position_embedding', 'scale', 'bias', 'logit_scale',
                 'class_embedding'})



def test_optimizer_state_keeps_plain_adamws_structure():
    """So checkpoints written before the mask existed (plain optax.adamw) still restore."""
    opt = load_config_file(os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny').optimizer
    tx, schedule = trainer.make_optimizer(opt, total_steps=10)
    plain = optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)),
        max_consecutive_errors=opt.skip_nonfinite_updates)
    params = nnx.state(ImageGPT(vocab_size=8, seq_len=4, num_layers=2, width=8, num_heads=2,
                                rngs=nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
