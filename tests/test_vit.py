"""ViT classification: the paper's shapes, a tiny training run with its evaluation, fine-tuning
at another resolution (position embeddings resampled), and hf-vit conversion against
transformers' ViTForImageClassification."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from PIL import Image

import pixelgen
from pixelgen import pretrained
from pixelgen.config import ConfigError, load_config_file, parse_config_args
from pixelgen.evaluators import EvalContext
from pixelgen.evaluators import vit as vit_evaluators
from pixelgen.models.vit import resample_position_embedding
from pixelgen.tasks import vit as vit_task
from pixelgen.train import main as train_main

TINY = os.path.join(REPO, 'configs', 'vit_shapes.py') + ':tiny'


def paper_config(variant: str):
    config, _ = parse_config_args(['--config', os.path.join(REPO, 'configs', 'vit.py') +
                                   f':{variant}'])
    return config


@pytest.mark.parametrize('variant, count', [('b16', 86_567_656), ('l16', 304_326_632)])
def test_paper_configs_have_the_parameter_counts_of_transformers_vit(variant, count):
    # ViTForImageClassification(ViTConfig(hidden_size=768|1024, num_hidden_layers=12|24,
    # num_attention_heads=12|16, intermediate_size=4*hidden, patch_size=16, image_size=224,
    # num_labels=1000)) has these many parameters; the paper rounds them to 86M and 307M.
    _, params, _ = pretrained.abstract_params(paper_config(variant))
    assert sum(x.size for x in jax.tree.leaves(params)) == count


def tiny_model(*overrides: str):
    config, _ = parse_config_args(['--config', TINY, '--config.model.num_classes=6',
                                   *overrides])
    return config, vit_task.build_model(config, nnx.Rngs(0))


def test_the_model_normalises_images_in_0_1_with_the_configs_mean_and_std():
    _, model = tiny_model('--config.data.mean=(0.2,0.4,0.6)',
                          '--config.data.std=(0.5,0.25,2.0)')
    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.normalise(images)),
                               (images - [0.2, 0.4, 0.6]) / [0.5, 0.25, 2.0], atol=1e-6)
    as_uint8 = np.round(images * 255).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(model.normalise(as_uint8)),
                               (as_uint8 / 255 - [0.2, 0.4, 0.6]) / [0.5, 0.25, 2.0], atol=1e-6)
    logits = model(images)
    assert logits.shape == (2, 6) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), 0.0)  # the paper's zero-initialised head


def test_mean_pooling_has_no_class_token_and_a_pre_logits_layer_changes_the_head():
    _, model = tiny_model('--config.model.pool=mean', '--config.model.representation_size=24')
    assert model.encoder.class_embedding is None
    assert model.encoder.position_embedding.shape == (4, 32)  # a 2x2 grid, no class row
    assert model.head.kernel.shape == (24, 6)
    assert model(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 6)


def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match='model.pool'):
        tiny_model('--config.model.pool=max')
    with pytest.raises(ConfigError, match='data.image_size=20 must be divisible'):
        tiny_model('--config.data.image_size=20')
    config = load_config_file(TINY)
    with pytest.raises(ConfigError, match='num_classes=-1 is resolved from the dataset'):
        vit_task.build_model(config, nnx.Rngs(0))


def test_resampling_keeps_the_class_row_and_is_the_identity_on_the_same_grid():
    posemb = jnp.asarray(np.random.default_rng(0).normal(size=(1 + 9, 5)), jnp.float32)
    np.testing.assert_allclose(resample_position_embedding(posemb, 3, class_token=True), posemb,
                               atol=1e-6)
    bigger = resample_position_embedding(posemb, 6, class_token=True)
    assert bigger.shape == (37, 5)
    np.testing.assert_array_equal(bigger[0], posemb[0])
    # bilinear with half-pixel centres: doubling a grid repeats no value outside the border,
    # and every new value lies between its neighbours' (a convex combination)
    grid = np.asarray(posemb[1:]).reshape(3, 3, 5)
    new = np.asarray(bigger[1:]).reshape(6, 6, 5)
    np.testing.assert_allclose(new[1, 1], 0.75 * 0.75 * grid[0, 0] + 0.75 * 0.25 * grid[0, 1]
                               + 0.25 * 0.75 * grid[1, 0] + 0.25 * 0.25 * grid[1, 1], atol=1e-6)
    np.testing.assert_allclose(new[0, 0], grid[0, 0], atol=1e-6)  # edges clamp


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('vit_run'))
    assert train_main(['--config', TINY, f'--config.data.data_dir={data_dir}',
                       '--workdir', workdir]) == 0
    return workdir


@pytest.mark.slow
def test_tiny_run_trains_evaluates_and_writes_a_confusion_matrix(trained, data_dir, tmp_path):
    loaded = pixelgen.load(trained)
    assert loaded.step == 4 and loaded.config.model.num_classes == 6  # resolved from 'shape'
    assert os.path.exists(os.path.join(trained, 'samples', 'predictions_0000004.png'))
    ctx = EvalContext(loaded=loaded, out_dir=str(tmp_path), num_examples=30,
                      options={'data_dir': data_dir})
    scores = vit_evaluators.EVALUATORS['accuracy'](ctx)
    assert scores['num_examples'] == 30 and 0 <= scores['accuracy'] <= 1
    with open(tmp_path / 'confusion.json') as f:
        confusion = json.load(f)
    matrix = np.array(confusion['matrix'])
    assert confusion['classes'][:2] == ['circle', 'square'] and matrix.shape == (6, 6)
    assert matrix.sum() == 30
    assert np.isclose(np.trace(matrix) / 30, scores['accuracy'])
    assert Image.open(tmp_path / 'confusion.png').size[0] > 100


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    matrix = vit_evaluators.confusion_matrix(np.array([0, 0, 1, 2, 2, 2]),
                                             np.array([0, 1, 1, 2, 0, 2]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


@pytest.mark.slow
def test_finetuning_at_another_resolution_resamples_the_position_embeddings(
        trained, data_dir, tmp_path, capsys):
    workdir = str(tmp_path / 'ft')
    assert train_main(['--config', TINY, f'--config.data.data_dir={data_dir}',
                       '--workdir', workdir, f'--config.init_from={trained}',
                       '--config.data.image_size=32', '--config.data.label_key=color',
                       '--config.total_steps=2', '--config.checkpoint_every_steps=1']) == 0
    out = capsys.readouterr().out
    assert 'position embeddings resampled bilinearly (5, 32) -> (17, 32)' in out
    assert "fresh: ['head']" in out.replace("['head']['bias'], ['head']['kernel']", "['head']")
    # step 1 took one update at learning rate 0 (the first of the warm-up), so it holds the
    # initialisation: the resampled embeddings, the other pretrained weights, a zero head
    source, tuned = pixelgen.load(trained).model, pixelgen.load(workdir, step=1).model
    np.testing.assert_allclose(
        np.asarray(tuned.encoder.position_embedding[...]),
        np.asarray(resample_position_embedding(source.encoder.position_embedding[...], 4,
                                               class_token=True)), atol=1e-6)
    assert tuned.head.kernel.shape == (32, 7)  # 7 colours, a new zero head
    np.testing.assert_array_equal(np.asarray(tuned.head.kernel[...]), 0.0)
    np.testing.assert_allclose(np.asarray(tuned.encoder.ln_post.scale[...]),
                               np.asarray(source.encoder.ln_post.scale[...]), atol=1e-6)


# hf-vit against transformers ------------------------------------------------------------

@pytest.fixture(scope='module')
def hf_vit_folder(tmp_path_factory) -> str:
    """A random tiny ViTForImageClassification (every weight perturbed) with its processor's
    own mean and std, saved with save_pretrained."""
    torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch: .[test]')
    transformers = pytest.importorskip('transformers', reason='the parity tests need .[test]')
    folder = str(tmp_path_factory.mktemp('hf_vit'))
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=192, image_size=32, patch_size=8,
                                    num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225],
                                   size={'height': 32, 'width': 32}).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parity
def test_hf_vit_converts_to_the_same_logits(hf_vit_folder, tmp_path):
    import torch
    import transformers

    from pixelgen.convert import __main__ as convert_cli
    workdir = str(tmp_path / 'converted')
    assert convert_cli.main(['--from', 'hf-vit', '--src', hf_vit_folder,
                             '--workdir', workdir]) == 0
    vit = pixelgen.load(workdir)
    assert vit.config.data.mean == (0.485, 0.456, 0.406) and vit.config.model.norm_eps == 1e-12
    images = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    reference = transformers.ViTForImageClassification.from_pretrained(hf_vit_folder).eval()
    processor = transformers.ViTImageProcessor.from_pretrained(hf_vit_folder)
    pixels = processor(list(images), return_tensors='pt', do_rescale=False,
                       do_resize=False)['pixel_values']
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(np.asarray(vit.model(images)), expected, atol=1e-4)
