"""Fine-tuning: a pretrained workdir initialises a classifier run (L_GEN + w * L_CLF) with a
fresh head, in either layer layout (looped or scanned); augmentation; the errors of a config
that cannot fine-tune (tiny shapes; CPU)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from flax import nnx

from pixelgen import pretrained, tasks, trainer
from pixelgen.config import ConfigError, load_saved_config, parse_config_args
from pixelgen.convert import save_workdir
from pixelgen.data import palette as palette_lib
from pixelgen.data import pipeline
from pixelgen.models.igpt import ImageGPT
from pixelgen.tasks import igpt as task_lib

FINETUNE = os.path.join(REPO, 'configs', 'igpt_finetune.py') + ':shapes_tiny'
SHAPES_CLASSES = 6


@pytest.fixture(scope='module')
def pretrained_workdir(data_dir, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('pretrained'))
    config = tiny_config(data_dir, '--config.sample_every_steps=0', '--config.eval_every_steps=0')
    trainer.train(config, workdir, stop_after=3)
    return workdir


def finetune_config(data_dir: str, init_from: str, *overrides: str):
    config, rest = parse_config_args(['--config', FINETUNE, f'--config.data.data_dir={data_dir}',
                                      f'--config.init_from={init_from}', *overrides])
    assert not rest
    return config


def fresh_state(config):
    tx, _ = trainer.make_optimizer(config.optimizer, config.total_steps)
    return trainer.init_state(task_lib.build_model(config, nnx.Rngs(config.seed)), tx,
                              config.seed)[2]


@pytest.mark.slow
def test_init_loads_pretrained_params_exactly_and_the_head_is_fresh(data_dir,
                                                                    pretrained_workdir):
    config = finetune_config(data_dir, pretrained_workdir,
                             f'--config.model.num_classes={SHAPES_CLASSES}')
    fresh = fresh_state(config)
    state = trainer.init_params_from(fresh, config)
    source = pretrained.load(pretrained_workdir)
    _, source_params, _ = nnx.split(source.model, nnx.Param, ...)
    loaded = dict(jax.tree_util.tree_flatten_with_path(source_params)[0])
    head = []
    for path, value in jax.tree_util.tree_flatten_with_path(state['params'])[0]:
        if path in loaded:
            np.testing.assert_array_equal(value, loaded[path])
        else:
            head.append(jax.tree_util.keystr(path))
    assert head == ["['clf']['kernel'].value"] or head == ["['clf']['kernel']"]
    kernel = state['params']['clf']['kernel'][...]
    assert kernel.shape == (config.model.width, SHAPES_CLASSES)
    np.testing.assert_array_equal(kernel, fresh['params']['clf']['kernel'][...])
    # The pretrained run really moved its parameters away from the fresh ones.
    assert not np.allclose(state['params']['head']['kernel'][...],
                           fresh['params']['head']['kernel'][...])
    assert int(state['step']) == 0


def finetuned_model(config):
    """The model that `config` fine-tunes at step 0: init_from's weights and a fresh head."""
    model = task_lib.build_model(config, nnx.Rngs(config.seed))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, trainer.init_params_from(fresh_state(config), config)['params'],
                     rest)


def with_layout(config, scan_layers: bool, init_from: str):
    with config.unlocked():  # the igpt configs predate the keys
        config.model.scan_layers = scan_layers
        config.init_from = init_from
    return config


