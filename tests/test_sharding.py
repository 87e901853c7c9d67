"""Sharding on 8 simulated CPU devices (one subprocess each, since the device count is fixed
when JAX starts): every mesh gives the single-device loss and gradients, parameters are
sharded as the rules say. Checkpoints moving between meshes: test_sharding_restore.py."""

from __future__ import annotations

import json

import pytest
from conftest import run_python

MESH_EQUIVALENCE = '''
import json, jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import PartitionSpec as P
from pixelgen import parallel, trainer
from pixelgen.models.igpt import ImageGPT

assert jax.device_count() == 8
rules = parallel.DEFAULT_RULES

class Task:  # the iGPT loss on fixed tokens
    def loss(self, model, batch, rng, step=None):
        logits = model(batch['tokens'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['tokens']).mean()
        return loss, {'loss': loss}

tx = optax.adamw(1e-2, b2=0.95)
def fresh():
    model = ImageGPT(vocab_size=16, seq_len=16, num_layers=2, width=64, num_heads=8,
                     rngs=nnx.Rngs(0))
    graphdef, rest, state = trainer.init_state(model, tx, 0)
    # a non-zero head, so every gradient is non-trivial
    head = jax.random.normal(jax.random.PRNGKey(1), (64, 16)) * 0.1
    state['params']['head']['kernel'][...] = head
    return graphdef, rest, state
tokens = np.random.default_rng(0).integers(0, 16, (8, 16)).astype(np.int32)

def step(shape, devices):
    mesh = parallel.make_mesh(dict(zip(parallel.AXES, shape)), devices)
    graphdef, rest, abstract = trainer.abstract_state(fresh)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: fresh()[2], out_shardings=shardings)()
    step_fn = trainer.make_train_step(Task(), graphdef, rest, tx, lambda s: 1e-2)
    batch = parallel.global_batch({'tokens': tokens}, mesh)
    loss_fn = lambda params: Task().loss(nnx.merge(graphdef, params, rest), batch, None)[0]
    with parallel.activation_sharding(mesh, rules):
        grads = jax.jit(jax.grad(loss_fn))(state['params'])
        new, metrics = jax.jit(step_fn, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                               out_shardings=(shardings, parallel.replicated(mesh)))(
            state, batch)
    return new, metrics, shardings, grads

ref, ref_metrics, _, ref_grads = step((1, 1, 1), jax.devices()[:1])
out = {}
for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]:
    new, metrics, shardings, grads = step(shape, jax.devices())
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                            / (np.max(np.abs(np.asarray(b))) + 1e-12)),
                         grads, ref_grads)
    out[str(shape)] = {'loss': float(metrics['loss']), 'grad_norm': float(metrics['grad_norm']),
                       'max_relative_grad_diff': max(jax.tree.leaves(diffs))}
    if shape == (2, 2, 2):
        p = new['params']
        blk = p['transformer']['blocks'][0]
        mu = new['opt_state'][0].mu['transformer']['blocks'][0]['mlp']['fc']['kernel']
        out['specs'] = {
            'mlp_fc': str(blk['mlp']['fc']['kernel'].value.sharding.spec),
            'attn_query': str(blk['attn']['query']['kernel'].value.sharding.spec),
            'head': str(p['head']['kernel'].value.sharding.spec),
            'adam_mu_mlp_fc': str(mu.value.sharding.spec),
            'norm': str(blk['norm1']['scale'].value.sharding.spec),
            'shard_shape_mlp_fc': list(
                blk['mlp']['fc']['kernel'].value.addressable_shards[0].data.shape),
        }
out['reference'] = {'loss': float(ref_metrics['loss']),
                    'grad_norm': float(ref_metrics['grad_norm'])}

# The same with 4-position tree leaves, so the 16 tokens take the tiled attention (custom VJP).
from pixelgen.nn import attention
attention.DEFAULT_CAUSAL_BLOCK = 4
probe = ImageGPT(vocab_size=16, seq_len=16, num_layers=1, width=64, num_heads=8,
                 rngs=nnx.Rngs(0))
out['tiled'] = {'uses_tiles': probe.transformer.blocks[0].attn.tiling(16) is not None}
_, tiled_metrics, _, tiled_ref = step((1, 1, 1), jax.devices()[:1])
out['tiled']['loss_vs_dense'] = abs(float(tiled_metrics['loss']) - float(ref_metrics['loss']))
for shape in [(8, 1, 1), (2, 2, 2), (1, 1, 8)]:
    _, _, _, grads = step(shape, jax.devices())
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                            / (np.max(np.abs(np.asarray(b))) + 1e-12)),
                         grads, tiled_ref)
    out['tiled'][str(shape)] = max(jax.tree.leaves(diffs))
print('RESULT' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def mesh_results():
    stdout = run_python(MESH_EQUIVALENCE, devices=8)
    return json.loads(stdout.split('RESULT', 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize('shape', ['(8, 1, 1)', '(2, 4, 1)', '(2, 2, 2)', '(1, 1, 8)'])
def test_every_mesh_matches_one_device(mesh_results, shape):
    ref, got = mesh_results['reference'], mesh_results[shape]
    assert got['loss'] == pytest.approx(ref['loss'], rel=1e-5)
    assert got['grad_norm'] == pytest.approx(ref['grad_norm'], rel=1e-4)
    assert got['max_relative_grad_diff'] < 1e-5  # per tensor, relative to its largest entry


@pytest.mark.slow
def test_tiled_attention_matches_one_device_on_every_mesh(mesh_results):
    tiled = mesh_results['tiled']
    assert tiled['uses_tiles']
    assert tiled['loss_vs_dense'] < 1e-5  # the same model as the dense-attention run
    for shape in ('(8, 1, 1)', '(2, 2, 2)', '(1, 1, 8)'):
        assert tiled[shape] < 1e-5, shape


@pytest.mark.slow
def test_parameters_are_sharded_as_the_rules_say(mesh_results):
    specs = mesh_results['specs']
    assert specs['mlp_fc'] == "P('fsdp', 'tensor')"        # embed, mlp
    assert specs['attn_query'] == "P('fsdp', 'tensor', None)"  # embed, heads, kv
    assert specs['head'] == "P('fsdp', 'tensor')"          # embed, vocab
    assert specs['adam_mu_mlp_fc'] == specs['mlp_fc']                  # optimizer follows
    assert specs['norm'] == "P('fsdp',)"
    assert specs['shard_shape_mlp_fc'] == [32, 128]                    # [64/2, 256/2]


def test_the_mesh_fills_its_minus_one_axis_and_refuses_what_cannot_fit():
    from pixelgen import parallel
    assert parallel.mesh_shape({'data': 2, 'fsdp': -1}, 8) == (2, 4, 1)
    assert parallel.mesh_shape({'data': -1}, 1) == (1, 1, 1)
    with pytest.raises(ValueError, match='not a multiple of 3'):
        parallel.mesh_shape({'data': 3, 'fsdp': -1}, 8)
    with pytest.raises(ValueError, match='unknown axes'):
        parallel.mesh_shape({'pipeline': 2}, 2)
