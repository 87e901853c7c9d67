"""HuggingFace `ViTForImageClassification` checkpoints <-> a pixelgen ViT workdir.

The source folder is what `ViTForImageClassification.save_pretrained` (or a hub download,
e.g. google/vit-base-patch16-224) holds: config.json, model.safetensors (or shards, or
pytorch_model.bin) and preprocessor_config.json, whose image_mean / image_std become the
config's data.mean / data.std, so `pixelgen.load(OUT).model(images in [0, 1])` gives the
checkpoint's logits. The mapping goes both ways: `hf_state_dict` and `hf_config` write the
same format back (pixelgen.export --to hf-vit).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from pixelgen.config import ConfigError
from pixelgen.convert import save_workdir
from pixelgen.convert.hf_clip import read_state_dict
from pixelgen.tasks.vit import base_config, build_model

NAME = 'hf-vit'
DESCRIPTION = ('a HuggingFace ViTForImageClassification folder (config.json, *.safetensors or '
               'pytorch_model.bin, preprocessor_config.json)')

# transformers >= 5 names its modules differently from the released (and saved) checkpoints;
# both are read, the released names are written.
_NEW_TO_RELEASED = (('vit.layers.', 'vit.encoder.layer.'),
                    ('attention.q_proj', 'attention.attention.query'),
                    ('attention.k_proj', 'attention.attention.key'),
                    ('attention.v_proj', 'attention.attention.value'),
                    ('attention.o_proj', 'attention.output.dense'),
                    ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense'))
# pixelgen block parameter -> the released name's suffix within `vit.encoder.layer.<i>.`
_BLOCK = {('attn', 'query'): 'attention.attention.query',
          ('attn', 'key'): 'attention.attention.key',
          ('attn', 'value'): 'attention.attention.value',
          ('attn', 'out'): 'attention.output.dense',
          ('mlp', 'fc'): 'intermediate.dense', ('mlp', 'proj'): 'output.dense'}
_NORMS = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after'}


def released_names(weights: dict) -> dict:
    """The state dict with transformers >= 5 module names turned into the released ones."""
    out = {}
    for name, value in weights.items():
        for new, old in _NEW_TO_RELEASED:
            name = name.replace(new, old)
        out[name] = value
    return out


def config_from_hf(hf: dict, folder: str, processor: dict | None = None):
    """The pixelgen ViT config of a HuggingFace ViTConfig dict (and its image processor's)."""
    problems = []
    ratio = hf['intermediate_size'] / hf['hidden_size']
    if not float(ratio).is_integer():
        problems.append(f'intermediate_size / hidden_size must be a whole number, got {ratio}')
    if hf.get('hidden_act', 'gelu') != 'gelu':
        problems.append(f"hidden_act must be 'gelu', got {hf.get('hidden_act')!r}")
    if not hf.get('qkv_bias', True):
        problems.append('qkv_bias must be true')
    if hf.get('num_channels', 3) != 3:
        problems.append('only RGB models (num_channels=3) are supported')
    if problems:
        raise ConfigError(f'{folder}/config.json is a ViT that pixelgen cannot represent: '
                          + '; '.join(problems) + '.')
    c = base_config()
    c.data.image_size = hf['image_size']
    c.data.label_key = 'label'
    c.model.patch_size = hf['patch_size']
    c.model.width = hf['hidden_size']
    c.model.num_layers = hf['num_hidden_layers']
    c.model.num_heads = hf['num_attention_heads']
    c.model.mlp_ratio = int(ratio)
    c.model.num_classes = len(hf.get('id2label') or {}) or hf.get('num_labels', 2)
    c.model.norm_eps = float(hf.get('layer_norm_eps', 1e-12))
    c.model.activation = 'gelu'
    if processor:
        c.data.mean = tuple(float(v) for v in processor.get('image_mean', c.data.mean))
        c.data.std = tuple(float(v) for v in processor.get('image_std', c.data.std))
    return c


def _linear(w: np.ndarray) -> np.ndarray:
    return w.T  # torch [out, in] <-> [in, out]


def params_from_hf(weights: dict, config) -> dict:
    """A pure dict of the pixelgen ViT's parameters from a ViTForImageClassification state
    dict (released or transformers >= 5 names)."""
    w = released_names(weights)
    m = config.model
    heads, head_dim = m.num_heads, m.width // m.num_heads
    patch = w['vit.embeddings.patch_embeddings.projection.weight']  # [width, 3, p, p]
    blocks = {}
    for i in range(m.num_layers):
        p = f'vit.encoder.layer.{i}.'
        block = {norm: {'scale': w[p + hf + '.weight'], 'bias': w[p + hf + '.bias']}
                 for norm, hf in _NORMS.items()}
        block['attn'], block['mlp'] = {}, {}
        for (part, name), hf in _BLOCK.items():
            kernel, bias = _linear(w[p + hf + '.weight']), w[p + hf + '.bias']
            if name in ('query', 'key', 'value'):
                kernel, bias = (kernel.reshape(m.width, heads, head_dim),
                                bias.reshape(heads, head_dim))
            elif name == 'out':
                kernel = kernel.reshape(heads, head_dim, m.width)
            block[part][name] = {'kernel': kernel, 'bias': bias}
        blocks[i] = block
    return {
        'encoder': {
            # conv [width, c, p1, p2] -> matmul on patches flattened as (p1 p2 c)
            'patch_embed': {'kernel': patch.transpose(2, 3, 1, 0).reshape(-1, patch.shape[0]),
                            'bias': w['vit.embeddings.patch_embeddings.projection.bias']},
            'class_embedding': w['vit.embeddings.cls_token'].reshape(-1),
            'position_embedding': w['vit.embeddings.position_embeddings'][0],
            'transformer': {'blocks': blocks},
            'ln_post': {'scale': w['vit.layernorm.weight'], 'bias': w['vit.layernorm.bias']},
        },
        'head': {'kernel': _linear(w['classifier.weight']), 'bias': w['classifier.bias']},
    }


def hf_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf`: a pure dict of a ViT's parameters -> a
    ViTForImageClassification state dict (released names, float32)."""
    check_exportable(config)
    m = config.model
    e = params['encoder']
    p = m.patch_size
    kernel = np.asarray(e['patch_embed']['kernel'])  # [(p1 p2 c), width]
    out = {
        'vit.embeddings.patch_embeddings.projection.weight':
            kernel.reshape(p, p, 3, m.width).transpose(3, 2, 0, 1),
        'vit.embeddings.patch_embeddings.projection.bias': e['patch_embed']['bias'],
        'vit.embeddings.cls_token': np.asarray(e['class_embedding']).reshape(1, 1, -1),
        'vit.embeddings.position_embeddings': np.asarray(e['position_embedding'])[None],
        'vit.layernorm.weight': e['ln_post']['scale'], 'vit.layernorm.bias': e['ln_post']['bias'],
        'classifier.weight': _linear(np.asarray(params['head']['kernel'])),
        'classifier.bias': params['head']['bias'],
    }
    for i, block in e['transformer']['blocks'].items():
        prefix = f'vit.encoder.layer.{i}.'
        for norm, hf in _NORMS.items():
            out[prefix + hf + '.weight'] = block[norm]['scale']
            out[prefix + hf + '.bias'] = block[norm]['bias']
        for (part, name), hf in _BLOCK.items():
            kernel = np.asarray(block[part][name]['kernel'])
            if name in ('query', 'key', 'value'):
                kernel = kernel.reshape(m.width, -1)  # [width, heads, head_dim] -> [in, out]
            elif name == 'out':
                kernel = kernel.reshape(-1, m.width)  # [heads, head_dim, width]
            out[prefix + hf + '.weight'] = _linear(kernel)
            out[prefix + hf + '.bias'] = np.asarray(block[part][name]['bias']).reshape(-1)
    return {k: np.asarray(v, np.float32).copy(order='C') for k, v in out.items()}


def check_exportable(config) -> None:
    """ViTForImageClassification has a class token, one linear head and GELU."""
    m = config.model
    problems = []
    if m.pool != 'token':
        problems.append(f"model.pool={m.pool!r} (HF's ViT pools the class token)")
    if m.representation_size:
        problems.append(f'model.representation_size={m.representation_size} (HF\'s classifier '
                        'is one linear layer)')
    if m.activation != 'gelu':
        problems.append(f"model.activation={m.activation!r} (HF's ViT uses 'gelu')")
    if problems:
        raise ConfigError('This ViT has no ViTForImageClassification equivalent: '
                          + '; '.join(problems) + '. Export it with --to safetensors.')


def hf_config(config, class_names: list[str] | None = None) -> dict:
    """config.json of the ViTForImageClassification equal to `config`'s model."""
    m = config.model
    names = class_names or [f'LABEL_{i}' for i in range(m.num_classes)]
    return {
        'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
        'hidden_size': m.width, 'num_hidden_layers': m.num_layers,
        'num_attention_heads': m.num_heads, 'intermediate_size': m.mlp_ratio * m.width,
        'hidden_act': 'gelu', 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
        'layer_norm_eps': float(m.norm_eps), 'image_size': config.data.image_size,
        'patch_size': m.patch_size, 'num_channels': 3, 'qkv_bias': True,
        'initializer_range': 0.02, 'encoder_stride': m.patch_size,
        'id2label': {str(i): n for i, n in enumerate(names)},
        'label2id': {n: i for i, n in enumerate(names)}, 'torch_dtype': 'float32',
    }


def hf_processor(config) -> dict:
    """preprocessor_config.json: resize to the model's side, scale to [0, 1], normalise."""
    side = config.data.image_size
    return {'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
            'size': {'height': side, 'width': side}, 'resample': 2, 'do_rescale': True,
            'rescale_factor': 1 / 255, 'do_normalize': True,
            'image_mean': list(config.data.mean), 'image_std': list(config.data.std)}


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_model(src: str):
    """(config, pixelgen ViT with the checkpoint's weights) of a ViTForImageClassification
    folder."""
    hf = _read_json(os.path.join(src, 'config.json'))
    if hf is None:
        raise FileNotFoundError(f'{src} has no config.json; pass the folder that '
                                'ViTForImageClassification.save_pretrained wrote.')
    config = config_from_hf(hf, src, _read_json(os.path.join(src, 'preprocessor_config.json')))
    model = build_model(config, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    expected = nnx.to_pure_dict(state)
    loaded = params_from_hf(read_state_dict(src), config)

    def check(path, want, got):
        if np.shape(want) != np.shape(got):
            raise ValueError(f'{src}: parameter {"/".join(map(str, path))} has shape '
                             f'{np.shape(got)} in the checkpoint but {np.shape(want)} in the '
                             'model its config.json describes.')
    jax.tree_util.tree_map_with_path(check, expected, loaded)
    nnx.replace_by_pure_dict(state, loaded)
    nnx.update(model, state)
    return config, model


def convert(src: str, workdir: str) -> str:
    config, model = load_model(src)
    path = save_workdir(config, model, workdir)
    n = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    m = config.model
    return (f'ViT {m.num_layers} layers x {m.width} /{m.patch_size} at {config.data.image_size}'
            f'px, {m.num_classes} classes, {n:,} parameters -> {path}')