@pytest.mark.slow
def test_released_looped_weights_finetune_a_scanned_model_and_back(data_dir, pretrained_workdir,
                                                                  tmp_path):
    source = pretrained.load(pretrained_workdir)
    side = source.config.data.image_size
    tokens = jax.random.randint(jax.random.key(3), (2, side * side), 0,
                                source.config.data.palette_size, dtype=jnp.int32)
    expected = source.model(tokens)

    def finetune(init_from, scan_layers):
        config = with_layout(finetune_config(data_dir, init_from,
                                             f'--config.model.num_classes={SHAPES_CLASSES}'),
                             scan_layers, init_from)
        task_lib.validate_init_from(config)  # a layout difference alone is allowed
        model = finetuned_model(config)
        assert model.transformer.scan_layers == scan_layers
        logits, class_logits = model.logits_and_class_logits(tokens)
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(class_logits, 0)  # the fresh head is zero-initialised
        return model

    scanned = finetune(pretrained_workdir, True)  # looped -> scanned: stacked in layer order
    np.testing.assert_array_equal(scanned.transformer.blocks.mlp.fc.kernel[...][1],
                                  source.model.transformer.blocks[1].mlp.fc.kernel[...])

    # scanned -> looped: a scanned workdir holding the same weights, stacked.
    scanned_config = with_layout(load_saved_config(pretrained_workdir), True, pretrained_workdir)
    scanned_workdir = str(tmp_path / 'scanned')
    save_workdir(scanned_config, finetuned_model(scanned_config), scanned_workdir)
    palette_lib.save_palette(source.palette, scanned_workdir)  # an iGPT workdir has its palette
    looped = finetune(scanned_workdir, False)
    np.testing.assert_array_equal(looped.transformer.blocks[1].mlp.fc.kernel[...],
                                  source.model.transformer.blocks[1].mlp.fc.kernel[...])


@pytest.mark.slow
def test_finetune_run_reports_accuracy_and_keeps_the_palette(data_dir, pretrained_workdir,
                                                             tmp_path):
    config = finetune_config(data_dir, pretrained_workdir, '--config.eval_every_steps=2',
                             '--config.sample_every_steps=0')
    workdir = str(tmp_path / 'finetune')
    trainer.train(config, workdir, stop_after=4)
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['model']['num_classes'] == SHAPES_CLASSES  # from the label feature
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if 'eval/accuracy' in r]
    assert evals and 0 <= evals[0]['eval/accuracy'] <= 1 and 'eval/clf_loss' in evals[0]
    assert all({'train/clf_loss', 'train/gen_loss', 'train/accuracy'} <= set(r)
               for r in records if 'train/loss' in r)
    np.testing.assert_array_equal(palette_lib.load_palette(workdir),
                                  palette_lib.load_palette(pretrained_workdir))
    loaded = pretrained.load(workdir)
    assert loaded.model.clf.kernel.shape == (config.model.width, SHAPES_CLASSES)
    # Once the run has a checkpoint, the pretrained workdir is no longer needed (eval jobs).
    tasks.make(finetune_config(data_dir, str(tmp_path / 'moved_away')), workdir)


@pytest.mark.slow
def test_joint_loss_gradient_reaches_the_backbone_and_both_heads():
    model = ImageGPT(vocab_size=16, seq_len=16, num_layers=2, width=32, num_heads=4,
                     num_classes=3, rngs=nnx.Rngs(0))
    for i, head in enumerate((model.head, model.clf)):  # as after pretraining / some steps
        head.kernel[...] = jax.random.normal(jax.random.key(i), head.kernel.shape) * 0.5
    batch = {'tokens': jax.random.randint(jax.random.key(2), (4, 16), 0, 16),
             'label': jnp.array([0, 1, 2, 1])}
    graphdef, params = nnx.split(model, nnx.Param)

    def grads(weight):
        def loss(params):
            return task_lib.ImageGPTLoss('ar', weight).loss(
                nnx.merge(graphdef, params), batch, jax.random.key(0))
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    joint, m = grads(0.5)
    gen_only, _ = grads(0.0)
    np.testing.assert_allclose(m['loss'], m['gen_loss'] + 0.5 * m['clf_loss'], rtol=1e-6)
    assert float(jnp.abs(joint['clf']['kernel'][...]).max()) > 0  # L_CLF reaches its head
    assert float(jnp.abs(gen_only['clf']['kernel'][...]).max()) == 0
    assert float(jnp.abs(joint['head']['kernel'][...]).max()) > 0  # L_GEN reaches its head
    backbone = joint['transformer']['blocks'][0]['mlp']['fc']['kernel'][...]
    backbone_gen = gen_only['transformer']['blocks'][0]['mlp']['fc']['kernel'][...]
    assert float(jnp.abs(backbone - backbone_gen).max()) > 1e-6  # L_CLF reaches the backbone
    assert float(jnp.abs(backbone_gen).max()) > 0  # and so does L_GEN


