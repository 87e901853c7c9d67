"""The eval job: `python -m pixelgen.evaluate` on a tiny trained workdir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from conftest import tiny_config
from PIL import Image

from pixelgen import evaluate
from pixelgen.config import ConfigError


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """(workdir, final metrics) of the tiny config: 12 steps, checkpoints at 6 and 12."""
    from pixelgen.trainer import train
    workdir = str(tmp_path_factory.mktemp('evaluate') / 'run')
    return workdir, train(tiny_config(data_dir), workdir)


def _digests(directory: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def evaluated(trained):
    """Evaluates the latest checkpoint: loss on the whole test split, then probe and samples
    on 64 examples (a second run, whose results join the first's report); (workdir, report,
    digests of the checkpoints before)."""
    workdir, _ = trained
    before = _digests(os.path.join(workdir, 'checkpoints'))
    before['config.json'] = _digests(workdir)['config.json']
    assert evaluate.main(['--workdir', workdir, '--eval', 'loss', '--option',
                          'batch_size=100']) == 0
    assert evaluate.main(['--workdir', workdir, '--eval', 'probe,samples', '--num_examples',
                          '64', '--option', 'batch_size=32']) == 0
    with open(os.path.join(workdir, 'eval', '12', 'report.json')) as f:
        return workdir, json.load(f), before


@pytest.mark.slow
def test_report_has_every_evaluator_and_its_files(evaluated):
    workdir, report, _ = evaluated
    assert report['step'] == 12 and report['task'] == 'igpt'
    assert set(report['evaluators']) == {'loss', 'probe', 'samples'}
    probe = report['evaluators']['probe']['metrics']
    for layer in ('layer_00', 'layer_01'):  # the tiny model has 2 layers
        for split in ('train', 'val', 'test'):
            assert 0.0 <= probe[f'{layer}/{split}_accuracy'] <= 1.0
    assert probe['best_layer'] in (0.0, 1.0)
    assert 0.0 <= probe['pixels/test_accuracy'] <= 1.0
    assert report['files'] == ['completions.png', 'probe_accuracy.png']
    for name in report['files']:
        with Image.open(os.path.join(workdir, 'eval', '12', name)) as image:
            assert image.format == 'PNG'
    tensorboard = os.path.join(workdir, 'eval', 'tensorboard', 'eval_job')
    assert any(f.startswith('events.out') for f in os.listdir(tensorboard))


@pytest.mark.slow
def test_loss_matches_the_trainers_final_test_evaluation(trained, evaluated):
    _, final = trained
    loss = evaluated[1]['evaluators']['loss']['metrics']
    assert loss['num_examples'] == 1000  # the whole shapes test split
    assert loss['bits_per_dim'] == pytest.approx(final['test/bits_per_dim'], rel=1e-4)


@pytest.mark.slow
def test_checkpoints_and_config_are_untouched(evaluated):
    workdir, _, before = evaluated
    after = _digests(os.path.join(workdir, 'checkpoints'))
    after['config.json'] = _digests(workdir)['config.json']
    assert after == before


@pytest.mark.slow
def test_watch_evaluates_each_checkpoint_once(trained, tmp_path):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns('eval'))
    kwargs = {'timeout_s': 30.0, 'poll_s': 0.05, 'num_examples': 4}
    assert evaluate.watch(workdir, ['loss'], **kwargs) == [6, 12]
    # A restarted watcher finds both reports and, the final step being done, exits at once.
    assert evaluate.watch(workdir, ['loss'], **kwargs) == []
    # Asking for another evaluator evaluates the steps again, keeping the first results.
    assert evaluate.watch(workdir, ['loss', 'samples'], **kwargs) == [6, 12]
    report = evaluate.read_report(workdir, 6)
    assert set(report['evaluators']) == {'loss', 'samples'}


@pytest.mark.slow
def test_unknown_evaluator_missing_step_and_missing_workdir_are_clear_errors(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(ConfigError, match=r"--eval nope: not an evaluator of task 'igpt'.*"
                                          r"'loss', 'probe', 'samples'"):
        evaluate.main(['--workdir', workdir, '--eval', 'loss,nope'])
    with pytest.raises(FileNotFoundError, match=r'No checkpoint for step 7.*\[6, 12\]'):
        evaluate.main(['--workdir', workdir, '--eval', 'loss', '--step', '7'])
    with pytest.raises(FileNotFoundError, match='does not exist'):
        evaluate.main(['--workdir', str(tmp_path / 'missing'), '--eval', 'loss'])


def test_summary_prints_a_row_per_layer():
    lines = evaluate.format_metrics({'best_layer': 1.0, 'layer_00/test_accuracy': 0.5,
                                     'layer_01/test_accuracy': 0.75})
    assert lines[0] == '  best_layer 1'
    assert lines[-2].split() == ['layer_00', '0.5000']
    assert lines[-1].split() == ['layer_01', '0.7500']


@pytest.mark.slow
def test_without_eval_the_configs_declared_evaluators_run_with_their_options(trained, tmp_path):
    """config.evals names the evaluators and their options, so `--workdir W` alone reproduces
    an evaluation; --option overrides a declared option; an empty declaration asks for --eval."""
    workdir = str(tmp_path / 'copy')
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns('eval'))
    path = os.path.join(workdir, 'config.json')
    with open(path) as f:
        tree = json.load(f)
    tree['evals'] = {'samples': {'num_images': 1, 'samples_per_image': 1, 'seed': 3}}
    with open(path, 'w') as f:
        json.dump(tree, f)
    assert evaluate.main(['--workdir', workdir, '--option', 'seed=5']) == 0
    report = evaluate.read_report(workdir, 12)
    assert set(report['evaluators']) == {'samples'}
    assert report['evaluators']['samples']['options'] == {
        'num_images': '1', 'samples_per_image': '1', 'seed': '5'}
    tree['evals'] = {}
    with open(path, 'w') as f:
        json.dump(tree, f)
    with pytest.raises(ConfigError, match=r'declares no evaluator.*--eval loss,probe,samples'):
        evaluate.main(['--workdir', workdir])
