"""OpenAI's released dVAE (the `DALL-E` package's Encoder and Decoder) -> a pixelgen workdir.

    python -m pixelgen.convert --from openai-dvae --src DIR --workdir OUT

DIR holds `encoder.pt` and `decoder.pt`: the modules' state dicts, read with
`torch.load(weights_only=True)` (plain tensors, no code is unpickled). OpenAI publishes
pickled modules (`encoder.pkl`, `decoder.pkl`), which only an unsafe unpickler can open. Turn
them into state dicts once, outside pixelgen, where you trust the files and have `DALL-E`:

    python -c "import torch
    for n in ('encoder', 'decoder'):
        torch.save(torch.load(f'{n}.pkl', weights_only=False).state_dict(), f'{n}.pt')"

Sizes (base widths, blocks per group, codebook) are read from the tensors. Torch convs are
[out, in, k, k] in NCHW; pixelgen's are [k, k, in, out] in NHWC.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from pixelgen.config import ConfigError, load_config_file
from pixelgen.convert import save_workdir
from pixelgen.convert._tensors import read_tensor_file
from pixelgen.models.dvae import DVAE

NAME = 'openai-dvae'
DESCRIPTION = "OpenAI's DALL-E dVAE: encoder.pt + decoder.pt state dicts of the dall_e package"
GROUPS = 4  # the release always has 4 groups, widths 1, 2, 4, 8 x n_hid
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'dvae.py')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch state dict file -> {name: float32 array}, without unpickling code."""
    if not os.path.isfile(path):
        pickled = os.path.splitext(path)[0] + '.pkl'
        hint = (f' {pickled} is a pickled module: save its state_dict() as {path} first (see '
                'python -m pixelgen.convert --help and pixelgen/convert/openai_dvae.py).'
                if os.path.isfile(pickled) else '')
        raise FileNotFoundError(f'{path} not found.{hint}')
    state = read_tensor_file(path)  # plain tensors only, each finite
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _blocks_per_group(state: dict) -> int:
    return len({k.split('.')[2] for k in state if k.startswith('blocks.group_1.block_')})


def sizes_of(encoder: dict, decoder: dict) -> dict:
    """The config.model fields of the release that wrote these state dicts."""
    return {'encoder_width': encoder['blocks.input.w'].shape[0],
            'decoder_width': decoder['blocks.output.conv.w'].shape[1],
            'decoder_init_width': decoder['blocks.input.w'].shape[0],
            'codebook_size': encoder['blocks.output.conv.w'].shape[0],
            'blocks_per_group': _blocks_per_group(encoder),
            'width_multipliers': (1, 2, 4, 8)}


def make_config(sizes: dict, image_size: int = 256):
    config = load_config_file(CONFIG)
    for key, value in sizes.items():
        config.model[key] = value
    config.model.dtype = 'float32'  # the release's CPU path; parity is tested in float32
    config.data.image_size = image_size
    return config


def _convs(module: DVAE, side: str):
    """(torch name prefix, nnx.Conv) of one half of the model, in the release's naming."""
    half = module.encoder if side == 'encoder' else module.decoder
    yield 'blocks.input', half.input
    for g, group in enumerate(half.groups):
        for b, block in enumerate(group):
            prefix = f'blocks.group_{g + 1}.block_{b + 1}'
            if block.id_path is not None:
                yield f'{prefix}.id_path', block.id_path
            for i, layer in enumerate(block.res_path):
                yield f'{prefix}.res_path.conv_{i + 1}', layer
    yield 'blocks.output.conv', half.output


def load_into(model: DVAE, encoder: dict, decoder: dict) -> None:
    """Copies the release's tensors into `model` (whose sizes must match), checking that every
    tensor is used exactly once and every shape matches."""
    for side, state in (('encoder', encoder), ('decoder', decoder)):
        unused = set(state)
        for name, layer in _convs(model, side):
            w, b = state.get(f'{name}.w'), state.get(f'{name}.b')
            if w is None or b is None:
                raise ConfigError(f'The {side} state dict lacks {name}.w/.b; is it from the '
                                  'dall_e package with 4 groups?')
            kernel = np.transpose(w, (2, 3, 1, 0))  # [out, in, k, k] -> [k, k, in, out]
            if kernel.shape != layer.kernel.shape or b.shape != layer.bias.shape:
                raise ConfigError(f'{side} {name}: the release has {w.shape}, pixelgen expects '
                                  f'{layer.kernel.shape} (kernel [k, k, in, out]).')
            layer.kernel[...] = kernel
            layer.bias[...] = b
            unused -= {f'{name}.w', f'{name}.b'}
        if unused:
            raise ConfigError(f'The {side} state dict has tensors pixelgen does not use: '
                              f'{sorted(unused)[:5]}')


def convert(src: str, workdir: str) -> str:
    from pixelgen.tasks.dvae import build_model

    encoder = load_state_dict(os.path.join(src, 'encoder.pt'))
    decoder = load_state_dict(os.path.join(src, 'decoder.pt'))
    config = make_config(sizes_of(encoder, decoder))
    model = build_model(config, nnx.Rngs(config.seed))
    load_into(model, encoder, decoder)
    path = save_workdir(config, model, workdir)
    m = config.model
    return (f'OpenAI dVAE (base widths {m.encoder_width}/{m.decoder_width}, '
            f'{m.blocks_per_group} blocks per group, {m.codebook_size} codes, '
            f'{config.data.image_size}px -> {config.data.image_size // 8}x'
            f'{config.data.image_size // 8}) written to {path}')
