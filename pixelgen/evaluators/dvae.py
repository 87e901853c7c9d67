"""Eval-job evaluators of the dVAE: reconstruction quality and codebook usage, with a PNG.

  python -m pixelgen.evaluate --workdir W --eval reconstruction [--num_examples 1000]

For the `shapes` dataset it also reports whether the reconstructions are recognisably right:
the colour and shape that the DALL·E evaluators' attribute classifier reads from the
reconstructions of one-object test images (`color_accuracy`, `shape_accuracy`,
`both_accuracy`; the classifier is right on 100% of real test images).
"""

from __future__ import annotations

import math

import numpy as np

from pixelgen import storage
from pixelgen.data import pipeline
from pixelgen.evaluators import EvalContext

GRID_IMAGES = 16


def reconstruction(ctx: EvalContext) -> dict[str, float]:
    """MSE and PSNR of argmax-code reconstructions of the eval split, the codebook's
    perplexity and number of codes used over all of it, and a grid PNG (originals above their
    reconstructions) in ctx.out_dir."""
    from pixelgen.dvae import compiled, encode_source
    from pixelgen.evaluators.dalle import AttributeClassifier, attribute_accuracies, parse_caption
    from pixelgen.tasks.dvae import to_uint8, write_reconstruction_grid

    model, config = ctx.loaded.model, ctx.loaded.config
    d = config.data
    source = pipeline.open_source(d.dataset, d.eval_split, d.data_dir)
    n = min(len(source), ctx.num_examples) if ctx.num_examples else len(source)
    decode = compiled(model, 'decode')
    counts = np.zeros(model.codebook_size, np.int64)
    sq_err, originals, batch = 0.0, [], []
    judge = d.dataset == 'shapes'  # captions name the attributes of one-object images
    attributes, pictures = [], []

    def flush() -> float:
        codes = np.stack([e['codes'] for e in batch]).astype(np.int32)
        x = np.stack([e['image'] for e in batch]).astype(np.float32) / 255.0
        decoded = np.asarray(decode(codes))
        for e, picture in zip(batch, decoded, strict=True):
            if judge and (truth := parse_caption(e['caption'])) is not None:
                attributes.append(truth)
                pictures.append(picture)
        return float(np.sum(np.mean(np.square(decoded - x), axis=(1, 2, 3))))

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
    path = storage.join(ctx.out_dir, f'reconstructions_{ctx.loaded.step:07d}.png')
    write_reconstruction_grid(model, np.stack(originals), path)
    metrics = {'mse': mse, 'psnr': -10 * math.log10(max(mse, 1e-10)),
               'perplexity': float(np.exp(-np.sum(p * np.log(p)))),
               'codes_used': float(len(p)), 'examples': float(n)}
    if pictures:
        truth = np.array(attributes)
        classifier = AttributeClassifier(d.data_dir, int(ctx.options.get('classifier_images',
                                                                         3000)))
        metrics.update(attribute_accuracies(classifier, to_uint8(np.stack(pictures)),
                                            truth[:, 0], truth[:, 1], ''))
        metrics['judged_examples'] = float(len(pictures))
    return metrics


EVALUATORS = {'reconstruction': reconstruction}
