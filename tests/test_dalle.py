"""DALL·E: sequence and embeddings, the weighted loss, causality, generation, task, sample CLI."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelgen.config import ConfigError, parse_config_args
from pixelgen.models.dalle import PAD_ID, DallE
from pixelgen.sampling import filter_logits, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'dalle_shapes.py') + ':tiny'
T, W, TEXT_VOCAB, IMAGE_VOCAB = 6, 4, 40, 16


@pytest.fixture(scope='module')
def model() -> DallE:
    m = DallE(text_vocab_size=TEXT_VOCAB, image_vocab_size=IMAGE_VOCAB, text_len=T,
              grid_size=W, num_layers=4, width=32, num_heads=2, rngs=nnx.Rngs(0))
    # The heads start at zero (uniform predictions); random ones make every check bite.
    for i, head in enumerate((m.text_head, m.image_head)):
        head.kernel[...] = jax.random.normal(jax.random.key(i), head.kernel.shape)
    return m


@pytest.fixture(scope='module')
def batch() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    text = rng.integers(3, TEXT_VOCAB, (3, T))
    text[0, 2:], text[1, 5:] = PAD_ID, PAD_ID  # rows with 1, 4 and 5 text targets
    return jnp.asarray(text, jnp.int32), jnp.asarray(rng.integers(0, IMAGE_VOCAB, (3, W * W)))


@pytest.fixture(scope='module')
def forward(model):
    return nnx.jit(lambda m, text, image: m(text, image))


@pytest.mark.slow
def test_shapes_schedule_and_embeddings(model, batch, forward):
    text, image = batch
    text_logits, image_logits = forward(model, text, image)
    assert text_logits.shape == (3, T - 1, TEXT_VOCAB) and text_logits.dtype == jnp.float32
    assert image_logits.shape == (3, W * W, IMAGE_VOCAB)
    assert model.layer_kinds == ('row', 'column', 'row', 'conv')
    h = np.asarray(model.embed(text, image))
    assert h.shape == (3, T + W * W, 32)
    # Image token p = (r, c): token + row r + column c embeddings.
    p = 6
    expected = (model.image_embed.embedding[...][image[2, p]] + model.row_embed[...][p // W]
                + model.col_embed[...][p % W])
    np.testing.assert_allclose(h[2, T + p], expected, rtol=1e-6)


def test_every_text_position_has_its_own_pad(model):
    pads = jnp.full((1, T), PAD_ID, jnp.int32)
    h = np.asarray(model.embed(pads, jnp.zeros((1, W * W), jnp.int32)))[0, :T]
    table = model.text_embed.embedding[...]
    for k in range(T):  # pad at position k is token text_vocab + k, not a shared pad row
        np.testing.assert_allclose(h[k], table[TEXT_VOCAB + k] + model.text_pos[...][k],
                                   rtol=1e-6)
    assert len({row.tobytes() for row in table[TEXT_VOCAB:TEXT_VOCAB + T]}) == T
    assert table.shape[0] == TEXT_VOCAB + T


def test_logits_never_see_later_tokens(model, batch, forward):
    text, image = batch
    text_logits, image_logits = forward(model, text, image)
    p = 9  # change image token p: image logits 0..p predict tokens <= p from tokens < them
    changed = image.at[:, p].set((image[:, p] + 1) % IMAGE_VOCAB)
    text_after, image_after = forward(model, text, changed)
    np.testing.assert_array_equal(text_after, text_logits)
    np.testing.assert_allclose(image_after[:, :p + 1], image_logits[:, :p + 1], rtol=1e-6)
    assert not np.allclose(image_after[:, p + 1:], image_logits[:, p + 1:])
    k = 3  # change text token k: text logits 0..k-1 (predicting tokens 1..k) stay
    changed_text = text.at[2, k].set(4 if int(text[2, k]) != 4 else 5)
    text_after, image_after = forward(model, changed_text, image)
    np.testing.assert_allclose(text_after[2, :k], text_logits[2, :k], rtol=1e-6)
    assert not np.allclose(image_after[2], image_logits[2])  # the image sees all text


@pytest.mark.slow
def test_kv_cache_decoding_matches_the_forward_pass(model, batch, forward):
    text, image = batch
    _, image_logits = forward(model, text, image)
    sequence = jnp.concatenate([text, image], axis=1)
    step = nnx.jit(lambda m, token, position, cache: m.decode_step(token, position, cache))
    cache, decoded = model.init_cache(3), []
    for position in range(T + W * W - 1):
        logits, cache = step(model, sequence[:, position], position, cache)
        if position >= T - 1:
            decoded.append(logits)
    np.testing.assert_allclose(np.stack(decoded, axis=1), image_logits, atol=1e-4)


@pytest.mark.slow
def test_the_loss_normalises_text_and_image_separately(model, batch, forward):
    from pixelgen.tasks.dalle import DalleLoss
    text, image = batch
    config = parse_config_args(['--config', TINY])[0]
    loss_fn = nnx.jit(lambda m, b: DalleLoss(config).loss(m, b, None))
    loss, metrics = loss_fn(model, {'text': text, 'image': image})
    text_logits, image_logits = forward(model, text, image)
    text_nll = -jnp.take_along_axis(jax.nn.log_softmax(text_logits), text[:, 1:, None], -1)[..., 0]
    image_nll = -jnp.take_along_axis(jax.nn.log_softmax(image_logits), image[..., None],
                                     -1)[..., 0]
    real = np.asarray(text[:, 1:] != PAD_ID)
    assert real.sum() == 1 + 4 + 5  # pads are not targets
    text_mean = float(np.asarray(text_nll)[real].mean())
    image_mean = float(np.mean(image_nll))
    np.testing.assert_allclose(metrics['text_loss'], text_mean, rtol=1e-5)
    np.testing.assert_allclose(metrics['image_loss'], image_mean, rtol=1e-5)
    np.testing.assert_allclose(loss, text_mean / 8 + 7 * image_mean / 8, rtol=1e-5)
    # Pooling both kinds into one mean (or weighting token sums) gives another number.
    pooled = (np.asarray(text_nll)[real].sum() + float(np.sum(image_nll))) / (
        real.sum() + image_nll.size)
    weighted_sums = (np.asarray(text_nll)[real].sum() / 8 + 7 * float(np.sum(image_nll)) / 8) / (
        real.sum() + image_nll.size)
    for wrong in (pooled, weighted_sums):
        assert abs(float(loss) - wrong) > 1e-2 * abs(float(loss))
    with config.unlocked():
        config.loss.text_weight, config.loss.image_weight = 1.0, 0.0
    text_only, _ = nnx.jit(lambda m, b: DalleLoss(config).loss(m, b, None))(
        model, {'text': text, 'image': image})
    np.testing.assert_allclose(text_only, text_mean, rtol=1e-5)


@pytest.mark.slow
def test_generation_keeps_the_prompt_and_follows_the_model(model, batch, forward):
    text, image = batch
    prompt = image[:, :5]
    codes = generate(model, jax.random.key(1), text, image_prompt=prompt, top_k=1)
    assert codes.shape == (3, W * W) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(codes[:, :5], prompt)
    # Greedy: every drawn code is the argmax of the full forward pass given the codes before.
    _, image_logits = forward(model, text, codes)
    np.testing.assert_array_equal(codes[:, 5:], jnp.argmax(image_logits, -1)[:, 5:])
    drawn = generate(model, jax.random.key(2), text, temperature=1.5, top_p=0.9)
    assert int(drawn.min()) >= 0 and int(drawn.max()) < IMAGE_VOCAB
    np.testing.assert_array_equal(drawn, generate(model, jax.random.key(2), text,
                                                  temperature=1.5, top_p=0.9))
    with pytest.raises(ValueError, match='text_len=6'):
        generate(model, jax.random.key(0), text[:, :4])
    # A process of a multi-host job draws its rows of the batch, exactly.
    part = generate(model, jax.random.key(2), text[1:], temperature=1.5, top_p=0.9, rows=(1, 3),
                    batch_size=3)
    np.testing.assert_array_equal(part, np.asarray(drawn)[1:])


def test_guided_generation_draws_from_the_mixed_logits_of_caption_and_empty_caption(
        model, batch, forward):
    """Classifier-free guidance: greedy codes are the argmax of u + s (c - u), with c the
    logits given the caption and u those given the empty caption (every position a pad)."""
    text, _ = batch
    scale = 3.0
    codes = generate(model, jax.random.key(1), text, top_k=1, guidance_scale=scale)
    _, conditional = forward(model, text, codes)
    _, unconditional = forward(model, jnp.full_like(text, PAD_ID), codes)
    guided = unconditional + scale * (conditional - unconditional)
    np.testing.assert_array_equal(codes, jnp.argmax(guided, -1))
    assert (np.asarray(codes) != np.asarray(generate(model, jax.random.key(1), text,
                                                     top_k=1))).any()
    np.testing.assert_array_equal(  # s = 1 is plain conditional sampling
        generate(model, jax.random.key(4), text, guidance_scale=1.0),
        generate(model, jax.random.key(4), text))
    with pytest.raises(ValueError, match='guidance_scale'):
        generate(model, jax.random.key(0), text, guidance_scale=-1.0)


def test_caption_dropout_trains_on_the_empty_caption(model, batch):
    from pixelgen.tasks.dalle import DalleLoss
    text, image = batch
    config = parse_config_args(['--config', TINY])[0]
    with config.unlocked():
        config.loss.caption_dropout = 0.999999
    dropped, _ = nnx.jit(lambda m, b: DalleLoss(config).loss(m, b, jax.random.key(0)))(
        model, {'text': text, 'image': image})
    with config.unlocked():
        config.loss.caption_dropout = 0.0
    empty, _ = nnx.jit(lambda m, b: DalleLoss(config).loss(m, b, None))(
        model, {'text': jnp.full_like(text, PAD_ID), 'image': image})
    kept, _ = nnx.jit(lambda m, b: DalleLoss(config).loss(m, b, None))(
        model, {'text': text, 'image': image})
    np.testing.assert_allclose(dropped, empty, rtol=1e-6)
    assert abs(float(kept) - float(empty)) > 1e-3
    with config.unlocked():
        config.loss.caption_dropout = 1.0
    with pytest.raises(ConfigError, match='caption_dropout'):
        DalleLoss(config)


def test_top_k_and_top_p_filtering():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.1)))
    assert kept.tolist() == [[True, False, False, False]]  # the best always stays
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=3)))
    assert kept.tolist() == [[True, True, True, False]]


@pytest.mark.slow
def test_12b_config_has_the_papers_shape_and_about_12b_parameters():
    from pixelgen.tasks.dalle import num_params
    config = parse_config_args(['--config', os.path.join(REPO, 'configs', 'dalle.py:12b')])[0]
    m = config.model
    assert (m.num_layers, m.num_heads, m.width, m.text_vocab_size, m.image_vocab_size,
            m.text_len, m.grid_size) == (64, 62, 3968, 16384, 8192, 256, 32)
    assert 12.0e9 < num_params(config) < 12.5e9


def test_bad_config_values_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match='Did you mean model.text_len'):
        parse_config_args(['--config', TINY, '--config.model.text_lenn=3'])
    from pixelgen.tasks.dalle import build_model
    config = parse_config_args(['--config', TINY, "--config.model.layer_kinds=('row', 'x')"])[0]
    with pytest.raises(ConfigError, match='model.layer_kinds'):
        build_model(config, nnx.Rngs(0))


# The task and the command line, on a tiny codes dataset ----------------------------------------
def _codes_examples(n: int, seed: int, two_every: int = 0):
    """Random codes with one-object captions; every `two_every`-th a two-object one."""
    from pixelgen.data.builders.shapes import COLORS, SHAPES, SIZES
    rng = np.random.default_rng(seed)
    for i in range(n):
        s, c, z = SHAPES[rng.integers(6)], COLORS[rng.integers(7)], SIZES[rng.integers(2)]
        caption = f'a {z} {c} {s}'
        if two_every and i % two_every == two_every - 1:
            caption += ' to the left of a small red circle'
        yield {'codes': rng.integers(0, IMAGE_VOCAB, (W, W)).astype(np.uint16),
               'caption': caption, 'label': SHAPES.index(s)}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny DALL·E trained for a few steps on random codes, and a random tiny dVAE."""
    from pixelgen import tasks
    from pixelgen.convert import save_workdir
    from pixelgen.data.codes import write_codes
    from pixelgen.trainer import train
    root = tmp_path_factory.mktemp('dalle')
    codes_dir, workdir, dvae_dir = (str(root / n) for n in ('codes', 'dalle', 'dvae'))
    write_codes(codes_dir, 'train', _codes_examples(48, 0), grid_size=W, codebook_size=16)
    write_codes(codes_dir, 'test', _codes_examples(8, 1, two_every=4), grid_size=W,
                codebook_size=16)
    dvae_config = parse_config_args(['--config', os.path.join(REPO, 'configs',
                                                               'dvae_shapes.py:tiny'),
                                     '--config.model.codebook_size=16'])[0]
    save_workdir(dvae_config, tasks.module(dvae_config).build_model(dvae_config, nnx.Rngs(0)),
                 dvae_dir)
    config = parse_config_args(['--config', TINY, f'--config.data.codes_dir={codes_dir}',
                                f'--config.dvae_workdir={dvae_dir}'])[0]
    result = train(config, workdir)
    return {'workdir': workdir, 'codes_dir': codes_dir, 'dvae': dvae_dir, 'result': result,
            'config': config}


