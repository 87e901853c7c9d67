"""CLIP: the model's embeddings and loss, zero-shot classification, reranking, a tiny training
run end to end, and the contrastive batch spanning every device."""

from __future__ import annotations

import json
import math
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_python
from flax import nnx

import pixelgen
from pixelgen import images, rerank
from pixelgen.config import ConfigError, load_config_file, parse_config_args
from pixelgen.data.text import TextTokenizer
from pixelgen.evaluators import EvalContext
from pixelgen.evaluators import clip as clip_evaluators
from pixelgen.models.clip import contrastive_loss
from pixelgen.pretrained import Loaded
from pixelgen.tasks import clip as clip_task
from pixelgen.train import main as train_main

TINY = os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny'


@pytest.fixture(scope='module')
def config():
    return load_config_file(TINY)


@pytest.fixture(scope='module')
def model(config):
    return clip_task.build_model(config, nnx.Rngs(0))


def tokens_with_eot(config, rows: list[list[int]]) -> np.ndarray:
    """Rows of ids, each followed by [EOT] and padding to the context length."""
    m = config.model
    out = np.zeros((len(rows), m.context_length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row) + 1] = [*row, m.eot_id]
    return out


@pytest.mark.slow
def test_embeddings_are_l2_normalised(config, model):
    imgs = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    image_emb = np.asarray(model.encode_image(imgs))
    text_emb = np.asarray(model.encode_text(tokens_with_eot(config, [[5, 6], [7], [8, 9, 10]])))
    assert image_emb.shape == text_emb.shape == (3, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1.0, rtol=1e-5)
    # uint8 images in [0, 255] are the same images as floats in [0, 1]
    as_uint8 = np.round(imgs * 255).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(model.encode_image(as_uint8)),
                               np.asarray(model.encode_image(as_uint8 / 255.0)), atol=1e-5)


def numpy_clip_loss(logits: np.ndarray) -> float:
    """The paper's pseudocode: (CE(logits, arange, axis=0) + CE(logits, arange, axis=1)) / 2."""
    def cross_entropy(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_probs))
    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def test_loss_is_symmetric_and_equals_the_numpy_reference():
    logits = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32) * 5
    loss = float(contrastive_loss(jnp.asarray(logits)))
    np.testing.assert_allclose(loss, numpy_clip_loss(logits), rtol=1e-5)
    np.testing.assert_allclose(float(contrastive_loss(jnp.asarray(logits.T))), loss, rtol=1e-6)
    assert abs(numpy_clip_loss(np.triu(logits)) - numpy_clip_loss(np.tril(logits))) > 1e-3
    # padded rows (weight 0) neither count nor compete in the softmaxes
    weights = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
    np.testing.assert_allclose(float(contrastive_loss(jnp.asarray(logits), weights)),
                               numpy_clip_loss(logits[:4, :4]), rtol=1e-5)


