"""hf-clip: a HuggingFace CLIPModel folder becomes a pixelgen CLIP workdir with the same
embeddings, and CLIP's BPE through `tokenizers` gives transformers' CLIPTokenizer ids."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import pixelgen
from pixelgen.config import ConfigError
from pixelgen.convert import __main__ as convert_cli
from pixelgen.convert import hf_clip
from pixelgen.data import clip_bpe

pytestmark = [pytest.mark.parity]
torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch: .[test]')
transformers = pytest.importorskip('transformers', reason='the parity tests need .[test]')
CLIPConfig, CLIPModel, CLIPTokenizer = (transformers.CLIPConfig, transformers.CLIPModel,
                                        transformers.CLIPTokenizer)

TEXTS = ['a red star', 'A  Blue STAR!!', "it's 42 stars, redder?", 'ünïcødé ok',
         'a red star a red star a red star a red star a red star']
MERGES = ['r e', 're d</w>', 's t', 'a r</w>', 'st ar</w>', 'b l', 'u e</w>', 'bl ue</w>']
CONTEXT = 12


def byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes (openai/CLIP bytes_to_unicode)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_vocab(folder: str) -> int:
    """A hand-made CLIP vocabulary in CLIP's layout: bytes, bytes + '</w>', merges,
    <|startoftext|>, <|endoftext|>. Returns its size."""
    chars = byte_alphabet()
    vocab = (chars + [c + '</w>' for c in chars] + [''.join(m.split()) for m in MERGES]
             + ['<|startoftext|>', '<|endoftext|>'])
    with open(os.path.join(folder, 'vocab.json'), 'w') as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n' + '\n'.join(MERGES) + '\n')
    return len(vocab)


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory) -> str:
    """A random tiny CLIPModel (every weight perturbed, biases and norms included) saved
    with save_pretrained, plus the tiny vocabulary."""
    folder = str(tmp_path_factory.mktemp('hf_clip'))
    vocab_size = write_tiny_vocab(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=CONTEXT, eos_token_id=vocab_size - 1,
                         bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def converted(hf_folder, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('converted'))
    assert convert_cli.main(['--from', 'hf-clip', '--src', hf_folder, '--workdir', workdir]) == 0
    return workdir


def test_clip_bpe_matches_transformers_clip_tokenizer(hf_folder):
    reference = CLIPTokenizer.from_pretrained(hf_folder)
    expected = reference(TEXTS, padding='max_length', max_length=CONTEXT,
                         truncation=True)['input_ids']
    ours = clip_bpe.load_clip_bpe(hf_folder)
    encoded = ours.encode(TEXTS, CONTEXT, add_sot_eot=True)
    np.testing.assert_array_equal(encoded.ids, np.array(expected))
    assert encoded.num_truncated == 3  # the last three are longer than CONTEXT
    assert ours.decode(encoded.ids) == reference.batch_decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_converted_embeddings_equal_huggingface(hf_folder, converted):
    reference = CLIPModel.from_pretrained(hf_folder).eval()
    clip = pixelgen.load(converted)
    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 32, 3)).astype(np.float32)
    tokens = clip.assets['tokenizer'].encode(TEXTS, CONTEXT, add_sot_eot=True).ids
    mean, std = np.array(hf_clip.OPENAI_MEAN), np.array(hf_clip.OPENAI_STD)
    with torch.no_grad():
        pixels = torch.tensor(((images - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
        out = reference(input_ids=torch.tensor(tokens, dtype=torch.long), pixel_values=pixels)
    np.testing.assert_allclose(np.asarray(clip.model.encode_image(images)),
                               out.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(clip.model.encode_text(tokens)),
                               out.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(float(clip.model.logit_scale[...]),
                               float(reference.logit_scale), rtol=1e-6)


def test_torch_bin_checkpoints_read_like_safetensors(hf_folder, tmp_path):
    shutil.copy(os.path.join(hf_folder, 'config.json'), tmp_path)
    reference = hf_clip.read_state_dict(hf_folder)
    torch.save({k: torch.from_numpy(v) for k, v in reference.items()},
               tmp_path / 'pytorch_model.bin')
    loaded = hf_clip.read_state_dict(str(tmp_path))
    assert loaded.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_legacy_eos_id_pools_at_the_largest_token(hf_folder):
    with open(os.path.join(hf_folder, 'config.json')) as f:
        config = json.load(f)
    config['text_config']['eos_token_id'] = 2  # as in OpenAI's released configs
    assert hf_clip.config_from_hf(config, hf_folder).model.eot_id == (
        config['text_config']['vocab_size'] - 1)


def test_unrepresentable_checkpoint_is_refused(hf_folder):
    with open(os.path.join(hf_folder, 'config.json')) as f:
        config = json.load(f)
    config['vision_config']['hidden_act'] = 'relu'
    with pytest.raises(ConfigError, match='hidden_act'):
        hf_clip.config_from_hf(config, hf_folder)