@pytest.mark.slow
def test_training_reports_both_losses_and_keeps_its_tokenizer(trained, capsys):
    import pixelgen
    from pixelgen.tasks.dalle import DalleTask
    result = trained['result']
    for key in ('train/text_loss', 'train/image_loss', 'train/text_truncated', 'test/text_loss',
                'test/image_loss'):
        assert math.isfinite(result[key]), key
    loaded = pixelgen.load(trained['workdir'])
    tokenizer = loaded.assets['tokenizer']
    assert tokenizer.decode(tokenizer.encode(['A Large RED circle'], 8).ids) == [
        'a large red circle']
    assert os.path.exists(os.path.join(trained['workdir'], 'samples',
                                       'generations_0000006.png'))
    task = DalleTask(trained['config'], trained['workdir'])  # the held-out pair never trains
    captions = [task.train_source[i]['caption'] for i in range(len(task.train_source))]
    assert captions and not any('red star' in c for c in captions)
    assert 'are truncated' in capsys.readouterr().out


def test_start_up_reads_only_the_tokenizers_sample_when_encoding_dropped_the_pairs(
        tmp_path, capsys, monkeypatch):
    """Codes written without the held-out pairs (`dvae encode --exclude_phrases`) need no scan
    of the captions at start-up, and the BPE trains on data.tokenizer_captions of them; codes
    written with them are scanned and the pairs dropped there."""
    from pixelgen.data import pipeline
    from pixelgen.data.codes import write_codes
    from pixelgen.tasks.dalle import DalleTask
    rows = [e for e in _codes_examples(60, 0) if 'red star' not in e['caption']][:40]
    late = rows + [{**rows[0], 'caption': 'a small red star'}]
    excluded, scanned = str(tmp_path / 'excluded'), str(tmp_path / 'scanned')
    for out, train, meta in ((excluded, rows, {'train_excluded_phrases': ['Red Star']}),
                             (scanned, late, {})):
        write_codes(out, 'train', train, grid_size=W, codebook_size=16, metadata=meta)
        write_codes(out, 'test', _codes_examples(4, 1), grid_size=W, codebook_size=16)

    def config(codes_dir):
        return parse_config_args(['--config', TINY, f'--config.data.codes_dir={codes_dir}',
                                  '--config.data.tokenizer_captions=7'])[0]

    scans = []
    without = pipeline.without_phrases
    monkeypatch.setattr(pipeline, 'without_phrases', lambda *a, **k: scans.append(a) or
                        without(*a, **k))
    task = DalleTask(config(excluded), str(tmp_path / 'a'))
    out = capsys.readouterr().out
    assert not scans and len(task.train_source) == 40
    assert 'on 7 captions' in out and 'dropped at encoding' in out and 'of 7 sampled' in out
    task = DalleTask(config(scanned), str(tmp_path / 'b'))
    assert len(scans) == 1 and len(task.train_source) == 40
    assert 'dropped 1 here' in capsys.readouterr().out


