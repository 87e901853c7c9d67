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
linear_probe and retrieval: see pixelgen/evaluators/clip_features.py.
"""

from __future__ import annotations

import dataclasses
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
    return results


EVALUATORS = {'zeroshot': zeroshot, **clip_features.EVALUATORS}
