"""Two processes on localhost through jax.distributed (gloo), launched by
launch/local_multiprocess.sh: same losses as one process, and a crash resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

import pixelgen
from pixelgen.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = os.path.join(REPO, 'launch', 'local_multiprocess.sh')


def _launch(tiny_config_args, workdir):
    return subprocess.Popen(['bash', SCRIPT, '2', *tiny_config_args, '--workdir', workdir],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of `session`."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:  # gone already
            continue
        fields = stat[stat.rindex(')') + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != 'Z':
            found.append(int(entry))
    return found


def _kill_job(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and every trainer it started, at once, like a lost machine. The
    trainers run in process groups of their own (the script's `set -m`), so killing the
    launcher's group would leave them running; they stay in its session, so kill that."""
    for pid in _session_processes(launcher.pid):  # start_new_session: it leads a session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    deadline = time.monotonic() + 30
    while _session_processes(launcher.pid):
        assert time.monotonic() < deadline, 'the killed job\'s processes are still running'
        time.sleep(0.05)


def _losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def one_process(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('one_process'))
    train(tiny_config(data_dir), workdir)
    return workdir


def test_two_processes_match_one(one_process, tiny_config_args, tmp_path):
    workdir = str(tmp_path / 'two')
    proc = _launch(tiny_config_args, workdir)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert '[p0]' in output and 'process 0 of 2' in output
    assert os.path.isfile(os.path.join(workdir, 'logs', 'process_1.log'))
    two, one = _losses(workdir), _losses(one_process)
    assert sorted(two) == sorted(one) == [3, 6, 9, 12]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)
    data_state = os.listdir(os.path.join(workdir, 'checkpoints', '12', 'data'))
    assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data_state)


def test_killed_two_process_job_resumes(one_process, tiny_config_args, tmp_path):
    workdir = str(tmp_path / 'crash')
    proc = _launch(tiny_config_args, workdir)
    first = os.path.join(workdir, 'checkpoints', '6')
    deadline = time.monotonic() + 240
    while not os.path.isdir(first):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill_job(proc)
    rerun = _launch(tiny_config_args, workdir)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert 'resumed from' in output
    for a, b in zip(jax.tree.leaves(pixelgen.load(one_process).model),
                    jax.tree.leaves(pixelgen.load(workdir).model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def _trainer_pid(launcher: subprocess.Popen, process_id: int) -> int:
    """The pid of the trainer with `--process_id process_id` that `launcher` started."""
    for pid in _session_processes(launcher.pid):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                argv = f.read().split(b'\0')
        except OSError:
            continue
        if b'pixelgen.train' in argv and argv[argv.index(b'--process_id') + 1] == \
                str(process_id).encode():
            return pid
    raise AssertionError(f'no trainer with --process_id {process_id} is running')


@pytest.mark.parametrize('signum, name, status', [(signal.SIGTERM, 'SIGTERM', 0),
                                                   (signal.SIGINT, 'SIGINT', 130)])
def test_a_signal_to_one_host_saves_the_same_step_on_both_and_the_rerun_resumes(
        tiny_config_args, tmp_path, signum, name, status):
    workdir = str(tmp_path / 'preempted')
    quiet = ['--config.eval_every_steps=0', '--config.sample_every_steps=0',
             '--config.log_every_steps=1']
    proc = _launch([*tiny_config_args, *quiet, '--config.total_steps=2000',
                    '--config.checkpoint_every_steps=1000'], workdir)
    output = ''
    for line in proc.stdout:  # process 0's lines: wait until the steps run
        output += line
        if line.startswith('[p0] step 3/'):
            break
    else:
        raise AssertionError(f'the job ended before step 3:\n{output}')
    os.kill(_trainer_pid(proc, 1), signum)  # only process 1 gets it
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == status, output  # SIGINT: 130, on both hosts
    log_1 = open(os.path.join(workdir, 'logs', 'process_1.log')).read()
    saved_1 = re.findall(rf'^\[pixelgen\] {name}: saved step (\d+)', log_1, re.M)
    saved_0 = re.findall(rf'{name} \(received by another host\): saved step (\d+)', output)
    assert saved_1 and saved_0 == saved_1, (output, log_1)
    step = int(saved_1[0])
    assert 3 <= step < 1000
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [step]
    data_state = os.listdir(os.path.join(workdir, 'checkpoints', str(step), 'data'))
    assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data_state)
    if signum == signal.SIGINT:
        assert 'interrupted; rerun the same command' in log_1
        return  # the rerun is the same as after SIGTERM

    rerun = _launch([*tiny_config_args, *quiet, f'--config.total_steps={step + 2}',
                     '--config.checkpoint_every_steps=1000'], workdir)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert f'resumed from {workdir}/checkpoints/{step}' in output
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    train_steps = [r['step'] for r in rows if 'train/loss' in r]
    assert train_steps == list(range(1, step + 3))  # no step twice, none missing
