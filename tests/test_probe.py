"""The linear probe: accurate where classes are linearly separable, at chance where the labels
carry no signal, and its plot is a real PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixelgen import probe

CLASSES = 4
SEPARATIONS = (0.0, 0.5, 4.0)  # one synthetic 'layer' each: noise, weak, linearly separable


@pytest.fixture(scope='module')
def layers():
    """(train features [3, 600, 16], train labels, test features [3, 300, 16], test labels)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 900)
    features = np.stack([
        rng.normal(size=(CLASSES, 16))[labels] * s + rng.normal(size=(900, 16))
        for s in SEPARATIONS]).astype(np.float32)
    return features[:, :600], labels[:600], features[:, 600:], labels[600:]


@pytest.fixture(scope='module')
def results(layers):
    return probe.probe_layers(*layers)


def test_separable_layer_is_classified_and_chosen_as_best(results):
    assert results[2].test_accuracy > 0.95
    assert results[2].train_accuracy > 0.95
    assert probe.best_layer(results) == 2


def test_noise_layer_and_shuffled_labels_are_at_chance(results, layers):
    assert results[0].test_accuracy < 1 / CLASSES + 0.1
    train_x, train_y, test_x, test_y = layers
    shuffled = np.random.default_rng(1).permutation(train_y)
    result = probe.fit_probe(train_x[2], shuffled, test_x[2], test_y)
    assert result.test_accuracy < 1 / CLASSES + 0.1


def test_accuracy_ordering_follows_separability(results):
    accuracies = [r.test_accuracy for r in results]
    assert accuracies[0] < accuracies[1] < accuracies[2]


def test_single_class_labels_are_refused(layers):
    train_x, train_y, test_x, test_y = layers
    with pytest.raises(ValueError, match='single class'):
        probe.fit_probe(train_x[0], np.zeros_like(train_y), test_x[0], test_y)


def test_collect_drops_padding_rows():
    batches = [{'label': np.array([1, 2, 0]), 'mask': np.array([1.0, 1.0, 0.0]),
                'x': np.arange(3.0)}]
    features, labels = probe.collect(batches, lambda b: np.stack([b['x'][:, None]] * 2))
    assert features.shape == (2, 2, 1)
    np.testing.assert_array_equal(labels, [1, 2])


def test_plot_is_a_png_of_the_expected_size(results, tmp_path):
    path = probe.accuracy_plot(results, str(tmp_path / 'probe.png'), baseline=0.5)
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert image.size == (640, 400)
        pixels = np.asarray(image.convert('RGB'))
    assert (pixels != 255).any(axis=-1).mean() > 0.01  # something was drawn
    assert ((pixels[..., 0] > 150) & (pixels[..., 1] < 80)).any()  # the red test curve


def test_curve_plot_draws_the_best_layer_against_steps(tmp_path):
    path = probe.curve_plot([100, 200, 300], [0.6, 0.7, 0.75], str(tmp_path / 'curve.png'),
                            baseline=0.72)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert('RGB'))
    assert pixels.shape == (400, 640, 3)
    assert ((pixels[..., 0] > 150) & (pixels[..., 1] < 80)).any()  # the red curve
    assert ((pixels == 120).all(axis=-1)).any()  # the dashed baseline


@pytest.mark.slow
def test_the_probe_curve_command_trains_probes_every_checkpoint_and_resumes(data_dir,
                                                                           tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, TINY
    workdir = str(tmp_path / 'run')
    command = [sys.executable, os.path.join(REPO, 'launch', 'igpt_probe_curve.py'), workdir,
               '--config', TINY, f'--config.data.data_dir={data_dir}', '--num_examples', '40',
               '--batch_size', '8']
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, 'probe_results.json')) as f:
        results = json.load(f)
    assert results['steps'] == [6, 12]  # the tiny config checkpoints every 6 of 12 steps
    final = results['final']
    assert final['test_examples'] == 40 and len(final['layers_test_accuracy']) == 2
    assert 0 <= final['best_layer_test_accuracy'] <= 1
    assert results['beats_pixels'] == (final['best_layer_test_accuracy']
                                       > final['pixels_test_accuracy'])
    assert os.path.exists(os.path.join(workdir, 'probe_curve.png'))
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and 'probing step' not in again.stdout  # reports kept
