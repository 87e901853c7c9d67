"""CLIP evaluators: zero-shot classification from prompts.

    python -m pixelgen.evaluate --workdir runs/clip_shapes --eval zeroshot
        [--num_examples K] [--option split=test] [--option data_dir=DIR]
        [--option captions=holdout]

Each class is embedded as the normalised mean of its prompts' text embeddings (the paper's
prompt ensembling, §3.1.4); an image is assigned the class of highest cosine similarity.
Which attributes are classified, their class names and their prompt templates depend on the
dataset: `shapes` -> the (first) object's shape and colour; `fashion_mnist` -> the garment;
any other labelled tfds dataset -> its `label` names with generic photo prompts.
Option templates=FILE (one template per line, {} for the class name) or templates=imagenet
(the paper's 80 ImageNet templates) replaces the prompts of every attribute. Option
captions=holdout classifies only the images whose caption names one of the run's
`data.holdout_phrases` (the pairs that training never saw).

On `shapes`, prompt ensembling averages each shape's prompts over every colour and size, and
those are not paraphrases: the one prompt that matches the image's colour is 1 of 14. So the
evaluator also reads every one-object image by the best of all 84 one-object captions ("a
small red star", the captions reranking scores) and reports the caption's size, colour and
shape as caption_size_accuracy, caption_color_accuracy and caption_shape_accuracy
(caption_examples of them).
linear_probe and retrieval: see pixelgen/evaluators/clip_features.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from pixelgen import parallel
from pixelgen.config import ConfigError
from pixelgen.data import pipeline
from pixelgen.data.builders import fashion_mnist, shapes
from pixelgen.evaluators import clip_features
from pixelgen.rerank import embed_images, embed_texts

PHOTO_TEMPLATES = ('a photo of a {}.', 'a blurry photo of a {}.', 'a photo of the {}.',
                   'a low resolution photo of a {}.', 'a good photo of a {}.', 'a {}.')


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    """Classify feature `key` of each example into `class_names` using `templates`."""
    key: str
    class_names: Sequence[str]
    templates: Sequence[str]


def tasks_for(dataset: str, source) -> dict[str, ZeroShotTask]:
    """{name: ZeroShotTask} for a dataset (see the module docstring)."""
    if dataset == 'shapes':  # prompts in the captions' own words: "a large blue star"
        return {
            'shape': ZeroShotTask('shape', shapes.SHAPES, [
                f'a {size} {color} {{}}' for size in shapes.SIZES for color in shapes.COLORS]),
            'color': ZeroShotTask('color', shapes.COLORS, [
                f'a {size} {{}} {shape}' for size in shapes.SIZES for shape in shapes.SHAPES]),
        }
    if dataset == 'fashion_mnist':
        return {'label': ZeroShotTask('label', fashion_mnist.CAPTION_NAMES, PHOTO_TEMPLATES)}
    features = source.dataset_info.features
    if 'label' not in features or not hasattr(features['label'], 'names'):
        raise ConfigError(f'Dataset {dataset!r} has no class-label feature `label`, so zero-shot '
                          'classification has no classes to choose from.')
    names = [n.replace('_', ' ') for n in features['label'].names]
    return {'label': ZeroShotTask('label', names, PHOTO_TEMPLATES)}


def class_embeddings(clip, task: ZeroShotTask) -> np.ndarray:
    """[num_classes, embed_dim]: each class's prompt embeddings averaged, then normalised."""
    prompts = [t.format(name) for name in task.class_names for t in task.templates]
    emb = embed_texts(clip, prompts).reshape(len(task.class_names), len(task.templates), -1)
    mean = emb.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zeroshot_predictions(clip, imgs, task: ZeroShotTask) -> np.ndarray:
    """int [n]: the predicted class index of each image."""
    return np.argmax(embed_images(clip, imgs) @ class_embeddings(clip, task).T, axis=1)


def zeroshot(ctx) -> dict[str, float]:
    """Accuracy (and chance level) of every zero-shot attribute on the held-out split."""
    config = ctx.loaded.config
    d = config.data
    split = ctx.options.get('split', d.eval_split)
    source = pipeline.open_source(d.dataset, split, ctx.options.get('data_dir', d.data_dir))
    tasks = tasks_for(d.dataset, source)
    if 'templates' in ctx.options:  # a file of templates, or 'imagenet' (the paper's 80)
        templates = clip_features.load_templates(ctx.options['templates'])
        tasks = {name: dataclasses.replace(task, templates=templates)
                 for name, task in tasks.items()}
    if ctx.options.get('captions', 'test') == 'holdout':
        source = pipeline.with_phrases(source, d.holdout_phrases, d.caption_key)
    n = min(ctx.num_examples or len(source), len(source))
    start, end = parallel.host_range(n)  # each process classifies its own share
    examples = [source[i] for i in range(start, end)]
    imgs = np.stack([pipeline.to_rgb_square(e['image'], d.image_size) for e in examples]
                    ) if examples else np.zeros((0, d.image_size, d.image_size, 3), np.uint8)
    results = {'num_examples': float(n)}
    for name, task in tasks.items():
        labels = np.array([int(e[task.key]) for e in examples], np.int32)
        predicted = (zeroshot_predictions(ctx.loaded, imgs, task) if examples
                     else np.zeros(0, np.int32))
        right = parallel.gather_rows((predicted == labels).astype(np.int32), n)
        results[f'{name}_accuracy'] = float(np.mean(right))
        results[f'{name}_chance'] = 1.0 / len(task.class_names)
    if d.dataset == 'shapes':
        results.update(caption_readings(ctx.loaded, imgs, examples, d.caption_key, n))
    return results


def caption_readings(clip, imgs, examples, caption_key: str, n: int) -> dict[str, float]:
    """shapes: the size, colour and shape of each one-object image read from the best-matching
    one-object caption ("a {size} {colour} {shape}", every combination), as the fraction right
    of the one-object images among `examples` (this process's share of n)."""
    from pixelgen.evaluators.dalle import CAPTION
    combos = list(itertools.product(shapes.SIZES, shapes.COLORS, shapes.SHAPES))
    truth = np.full(len(examples), -1, np.int32)  # a combination's index; -1: not one object
    for row, e in enumerate(examples):
        caption = e[caption_key]
        found = CAPTION.match(caption.decode() if isinstance(caption, bytes) else caption)
        if found and found.groups() in combos:
            truth[row] = combos.index(found.groups())
    best = np.zeros(len(examples), np.int32)
    if examples:
        texts = embed_texts(clip, ['a {} {} {}'.format(*c) for c in combos])
        best = np.argmax(embed_images(clip, imgs) @ texts.T, axis=1).astype(np.int32)
    judged = parallel.gather_rows((truth >= 0).astype(np.int32), n).astype(bool)
    truth = parallel.gather_rows(truth, n)[judged]
    best = parallel.gather_rows(best, n)[judged]
    results = {'caption_examples': float(judged.sum())}
    for i, name in enumerate(('size', 'color', 'shape')):
        got = np.array([combos[b][i] for b in best])
        want = np.array([combos[t][i] for t in truth])
        results[f'caption_{name}_accuracy'] = float(np.mean(got == want)) if len(got) else 0.0
    return results


EVALUATORS = {'zeroshot': zeroshot, **clip_features.EVALUATORS}