def test_crop_and_flip_are_windows_of_the_padded_image_and_seeded():
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    augment = pipeline.random_crop_flip(crop_padding=2, flip=True)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    windows = {(t, left, f): (padded[t:t + 6, left:left + 6][:, ::-1] if f else
                              padded[t:t + 6, left:left + 6])
               for t in range(5) for left in range(5) for f in (0, 1)}
    seen = set()
    for seed in range(60):
        out = augment({'image': image, 'label': 3}, np.random.default_rng(seed))['image']
        assert out.shape == image.shape and out.dtype == np.uint8
        match = [k for k, w in windows.items() if np.array_equal(w, out)]
        assert match, seed
        seen.add(match[0])
        again = augment({'image': image, 'label': 3}, np.random.default_rng(seed))['image']
        np.testing.assert_array_equal(out, again)
    assert len(seen) > 20 and {k[2] for k in seen} == {0, 1}
    plain = pipeline.random_crop_flip(0, False)({'image': image}, np.random.default_rng(0))
    np.testing.assert_array_equal(plain['image'], image)


@pytest.mark.slow
def test_augmented_batches_are_seeded_and_resume_exactly(data_dir):
    source = pipeline.open_source('shapes', 'test', data_dir)

    crop_flip = pipeline.random_crop_flip(2, True)

    def iterator(augment=crop_flip):
        return pipeline.train_iterator(source, batch_size=4, seed=0,
                                       prepare=pipeline.image_example(8), augment=augment)

    first = iterator()
    batches = [next(first)['image'] for _ in range(3)]
    state = first.get_state()
    later = [next(first)['image'] for _ in range(2)]
    again = iterator()
    for b in batches:
        np.testing.assert_array_equal(next(again)['image'], b)
    resumed = iterator()
    resumed.set_state(state)
    for b in later:
        np.testing.assert_array_equal(next(resumed)['image'], b)
    plain = next(iterator(augment=None))['image']
    assert plain.shape == batches[0].shape and not np.array_equal(plain, batches[0])


@pytest.mark.slow
def test_init_from_errors_name_the_problem(data_dir, pretrained_workdir, tmp_path):
    with pytest.raises(ConfigError, match='not a pixelgen workdir'):
        task_lib.validate_init_from(finetune_config(data_dir, str(tmp_path / 'absent')))
    with pytest.raises(ConfigError, match='model.width: .* has 32, this config 64'):
        task_lib.validate_init_from(finetune_config(data_dir, pretrained_workdir,
                                                    '--config.model.width=64'))
    with pytest.raises(ConfigError, match="objective: .* has 'ar', this config 'bert'"):
        task_lib.validate_init_from(finetune_config(data_dir, pretrained_workdir,
                                                    '--config.objective=bert'))
    with pytest.raises(ConfigError, match='model.num_classes=7 but .* has 6 classes'):
        tasks.make(finetune_config(data_dir, pretrained_workdir, '--config.model.num_classes=7'),
                   str(tmp_path / 'ft'))
    with pytest.raises(ConfigError, match='No checkpoint for step 99'):
        trainer.init_params_from(
            fresh_state(finetune_config(data_dir, pretrained_workdir,
                                        '--config.model.num_classes=6')),
            finetune_config(data_dir, pretrained_workdir, '--config.model.num_classes=6',
                            '--config.init_from_step=99'))
