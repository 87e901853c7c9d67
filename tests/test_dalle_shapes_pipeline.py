"""launch/dalle_shapes.sh: the DALL·E pipeline on `shapes` in one command (its :tiny form),
results.json with every figure as a fraction, and a rerun that resumes instead of redoing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.launch]

SCRIPT = os.path.join(REPO, 'launch', 'dalle_shapes.sh')


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, 'PYTHON': sys.executable,
                                             **(env or {})})


def test_bad_arguments_are_refused_with_the_fix():
    done = _run('--seed', '1')
    assert done.returncode == 2 and 'the first argument is WORKDIR' in done.stderr
    done = _run('/tmp/x', '--bogus')
    assert done.returncode == 2 and "unknown option '--bogus'" in done.stderr
    assert _run('--help').stdout.startswith('The DALL·E pipeline')


def test_the_tiny_pipeline_writes_results_and_a_rerun_resumes(tmp_path, data_dir):
    workdir = str(tmp_path / 'pipeline')
    env = {'TFDS_DATA_DIR': data_dir}  # the shapes dataset the session built
    done = _run(workdir, '--tiny', '--guidance_scales', '2', '--dvae_args',
                '--config.model.encoder_width=4 --config.model.decoder_width=4',
                '--clip_args', '--config.total_steps=5',
                '--dalle_args', '--config.total_steps=4', env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = {}
    for model in ('dvae', 'clip', 'dalle'):
        with open(os.path.join(workdir, model, 'config.json')) as f:
            saved[model] = json.load(f)
    assert saved['dvae']['model']['encoder_width'] == 4  # the levers reach their stage
    assert saved['clip']['total_steps'] == 5 and saved['dalle']['total_steps'] == 4
    for part in ('dvae', 'codes', 'clip', 'dalle', 'results.json'):
        assert os.path.exists(os.path.join(workdir, part)), part
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    fractions = [results['heldout'][k][m] for k in ('random', 'reranked')
                 for m in ('color_accuracy', 'shape_accuracy', 'both_accuracy')]
    fractions += list(results['heldout']['guidance']['2'].values())
    fractions += list(results['heldout']['reranked_guidance']['2'].values())
    fractions += list(results['test']['random'].values()) + list(results['dvae'].values())
    fractions += list(results['clip_zeroshot'].values())
    assert len(fractions) == 22 and all(0 <= v <= 1 for v in fractions)
    assert {'caption_color_accuracy', 'caption_shape_accuracy'} <= set(results['clip_zeroshot'])
    assert results['classifier_real']['color_accuracy'] >= 0.99
    two = results['two_objects']
    assert set(two) == {'random', 'real', 'dvae'}
    assert all(0 <= v <= 1 for part in two.values() for v in part.values())
    assert two['real']['relation_accuracy'] >= 0.9  # the classifier reads real pairs
    for part in ('dvae', 'heldout.random', 'heldout.reranked'):  # split by object size
        assert set(results['by_size'][part]) == {'small', 'large'}, part
    assert set(results['by_size']['heldout.random']['small']) == {
        'color_accuracy', 'shape_accuracy', 'both_accuracy'}
    assert results['minutes'] > 0 and 'dvae.shape_accuracy' in results['meets_targets']
    from pixelgen import images  # every held-out caption's row, three panels of its samples
    figure = images.read_rgb(os.path.join(workdir, 'heldout_samples.png'))
    with open(os.path.join(workdir, 'results', 'heldout_random', 'attributes_holdout.txt')) as f:
        assert figure.shape[0] == 28 + (len(f.read().split()) // 4) * 66 + 2
    # Killed after the trainings, it resumes: nothing is trained again, a lost evaluation is
    # redone, and the others are kept.
    os.remove(os.path.join(workdir, 'results', 'test_random.json'))
    os.remove(os.path.join(workdir, 'stages', 'evaluate.seconds'))
    again = _run(workdir, '--tiny', '--guidance_scales', '2', env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ('dvae', 'encode', 'clip', 'dalle'):
        assert f'[dalle_shapes] {stage}: done before' in again.stdout
    assert '[results] heldout_random: done before, kept' in again.stdout
    assert '[results] test_random (' in again.stdout
