"""CLIP's evaluators beyond zero-shot: recall@k retrieval, a linear probe on image features,
and prompt templates from a file (the paper's 80 ImageNet templates are shipped)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import REPO
from flax import nnx

import pixelgen
from pixelgen.config import ConfigError, parse_config_args
from pixelgen.convert import save_workdir
from pixelgen.data import pipeline
from pixelgen.data.text import TextTokenizer
from pixelgen.evaluators import EvalContext, clip_features, evaluators
from pixelgen.tasks import clip as clip_task

TINY = os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny'


def test_recall_at_k_counts_a_query_right_when_any_correct_item_is_in_its_top_k():
    scores = np.array([[0.9, 0.1, 0.5, 0.3],    # correct item 2 ranks 2nd
                       [0.2, 0.8, 0.1, 0.0],    # correct item 1 ranks 1st
                       [0.7, 0.6, 0.5, 0.1]])   # correct items 3 (4th) and 2 (3rd)
    correct = np.zeros((3, 4), bool)
    correct[0, 2] = correct[1, 1] = correct[2, 3] = correct[2, 2] = True
    assert clip_features.recall_at_k(scores, correct, ks=(1, 2, 3, 4)) == {
        1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: 1.0}


def test_the_shipped_imagenet_templates_are_the_papers_80():
    templates = clip_features.load_templates('imagenet')
    assert len(templates) == len(set(templates)) == 80
    assert templates[0] == 'a bad photo of a {}.' and templates[-1] == 'a tattoo of the {}.'
    assert 'itap of my {}.' in templates and all(t.count('{}') == 1 for t in templates)


def test_a_template_file_is_read_and_a_line_without_a_slot_is_refused(tmp_path):
    path = tmp_path / 'templates.txt'
    path.write_text('a drawing of a {}.\n\n  a {} shape  \n')
    assert clip_features.load_templates(str(path)) == ('a drawing of a {}.', 'a {} shape')
    path.write_text('a drawing of a {}.\na photo\n')
    with pytest.raises(ConfigError, match="'a photo'"):
        clip_features.load_templates(str(path))
    with pytest.raises(ConfigError, match='neither a file nor one of the shipped sets'):
        clip_features.load_templates(str(tmp_path / 'missing.txt'))


def test_clip_task_lists_the_new_evaluators():
    assert {'zeroshot', 'linear_probe', 'retrieval'} <= set(evaluators('clip'))


@pytest.fixture(scope='module')
def clip_workdir(data_dir, tmp_path_factory) -> str:
    """An untrained tiny CLIP saved as a workdir, with a BPE trained on shapes' captions."""
    config, _ = parse_config_args(['--config', TINY, f'--config.data.data_dir={data_dir}'])
    workdir = str(tmp_path_factory.mktemp('clip_evals'))
    source = pipeline.open_source('shapes', 'train', data_dir)
    tokenizer = TextTokenizer.train(
        (clip_task.caption_text(source[i]['caption']) for i in range(300)),
        vocab_size=config.model.vocab_size)
    save_workdir(config, clip_task.build_model(config, nnx.Rngs(0)), workdir)
    tokenizer.save(os.path.join(workdir, clip_task.TOKENIZER_FILE))
    return workdir


def context(workdir, data_dir, out_dir, n, **options):
    return EvalContext(loaded=pixelgen.load(workdir), out_dir=str(out_dir), num_examples=n,
                       options={'data_dir': data_dir, **options})


@pytest.mark.slow
def test_retrieval_reports_recall_that_grows_with_k_and_is_whole_past_the_gallery(
        clip_workdir, data_dir, tmp_path):
    ctx = context(clip_workdir, data_dir, tmp_path, 24)
    scores = clip_features.retrieval(ctx)
    assert scores['num_images'] == 24 and 1 <= scores['num_texts'] <= 24
    for side in ('image_to_text', 'text_to_image'):
        r = [scores[f'{side}/recall@{k}'] for k in (1, 5, 10)]
        assert 0 <= r[0] <= r[1] <= r[2] <= 1
    if scores['num_texts'] <= 10:
        assert scores['image_to_text/recall@10'] == 1.0
    # recall@1 of image->text recomputed by hand from the embeddings
    source = pipeline.open_source('shapes', 'test', data_dir)
    loaded = ctx.loaded
    examples = [source[i] for i in range(24)]
    captions = [clip_task.caption_text(e['caption']) for e in examples]
    texts = sorted(set(captions))
    imgs = np.stack([pipeline.to_rgb_square(e['image'], 16) for e in examples])
    sims = clip_features.embed_images(loaded, imgs) @ clip_features.embed_texts(loaded, texts).T
    by_hand = np.mean([texts[int(np.argmax(s))] == c for s, c in zip(sims, captions, strict=True)])
    assert scores['image_to_text/recall@1'] == pytest.approx(by_hand)


@pytest.mark.slow
def test_linear_probe_fits_on_image_features(clip_workdir, data_dir, tmp_path):
    scores = clip_features.linear_probe(context(clip_workdir, data_dir, tmp_path, 60))
    assert scores['train_examples'] == scores['test_examples'] == 60
    for key in ('train_accuracy', 'val_accuracy', 'test_accuracy'):
        assert 0 <= scores[key] <= 1
    with pytest.raises(ConfigError, match="no feature 'nope'"):
        clip_features.linear_probe(context(clip_workdir, data_dir, tmp_path, 10,
                                           label_key='nope'))


@pytest.mark.slow
def test_zeroshot_uses_the_templates_of_the_option(clip_workdir, data_dir, tmp_path,
                                                   monkeypatch):
    from pixelgen.evaluators import clip as clip_evaluators
    path = tmp_path / 'templates.txt'
    path.write_text('a small {} thing\na big {} thing\n')
    seen = []
    real = clip_evaluators.class_embeddings

    def spy(clip, task):
        seen.append(tuple(task.templates))
        return real(clip, task)
    monkeypatch.setattr(clip_evaluators, 'class_embeddings', spy)
    scores = clip_evaluators.zeroshot(context(clip_workdir, data_dir, tmp_path, 12,
                                              templates=str(path)))
    assert seen == [('a small {} thing', 'a big {} thing')] * 2  # shape and colour
    assert 0 <= scores['shape_accuracy'] <= 1
