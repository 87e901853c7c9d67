"""HuggingFace ImageGPT (`transformers` ImageGPTForCausalImageModeling) -> pixelgen iGPT.

  python -m pixelgen.convert --from hf-imagegpt --src DIR --workdir OUT

DIR holds what `save_pretrained` writes (the hub's openai/imagegpt-{small,medium,large}):
config.json, model.safetensors or pytorch_model.bin (or their sharded .index.json forms), and
preprocessor_config.json with the colour `clusters`, which become the workdir's palette.

The HF port (of OpenAI's TF checkpoints) differs from pixelgen's layout in three ways:
- the start of sequence is token `vocab_size - 1` (wte has k + 1 rows, lm_head k); here it is
  the separate `sos` vector, as in openai/image-gpt;
- q, k, v are packed into `c_attn` [d, 3d] (Conv1D: x @ W + b), heads split as h * e;
- every Conv1D has a bias, all zero in the released weights; pixelgen's model has none, so a
  non-zero bias is refused rather than silently dropped.
Tensors are read with safetensors, or torch.load(weights_only=True): never arbitrary pickles.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from pixelgen.convert import _igpt_common as common
from pixelgen.convert._tensors import ConversionError, file_inside, read_tensor_file

NAME = 'hf-imagegpt'
DESCRIPTION = ('HuggingFace ImageGPT (config.json, model.safetensors or pytorch_model.bin, '
               'preprocessor_config.json with clusters)')

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                'pytorch_model.bin.index.json')
# Buffers older checkpoints carry beside the parameters: the causal mask and its fill value.
IGNORED = re.compile(r'h\.\d+\.attn\.(bias|masked_bias)')
# Settings under which HF's forward pass is the original iGPT's (and pixelgen's).
REQUIRED_SETTINGS = {'activation_function': 'quick_gelu', 'layer_norm_epsilon': 1e-5,
                     'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
                     'add_cross_attention': False}


def _read_json(src: str, name: str) -> dict:
    path = os.path.join(src, name)
    if not os.path.isfile(path):
        raise ConversionError(f'{path} is missing; --src must be a folder written by '
                              'save_pretrained (model and image processor).')
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f'{path} is not valid JSON (line {e.lineno}: {e.msg}); it is '
                                  'truncated or damaged. Download it again.') from e


def load_tensors(src: str) -> dict[str, np.ndarray]:
    """{HF name: array} from the first weight file of WEIGHT_FILES found in `src`."""
    for name in WEIGHT_FILES:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith('.index.json'):
            return read_tensor_file(path)
        weight_map = _read_json(src, name).get('weight_map')
        if not isinstance(weight_map, dict):
            raise ConversionError(f'{path} has no "weight_map" of tensor names to shard files.')
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_tensor_file(file_inside(src, shard, path)))
        return tensors
    found = sorted(os.listdir(src)) if os.path.isdir(src) else 'not a folder'
    raise ConversionError(f'{src} holds none of {WEIGHT_FILES} (found: {found}).')


def _check_settings(hf: dict) -> None:
    if hf.get('model_type') != 'imagegpt':
        raise ConversionError(f'config.json has model_type={hf.get("model_type")!r}; expected '
                              "'imagegpt'.")
    for key, wanted in REQUIRED_SETTINGS.items():
        if key in hf and hf[key] != wanted:
            raise ConversionError(f'config.json has {key}={hf[key]!r}; pixelgen iGPT (like the '
                                  f'original) computes {key}={wanted!r} and cannot reproduce it.')


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ImageGPTForCausalImageModeling names the body `transformer.*`; ImageGPTModel does not."""
    out = {}
    for name, value in tensors.items():
        short = name.removeprefix('transformer.')
        if IGNORED.fullmatch(short):
            continue
        out[short] = np.asarray(value)
    return out