def test_hard_negatives_join_only_the_image_to_text_softmax():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 5)).astype(np.float32) * 3
    negatives = rng.normal(size=(5, 5)).astype(np.float32) * 3
    keep = np.array([1, 0, 1, 1, 0], np.float32)

    def cross_entropy(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.mean(log_probs[np.arange(5), np.arange(5)])
    want = 0.5 * (cross_entropy(np.concatenate([logits, negatives[:, keep > 0]], axis=1))
                  + cross_entropy(logits.T))
    got = contrastive_loss(jnp.asarray(logits), negatives=jnp.asarray(negatives),
                           negative_weights=jnp.asarray(keep))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(got) > numpy_clip_loss(logits)  # a negative only ever adds to the loss
    none_kept = contrastive_loss(jnp.asarray(logits), negatives=jnp.asarray(negatives),
                                 negative_weights=jnp.zeros(5))
    np.testing.assert_allclose(float(none_kept), numpy_clip_loss(logits), rtol=1e-5)


def test_a_hard_negative_swaps_one_group_word_and_never_names_a_held_out_pair():
    groups = [('circle', 'square', 'star'), ('red', 'green')]
    seen = set()
    for seed in range(60):
        negative = clip_task.hard_negative('a small green circle', groups, ('red star',),
                                           np.random.default_rng(seed))
        changed = [(a, b) for a, b in zip('a small green circle'.split(), negative.split(),
                                                      strict=True)
                   if a != b]
        assert len(changed) == 1 and any(set(changed[0]) <= set(g) for g in groups), negative
        seen.add(negative)
    assert seen == {'a small green square', 'a small green star', 'a small red circle'}
    assert clip_task.hard_negative('a small red circle', [('circle', 'star')], ('red star',),
                                   np.random.default_rng(0)) == ''  # the only swap is held out
    assert clip_task.hard_negative('a photo', groups, (), np.random.default_rng(0)) == ''


def test_training_batches_carry_each_captions_hard_negative(data_dir, tmp_path):
    config = load_config_file(TINY)
    config.data.data_dir = data_dir
    config.data.hard_negative_words = ('circle,square,triangle,diamond,cross,star',)
    config.model.context_length = 64  # no caption cut short, so each shows its swap
    task = clip_task.CLIPTask(config, str(tmp_path))
    batch = next(task.train_iterator(config.batch_size))
    tokenizer = task.tokenizer
    for tokens, negative, kept in zip(batch['tokens'], batch['negative_tokens'],
                                      batch['negative_mask'], strict=True):
        assert kept == 1  # every shapes caption names a shape
        caption, swapped = (tokenizer.decode(t)[0].split() for t in (tokens, negative))
        assert len(caption) == len(swapped)
        assert sum(a != b for a, b in zip(caption, swapped, strict=True)) == 1
    model = task.build_model(nnx.Rngs(0))
    loss, _ = task.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    without = {k: jnp.asarray(batch[k]) for k in ('image', 'tokens')}
    assert float(loss) > float(task.loss(model, without, None)[0])
    with pytest.raises(ConfigError, match='hard_negative_words'):
        config.data.hard_negative_words = ('circle',)
        clip_task.validate_config(config)


@pytest.mark.slow
def test_logit_scale_is_clamped_at_100(config, model):
    model = nnx.clone(model)
    np.testing.assert_allclose(float(model.scale()), 1 / 0.07, rtol=1e-5)  # the paper's init
    model.logit_scale[...] = jnp.asarray(math.log(1000.0))
    assert float(model.scale()) == 100.0
    imgs = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    logits = np.asarray(model(imgs, tokens_with_eot(config, [[5], [6]])))
    assert np.abs(logits).max() <= 100.0 + 1e-4
    grad = nnx.grad(lambda m: m.scale())(model)
    assert float(grad.logit_scale[...]) == 0.0  # beyond the cap the temperature stops learning


@pytest.mark.slow
def test_text_features_come_from_the_first_eot_token(config, model):
    base = tokens_with_eot(config, [[5, 6, 7]])  # [EOT] at position 3
    np.testing.assert_array_equal(np.asarray(model.text.eot_positions(jnp.asarray(base))), [3])
    after, before = base.copy(), base.copy()
    after[0, 4:] = 9  # tokens after [EOT] (even another [EOT]) cannot change the feature
    after[0, 6] = config.model.eot_id
    before[0, 1] = 9
    emb = [np.asarray(model.encode_text(t)) for t in (base, after, before)]
    np.testing.assert_allclose(emb[1], emb[0], atol=1e-6)
    assert np.abs(emb[2] - emb[0]).max() > 1e-3
    no_eot = np.full((1, 5), 5, np.int32)
    np.testing.assert_array_equal(np.asarray(model.text.eot_positions(jnp.asarray(no_eot))), [4])


def test_image_size_not_divisible_by_patch_size_is_a_config_error():
    config, _ = parse_config_args(['--config', TINY, '--config.data.image_size=20'])
    with pytest.raises(ConfigError, match='data.image_size=20 must be divisible by '
                                          'model.patch_size=8'):
        clip_task.build_model(config, nnx.Rngs(0))


@pytest.mark.slow
def test_vit_b32_config_has_the_released_parameter_count():
    """151,277,313: OpenAI's ViT-B/32 as transformers' CLIPModel holds it (B/16 and L/14 give
    their released 149,620,737 and 427,616,513 too; not run here to save time)."""
    config = load_config_file(os.path.join(REPO, 'configs', 'clip.py') + ':b32')
    shapes = nnx.eval_shape(lambda: clip_task.build_model(config, nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param))) == 151_277_313


# A stand-in CLIP whose embeddings are known: an image embeds as its mean RGB colour, a text
# as the sum of its tokens' rows of a table that maps 'red', 'green', 'blue' to the RGB axes.
class _Text(nnx.Module):
    def __init__(self, context_length: int):
        self.context_length = context_length


class ColourCLIP(nnx.Module):
    image_size = 8

    def __init__(self, table: np.ndarray):
        self.table = nnx.Param(jnp.asarray(table))
        self.text = _Text(8)

    def encode_image(self, imgs):
        rgb = imgs.astype(jnp.float32).mean(axis=(1, 2))
        return rgb / jnp.linalg.norm(rgb, axis=-1, keepdims=True)

    def encode_text(self, tokens):
        vectors = self.table[...][tokens].sum(axis=1)
        return vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-9)


