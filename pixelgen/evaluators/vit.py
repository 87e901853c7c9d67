"""ViT evaluators: top-1 accuracy and the per-class confusion matrix.

    python -m pixelgen.evaluate --workdir runs/vit_shapes --eval accuracy
        [--num_examples K] [--option split=test] [--option data_dir=DIR]
        [--option batch_size=N]

accuracy  top-1 accuracy and loss on the split (default `data.eval_split`), each class's
          accuracy (recall), and confusion.png: row = true class, column = predicted class,
          each cell's count, shaded by the fraction of its row.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from pixelgen import images, parallel, storage, tasks
from pixelgen.data import pipeline
from pixelgen.evaluators import EvalContext


def _config(ctx: EvalContext):
    config = ctx.loaded.config.copy_and_resolve_references()
    if 'data_dir' in ctx.options:
        config.data.data_dir = ctx.options['data_dir']
    return config


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """int [num_classes, num_classes]: entry [t, p] counts examples of class t predicted p."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def confusion_plot(matrix: np.ndarray, names: list[str], path: str, *, title: str) -> str:
    """The confusion matrix as a PNG: rows true, columns predicted, counts in the cells."""
    k = len(names)
    cell = max(28, min(64, 640 // max(k, 1)))
    label = max(8 * max(len(n) for n in names), 40)
    left, top = label + 16, label + 40
    canvas = Image.new('RGB', (left + k * cell + 16, top + k * cell + 32), 'white')
    draw = ImageDraw.Draw(canvas)
    font, small = images.font(14), images.font(max(9, min(12, cell // 3)))
    draw.text((8, 8), title, fill='black', font=font)
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for t in range(k):
        draw.text((8, top + t * cell + cell // 2 - 6), names[t], fill='black', font=small)
        column = Image.new('RGBA', (label, 14), (255, 255, 255, 0))
        ImageDraw.Draw(column).text((0, 0), names[t], fill='black', font=small)
        canvas.paste(column.rotate(90, expand=True), (left + t * cell + cell // 2 - 7, 36),
                     column.rotate(90, expand=True))
        for p in range(k):
            shade = int(255 * (1 - matrix[t, p] / rows[t, 0]))
            box = [left + p * cell, top + t * cell, left + (p + 1) * cell, top + (t + 1) * cell]
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((box[0] + 3, box[1] + cell // 2 - 6), str(matrix[t, p]),
                      fill='white' if shade < 110 else 'black', font=small)
    draw.text((left, top + k * cell + 8), 'predicted ->   (rows: true class)', fill='black',
              font=small)
    return images.save_png(np.asarray(canvas), path)


def accuracy(ctx: EvalContext) -> dict[str, float]:
    """Top-1 accuracy, loss, per-class accuracy and confusion.png on the split."""
    config = _config(ctx)
    task = tasks.make(config, ctx.loaded.workdir)
    split = ctx.options.get('split', config.data.eval_split)
    batch_size = int(ctx.options.get('batch_size', config.batch_size))
    graphdef, state = nnx.split(ctx.loaded.model)
    logits_fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    true, predicted, nll = [], [], []
    for batch in task.eval_batches(batch_size, ctx.num_examples, split=split):
        rows = np.asarray(batch['mask']) > 0
        logits = np.asarray(jax.device_get(logits_fn(state, batch['image'])))[rows]
        labels = np.asarray(batch['label'])[rows]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        nll.append(-log_probs[np.arange(len(labels)), labels])
        true.append(labels)
        predicted.append(logits.argmax(axis=-1))
    # each process evaluated its own share of the split; every process gets all of it
    d = config.data
    source = task.eval_source if split == d.eval_split else pipeline.open_source(
        d.dataset, split, d.data_dir)
    n = min(ctx.num_examples or len(source), len(source))
    true, predicted = (parallel.gather_rows(np.concatenate(x).astype(np.int32), n)
                       for x in (true, predicted))
    nll = parallel.gather_rows(np.concatenate(nll).astype(np.float32), n)
    k = config.model.num_classes
    matrix = confusion_matrix(true, predicted, k)
    names = task.class_names
    confusion_plot(matrix, names, storage.join(ctx.out_dir, 'confusion.png'),
                   title=f'Confusion, step {ctx.loaded.step} ({config.data.dataset} {split}, '
                         f'{config.data.label_key})')
    storage.write_text(storage.join(ctx.out_dir, 'confusion.json'),
                       json.dumps({'classes': list(names), 'matrix': matrix.tolist()}) + '\n')
    per_class = {f'class_accuracy/{names[c]}': float(matrix[c, c] / max(matrix[c].sum(), 1))
                 for c in range(k)}
    return {'accuracy': float(np.mean(true == predicted)), 'loss': float(nll.mean()),
            **per_class, 'num_examples': float(len(true))}


EVALUATORS = {'accuracy': accuracy}
