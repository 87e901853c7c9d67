"""What the iGPT importers share: pixelgen's parameter layout and writing the workdir.

Each importer reads its format, checks it against that format's own names, and hands over
the weights in pixelgen's layout (`block_params`, `model_params`); `write_workdir` then
checks them against the model a config builds, and writes config, checkpoint and palette.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelgen.config import ConfigDict, ConfigError, load_config_file
from pixelgen.convert import save_workdir
from pixelgen.convert._tensors import ConversionError
from pixelgen.data.palette import save_palette

Path = tuple[str | int, ...]

# The paper sizes live in configs/igpt.py; a converted model keeps its size's training settings
# (batch, learning rate, remat) so that fine-tuning from it starts from sensible values.
PAPER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'igpt.py')
PAPER_SIZES = ('s', 'm', 'l', 'xl')


def block_params(index: int, *, norm1, query, key, value, out, norm2, fc, proj) -> dict[Path,
                                                                                       np.ndarray]:
    """One transformer block in pixelgen's layout (d = width, h = heads, e = d / h):
    norm1, norm2 [d]; query, key, value [d, h, e]; out [h, e, d]; fc [d, r*d]; proj [r*d, d]."""
    prefix = ('transformer', 'blocks', index)
    return {
        prefix + ('norm1', 'scale'): norm1,
        prefix + ('attn', 'query', 'kernel'): query,
        prefix + ('attn', 'key', 'kernel'): key,
        prefix + ('attn', 'value', 'kernel'): value,
        prefix + ('attn', 'out', 'kernel'): out,
        prefix + ('norm2', 'scale'): norm2,
        prefix + ('mlp', 'fc', 'kernel'): fc,
        prefix + ('mlp', 'proj', 'kernel'): proj,
    }


def model_params(*, wte, wpe, sos, ln_f, head, blocks: list[dict]) -> dict[Path, np.ndarray]:
    """The whole model: wte [k, d] (palette tokens; k + 1 rows with BERT's mask token), wpe
    [n, d], sos [d] (None for BERT), ln_f [d], head [d, k] (logits = ln_f(h) @ head), and
    `blocks` from `block_params`."""
    params = {('wte', 'embedding'): wte, ('wpe',): wpe, ('ln_f', 'scale'): ln_f,
              ('head', 'kernel'): head}
    if sos is not None:
        params[('sos',)] = sos
    for block in blocks:
        params.update(block)
    return params


def _paper_template(num_layers: int, width: int, num_heads: int) -> tuple[ConfigDict, str]:
    """The configs/igpt.py size with this shape (else iGPT-S's settings) and its name."""
    if not os.path.isfile(PAPER_CONFIG):
        raise ConfigError(f'{PAPER_CONFIG} is missing; the converters take their training '
                          'settings from it. Run from a source checkout of pixelgen.')
    for size in PAPER_SIZES:
        config = load_config_file(f'{PAPER_CONFIG}:{size}')
        m = config.model
        if (m.num_layers, m.width, m.num_heads) == (num_layers, width, num_heads):
            return config, f'iGPT-{size.upper()}'
    return load_config_file(f'{PAPER_CONFIG}:s'), 'custom size'


def make_config(params: dict[Path, np.ndarray], palette_size: int,
                objective: str) -> tuple[ConfigDict, str]:
    """The pixelgen iGPT config whose model has exactly these parameters' shapes."""
    width, vocab = params[('head', 'kernel')].shape
    seq_len = params[('wpe',)].shape[0]
    num_layers = len({p[2] for p in params if p[0] == 'transformer'})
    num_heads = params[('transformer', 'blocks', 0, 'attn', 'query', 'kernel')].shape[1]
    hidden = params[('transformer', 'blocks', 0, 'mlp', 'fc', 'kernel')].shape[1]
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ConversionError(f'The model has {seq_len} positions, not a square image; pixelgen '
                              'iGPT models raster-scan square images (e.g. 1024 = 32 x 32).')
    if hidden % width:
        raise ConversionError(f'The MLP width {hidden} is not a multiple of the model width '
                              f'{width}; pixelgen iGPT needs an integer mlp_ratio.')
    if vocab != palette_size:
        raise ConversionError(f'The model predicts {vocab} colours but the palette has '
                              f'{palette_size}; the clusters file belongs to another model.')
    config, label = _paper_template(num_layers, width, num_heads)
    config.model.num_layers = num_layers
    config.model.width = width
    config.model.num_heads = num_heads
    config.model.mlp_ratio = hidden // width
    config.data.image_size = side
    config.data.palette_size = palette_size
    config.objective = objective
    config.model.num_classes = 0  # released weights carry no classifier
    config.model.scan_layers = False  # written in the looped layout, blocks/<i>/...
    return config, label


def check_palette(palette: np.ndarray, source: str) -> np.ndarray:
    """[k, 3] colour centres in [-1, 1] RGB (as openai/image-gpt and HF store them)."""
    palette = np.asarray(palette, np.float32)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ConversionError(f'{source}: expected colour clusters of shape [k, 3]; got '
                              f'{palette.shape}.')
    if not np.all(np.isfinite(palette)) or np.abs(palette).max() > 1.0 + 1e-3:
        raise ConversionError(f'{source}: colour clusters must lie in [-1, 1] (RGB / 127.5 - 1); '
                              f'they range over [{palette.min():.3g}, {palette.max():.3g}].')
    return palette


def write_workdir(params: dict[Path, np.ndarray], palette: np.ndarray, workdir: str, *,
                  objective: str = 'ar') -> str:
    """Builds the model a config describes, fills it with `params`, writes the workdir
    (config, step-0 checkpoint, palette.npy). Returns a one-line description."""
    from pixelgen.tasks import igpt

    config, label = make_config(params, len(palette), objective)
    abstract = nnx.eval_shape(lambda: igpt.build_model(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat, unfilled = [], []
    for path, variable in nnx.to_flat_state(state):
        if path not in params:
            unfilled.append(path)
            continue
        value = np.asarray(params[path])
        if value.shape != variable.shape:
            raise ConversionError(f'{"/".join(map(str, path))}: the converted tensor has shape '
                                  f'{value.shape}; the model needs {variable.shape}.')
        flat.append((path, variable.replace(value=jnp.asarray(value, jnp.float32))))
    extra = set(params) - {path for path, _ in flat}
    if unfilled or extra:
        raise ConversionError(f'Parameters do not match the model: missing {unfilled}, '
                              f'unexpected {sorted(extra, key=str)}.')
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    save_workdir(config, model, workdir)
    save_palette(palette, workdir)
    count = sum(v.size for v in params.values())
    m = config.model
    return (f'{label} ({objective}): {m.num_layers} layers, width {m.width}, {m.num_heads} heads, '
            f'{config.data.image_size}x{config.data.image_size} pixels, '
            f'{config.data.palette_size} colours, {count:,} parameters -> {workdir}')
