"""Eval-job evaluators of the dVAE: reconstruction quality and codebook usage, with a PNG.

  python -m pixelgen.evaluate --workdir W --eval reconstruction [--num_examples 1000]
      [--option captions=holdout]

For the `shapes` dataset it also reports whether the reconstructions are recognisably right:
the colour and shape that the DALL·E evaluators' attribute classifier reads from the
reconstructions of one-object test images (`color_accuracy`, `shape_accuracy`,
`both_accuracy`; the classifier is right on 100% of real test images), also per object
size (`small_shape_accuracy`, `large_shape_accuracy`, ...). With
--option captions=holdout only the test images whose caption names one of the run's
`data.holdout_phrases` are evaluated: the pairs that training never saw.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from pixelgen import parallel, storage
from pixelgen.config import ConfigError
from pixelgen.data import pipeline
from pixelgen.data.builders import shapes
from pixelgen.evaluators import EvalContext

GRID_IMAGES = 16


def reconstruction(ctx: EvalContext) -> dict[str, float]:
    """MSE and PSNR of argmax-code reconstructions of the eval split, the codebook's
    perplexity and number of codes used over all of it, and a grid PNG (originals above their
    reconstructions) in ctx.out_dir."""
    from pixelgen.dvae import compiled, encode_source
    from pixelgen.evaluators.dalle import (
        AttributeClassifier,
        attribute_accuracies,
        caption_size,
        parse_caption,
    )
    from pixelgen.tasks.dvae import to_uint8, write_reconstruction_grid

    model, config = ctx.loaded.model, ctx.loaded.config
    d = config.data
    source = pipeline.open_source(d.dataset, d.eval_split, d.data_dir)
    if ctx.options.get('captions', 'test') == 'holdout':
        source = pipeline.with_phrases(source, d.holdout_phrases)
    elif ctx.options.get('captions', 'test') != 'test':
        raise ConfigError(f'--option captions={ctx.options["captions"]!r}: expected test (the '
                          'whole split) or holdout (its images of data.holdout_phrases).')
    n = min(len(source), ctx.num_examples) if ctx.num_examples else len(source)
    decode = compiled(model, 'decode')
    counts = np.zeros(model.codebook_size, np.int64)
    sq_err, originals, batch = 0.0, [], []
    judge = d.dataset == 'shapes'  # captions name the attributes of one-object images
    attributes, pictures, sizes = [], [], []

    def flush() -> float:
        codes = np.stack([e['codes'] for e in batch]).astype(np.int32)
        x = np.stack([e['image'] for e in batch]).astype(np.float32) / 255.0
        decoded = np.asarray(decode(codes))
        for e, picture in zip(batch, decoded, strict=True):
            if judge and (truth := parse_caption(e['caption'])) is not None:
                attributes.append(truth)
                pictures.append(picture)
                sizes.append(shapes.SIZES.index(caption_size(e['caption'])))
        return float(np.sum(np.mean(np.square(decoded - x), axis=(1, 2, 3))))

    start, end = parallel.host_range(n)  # each process its own share; summed below
    for example in encode_source(model, source, image_size=d.image_size, batch_size=64,
                                 start=start, end=end):
        counts += np.bincount(example['codes'].ravel(), minlength=model.codebook_size)
        if len(originals) < GRID_IMAGES:
            originals.append(example['image'])
        batch.append(example)
        if len(batch) == 64:
            sq_err, batch = sq_err + flush(), []
    if batch:
        sq_err += flush()
    if jax.process_count() > 1:
        sq_err = parallel.sum_across_hosts({'sq_err': sq_err})['sq_err']
        counts = parallel.gather_rows(counts[None].astype(np.int32),
                                      jax.process_count()).sum(axis=0)
    mse = sq_err / n
    p = counts[counts > 0] / counts.sum()
    if jax.process_index() == 0:  # process 0's share holds the split's first images
        path = storage.join(ctx.out_dir, f'reconstructions_{ctx.loaded.step:07d}.png')
        write_reconstruction_grid(model, np.stack(originals), path)
    if jax.process_count() > 1:  # the judged images of every share, in order
        size = d.image_size
        pictures = list(parallel.gather_varying(
            np.stack(pictures) if pictures else np.zeros((0, size, size, 3), np.float32)))
        attributes = [tuple(a) for a in parallel.gather_varying(
            np.array(attributes, np.int32).reshape(-1, 2))]
        sizes = list(parallel.gather_varying(np.array(sizes, np.int32)))
    metrics = {'mse': mse, 'psnr': -10 * math.log10(max(mse, 1e-10)),
               'perplexity': float(np.exp(-np.sum(p * np.log(p)))),
               'codes_used': float(len(p)), 'examples': float(n)}
    if pictures:
        truth = np.array(attributes)
        classifier = AttributeClassifier(d.data_dir, int(ctx.options.get('classifier_images',
                                                                         3000)))
        metrics.update(attribute_accuracies(classifier, to_uint8(np.stack(pictures)),
                                            truth[:, 0], truth[:, 1], '',
                                            sizes=[shapes.SIZES[i] for i in sizes]))
        metrics['judged_examples'] = float(len(pictures))
    return metrics


EVALUATORS = {'reconstruction': reconstruction}