class _Tensors:
    """Takes named tensors once each, checking shapes, so that leftovers can be reported."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors
        self.taken: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ConversionError(f'Tensor {name!r} is missing from the checkpoint (expected '
                                  f'shape {shape}); is it an ImageGPTForCausalImageModeling?')
        value = self.tensors[name]
        if value.shape != shape:
            raise ConversionError(f'Tensor {name!r} has shape {value.shape}; config.json '
                                  f'implies {shape}.')
        self.taken.add(name)
        return value.astype(np.float32, copy=False)

    def zero_bias(self, name: str, shape: tuple[int, ...]) -> None:
        bias = self.take(name, shape)
        if np.any(bias != 0):
            raise ConversionError(
                f'Tensor {name!r} is non-zero (max |b| = {np.abs(bias).max():.3g}). pixelgen '
                'iGPT has no biases, like the original; the released weights have all-zero '
                'biases, so this checkpoint was trained further with biases and cannot be '
                'converted exactly.')

    def check_all_taken(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            raise ConversionError(f'Unexpected tensors in the checkpoint: {left[:10]}'
                                  f'{" ..." if len(left) > 10 else ""}; pixelgen iGPT has no '
                                  'place for them (a classification head cannot be imported).')


def to_pixelgen(tensors: dict[str, np.ndarray], hf: dict) -> dict:
    """HF tensors + config.json -> pixelgen parameters (see _igpt_common.model_params)."""
    d, heads, layers = hf['n_embd'], hf['n_head'], hf['n_layer']
    vocab, positions = hf['vocab_size'] - 1, hf['n_positions']  # vocab: colours, without sos
    hidden = hf.get('n_inner') or 4 * d
    if d % heads:
        raise ConversionError(f'config.json: n_head={heads} does not divide n_embd={d}.')
    e = d // heads
    t = _Tensors(_strip_prefix(tensors))
    wte = t.take('wte.weight', (vocab + 1, d))
    blocks = []
    for i in range(layers):
        p = f'h.{i}.'
        qkv = t.take(p + 'attn.c_attn.weight', (d, 3 * d))  # x @ W: columns are q | k | v
        t.zero_bias(p + 'attn.c_attn.bias', (3 * d,))
        t.zero_bias(p + 'attn.c_proj.bias', (d,))
        t.zero_bias(p + 'mlp.c_fc.bias', (hidden,))
        t.zero_bias(p + 'mlp.c_proj.bias', (d,))
        query, key, value = (qkv[:, j * d:(j + 1) * d].reshape(d, heads, e) for j in range(3))
        blocks.append(common.block_params(
            i, norm1=t.take(p + 'ln_1.weight', (d,)), query=query, key=key, value=value,
            out=t.take(p + 'attn.c_proj.weight', (d, d)).reshape(heads, e, d),
            norm2=t.take(p + 'ln_2.weight', (d,)),
            fc=t.take(p + 'mlp.c_fc.weight', (d, hidden)),
            proj=t.take(p + 'mlp.c_proj.weight', (hidden, d))))
    params = common.model_params(
        wte=wte[:vocab], sos=wte[vocab], wpe=t.take('wpe.weight', (positions, d)),
        ln_f=t.take('ln_f.weight', (d,)), head=t.take('lm_head.weight', (vocab, d)).T,
        blocks=blocks)
    t.check_all_taken()
    return params


def read_clusters(src: str) -> np.ndarray:
    """The image processor's colour clusters [k, 3] in [-1, 1]."""
    processor = _read_json(src, 'preprocessor_config.json')
    if processor.get('clusters') is None:
        raise ConversionError(f'{src}/preprocessor_config.json has no "clusters"; they are the '
                              "model's colour palette. Save the ImageGPTImageProcessor with it.")
    return common.check_palette(processor['clusters'], f'{src}/preprocessor_config.json')


def convert(src: str, workdir: str) -> str:
    hf = _read_json(src, 'config.json')
    _check_settings(hf)
    palette = read_clusters(src)
    params = to_pixelgen(load_tensors(src), hf)
    return common.write_workdir(params, palette, workdir)
