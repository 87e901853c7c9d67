"""DALL·E evaluators: do generated images show the attributes their caption asks for?

    python -m pixelgen.evaluate --workdir runs/dalle_shapes --eval attribute_accuracy
        [--option captions=holdout|test|two] [--option samples=8] [--option clip_workdir=C]
        [--option top=2] [--option dvae_workdir=D] [--option data_dir=TFDS_DIR]
        [--option classifier_images=3000] [--option temperature=1] [--option top_k=K]
        [--option top_p=P] [--option guidance_scale=S] [--option seed=0]

For a model trained on codes of the `shapes` dataset. Captions are one-object captions
"a {size} {colour} {shape}": with captions=holdout (the default when the config holds phrases
out) every size of every held-out colour/shape pair, which training never saw together;
with captions=test the one-object captions of the test split; with captions=two
TWO_OBJECT_CAPTIONS (--option num_captions) two-object captions of the test split, evenly
spaced ("a large blue star to the left of a small yellow square": both objects' attributes
and their relation, `two_object_accuracies`). Each caption gets `samples`
images (decoded by the dVAE); with clip_workdir, CLIP keeps the best `top` of them. With
guidance_scale S != 1 they are drawn with classifier-free guidance (`sampling.generate`).

An image's attributes are read by a classifier fitted on `shapes` training images: colour =
the palette colour nearest the mean of the pixels that differ from the border's median
(the background), shape = 5-nearest-neighbours on that foreground's bounding-box silhouette
resized to 16×16. Its accuracy on real test images and on the dVAE's reconstructions of the
test codes (the best a generator can hope for) are reported beside the generations'.
One-object scores are also given per object size (`small_shape_accuracy`, ...).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pixelgen import images, parallel, storage
from pixelgen.config import ConfigError
from pixelgen.data import pipeline
from pixelgen.data.builders import shapes
from pixelgen.tasks.dvae import to_uint8

CAPTION = re.compile(r'^a (small|large) (\w+) (\w+)$')
TWO_OBJECTS = re.compile(r'^(a \w+ \w+ \w+) (to the left of|to the right of|above|below) '
                         r'(a \w+ \w+ \w+)$')
TWO_OBJECT_CAPTIONS = 48  # captions=two: this many two-object test captions, evenly spaced
FOREGROUND_DISTANCE = 60.0  # RGB units from the background median; colours are >= 110 away
SILHOUETTE = 16


def foreground(image: np.ndarray) -> np.ndarray:
    """bool [h, w]: pixels far from the median colour of the image border."""
    image = image.astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.linalg.norm(image - np.median(border, axis=0), axis=-1) > FOREGROUND_DISTANCE


class AttributeClassifier:
    """Colour and shape of the object in a `shapes`-like uint8 image [h, w, 3]."""

    def __init__(self, data_dir: str = '', num_images: int = 3000):
        from sklearn.neighbors import KNeighborsClassifier
        source = pipeline.open_source('shapes', 'train', data_dir)
        records = [source[i] for i in range(min(num_images, len(source)))]
        records = [r for r in records if r['num_objects'] == 1]
        self._palette = np.array([shapes.PALETTE[c] for c in shapes.COLORS], np.float32)
        features = np.stack([self._silhouette(r['image'])[0] for r in records])
        self._shape = KNeighborsClassifier(5).fit(features, [r['shape'] for r in records])

    @staticmethod
    def _silhouette(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = foreground(image)
        return AttributeClassifier._mask_silhouette(mask), mask

    @staticmethod
    def _mask_silhouette(mask: np.ndarray) -> np.ndarray:
        if mask.sum() < 4:
            return np.zeros(SILHOUETTE ** 2, np.float32)
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
        small = Image.fromarray(crop).resize((SILHOUETTE, SILHOUETTE), Image.BILINEAR)
        return np.asarray(small, np.float32).reshape(-1) / 255

    def _colour(self, picture: np.ndarray, mask: np.ndarray) -> int:
        mean = picture[mask].astype(np.float32).mean(axis=0) if mask.any() else 0
        return int(np.argmin(((self._palette - mean) ** 2).sum(axis=1)))

    def predict(self, pictures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n, h, w, 3] -> (colour ids [n], shape ids [n]); both -1 where no object
        is found: no foreground, or one covering over half the picture (no shape does)."""
        colours, features, found = [], [], []
        for picture in pictures:
            feature, mask = self._silhouette(picture)
            features.append(feature)
            found.append(4 <= mask.sum() <= mask.size // 2)
            colours.append(self._colour(picture, mask))
        found = np.array(found)
        shape_ids = self._shape.predict(np.stack(features))
        return np.where(found, colours, -1), np.where(found, shape_ids, -1)


    def predict_pairs(self, pictures: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                           np.ndarray, np.ndarray]:
        """uint8 [n, h, w, 3] -> (found [n], colour ids [n, 2], shape ids [n, 2], centres
        [n, 2, 2] as (x, y)) of the two largest foreground parts (8-connected) of each
        picture; found is False where fewer than two parts of 4 or more pixels exist."""
        from scipy import ndimage
        n = len(pictures)
        found = np.zeros(n, bool)
        colours, shape_ids = np.full((n, 2), -1), np.full((n, 2), -1)
        centres = np.zeros((n, 2, 2), np.float32)
        features, where = [], []
        for i, picture in enumerate(pictures):
            parts, count = ndimage.label(foreground(picture), structure=np.ones((3, 3)))
            sizes = np.bincount(parts.ravel(), minlength=count + 1)[1:]
            largest = np.argsort(-sizes, kind='stable')[:2] + 1
            if count < 2 or sizes[largest[1] - 1] < 4:
                continue
            found[i] = True
            for j, label in enumerate(largest):
                mask = parts == label
                ys, xs = np.nonzero(mask)
                centres[i, j] = xs.mean(), ys.mean()
                colours[i, j] = self._colour(picture, mask)
                features.append(self._mask_silhouette(mask))
                where.append((i, j))
        if features:
            predicted = self._shape.predict(np.stack(features))
            for (i, j), shape_id in zip(where, predicted, strict=True):
                shape_ids[i, j] = shape_id
        return found, colours, shape_ids, centres


def parse_caption(caption: str) -> tuple[int, int] | None:
    found = CAPTION.match(caption)
    if not found or found[2] not in shapes.COLORS or found[3] not in shapes.SHAPES:
        return None
    return shapes.COLORS.index(found[2]), shapes.SHAPES.index(found[3])


def parse_two_objects(caption: str) -> tuple[tuple[int, int], str, tuple[int, int]] | None:
    """'a large blue star to the left of a small yellow square' -> ((colour, shape) of the
    first object, the relation, (colour, shape) of the second); None for other captions."""
    found = TWO_OBJECTS.match(caption)
    if not found:
        return None
    first, second = parse_caption(found[1]), parse_caption(found[3])
    return None if first is None or second is None else (first, found[2], second)


def two_object_accuracies(classifier, pictures: np.ndarray, captions: list[str],
                          prefix: str) -> dict[str, float]:
    """How well pictures show their two-object captions. The caption's relation says where
    its first object lies (left of, right of, above or below the second), so each found
    part is matched to the caption's object at its place:
      two_objects_found      two separate objects are drawn
      two_color_accuracy     per object, the colour of the object at that place
      two_shape_accuracy     per object, the shape of the object at that place
      two_relation_accuracy  the two colours in the relation's order (captions whose two
                             colours differ; one object per colour drawn on the wrong side
                             fails)
      two_all_accuracy       both objects' colour and shape, each at its place"""
    found, colours, shape_ids, centres = classifier.predict_pairs(pictures)
    truth = [parse_two_objects(c) for c in captions]
    colour_ok, shape_ok, relation_ok, distinct = [], [], [], []
    for i, (first, relation, second) in enumerate(truth):
        axis = 0 if 'left' in relation or 'right' in relation else 1
        first_low = relation in ('to the left of', 'above')  # at the lower x (or y)?
        low = int(np.argmin(centres[i, :, axis]))
        order = [low, 1 - low] if first_low else [1 - low, low]
        want = [first, second]
        colour_ok.append([found[i] and colours[i, order[k]] == want[k][0] for k in range(2)])
        shape_ok.append([found[i] and shape_ids[i, order[k]] == want[k][1] for k in range(2)])
        distinct.append(first[0] != second[0])
        relation_ok.append(all(colour_ok[-1]))
    colour_ok, shape_ok = np.array(colour_ok), np.array(shape_ok)
    distinct, relation_ok = np.array(distinct), np.array(relation_ok)
    return {f'{prefix}two_objects_found': float(found.mean()),
            f'{prefix}two_color_accuracy': float(colour_ok.mean()),
            f'{prefix}two_shape_accuracy': float(shape_ok.mean()),
            f'{prefix}two_relation_accuracy': (float(relation_ok[distinct].mean())
                                               if distinct.any() else float('nan')),
            f'{prefix}two_all_accuracy': float((colour_ok & shape_ok).all(axis=1).mean())}


def _scores(classifier, pictures: np.ndarray, captions: list[str], which: str,
            prefix: str) -> dict[str, float]:
    """The attribute accuracies of pictures against their captions (one per picture)."""
    if which == 'two':
        return two_object_accuracies(classifier, pictures, captions, prefix)
    truth = np.array([parse_caption(c) for c in captions])
    return attribute_accuracies(classifier, pictures, truth[:, 0], truth[:, 1], prefix,
                                sizes=[caption_size(c) for c in captions])


def holdout_captions(phrases) -> list[str]:
    """Every size of each held-out 'colour shape' phrase, as a one-object caption."""
    captions = [f'a {size} {phrase}' for phrase in phrases for size in shapes.SIZES]
    return [c for c in captions if parse_caption(c) is not None]


def caption_size(caption: str) -> str:
    """'a small red star' -> 'small' (a one-object caption, as parse_caption accepts)."""
    return CAPTION.match(caption)[1]


def attribute_accuracies(classifier, pictures, colours, shape_ids, prefix: str,
                         sizes=None) -> dict[str, float]:
    """{prefix}color/shape/both_accuracy of pictures against their true colour and shape
    indices; with `sizes` (each picture's size name), also {prefix}<size>_color_accuracy ...
    over the pictures of each size, since a small object loses its shape first."""
    got_colour, got_shape = classifier.predict(pictures)
    colour_ok, shape_ok = got_colour == colours, got_shape == shape_ids
    groups = {'': np.ones(len(colour_ok), bool)}
    if sizes is not None:
        sizes = np.asarray(sizes)
        groups.update({f'{size}_': sizes == size for size in shapes.SIZES if (sizes == size).any()})
    metrics = {}
    for group, chosen in groups.items():
        metrics[f'{prefix}{group}color_accuracy'] = float(colour_ok[chosen].mean())
        metrics[f'{prefix}{group}shape_accuracy'] = float(shape_ok[chosen].mean())
        metrics[f'{prefix}{group}both_accuracy'] = float((colour_ok & shape_ok)[chosen].mean())
    return metrics


def attribute_accuracy(ctx) -> dict[str, float]:
    import pixelgen
    from pixelgen.data.codes import open_codes
    from pixelgen.sampling import generate
    from pixelgen.tasks.dalle import decode_codes

    loaded, options = ctx.loaded, ctx.options
    config, model = loaded.config, loaded.model
    tokenizer = loaded.assets['tokenizer']
    which = options.get('captions', 'holdout' if config.data.holdout_phrases else 'test')
    samples = int(options.get('samples', 8))
    top = int(options.get('top', samples))
    test = open_codes(config.data.codes_dir, config.data.eval_split)
    test_records = [test[i] for i in range(len(test) if ctx.num_examples is None
                                           else min(ctx.num_examples, len(test)))]
    parse = parse_two_objects if which == 'two' else parse_caption
    test_records = [r for r in test_records if parse(r['caption'])]
    if which == 'holdout':
        captions = holdout_captions(config.data.holdout_phrases)
    elif which == 'test':
        captions = sorted({r['caption'] for r in test_records})
    elif which == 'two':
        every = sorted({r['caption'] for r in test_records})
        wanted = min(int(options.get('num_captions', TWO_OBJECT_CAPTIONS)), len(every))
        captions = [every[i] for i in np.linspace(0, len(every) - 1, wanted).astype(int)
                    ] if wanted else []
    else:
        raise ConfigError(f'--option captions={which!r}: expected holdout, test or two.')
    if not captions:
        raise ConfigError(f'No "a <size> <colour> <shape>" captions for captions={which} '
                          '(two: "... to the left of ..." ones); this evaluator is for models '
                          'of `shapes` codes.')
    dvae_dir = options.get('dvae_workdir', config.dvae_workdir)
    if not dvae_dir:
        raise ConfigError('No dVAE to decode with: pass --option dvae_workdir=DIR.')
    dvae = pixelgen.load(dvae_dir).model
    clip = pixelgen.load(options['clip_workdir']) if 'clip_workdir' in options else None
    classifier = AttributeClassifier(options.get('data_dir', ''),
                                     int(options.get('classifier_images', 3000)))

    kept = []
    rng = jax.random.PRNGKey(int(options.get('seed', 0)))
    first, end = parallel.host_range(len(captions))  # each process draws its own captions
    for i, caption in enumerate(captions[first:end], first):
        text = tokenizer.encode([caption] * samples, model.text_len, add_sot_eot=True).ids
        codes = generate(model, jax.random.fold_in(rng, i), jnp.asarray(text),
                         temperature=float(options.get('temperature', 1.0)),
                         top_k=int(options['top_k']) if 'top_k' in options else None,
                         top_p=float(options['top_p']) if 'top_p' in options else None,
                         guidance_scale=float(options.get('guidance_scale', 1.0)))
        side = model.grid_size
        pictures = to_uint8(decode_codes(dvae, codes.reshape(samples, side, side)))
        if clip is not None:
            from pixelgen.rerank import rerank
            pictures = pictures[rerank(clip, pictures, caption, top)[0]]
        kept.append(pictures)
    per_caption = top if clip is not None else samples
    side = dvae.downsampling * model.grid_size  # decoded pictures are side x side
    kept = parallel.gather_rows(
        np.stack(kept) if kept else np.zeros((0, per_caption, side, side, 3), np.uint8),
        len(captions))
    pictures = np.concatenate(kept)
    metrics = _scores(classifier, pictures,
                      [c for c in captions for _ in range(per_caption)], which, '')
    metrics['num_images'] = float(len(pictures))
    metrics['num_captions'] = float(len(captions))

    # Ceilings: the classifier on real test images, and on the dVAE's decoding of their codes.
    real_source = pipeline.open_source('shapes', 'test', options.get('data_dir', ''))
    real = [real_source[i] for i in range(min(500, len(real_source)))]
    real = [r for r in real if r['num_objects'] == (2 if which == 'two' else 1)]
    metrics.update(_scores(classifier, np.stack([r['image'] for r in real]),
                           [r['caption'].decode() for r in real], which, 'real_images_'))
    if test_records:
        decoded = to_uint8(decode_codes(dvae, jnp.asarray(
            np.stack([r['codes'] for r in test_records]), jnp.int32)))
        metrics.update(_scores(classifier, decoded, [r['caption'] for r in test_records],
                               which, 'reconstructions_'))
    if jax.process_index() == 0:
        images.save_png(images.make_grid(list(kept)),
                        storage.join(ctx.out_dir, f'attributes_{which}.png'))
        storage.write_text(storage.join(ctx.out_dir, f'attributes_{which}.txt'),
                           '\n'.join(captions) + '\n')
    return metrics


EVALUATORS = {'attribute_accuracy': attribute_accuracy}
