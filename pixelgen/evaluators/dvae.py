"""Eval-job evaluators of the dVAE: reconstruction quality and codebook usage, with a PNG.

  python -m pixelgen.evaluate --workdir W --eval reconstruction [--num_examples 1000]
"""

from __future__ import annotations

import math
import os

import numpy as np

from pixelgen.data import pipeline
from pixelgen.evaluators import EvalContext

GRID_IMAGES = 16


def reconstruction(ctx: EvalContext) -> dict[str, float]:
    """MSE and PSNR of argmax-code reconstructions of the eval split, the codebook's
    perplexity and number of codes used over all of it, and a grid PNG (originals above their
    reconstructions) in ctx.out_dir."""
    from pixelgen.dvae import compiled, encode_source
    from pixelgen.tasks.dvae import write_reconstruction_grid

    model, config = ctx.loaded.model, ctx.loaded.config
    d = config.data
    source = pipeline.open_source(d.dataset, d.eval_split, d.data_dir)
    n = min(len(source), ctx.num_examples) if ctx.num_examples else len(source)
    decode = compiled(model, 'decode')
    counts = np.zeros(model.codebook_size, np.int64)
    sq_err, originals, batch = 0.0, [], []

    def flush() -> float:
        codes = np.stack([e['codes'] for e in batch]).astype(np.int32)
        x = np.stack([e['image'] for e in batch]).astype(np.float32) / 255.0
        return float(np.sum(np.mean(np.square(np.asarray(decode(codes)) - x), axis=(1, 2, 3))))

    for example in encode_source(model, source, image_size=d.image_size, batch_size=64, end=n):
        counts += np.bincount(example['codes'].ravel(), minlength=model.codebook_size)
        if len(originals) < GRID_IMAGES:
            originals.append(example['image'])
        batch.append(example)
        if len(batch) == 64:
            sq_err, batch = sq_err + flush(), []
    if batch:
        sq_err += flush()
    mse = sq_err / n
    p = counts[counts > 0] / counts.sum()
    path = os.path.join(ctx.out_dir, f'reconstructions_{ctx.loaded.step:07d}.png')
    write_reconstruction_grid(model, np.stack(originals), path)
    return {'mse': mse, 'psnr': -10 * math.log10(max(mse, 1e-10)),
            'perplexity': float(np.exp(-np.sum(p * np.log(p)))),
            'codes_used': float(len(p)), 'examples': float(n)}


EVALUATORS = {'reconstruction': reconstruction}