@pytest.mark.slow
def test_fine_tuning_from_a_dalle_workdir_keeps_its_tokenizer(trained, tmp_path, capsys):
    import pixelgen
    from pixelgen.trainer import train
    config = trained['config'].copy_and_resolve_references()
    with config.unlocked():
        config.init_from, config.total_steps = trained['workdir'], 2
        config.eval_every_steps = config.sample_every_steps = config.checkpoint_every_steps = 2
    workdir = str(tmp_path / 'finetuned')
    train(config, workdir)
    with open(os.path.join(trained['workdir'], 'tokenizer.json'), 'rb') as a, \
            open(os.path.join(workdir, 'tokenizer.json'), 'rb') as b:
        assert a.read() == b.read()
    assert f'initialised from {trained["workdir"]}' in capsys.readouterr().out
    assert pixelgen.load(workdir).step == 2  # a fresh run of 2 steps, not a resume of 6
    with config.unlocked():
        config.init_from = str(tmp_path)  # no tokenizer.json there
    with pytest.raises(ConfigError, match='has no tokenizer.json'):
        train(config, str(tmp_path / 'refused'))


@pytest.mark.slow
def test_sample_cli_writes_a_grid_and_warns_on_long_prompts(trained, capsys, tmp_path):
    from PIL import Image

    from pixelgen import sample
    out = str(tmp_path / 'out')
    long_prompt = 'a large red star to the left of a small blue circle above a white cross'
    assert sample.main(['--workdir', trained['workdir'], '--prompt', long_prompt, '--num', '4',
                        '--out', out]) == 0
    captured = capsys.readouterr()
    assert 'warning: the prompt is longer than model.text_len=8' in captured.err
    files = os.listdir(out)
    assert len(files) == 1 and files[0].endswith('.png')
    with Image.open(os.path.join(out, files[0])) as grid:
        assert grid.size[0] > 2 * 8 and grid.mode == 'RGB'  # 2x2 tiles of decoded images
    # Image-prompted: the top row of test example 0 is kept, the rest completed.
    assert sample.main(['--workdir', trained['workdir'], '--prime_index', '0', '--prime_rows',
                        '1', '--num', '4', '--out', out]) == 0
    assert len(os.listdir(out)) == 2
    # The user's own picture, encoded by the dVAE: its top code row given.
    picture = str(tmp_path / 'mine.png')
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(picture)
    assert sample.main(['--workdir', trained['workdir'], '--prime_image', picture,
                        '--prime_rows', '1', '--prompt', 'a small red star', '--num', '2',
                        '--out', out]) == 0
    assert any('_primemine' in f for f in os.listdir(out))
    with pytest.raises(SystemExit):  # what should the rest show? --prompt is required
        sample.main(['--workdir', trained['workdir'], '--prime_image', picture,
                     '--prime_rows', '1'])
    # --out naming a PNG is the grid; --out_dir gets each image; guidance draws other images.
    grid, each = str(tmp_path / 'g' / 'grid.png'), str(tmp_path / 'each')
    for scale, name in (('1', 'grid.png'), ('3', 'guided.png')):
        assert sample.main(['--workdir', trained['workdir'], '--prompt', 'a large red star',
                            '--num', '3', '--out', str(tmp_path / 'g' / name),
                            '--out_dir', each + scale, '--guidance_scale', scale]) == 0
    assert sorted(os.listdir(tmp_path / 'g')) == ['grid.png', 'guided.png']
    assert sorted(os.listdir(each + '1')) == [f'a_large_red_star_00{i}.png' for i in range(3)]
    with Image.open(grid) as g, Image.open(os.path.join(each + '1', 'a_large_red_star_001.png')
                                           ) as tile:
        scale = -(-64 // tile.size[0])  # make_grid enlarges tiles to at least 64 pixels
        big = tile.size[0] * scale
        np.testing.assert_array_equal(  # the second tile of the grid (2-pixel gaps)
            np.asarray(g)[2:2 + big:scale, 4 + big:4 + 2 * big:scale], np.asarray(tile))
    with pytest.raises(SystemExit):  # --top ranks by CLIP: refused without a CLIP workdir
        sample.main(['--workdir', trained['workdir'], '--prompt', 'a red star', '--num', '4',
                     '--top', '2'])


def test_split_grid_gives_back_the_tiles_and_panels_are_laid_side_by_side():
    from pixelgen import images

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (3, 5, 16, 16, 3), dtype=np.uint8)
    grid = images.make_grid(list(tiles))  # enlarged 4x to 64-pixel tiles
    back = images.split_grid(grid, rows=3, cols=5)
    assert back.shape == (3, 5, 64, 64, 3)
    np.testing.assert_array_equal(back[:, :, ::4, ::4], tiles)
    with pytest.raises(ValueError, match='not a make_grid of 4 rows'):
        images.split_grid(grid, rows=4, cols=5)
    figure = images.labelled_panels([('left', back[:, :2]), ('right', back[:, 3:])],
                                    ['one', 'two', 'three'])
    assert figure.shape[0] > grid.shape[0] and figure.dtype == np.uint8
    left = images.make_grid(list(back[:, :2]))
    x = figure.shape[1] - 2 * left.shape[1] - 24  # the labels' column, then two panels
    np.testing.assert_array_equal(figure[28:28 + left.shape[0], x:x + left.shape[1]], left)
    assert (figure[:28] < 128).any()  # the titles are drawn


