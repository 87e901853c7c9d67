"""HuggingFace `CLIPModel` checkpoints (OpenAI's ViT-B/32, B/16, L/14) -> a pixelgen CLIP workdir.

The source folder is what `CLIPModel.save_pretrained` (or a hub download) holds:
config.json, model.safetensors (or *.safetensors shards, or pytorch_model.bin), and for the
tokenizer vocab.json + merges.txt (or tokenizer.json). The tokenizer is CLIP's own BPE,
rebuilt with `tokenizers` exactly as transformers' CLIPTokenizer builds it, and written into
the workdir, so `pixelgen.load(OUT).assets['tokenizer']` encodes texts for `encode_text`.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
from flax import nnx

from pixelgen import assets, storage
from pixelgen.config import ConfigError
from pixelgen.convert import save_workdir
from pixelgen.convert._tensors import ConversionError, read_tensor_file
from pixelgen.data.clip_bpe import load_folder_tokenizer
from pixelgen.models.clip import OPENAI_MEAN, OPENAI_STD
from pixelgen.tasks.clip import TOKENIZER_FILE, base_config, build_model

NAME = 'hf-clip'
DESCRIPTION = ('a HuggingFace CLIPModel folder (config.json, *.safetensors or pytorch_model.bin, '
               'vocab.json + merges.txt)')

def read_state_dict(folder: str) -> dict[str, np.ndarray]:
    """{name: float32 array} from *.safetensors (all shards) or pytorch_model.bin."""
    shards = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
    path = os.path.join(folder, 'pytorch_model.bin')
    if not shards and os.path.exists(path):
        shards = [path]
    if shards:
        weights = {}
        for shard in shards:
            weights.update(read_tensor_file(shard))  # finite, or refused naming the tensor
        return {k: np.asarray(v, np.float32) for k, v in weights.items()}
    raise FileNotFoundError(f'{folder} holds no *.safetensors and no pytorch_model.bin.')


def config_from_hf(hf: dict, folder: str):
    """The pixelgen CLIP config of a HuggingFace CLIPConfig dict."""
    text, vision = hf['text_config'], hf['vision_config']
    problems = []
    ratios = {part['intermediate_size'] / part['hidden_size'] for part in (text, vision)}
    acts = {text.get('hidden_act', 'quick_gelu'), vision.get('hidden_act', 'quick_gelu')}
    eps = {text.get('layer_norm_eps', 1e-5), vision.get('layer_norm_eps', 1e-5)}
    if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
        problems.append(f'intermediate_size / hidden_size must be one whole number, got {ratios}')
    if len(acts) != 1 or next(iter(acts)) not in ('quick_gelu', 'gelu'):
        problems.append(f"hidden_act must be 'quick_gelu' or 'gelu' in both towers, got {acts}")
    if eps != {1e-5}:
        problems.append(f'layer_norm_eps must be 1e-5, got {eps}')
    if vision.get('num_channels', 3) != 3:
        problems.append('only RGB vision models (num_channels=3) are supported')
    if problems:
        raise ConfigError(f'{folder}/config.json is a CLIP that pixelgen cannot represent: '
                          + '; '.join(problems) + '.')
    vocab_size = text['vocab_size']
    # OpenAI's configs say eos_token_id=2 and pool at the largest id (transformers' legacy
    # rule), which is <|endoftext|> = vocab_size - 1.
    eos = text.get('eos_token_id', 2)
    eot_id = vocab_size - 1 if eos == 2 else eos
    c = base_config()
    c.data.image_size = vision['image_size']
    c.model.patch_size = vision['patch_size']
    c.model.vision_width = vision['hidden_size']
    c.model.vision_layers = vision['num_hidden_layers']
    c.model.vision_heads = vision['num_attention_heads']
    c.model.vocab_size = vocab_size
    c.model.context_length = text['max_position_embeddings']
    c.model.text_width = text['hidden_size']
    c.model.text_layers = text['num_hidden_layers']
    c.model.text_heads = text['num_attention_heads']
    c.model.embed_dim = hf['projection_dim']
    c.model.eot_id = eot_id
    c.model.mlp_ratio = int(next(iter(ratios)))
    c.model.activation = next(iter(acts))
    c.model.image_mean, c.model.image_std = OPENAI_MEAN, OPENAI_STD
    processor = os.path.join(folder, 'preprocessor_config.json')
    if os.path.exists(processor):
        with open(processor) as f:
            p = json.load(f)
        c.model.image_mean = tuple(p.get('image_mean', OPENAI_MEAN))
        c.model.image_std = tuple(p.get('image_std', OPENAI_STD))
    return c


def _linear(w: np.ndarray) -> np.ndarray:
    return w.T  # torch [out, in] -> [in, out]


def _tower(weights: dict, prefix: str, num_layers: int, num_heads: int) -> dict:
    """The shared blocks of one tower, as a pure dict of pixelgen's Transformer."""
    blocks = {}
    for i in range(num_layers):
        p = f'{prefix}.encoder.layers.{i}.'
        width = weights[p + 'layer_norm1.weight'].shape[0]
        head_dim = width // num_heads

        def qkv(name, p=p, width=width, head_dim=head_dim):
            return {'kernel': _linear(weights[p + f'self_attn.{name}.weight']).reshape(
                        width, num_heads, head_dim),
                    'bias': weights[p + f'self_attn.{name}.bias'].reshape(num_heads, head_dim)}

        blocks[i] = {
            'norm1': {'scale': weights[p + 'layer_norm1.weight'],
                      'bias': weights[p + 'layer_norm1.bias']},
            'attn': {'query': qkv('q_proj'), 'key': qkv('k_proj'), 'value': qkv('v_proj'),
                     'out': {'kernel': _linear(weights[p + 'self_attn.out_proj.weight']).reshape(
                                 num_heads, head_dim, width),
                             'bias': weights[p + 'self_attn.out_proj.bias']}},
            'norm2': {'scale': weights[p + 'layer_norm2.weight'],
                      'bias': weights[p + 'layer_norm2.bias']},
            'mlp': {'fc': {'kernel': _linear(weights[p + 'mlp.fc1.weight']),
                           'bias': weights[p + 'mlp.fc1.bias']},
                    'proj': {'kernel': _linear(weights[p + 'mlp.fc2.weight']),
                             'bias': weights[p + 'mlp.fc2.bias']}},
        }
    return {'blocks': blocks}


