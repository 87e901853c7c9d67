"""pixelgen.export: the plain parameter tree for any task, and the transformers formats
(ImageGPT, CLIP, ViT), whose from_pretrained models compute pixelgen's logits and embeddings,
and which import back into the same model."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from safetensors.numpy import load_file

import pixelgen
from pixelgen import export
from pixelgen.config import ConfigError, parse_config_args
from pixelgen.convert import __main__ as convert_cli
from pixelgen.convert import save_workdir
from pixelgen.data import pipeline
from pixelgen.data.palette import save_palette
from pixelgen.data.text import TextTokenizer
from pixelgen.tasks import clip as clip_task
from pixelgen.tasks import igpt as igpt_task
from pixelgen.tasks import vit as vit_task

TEXTS = ['a large red star', 'a small blue circle and a green square', 'x',
         'a large red star a large red star a large red star a large red star']


def config_of(name: str, *overrides: str):
    config, _ = parse_config_args(['--config', os.path.join(REPO, 'configs', name) + ':tiny',
                                   *overrides])
    return config


def perturbed(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """`model` with every parameter moved by noise (zero heads and unit norms become
    informative, so a wrong mapping cannot pass)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys,
                                                                                strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def params_of(loaded) -> dict[str, np.ndarray]:
    return export.flat_names(export.parameter_tree(loaded.model))


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], atol=1e-7, err_msg=name)


@pytest.fixture(scope='module')
def vit_workdir(data_dir, tmp_path_factory) -> str:
    config = config_of('vit_shapes.py', '--config.model.num_classes=6',
                       f'--config.data.data_dir={data_dir}', '--config.data.mean=(0.4,0.5,0.6)',
                       '--config.data.std=(0.2,0.3,0.25)')
    workdir = str(tmp_path_factory.mktemp('vit'))
    save_workdir(config, perturbed(vit_task.build_model(config, nnx.Rngs(0))), workdir)
    return workdir


def test_safetensors_export_is_the_parameter_tree_of_any_task(vit_workdir, tmp_path):
    out = str(tmp_path / 'st')
    assert export.main(['--to', 'safetensors', '--workdir', vit_workdir, '--out', out]) == 0
    tensors = load_file(os.path.join(out, 'model.safetensors'))
    expected = params_of(pixelgen.load(vit_workdir))
    assert tensors.keys() == expected.keys()
    assert 'encoder/transformer/blocks/0/attn/query/kernel' in tensors
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value)
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['task'] == 'vit'


def test_export_refuses_a_format_of_another_task_and_a_used_folder(vit_workdir, tmp_path):
    with pytest.raises(ConfigError, match="exports task 'clip'.*Use --to hf-vit"):
        export.export(vit_workdir, 'hf-clip', str(tmp_path / 'x'))
    (tmp_path / 'used').mkdir()
    (tmp_path / 'used' / 'f').write_text('x')
    with pytest.raises(ConfigError, match='already holds files'):
        export.export(vit_workdir, 'safetensors', str(tmp_path / 'used'))


# transformers --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def transformers():
    pytest.importorskip('torch', reason='the parity tests compare with PyTorch: .[test]')
    return pytest.importorskip('transformers', reason='the parity tests need .[test]')


@pytest.mark.slow
@pytest.mark.parity
def test_hf_vit_export_gives_pixelgens_logits_and_imports_back(vit_workdir, transformers,
                                                               tmp_path):
    import torch
    out = str(tmp_path / 'hf')
    assert export.main(['--to', 'hf-vit', '--workdir', vit_workdir, '--out', out]) == 0
    ours = pixelgen.load(vit_workdir)
    reference = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert reference.config.id2label[1] == 'square'  # named from the dataset
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = reference(**processor(list(images), return_tensors='pt')).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.model(images / 255.0)), logits, atol=1e-4)
    back = str(tmp_path / 'back')
    assert convert_cli.main(['--from', 'hf-vit', '--src', out, '--workdir', back]) == 0
    again = pixelgen.load(back)
    assert tuple(again.config.data.mean) == (0.4, 0.5, 0.6)
    assert again.config.model.norm_eps == ours.config.model.norm_eps
    assert_same_params(ours, again)


@pytest.fixture(scope='module')
def clip_workdir(data_dir, tmp_path_factory) -> str:
    """A tiny CLIP (perturbed weights) with a BPE trained on shapes' captions."""
    config = config_of('clip_shapes.py', f'--config.data.data_dir={data_dir}')
    workdir = str(tmp_path_factory.mktemp('clip'))
    source = pipeline.open_source('shapes', 'train', data_dir)
    tokenizer = TextTokenizer.train(
        (clip_task.caption_text(source[i]['caption']) for i in range(300)),
        vocab_size=config.model.vocab_size)
    save_workdir(config, perturbed(clip_task.build_model(config, nnx.Rngs(0))), workdir)
    tokenizer.save(os.path.join(workdir, clip_task.TOKENIZER_FILE))
    return workdir


