"""CLIP evaluators on its embeddings: a linear probe, image<->text retrieval, and the prompt
templates of zero-shot classification (registered with the task's evaluators in clip.py).

    python -m pixelgen.evaluate --workdir runs/clip_shapes --eval linear_probe,retrieval
        [--num_examples K] [--option data_dir=DIR] [--option batch_size=N]
    python -m pixelgen.evaluate --workdir W --eval zeroshot --option templates=imagenet

linear_probe  logistic regression on the image features (the image tower's projected output
              before L2 normalisation, what openai/CLIP's encode_image returns), fitted as
              iGPT's probe is (pixelgen/probe.py: C chosen on a held-out slice of train),
              trained on `train_split` and tested on `test_split` (options; defaults
              data.train_split and data.eval_split), labels from option label_key ('label').
              --num_examples caps each split.
retrieval     recall@1/5/10 of image->text and text->image over the first --num_examples
              pairs of option split (data.eval_split). Equal captions are one text: an image
              is right when its caption is among the k best texts, a caption when any image it
              describes is among the k best images (as COCO's five captions per image are
              scored).
templates     (an option of zeroshot) a text file of prompt templates, one per line with {}
              where the class name goes, or 'imagenet' for the 80 templates of the paper's
              ImageNet prompt ensemble (shipped as pixelgen/evaluators/data/).
"""

from __future__ import annotations

from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelgen import parallel, probe, storage
from pixelgen.config import ConfigError
from pixelgen.data import pipeline
from pixelgen.rerank import embed_images, embed_texts

RECALL_AT = (1, 5, 10)
SHIPPED_TEMPLATES = {'imagenet': 'imagenet_templates.txt'}


def load_templates(spec: str) -> tuple[str, ...]:
    """Prompt templates from a file (one per line, each with one {}), or a shipped set by
    name ('imagenet': the paper's 80)."""
    if spec in SHIPPED_TEMPLATES:
        text = resources.files('pixelgen.evaluators').joinpath(
            'data', SHIPPED_TEMPLATES[spec]).read_text(encoding='utf-8')
    elif storage.exists(spec):
        text = storage.read_text(spec)
    else:
        raise ConfigError(f'--option templates={spec!r} is neither a file nor one of the '
                          f'shipped sets {sorted(SHIPPED_TEMPLATES)}. Pass a text file with '
                          'one template per line, e.g. "a photo of a {}.".')
    templates = tuple(line.strip() for line in text.splitlines() if line.strip())
    bad = [t for t in templates if t.count('{}') != 1]
    if bad or not templates:
        raise ConfigError(f'--option templates={spec!r}: every line needs exactly one {{}} '
                          f'where the class name goes; these do not: {bad[:3] or "(no lines)"}.')
    return templates


def recall_at_k(scores: np.ndarray, correct: np.ndarray, ks=RECALL_AT) -> dict[int, float]:
    """scores float [queries, gallery], correct bool [queries, gallery] -> {k: the fraction
    of queries with a correct item among their k highest-scoring gallery items}. Ties are
    broken by gallery order (a stable sort)."""
    order = np.argsort(-scores, axis=1, kind='stable')
    hits = np.take_along_axis(correct, order, axis=1)
    return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def _examples(ctx, split: str, keys: tuple[str, ...]):
    d = ctx.loaded.config.data
    source = pipeline.open_source(d.dataset, split, ctx.options.get('data_dir', d.data_dir))
    missing = [k for k in keys if k not in source.dataset_info.features]
    if missing:
        raise ConfigError(f'Dataset {d.dataset!r} has no feature {missing[0]!r} (features: '
                          f'{sorted(source.dataset_info.features)}); pass --option '
                          'label_key=NAME with one of them.')
    n = min(ctx.num_examples or len(source), len(source))
    return source, n


def retrieval(ctx) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 over the split's pairs (every process
    embeds them all: the gallery is the whole split)."""
    d = ctx.loaded.config.data
    split = ctx.options.get('split', d.eval_split)
    source, n = _examples(ctx, split, (d.caption_key,))
    examples = [source[i] for i in range(n)]
    imgs = np.stack([pipeline.to_rgb_square(e['image'], d.image_size) for e in examples])
    captions = [e[d.caption_key] for e in examples]
    captions = [c.decode('utf-8') if isinstance(c, bytes) else str(c) for c in captions]
    texts = sorted(set(captions))
    which = np.array([texts.index(c) for c in captions])  # image i's caption among the texts
    scores = embed_images(ctx.loaded, imgs) @ embed_texts(ctx.loaded, texts).T
    correct = which[:, None] == np.arange(len(texts))[None, :]  # [images, texts]
    out = {'num_images': float(n), 'num_texts': float(len(texts))}
    for k, r in recall_at_k(scores, correct).items():
        out[f'image_to_text/recall@{k}'] = r
    for k, r in recall_at_k(scores.T, correct.T).items():
        out[f'text_to_image/recall@{k}'] = r
    return out


def _feature_fn(clip):
    """A jitted uint8 images [b, s, s, 3] -> image features [b, embed_dim] (not normalised)."""
    graphdef, state = nnx.split(clip)
    mean, std = jnp.asarray(clip.image_mean), jnp.asarray(clip.image_std)

    def features(state, images):
        pixels = (images.astype(jnp.float32) / 255.0 - mean) / std
        return nnx.merge(graphdef, state).visual(pixels)[None]  # [1 layer, b, embed_dim]
    jitted = jax.jit(features)
    return lambda batch: jitted(state, batch['image'])


def linear_probe(ctx) -> dict[str, float]:
    """Train/validation/test accuracy of a logistic-regression probe on image features."""
    d = ctx.loaded.config.data
    label_key = ctx.options.get('label_key', 'label')
    batch_size = int(ctx.options.get('batch_size', ctx.loaded.config.batch_size))
    features_fn = _feature_fn(ctx.loaded.model)

    def prepare(features: dict) -> dict:
        return {'image': pipeline.to_rgb_square(features['image'], d.image_size),
                'label': np.int32(features[label_key])}

    def split_features(split: str):
        source, n = _examples(ctx, split, (label_key,))
        batches = pipeline.eval_batches(source, batch_size=batch_size, prepare=prepare,
                                        num_examples=n)
        feats, labels = probe.collect(batches, features_fn)  # this process's share
        return (parallel.gather_rows(feats[0].astype(np.float32), n),
                parallel.gather_rows(labels.astype(np.int32), n))

    train_x, train_y = split_features(ctx.options.get('train_split', d.train_split))
    test_x, test_y = split_features(ctx.options.get('test_split', d.eval_split))
    result = probe.fit_probe(train_x, train_y, test_x, test_y, seed=ctx.loaded.config.seed)
    return {'train_accuracy': result.train_accuracy, 'val_accuracy': result.val_accuracy,
            'test_accuracy': result.test_accuracy, 'inverse_l2': result.inverse_l2,
            'train_examples': float(len(train_y)), 'test_examples': float(len(test_y))}


EVALUATORS = {'linear_probe': linear_probe, 'retrieval': retrieval}