COLOURS = ('red', 'green', 'blue')


@pytest.fixture(scope='module')
def colour_clip():
    tokenizer = TextTokenizer.train(['a photo of red', 'a photo of green', 'a photo of blue'] * 5,
                                    vocab_size=300, min_frequency=1)
    table = np.zeros((tokenizer.vocab_size, 3), np.float32)
    for axis, word in enumerate(COLOURS):
        ids = tokenizer.encode([word], 4).ids[0]
        assert (ids != tokenizer.pad_id).sum() == 1, 'each colour must be one token'
        table[ids[0], axis] = 1.0
    return Loaded(model=ColourCLIP(table), config=None, step=0,
                                      assets={'tokenizer': tokenizer})


def solid(rgb, size: int = 12) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3))


def test_zeroshot_is_perfect_on_a_separable_setup(colour_clip):
    labels = np.array([0, 1, 2, 2, 1, 0])
    imgs = np.stack([solid(np.eye(3)[k] * 0.8 + 0.1) for k in labels])
    task = clip_evaluators.ZeroShotTask('label', COLOURS, ('a photo of {}', '{}'))
    np.testing.assert_array_equal(clip_evaluators.zeroshot_predictions(colour_clip, imgs, task),
                                  labels)
    swapped = clip_evaluators.ZeroShotTask('label', COLOURS[::-1], ('a photo of {}',))
    np.testing.assert_array_equal(
        clip_evaluators.zeroshot_predictions(colour_clip, imgs, swapped), 2 - labels)


class WordCLIP(nnx.Module):
    """Stand-in for shapes captions: a text embeds as the sum of its words' axes; an image
    embeds as its first row's red values (so a test can put any caption's vector there)."""
    image_size = 16

    def __init__(self, table: np.ndarray):
        self.table = nnx.Param(jnp.asarray(table))
        self.text = _Text(8)

    def encode_image(self, imgs):
        v = imgs[:, 0, :, 0].astype(jnp.float32)
        return v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    def encode_text(self, tokens):
        vectors = self.table[...][tokens].sum(axis=1)
        return vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-9)


def test_caption_readings_read_each_attribute_from_the_best_caption():
    from pixelgen.data.builders import shapes as shapes_data
    words = shapes_data.SIZES + shapes_data.COLORS + shapes_data.SHAPES
    captions = [f'a {s} {c} {h}' for s in shapes_data.SIZES for c in shapes_data.COLORS
                for h in shapes_data.SHAPES]
    tokenizer = TextTokenizer.train(captions * 3, vocab_size=400, min_frequency=1)
    table = np.zeros((tokenizer.vocab_size, WordCLIP.image_size), np.float32)
    for axis, word in enumerate(words):
        ids = tokenizer.encode([word], 4).ids[0]
        assert (ids != tokenizer.pad_id).sum() == 1, f'{word!r} must be one token'
        table[ids[0], axis] = 1.0
    clip = Loaded(model=WordCLIP(table), config=None, step=0, assets={'tokenizer': tokenizer})

    def image_of(size, colour, shape):
        img = np.zeros((16, 16, 3), np.uint8)
        for word in (size, colour, shape):
            img[0, words.index(word), 0] = 200
        return img

    truths = [('small', 'red', 'star'), ('large', 'blue', 'circle'), ('small', 'white', 'cross'),
              ('large', 'green', 'square')]
    drawn = list(truths)
    drawn[1] = ('large', 'blue', 'square')  # the image reads as another shape
    examples = [{'caption': 'a {} {} {}'.format(*t).encode()} for t in truths]
    examples.append({'caption': b'a small red star above a large blue circle'})  # not judged
    imgs = np.stack([image_of(*t) for t in drawn] + [image_of('small', 'red', 'star')])
    got = clip_evaluators.caption_readings(clip, imgs, examples, 'caption', len(examples))
    assert got == {'caption_examples': 4.0, 'caption_size_accuracy': 1.0,
                   'caption_color_accuracy': 1.0, 'caption_shape_accuracy': 0.75}


