"""Disk and paths: an unwritable or nearly full workdir is refused before training starts.
(A save that fails mid-way for lack of space is in test_faults.py: it needs a subprocess.)"""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import pytest
from conftest import tiny_config

from pixelgen import checkpoint
from pixelgen.trainer import train


def test_probe_refuses_a_workdir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    with pytest.raises(checkpoint.WorkdirError, match=r'a_file/run is not writable.*--workdir'):
        checkpoint.probe_workdir(str(blocker / 'run'))


def test_probe_creates_the_workdir_and_leaves_nothing_behind(tmp_path):
    workdir = tmp_path / 'new' / 'run'
    checkpoint.probe_workdir(str(workdir))
    assert os.listdir(workdir) == []


def test_unwritable_workdir_stops_training_before_anything_is_built(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(checkpoint.WorkdirError, match='not writable'):
        train(tiny_config(str(tmp_path / 'no_data')), str(blocker / 'run'))
    assert not (tmp_path / 'no_data').exists()  # stopped before the data was looked at


def test_free_space_check_counts_one_more_checkpoint(tmp_path, monkeypatch):
    state = {'w': jnp.zeros((1024, 1024), jnp.float32)}  # 4 MiB
    needed = int(checkpoint.SPACE_FACTOR * 4 * 2**20) + checkpoint.SPACE_MARGIN_BYTES
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=needed))
    checkpoint.check_free_space(str(tmp_path / 'not' / 'yet' / 'made'), state)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=needed - 1))
    with pytest.raises(checkpoint.WorkdirError,
                       match=r'nearly full: 20\.8 MiB free.*needs about 20\.8 MiB'):
        checkpoint.check_free_space(str(tmp_path), state)


@pytest.mark.slow
def test_nearly_full_disk_stops_training_before_the_first_step(data_dir, tmp_path,
                                                                monkeypatch):
    workdir = str(tmp_path / 'run')
    real = shutil.disk_usage

    def nearly_full(path):  # the workdir's disk reports 1 MiB free; other disks are real
        usage = real(path)
        return usage._replace(free=2**20) if str(path).startswith(workdir) else usage
    monkeypatch.setattr(shutil, 'disk_usage', nearly_full)
    with pytest.raises(checkpoint.WorkdirError, match=r'disk of .*run/checkpoints is nearly '
                                                      r'full: 1\.0 MiB free'):
        train(tiny_config(data_dir), workdir)
    assert not os.path.exists(os.path.join(workdir, 'config.json'))  # stopped before it
    assert checkpoint.make_manager(workdir).all_steps() == []
