"""End to end: the loss falls, outputs appear, resuming equals an uninterrupted run,
a checkpoint of another model shape is refused without being touched, load() and sampling."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
from conftest import TINY, tiny_config

import pixelgen
from pixelgen import checkpoint
from pixelgen.trainer import train


@pytest.fixture(scope='module')
def finished_run(data_dir, tmp_path_factory):
    """One uninterrupted tiny run (12 steps, checkpoints at 6 and 12)."""
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    result = train(tiny_config(data_dir), workdir)
    return workdir, result


def _params(workdir: str):
    return jax.tree.leaves(pixelgen.load(workdir).model)  # nnx modules are pytrees of params


@pytest.mark.slow
def test_run_writes_everything_a_user_looks_at(finished_run):
    workdir, result = finished_run
    for name in ('config.json', 'palette.npy', 'metrics.jsonl'):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int) == ['6', '12']
    assert any(f.startswith('events') for f in os.listdir(
        os.path.join(workdir, 'tensorboard', 'train')))
    assert os.path.isfile(os.path.join(workdir, 'samples', 'completions_0000012.png'))
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    train_records = [r for r in records if 'train/loss' in r]
    assert [r['step'] for r in train_records] == [3, 6, 9, 12]
    assert all('train/bits_per_dim' in r for r in train_records)
    assert 'test/bits_per_dim' in result


@pytest.mark.slow
def test_loss_falls(finished_run):
    workdir, result = finished_run
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    losses = [r['train/loss'] for r in records if 'train/loss' in r]
    assert losses[-1] < losses[0] - 0.2
    assert result['test/bits_per_dim'] < np.log2(16)  # below the uniform palette baseline


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(finished_run, data_dir, tmp_path):
    workdir, result = finished_run
    resumed = str(tmp_path / 'resumed')
    first = train(tiny_config(data_dir), resumed, stop_after=6)
    assert 'test/bits_per_dim' not in first  # stopped early: no final eval yet
    second = train(tiny_config(data_dir), resumed)
    for a, b in zip(_params(workdir), _params(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert second['test/loss'] == pytest.approx(result['test/loss'], abs=1e-6)
    # Determinism: the same config and seed give the same loss curve on the same machine.
    assert _loss_curve(resumed) == pytest.approx(_loss_curve(workdir), abs=1e-6)


def _loss_curve(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    curve = {row['step']: row['train/loss'] for row in rows if 'train/loss' in row}
    assert len(curve) >= 2, rows
    return curve


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_is_refused_and_kept(finished_run, data_dir):
    workdir, _ = finished_run
    ckpt = checkpoint.checkpoint_dir(workdir)
    before = {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)}
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r'model\.width.*32.*64'):
        train(tiny_config(data_dir, '--config.model.width=64', '--config.total_steps=24'),
              workdir)
    after = {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)}
    assert before == after


@pytest.mark.slow
def test_load_gives_model_config_and_palette(finished_run):
    workdir, _ = finished_run
    loaded = pixelgen.load(workdir)
    assert loaded.step == 12 and loaded.config.task == 'igpt'
    k, side = loaded.config.data.palette_size, loaded.config.data.image_size
    assert loaded.palette.shape == (k, 3)
    tokens = np.zeros((2, side * side), np.int32)
    assert loaded.model(tokens).shape == (2, side * side, k)
    with pytest.raises(FileNotFoundError, match='available steps'):
        pixelgen.load(workdir, step=5)


@pytest.mark.slow
def test_sample_command_writes_pngs(finished_run, tmp_path):
    from pixelgen.sample import main
    workdir, _ = finished_run
    assert main(['--workdir', workdir, '--num', '2', '--out', str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ['sample_completions_0000012.png',
                                            'unconditional_0000012.png']


def _launch(args, workdir):
    import subprocess
    import sys

    from conftest import REPO
    return subprocess.Popen([sys.executable, '-m', 'pixelgen.train', *args, '--workdir', workdir],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, workdir: str, step: int, timeout: float = 120.0) -> None:
    import time
    path = os.path.join(checkpoint.checkpoint_dir(workdir), str(step))
    deadline = time.monotonic() + timeout
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, 'no checkpoint appeared'
        time.sleep(0.05)


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def _assert_each_step_once(workdir: str) -> None:
    """metrics.jsonl holds no (step, metric) twice, and the rows of an uninterrupted run."""
    seen = [(row['step'], key) for row in _rows(workdir) for key in row if key != 'step']
    assert len(seen) == len(set(seen)), sorted(seen)
    assert [r['step'] for r in _rows(workdir) if 'train/loss' in r] == [3, 6, 9, 12]
    assert [r['step'] for r in _rows(workdir) if 'test/loss' in r] == [12]


@pytest.mark.slow
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(finished_run, tiny_config_args,
                                                            data_dir, tmp_path):
    import signal
    workdir, result = finished_run
    killed = str(tmp_path / 'killed')
    train(tiny_config(data_dir), killed, stop_after=6)  # checkpoint 6
    proc = _launch(tiny_config_args, killed)
    output = ''
    for line in proc.stdout:  # killed once step 9 is logged, before checkpoint 12
        output += line
        if line.startswith('step 9/'):
            break
    else:
        raise AssertionError(output)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [r['step'] for r in _rows(killed) if 'train/loss' in r] == [3, 6, 9]
    rerun = _launch(tiny_config_args, killed)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert 'resumed from' in output and 'dropped 1 rows past step 6' in output
    for a, b in zip(_params(workdir), _params(killed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    _assert_each_step_once(killed)  # the rows past the restored step were dropped


@pytest.mark.slow
def test_sigint_finishes_the_save_in_flight_saves_the_step_and_exits_130(
        tiny_config_args, tmp_path):
    import signal
    workdir = str(tmp_path / 'interrupted')
    proc = _launch([*tiny_config_args, '--config.log_every_steps=1',
                    '--config.eval_every_steps=0', '--config.sample_every_steps=0'], workdir)
    output = ''
    for line in proc.stdout:  # step 6's save was started asynchronously just before
        output += line
        if line.startswith('step 7/'):
            break
    else:
        raise AssertionError(output)
    proc.send_signal(signal.SIGINT)
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    saved = int(re.search(r'SIGINT: saved step (\d+)', output)[1])
    assert 7 <= saved < 12 and 'rerun the same command' in output
    directory = checkpoint.checkpoint_dir(workdir)
    assert sorted(os.listdir(directory), key=int) == ['6', str(saved)]  # no *-tmp-* left


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tiny_config_args, tmp_path):
    import signal
    workdir = str(tmp_path / 'preempted')
    proc = _launch([*tiny_config_args, '--config.total_steps=400',
                    '--config.checkpoint_every_steps=200', '--config.log_every_steps=1',
                    '--config.eval_every_steps=0', '--config.sample_every_steps=0'], workdir)
    output = ''
    for line in proc.stdout:  # wait until training steps are running
        output += line
        if line.startswith('step 2/'):
            break
    proc.send_signal(signal.SIGTERM)
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert 'SIGTERM: saved step' in output
    steps = checkpoint.make_manager(workdir).all_steps()
    assert steps and 2 <= steps[-1] < 400


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_one(finished_run, data_dir, tmp_path):
    import shutil
    workdir, _ = finished_run
    damaged = str(tmp_path / 'damaged')
    shutil.copytree(workdir, damaged)
    ckpt = checkpoint.checkpoint_dir(damaged)
    os.remove(os.path.join(ckpt, '12', 'state', 'manifest.ocdbt'))  # a lost file
    train(tiny_config(data_dir), damaged)  # warns, resumes from 6, trains 6 -> 12 again
    assert os.listdir(os.path.join(damaged, 'checkpoints_corrupt'))[0].startswith('12-')
    for a, b in zip(_params(workdir), _params(damaged), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_restore_step_picks_a_checkpoint(finished_run, data_dir, tmp_path):
    import shutil
    workdir, _ = finished_run
    again = str(tmp_path / 'again')
    shutil.copytree(workdir, again)
    with pytest.raises(FileNotFoundError, match='available'):
        train(tiny_config(data_dir), again, restore_step=5)
    result = train(tiny_config(data_dir, '--config.total_steps=12'), again, restore_step=12)
    assert 'test/loss' in result
    _assert_each_step_once(again)  # the final evaluation replaced the earlier one


def _scalar_events(workdir: str) -> list[tuple[str, int]]:
    """(tag, step) of the scalars TensorBoard shows for W/tensorboard/train: its event files
    read in order, applying their purges (a SessionLog.START at step S hides the events of
    earlier files at steps >= S)."""
    import struct

    from tensorboardX.proto import event_pb2
    folder = os.path.join(workdir, 'tensorboard', 'train')
    shown: list[tuple[str, int]] = []
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), 'rb').read()
        offset = 0
        while offset < len(data):  # TFRecords: length, its crc, the record, its crc
            (length,) = struct.unpack('<Q', data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.HasField('session_log') and event.session_log.status == 1:  # START
                shown = [(tag, step) for tag, step in shown if step < event.step]
            shown += [(v.tag, event.step) for v in event.summary.value]
    return shown


@pytest.mark.slow
def test_rewinding_a_finished_run_keeps_the_later_checkpoints_aside_or_deletes_them(
        finished_run, data_dir, tmp_path):
    import shutil
    workdir, _ = finished_run
    rewound = str(tmp_path / 'rewound')
    shutil.copytree(workdir, rewound)
    train(tiny_config(data_dir), rewound, restore_step=6)  # trains 7..12 again, saves 12
    aside = os.listdir(os.path.join(rewound, 'checkpoints_after_rewind'))
    assert len(aside) == 1 and aside[0].startswith('6-')
    kept = os.path.join(rewound, 'checkpoints_after_rewind', aside[0])
    assert os.listdir(kept) == ['12']  # the earlier run's step 12, intact
    assert sorted(checkpoint.make_manager(rewound).all_steps()) == [6, 12]
    for a, b in zip(_params(workdir), _params(rewound), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    _assert_each_step_once(rewound)
    events = _scalar_events(rewound)
    assert len(events) == len(set(events)) and ('train/loss', 12) in events

    train(tiny_config(data_dir), rewound, restore_step=6, overwrite_later=True)
    assert os.listdir(os.path.join(rewound, 'checkpoints_after_rewind')) == aside
    assert sorted(checkpoint.make_manager(rewound).all_steps()) == [6, 12]
    _assert_each_step_once(rewound)


@pytest.mark.slow
def test_exploding_run_stops_without_saving_a_nonfinite_state(data_dir, tmp_path):
    workdir = str(tmp_path / 'exploding')
    config = tiny_config(data_dir, '--config.optimizer.learning_rate=1e30',
                         '--config.optimizer.grad_clip_norm=1e30',
                         '--config.optimizer.skip_nonfinite_updates=2',
                         '--config.checkpoint_every_steps=1', '--config.log_every_steps=1')
    with pytest.raises(FloatingPointError, match='non-finite.*learning_rate'):
        train(config, workdir)
    for step in checkpoint.make_manager(workdir).all_steps():
        leaves = jax.tree.leaves(pixelgen.load(workdir, step).model)
        assert all(np.isfinite(np.asarray(x)).all() for x in leaves), step


def test_a_misspelled_key_fails_before_anything_is_written(tmp_path):
    from pixelgen import train
    from pixelgen.config import ConfigError
    workdir = tmp_path / 'w'
    with pytest.raises(ConfigError, match='Did you mean model.num_layers'):
        train.main(['--config', TINY, '--config.model.num_layrs=2', '--workdir', str(workdir)])
    assert not workdir.exists()