def test_rerank_orders_images_best_first(colour_clip):
    imgs = np.stack([solid((0, 1, 0)), solid((1, 0.6, 0)), solid((1, 0, 0)), solid((1, 0.2, 0))])
    best, scores = rerank.rerank(colour_clip, imgs, 'red', top=3)
    np.testing.assert_array_equal(best, [2, 3, 1])
    np.testing.assert_allclose(scores, [0, 1 / math.sqrt(1.36), 1, 1 / math.sqrt(1.04)],
                               atol=1e-5)
    table = rerank.score(colour_clip, imgs, list(COLOURS))
    assert table.shape == (4, 3)
    np.testing.assert_array_equal(np.argmax(table, axis=1), [1, 0, 0, 0])
    with pytest.raises(ValueError, match='top=5'):
        rerank.rerank(colour_clip, imgs, 'red', top=5)


def test_split_grid_recovers_the_tiles_of_make_grid():
    tiles = np.random.default_rng(0).integers(0, 255, (6, 5, 7, 3), dtype=np.uint8)
    grid = images.make_grid([tiles[:3], tiles[3:]], min_tile=1)
    np.testing.assert_array_equal(rerank.split_grid(grid, 2, 3), tiles)
    with pytest.raises(ValueError, match='grid_shape'):
        rerank.split_grid(grid, 4, 3)


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('clip_run'))
    assert train_main(['--config', TINY, f'--config.data.data_dir={data_dir}',
                       '--workdir', workdir]) == 0
    return workdir


@pytest.mark.slow
def test_tiny_training_run_gives_a_usable_clip(trained, data_dir, tmp_path, capsys):
    clip = pixelgen.load(trained)
    assert clip.step == 6 and isinstance(clip.assets['tokenizer'], TextTokenizer)
    assert os.path.exists(os.path.join(trained, 'samples', 'retrieval_0000006.png'))
    ctx = EvalContext(loaded=clip, out_dir=str(tmp_path), num_examples=40,
                      options={'data_dir': data_dir})
    scores = clip_evaluators.EVALUATORS['zeroshot'](ctx)
    assert scores['shape_chance'] == 1 / 6 and scores['color_chance'] == 1 / 7
    assert 0 <= scores['shape_accuracy'] <= 1 and 0 <= scores['color_accuracy'] <= 1
    assert 0 < scores['caption_examples'] <= 40 and 0 <= scores['caption_shape_accuracy'] <= 1
    # the CLI reranks the tiles of a grid and writes the best ones
    grid = os.path.join(trained, 'samples', 'retrieval_0000006.png')
    out = str(tmp_path / 'best.png')
    assert rerank.main(['--workdir', trained, '--text', 'a large red star', '--grid', grid,
                        '--grid_shape', '2x3', '--top', '2', '--out', out]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert len(lines) == 2 and float(lines[0].split()[1]) >= float(lines[1].split()[1])
    assert os.path.exists(out)


MULTI_DEVICE = '''
import json, jax, numpy as np
from flax import nnx
from pixelgen import parallel
from pixelgen.config import load_config_file
from pixelgen.models.clip import contrastive_loss
from pixelgen.tasks import clip as clip_task

config = load_config_file(TINY)
rng = np.random.default_rng(0)
batch = {'image': rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
         'tokens': rng.integers(3, 200, (16, 20)).astype(np.int32)}
batch['tokens'][:, 9] = config.model.eot_id
loss_and_logits = lambda m, b: (clip_task.CLIPLoss().loss(m, b, None)[0],
                                 m(b['image'], b['tokens']))

def loss_on(devices):
    mesh = parallel.make_mesh({'data': -1}, devices)
    placed = parallel.global_batch(batch, mesh)
    model = clip_task.build_model(config, nnx.Rngs(0))  # the same weights, on these devices
    with parallel.activation_sharding(mesh, parallel.DEFAULT_RULES):
        loss, logits = nnx.jit(loss_and_logits)(model, placed)
    return float(loss), np.asarray(logits)

eight, _ = loss_on(jax.devices())
one, logits = loss_on(jax.devices()[:1])
# what contrasting each device's 2 rows only would give
local = np.mean([float(contrastive_loss(logits[i:i + 2, i:i + 2])) for i in range(0, 16, 2)])
print(json.dumps({'eight': eight, 'one': one, 'per_device_mean': local}))
'''


@pytest.mark.slow
def test_contrastive_logits_span_the_global_batch_on_8_devices():
    stdout = run_python(f'TINY = {TINY!r}\n' + textwrap.dedent(MULTI_DEVICE), devices=8)
    losses = json.loads(stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(losses['eight'], losses['one'], rtol=1e-5)
    # contrasting only each device's 2 rows would give a very different (smaller) loss
    assert abs(losses['per_device_mean'] - losses['one']) > 0.5