def _norm(weights: dict, name: str) -> dict:
    return {'scale': weights[name + '.weight'], 'bias': weights[name + '.bias']}


def params_from_hf(weights: dict, config) -> dict:
    """A pure dict of the pixelgen CLIP's parameters from a CLIPModel state dict."""
    m = config.model
    patch = weights['vision_model.embeddings.patch_embedding.weight']  # [width, 3, p, p]
    v, t = 'vision_model', 'text_model'
    return {
        'visual': {
            # conv [width, c, p1, p2] -> matmul on patches flattened as (p1 p2 c)
            'patch_embed': {'kernel': patch.transpose(2, 3, 1, 0).reshape(-1, patch.shape[0])},
            'class_embedding': weights[f'{v}.embeddings.class_embedding'],
            'position_embedding': weights[f'{v}.embeddings.position_embedding.weight'],
            'ln_pre': _norm(weights, f'{v}.pre_layrnorm'),
            'transformer': _tower(weights, v, m.vision_layers, m.vision_heads),
            'ln_post': _norm(weights, f'{v}.post_layernorm'),
            'proj': {'kernel': _linear(weights['visual_projection.weight'])},
        },
        'text': {
            'token_embedding': {'embedding': weights[f'{t}.embeddings.token_embedding.weight']},
            'position_embedding': weights[f'{t}.embeddings.position_embedding.weight'],
            'transformer': _tower(weights, t, m.text_layers, m.text_heads),
            'ln_final': _norm(weights, f'{t}.final_layer_norm'),
            'proj': {'kernel': _linear(weights['text_projection.weight'])},
        },
        'logit_scale': weights['logit_scale'].reshape(()),
    }


def load_model(src: str):
    """(config, pixelgen CLIP with the checkpoint's weights) of a CLIPModel folder."""
    path = os.path.join(src, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{src} has no config.json; pass the folder that '
                                'CLIPModel.save_pretrained wrote.')
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f'{path} is not valid JSON (line {e.lineno}: {e.msg}); it is '
                                  'truncated or damaged. Download it again.') from e
    config = config_from_hf(hf, src)
    model = build_model(config, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    expected = nnx.to_pure_dict(state)
    try:
        loaded = params_from_hf(read_state_dict(src), config)
    except KeyError as e:
        raise ConversionError(f'{src}: tensor {e} is missing from the checkpoint; --src must be '
                              'a folder that CLIPModel.save_pretrained wrote.') from e

    def check(path, want, got):
        if np.shape(want) != np.shape(got):
            raise ConversionError(f'{src}: parameter {"/".join(map(str, path))} has shape '
                                  f'{np.shape(got)} in the checkpoint but {np.shape(want)} in the '
                                  'model its config.json describes.')
    import jax
    jax.tree_util.tree_map_with_path(check, expected, loaded)
    nnx.replace_by_pure_dict(state, loaded)
    nnx.update(model, state)
    return config, model


def convert(src: str, workdir: str) -> str:
    config, model = load_model(src)
    try:
        tokenizer = load_folder_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None
    if tokenizer is not None and tokenizer.eot_id != config.model.eot_id:
        raise ConfigError(f'{src}: the tokenizer says <|endoftext|> is {tokenizer.eot_id} but '
                          f'the model pools at token {config.model.eot_id}.')
    path = save_workdir(config, model, workdir)
    if tokenizer is not None:
        tokenizer.save(storage.join(workdir, TOKENIZER_FILE))
        assets.record(workdir, TOKENIZER_FILE)
    n = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return (f'CLIP ViT-{config.model.vision_width}w/{config.model.patch_size} at '
            f'{config.data.image_size}px, {n:,} parameters -> {path}; tokenizer: '
            + (type(tokenizer).__name__ if tokenizer else
               'none (no vocab.json + merges.txt or tokenizer.json in --src)'))