def test_attribute_accuracies_split_by_object_size():
    from pixelgen.evaluators.dalle import attribute_accuracies, caption_size

    class Reads:  # what a classifier read from four pictures: (colour, shape) indices
        def predict(self, pictures):
            return np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1])

    got = attribute_accuracies(Reads(), None, np.array([0, 1, 2, 0]), np.array([0, 0, 0, 1]),
                               'p_', sizes=['small', 'large', 'small', 'large'])
    assert got['p_color_accuracy'] == got['p_shape_accuracy'] == 0.75
    assert got['p_small_color_accuracy'] == 1.0 and got['p_large_color_accuracy'] == 0.5
    assert got['p_small_shape_accuracy'] == 1.0 and got['p_large_shape_accuracy'] == 0.5
    assert got['p_small_both_accuracy'] == 1.0 and got['p_large_both_accuracy'] == 0.0
    assert 'p_large_color_accuracy' not in attribute_accuracies(
        Reads(), None, np.zeros(4, int), np.zeros(4, int), 'p_', sizes=['small'] * 4)
    assert caption_size('a large red star') == 'large'


@pytest.mark.slow
def test_attribute_classifier_reads_real_shapes_and_the_evaluator_runs(trained, data_dir,
                                                                        tmp_path):
    import pixelgen
    from pixelgen.data import pipeline
    from pixelgen.data.builders import COLORS, SHAPES
    from pixelgen.evaluators import EvalContext
    from pixelgen.evaluators.dalle import (
        EVALUATORS,
        AttributeClassifier,
        holdout_captions,
        parse_two_objects,
        two_object_accuracies,
    )
    classifier = AttributeClassifier(data_dir, num_images=400)
    test = pipeline.open_source('shapes', 'test', data_dir)
    real = [r for r in (test[i] for i in range(120)) if r['num_objects'] == 1]
    colours, shape_ids = classifier.predict(np.stack([r['image'] for r in real]))
    assert np.mean(colours == [r['color'] for r in real]) > 0.95
    assert np.mean(shape_ids == [r['shape'] for r in real]) > 0.9
    assert holdout_captions(('red star',)) == ['a small red star', 'a large red star']
    ctx = EvalContext(loaded=pixelgen.load(trained['workdir']), out_dir=str(tmp_path),
                      options={'samples': '4', 'data_dir': data_dir, 'classifier_images': '200'})
    metrics = EVALUATORS['attribute_accuracy'](ctx)
    assert metrics['num_captions'] == 2 and metrics['num_images'] == 8  # 2 sizes of 'red star'
    assert 0 <= metrics['both_accuracy'] <= metrics['color_accuracy'] <= 1
    assert metrics['real_images_both_accuracy'] > 0.9
    assert metrics['small_color_accuracy'] + metrics['large_color_accuracy'] == pytest.approx(
        2 * metrics['color_accuracy'])  # 4 images of each size
    assert os.path.exists(tmp_path / 'attributes_holdout.png')

    # Two objects: both attributes and the relation, read at each object's place.
    two = [r for r in (test[i] for i in range(300)) if r['num_objects'] == 2]
    pictures = np.stack([r['image'] for r in two])
    captions = [r['caption'].decode() for r in two]
    read = two_object_accuracies(classifier, pictures, captions, '')
    assert read['two_objects_found'] > 0.95 and read['two_relation_accuracy'] > 0.9
    assert read['two_all_accuracy'] > 0.8
    mirrored = two_object_accuracies(classifier, pictures[:, :, ::-1], captions, '')
    swapped = [c for c in captions if 'left' in c or 'right' in c]  # left <-> right now
    assert len(swapped) > 10 and mirrored['two_relation_accuracy'] < 0.5
    assert parse_two_objects('a small red star above a large blue circle') == (
        (COLORS.index('red'), SHAPES.index('star')), 'above',
        (COLORS.index('blue'), SHAPES.index('circle')))
    assert parse_two_objects('a small red star') is None
    ctx.options.update(captions='two', num_captions='3', samples='2')
    metrics = EVALUATORS['attribute_accuracy'](ctx)
    assert metrics['num_captions'] == 2 and metrics['num_images'] == 4  # the test split's 2
    assert metrics['real_images_two_all_accuracy'] > 0.8
    assert 0 <= metrics['two_all_accuracy'] <= metrics['two_color_accuracy'] <= 1