@pytest.mark.slow
@pytest.mark.parity
def test_hf_clip_export_gives_pixelgens_embeddings_through_its_tokenizer_json(
        clip_workdir, transformers, tmp_path):
    import torch
    out = str(tmp_path / 'hf')
    assert export.main(['--to', 'hf-clip', '--workdir', clip_workdir, '--out', out]) == 0
    ours = pixelgen.load(clip_workdir)
    context = ours.config.model.context_length
    tokenizer = ours.assets['tokenizer']
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    encoded = hf_tokenizer(TEXTS, padding='max_length', max_length=context, truncation=True,
                           return_tensors='np')
    ids = tokenizer.encode(TEXTS, context, add_sot_eot=True).ids
    # the same tokens, [EOT] renumbered to the tokenizer's last id
    eot = tokenizer.vocab_size - 1
    renumbered = np.where(ids == tokenizer.eot_id, eot, np.where(ids == eot, tokenizer.eot_id,
                                                                  ids))
    real = encoded['attention_mask'] > 0
    np.testing.assert_array_equal(encoded['input_ids'][real], renumbered[real])
    reference = transformers.CLIPModel.from_pretrained(out).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(out)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        result = reference(input_ids=torch.tensor(encoded['input_ids']),
                           attention_mask=torch.tensor(encoded['attention_mask']),
                           **processor(list(images), return_tensors='pt'))
    np.testing.assert_allclose(np.asarray(ours.model.encode_text(ids)),
                               result.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.model.encode_image(images)),
                               result.image_embeds.numpy(), atol=1e-4)
    # and back: the imported model with its imported tokenizer embeds texts the same way
    back = str(tmp_path / 'back')
    assert convert_cli.main(['--from', 'hf-clip', '--src', out, '--workdir', back]) == 0
    again = pixelgen.load(back)
    again_ids = again.assets['tokenizer'].encode(TEXTS, context, add_sot_eot=True).ids
    np.testing.assert_allclose(np.asarray(again.model.encode_text(again_ids)),
                               np.asarray(ours.model.encode_text(ids)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(again.model.encode_image(images)),
                               np.asarray(ours.model.encode_image(images)), atol=1e-5)


def igpt_workdir(root, *overrides: str) -> str:
    config = config_of('igpt_shapes.py', '--config.model.num_classes=0', *overrides)
    workdir = str(root)
    k = config.data.palette_size
    save_workdir(config, perturbed(igpt_task.build_model(config, nnx.Rngs(0))), workdir)
    palette = np.random.default_rng(0).uniform(-1, 1, (k, 3)).astype(np.float32)
    save_palette(palette, workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize('scan_layers', [False, True])
def test_hf_imagegpt_export_gives_pixelgens_logits_and_imports_back(scan_layers, transformers,
                                                                   tmp_path):
    import torch
    workdir = igpt_workdir(tmp_path / 'w', f'--config.model.scan_layers={scan_layers}')
    out = str(tmp_path / 'hf')
    assert export.main(['--to', 'hf-imagegpt', '--workdir', workdir, '--out', out]) == 0
    ours = pixelgen.load(workdir)
    k = ours.config.data.palette_size
    reference = transformers.ImageGPTForCausalImageModeling.from_pretrained(out).eval()
    processor = transformers.ImageGPTImageProcessor.from_pretrained(out)
    np.testing.assert_allclose(processor.clusters, ours.palette, atol=1e-7)
    tokens = np.random.default_rng(0).integers(0, k, (2, ours.config.data.image_size ** 2))
    inputs = np.concatenate([np.full((2, 1), k), tokens[:, :-1]], axis=1)  # HF: sos = k
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(inputs)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.model(tokens)), logits, atol=1e-4)
    back = str(tmp_path / 'back')
    assert convert_cli.main(['--from', 'hf-imagegpt', '--src', out, '--workdir', back]) == 0
    again = pixelgen.load(back)
    np.testing.assert_allclose(np.asarray(again.model(tokens)), np.asarray(ours.model(tokens)),
                               atol=1e-5)
    np.testing.assert_array_equal(again.palette, ours.palette)


def test_a_bert_igpt_is_refused_with_the_reason(tmp_path):
    workdir = igpt_workdir(tmp_path / 'w', '--config.objective=bert')
    with pytest.raises(ConfigError, match="objective='bert'.*autoregressive only.*safetensors"):
        export.export(workdir, 'hf-imagegpt', str(tmp_path / 'hf'))


def test_a_vit_without_an_hf_equivalent_is_refused_naming_the_keys():
    from pixelgen.convert import hf_vit
    config = config_of('vit_shapes.py', '--config.model.pool=mean',
                       '--config.model.representation_size=16')
    with pytest.raises(ConfigError, match="model.pool='mean'.*representation_size=16"):
        hf_vit.check_exportable(config)


@pytest.mark.slow
@pytest.mark.parity
def test_an_imported_clip_exports_its_clip_tokenizer_files(transformers, tmp_path):
    import torch
    from test_clip_convert import CONTEXT, write_tiny_vocab
    texts = ['a red star', 'A  Blue STAR!!', "it's 42 stars, redder?"]
    src = str(tmp_path / 'src')
    os.makedirs(src)
    vocab_size = write_tiny_vocab(src)
    torch.manual_seed(0)
    original = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=CONTEXT, eos_token_id=vocab_size - 1,
                         bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=16)).eval()
    original.save_pretrained(src)
    workdir, out = str(tmp_path / 'w'), str(tmp_path / 'hf')
    assert convert_cli.main(['--from', 'hf-clip', '--src', src, '--workdir', workdir]) == 0
    assert export.main(['--to', 'hf-clip', '--workdir', workdir, '--out', out]) == 0
    assert {'vocab.json', 'merges.txt', 'tokenizer_config.json'} <= set(os.listdir(out))
    kwargs = dict(padding='max_length', max_length=CONTEXT, truncation=True,
                  return_tensors='pt')
    expected = transformers.CLIPTokenizer.from_pretrained(src)(texts, **kwargs)
    exported = transformers.CLIPTokenizer.from_pretrained(out)(texts, **kwargs)
    np.testing.assert_array_equal(exported['input_ids'], expected['input_ids'])
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    pixels = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**exported, pixel_values=pixels).text_embeds,
                                   original(**expected, pixel_values=pixels).text_embeds,
                                   atol=1e-5)
