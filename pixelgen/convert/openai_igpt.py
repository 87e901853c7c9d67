"""OpenAI's released iGPT TF checkpoints (openai/image-gpt download.py) -> pixelgen iGPT.

  python -m pixelgen.convert --from openai-igpt --src DIR --workdir OUT

DIR holds one checkpoint, `model.ckpt-N.index` with its `model.ckpt-N.data-*-of-*` shards,
and `kmeans_centers.npy`, the 512 colour clusters that become the palette. TensorFlow is not
needed: the bundle is read directly (see _tf_bundle.py). The variables are those of
openai/image-gpt src/model.py, whose layout pixelgen's model keeps:
  model/wte [k, d], model/wpe [n, d], model/sos [d], model/wtet [k, d],
  model/h{i}/ln_1/g, model/h{i}/ln_2/g, model/ln_f/g [d],
  model/h{i}/attn/{q,k,v,c}_proj [heads, d / heads, d], model/h{i}/mlp/c_fc/w [d, 4d],
  model/h{i}/mlp/c_proj/w [4d, d].
Optimizer slots and counters beside them are skipped. BERT checkpoints (igpt-*-bert) have no
sos vector; they become `objective='bert'` workdirs whose mask token (the extra row of wte) is
the zero vector, which is exactly how openai/image-gpt masks (`h = wte[x] * keep`).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from pixelgen.convert import _igpt_common as common
from pixelgen.convert._igpt_common import ConversionError
from pixelgen.convert._tensors import check_finite
from pixelgen.convert._tf_bundle import Bundle

NAME = 'openai-igpt'
DESCRIPTION = ('OpenAI iGPT TF checkpoint (model.ckpt-N.index + .data-* shards, '
               'kmeans_centers.npy); no TensorFlow needed')

CLUSTERS_FILE = 'kmeans_centers.npy'
# Training state saved beside the weights: Adam slots, step counters, Adam's beta powers.
OPTIMIZER_STATE = re.compile(r'.*/(Adam|Adam_1|adam_m|adam_v)|.*global_step|beta[12]_power')
# The classifier head of run.py --clf; openai never released it (the saver excludes it).
CLASSIFIER = re.compile(r'model/clf/.*')


def find_checkpoint(src: str) -> str:
    """The checkpoint prefix in `src` (the newest step if it holds several)."""
    indexes = glob.glob(os.path.join(src, 'model.ckpt-*.index'))
    if not indexes:
        found = sorted(os.listdir(src)) if os.path.isdir(src) else 'not a folder'
        raise ConversionError(f'{src} holds no model.ckpt-*.index (found: {found}); download a '
                              'checkpoint with openai/image-gpt download.py --model s --ckpt N.')

    def step(path: str) -> int:
        match = re.fullmatch(r'model\.ckpt-(\d+)\.index', os.path.basename(path))
        return int(match.group(1)) if match else -1
    return max(indexes, key=step).removesuffix('.index')


class _Variables:
    """Reads bundle variables once each, checking shapes, so that leftovers can be reported."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.taken: set[str] = set()

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.bundle.entries:
            raise ConversionError(f'Variable {name!r} is missing from {self.bundle.prefix}.')
        return self.bundle.entries[name].shape

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        stored = self.shape(name)
        # TF1 conv1d weights are sometimes stored with a leading [1] (GPT-2 style).
        if stored != shape and [s for s in stored if s != 1] != [s for s in shape if s != 1]:
            raise ConversionError(f'Variable {name!r} has shape {stored}; the rest of the '
                                  f'checkpoint implies {shape}.')
        self.taken.add(name)
        value = check_finite(name, self.bundle.read(name), self.bundle.prefix)
        return value.astype(np.float32).reshape(shape)

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(skipped training-state names, unknown names) among the variables not taken."""
        left = sorted(set(self.bundle.entries) - self.taken)
        skipped = [n for n in left if OPTIMIZER_STATE.fullmatch(n) or CLASSIFIER.fullmatch(n)]
        return skipped, [n for n in left if n not in skipped]


def to_pixelgen(bundle: Bundle) -> tuple[dict, str, list[str]]:
    """Bundle variables -> (pixelgen parameters, objective 'ar' or 'bert', names of the skipped
    training state)."""
    v = _Variables(bundle)
    names = bundle.entries
    if 'model/wte' not in names:
        raise ConversionError(f'{bundle.prefix} has no model/wte; it is not an openai/image-gpt '
                              f'checkpoint (its first variables: {sorted(names)[:5]}).')
    objective = 'ar' if 'model/sos' in names else 'bert'  # BERT runs create no sos
    vocab, d = v.shape('model/wte')
    layers = len({m.group(1) for n in names if (m := re.match(r'model/h(\d+)/', n))})
    heads = v.shape('model/h0/attn/q_proj')[0]
    hidden = v.shape('model/h0/mlp/c_fc/w')[-1]
    if d % heads:
        raise ConversionError(f'{bundle.prefix}: model/h0/attn/q_proj has {heads} heads, which '
                              f'do not divide the width {d}.')
    e = d // heads
    blocks = []
    for i in range(layers):
        p = f'model/h{i}/'
        attn = {name: v.take(f'{p}attn/{name}', (heads, e, d))
                for name in ('q_proj', 'k_proj', 'v_proj', 'c_proj')}
        blocks.append(common.block_params(
            i, norm1=v.take(p + 'ln_1/g', (d,)),
            # TF computes einsum('bsf,hef->bhse', x, w): pixelgen's kernels are [d, heads, e].
            query=attn['q_proj'].transpose(2, 0, 1), key=attn['k_proj'].transpose(2, 0, 1),
            value=attn['v_proj'].transpose(2, 0, 1), out=attn['c_proj'],
            norm2=v.take(p + 'ln_2/g', (d,)), fc=v.take(p + 'mlp/c_fc/w', (d, hidden)),
            proj=v.take(p + 'mlp/c_proj/w', (hidden, d))))
    wte = v.take('model/wte', (vocab, d))
    if objective == 'bert':
        wte = np.concatenate([wte, np.zeros((1, d), np.float32)])  # the mask token
    params = common.model_params(
        wte=wte, wpe=v.take('model/wpe', (v.shape('model/wpe')[0], d)),
        sos=v.take('model/sos', (d,)) if objective == 'ar' else None,
        ln_f=v.take('model/ln_f/g', (d,)), head=v.take('model/wtet', (vocab, d)).T,
        blocks=blocks)
    skipped, unknown = v.leftovers()
    if unknown:
        raise ConversionError(f'{bundle.prefix} holds variables pixelgen iGPT has no place for: '
                              f'{unknown[:10]}{" ..." if len(unknown) > 10 else ""}.')
    return params, objective, skipped


def convert(src: str, workdir: str) -> str:
    prefix = find_checkpoint(src)
    clusters_path = os.path.join(src, CLUSTERS_FILE)
    if not os.path.isfile(clusters_path):
        raise ConversionError(f'{clusters_path} is missing; download the colour clusters with '
                              'openai/image-gpt download.py --clusters.')
    palette = common.check_palette(np.load(clusters_path), clusters_path)
    params, objective, skipped = to_pixelgen(Bundle(prefix))
    summary = common.write_workdir(params, palette, workdir, objective=objective)
    return f'{os.path.basename(prefix)}: {summary} ({len(skipped)} training-state tensors skipped)'
