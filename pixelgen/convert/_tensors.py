"""Reading released weight files safely: every importer reads tensors through here.

- `.safetensors` files are read with safetensors; anything else with
  `torch.load(weights_only=True)`, which unpickles plain tensors only, never code. A file
  that is truncated, damaged or a pickled module is a ConversionError naming the file.
- Every tensor read must be finite: NaN or Inf is refused, naming the tensor and file (a
  model with them samples token 0 everywhere).
- Shard files named by an index (`*.index.json`) must lie inside `--src`.
"""

from __future__ import annotations

import os

import numpy as np

from pixelgen.config import ConfigError


class ConversionError(ConfigError):
    """The source files cannot become a pixelgen model; the message names the file or tensor.
    (A ConfigError: the command line prints it without a traceback.)"""


def check_finite(name: str, value: np.ndarray, source: str) -> np.ndarray:
    """`value`, if every entry is finite; else a ConversionError naming `name` in `source`."""
    value = np.asarray(value)
    if value.dtype.kind == 'f' or value.dtype.name.startswith(('bfloat', 'float')):
        as_float = value.astype(np.float32)
        bad = ~np.isfinite(as_float)
        if bad.any():
            raise ConversionError(
                f'{source}: tensor {name!r} holds {int(np.isnan(as_float).sum())} NaN and '
                f'{int(np.isinf(as_float).sum())} Inf values (of {value.size}); the weights '
                'are damaged or diverged. Convert a good copy of the release.')
    return value


def read_tensor_file(path: str) -> dict[str, np.ndarray]:
    """{name: array} of one weight file (safetensors, or a torch state dict), each checked
    finite. Torch floating tensors come back as float32."""
    if not os.path.isfile(path):
        raise ConversionError(f'{path} does not exist (or is not a regular file).')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework='np') as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f'{path} is not a readable safetensors file ({e}); it is '
                                  'truncated or damaged. Download it again.') from e
    else:
        import pickle

        import torch
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
                AttributeError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if isinstance(e, pickle.UnpicklingError):  # torch's own advice is to unpickle code
                first = 'it pickles objects other than plain tensors, e.g. a whole module'
            raise ConversionError(
                f'{path} could not be read as plain tensors ({first}). pixelgen reads torch '
                'files with weights_only=True and never unpickles code: if it is a pickled '
                "module, save its state_dict() with torch.save; if it is truncated, download "
                'it again.') from e
        if not isinstance(state, dict):
            raise ConversionError(f'{path} holds a {type(state).__name__}, not a state dict '
                                  "(name -> tensor); save the model's state_dict() into it.")
        tensors = {name: (t.detach().float() if t.is_floating_point() else t.detach()).numpy()
                   for name, t in state.items()}
    return {name: check_finite(name, value, path) for name, value in tensors.items()}


def file_inside(src: str, relative: str, index: str) -> str:
    """The path of `relative` (a file name from the index file `index`) inside `src`;
    a name that leads outside `src` (absolute, `..`, or a symlink out) is refused."""
    root = os.path.realpath(src)
    path = os.path.realpath(os.path.join(src, relative))
    if os.path.isabs(relative) or os.path.commonpath([root, path]) != root:
        raise ConversionError(f'{index} names the shard {relative!r}, which lies outside '
                              f'--src {src}; an index may only name files in its own folder.')
    return path
