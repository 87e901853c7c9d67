"""Fault injection: SIGKILL at many points, even inside an async checkpoint save, then the
same command again; the run must end exactly where an uninterrupted one does, and a
half-written checkpoint must never be taken as the latest. Corruption: flipped bits and
truncated files in a checkpoint are always detected (array checksums, file digest), and each
kind of job then does what docs/reliability.md#checksums says.

The child process is `python -m pixelgen.train` with a test hook (CHILD below) that can stall
Orbax's atomic save right after it created the temporary directory or right before it renames
it into place: the parent kills the child while it is stalled there.

The longer campaign (random kill points, reported in the issue's closing note):
    python tests/test_faults.py --kills 30 --data_dir /tmp/tfds
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import pixelgen
from pixelgen import checkpoint

pytestmark = [pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'igpt_shapes.py') + ':tiny'
QUIET = ('--config.eval_every_steps=0', '--config.sample_every_steps=0')  # params unchanged
STALL_ENV = 'PIXELGEN_TEST_STALL'  # 'create:<step>' or 'finalize:<step>'
STALLED = 'STALLED in'
FSIZE_ENV = 'PIXELGEN_TEST_FILE_SIZE_LIMIT'  # '<step>:<bytes>': RLIMIT_FSIZE once step is saved

# Runs pixelgen.train; with $PIXELGEN_TEST_STALL set it blocks inside the atomic save of one
# checkpoint step: after the tmp dir is created, or before it is renamed to the final name.
# With $PIXELGEN_TEST_FILE_SIZE_LIMIT, once that step is saved the kernel refuses to let any
# file grow past the limit (EFBIG): later checkpoint writes fail as on a full disk.
CHILD = f'''
import os, resource, signal, sys, time
from orbax.checkpoint._src.path import atomicity
where, _, step = os.environ.get({STALL_ENV!r}, '').partition(':')
path_class = atomicity.AtomicRenameTemporaryPath
create, finalize = path_class.create, path_class.finalize
def stall(tmp_path, point):
    if where == point and tmp_path.get_final().name == step:
        print(f'{STALLED} ' + point + ' of checkpoint ' + step + ': ' + str(tmp_path.get()),
              flush=True)
        time.sleep(3600)
async def stalled_create(self):
    path = await create(self)
    stall(self, 'create')
    return path
async def stalled_finalize(self):
    stall(self, 'finalize')
    return await finalize(self)
async def finalize_then_limit(self):
    await stalled_finalize(self)
    if self.get_final().name == fsize_step:  # from now on, no file may grow past fsize bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), resource.RLIM_INFINITY))
fsize_step, _, fsize = os.environ.get({FSIZE_ENV!r}, '').partition(':')
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG)
path_class.create, path_class.finalize = stalled_create, finalize_then_limit
from pixelgen import cli
from pixelgen.train import main
cli.run(main)
'''


def launch(args: list[str], workdir: str, stall: str = '', file_size_limit: str = ''
           ) -> subprocess.Popen:
    env = {**os.environ, STALL_ENV: stall, FSIZE_ENV: file_size_limit}
    return subprocess.Popen([sys.executable, '-c', CHILD, *args, '--workdir', workdir],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_until(proc: subprocess.Popen, marker: str, timeout: float = 300.0) -> str:
    """Reads the child's output until a line starts with `marker`, then SIGKILLs it.
    Returns the output; fails if the child ends or the time runs out first."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    output = ''
    try:
        for line in proc.stdout:
            output += line
            if line.startswith(marker):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc.stdout.close()
                return output
    finally:
        timer.cancel()
    proc.wait()
    raise AssertionError(f'the child ended (rc {proc.returncode}) before {marker!r}:\n{output}')


def finish(proc: subprocess.Popen, timeout: float = 300.0) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


def committed_steps(workdir: str) -> list[int]:
    """The checkpoints that training would resume from (what Orbax lists as complete)."""
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        return list(manager.all_steps())
    finally:
        manager.close()


def tmp_checkpoints(workdir: str) -> list[str]:
    directory = checkpoint.checkpoint_dir(workdir)
    return sorted(f for f in os.listdir(directory) if 'tmp' in f) if os.path.isdir(
        directory) else []


def resumed_from(output: str) -> int | None:
    found = re.findall(r'resumed from .*/checkpoints/(\d+)', output)
    return int(found[-1]) if found else None


def params(workdir: str) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(pixelgen.load(workdir).model)]


def assert_same_params(a: str, b: str) -> None:
    for x, y in zip(params(a), params(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory) -> str:
    """The reference: the same tiny run, never killed (checkpoints at 6 and 12)."""
    from conftest import tiny_config

    from pixelgen.trainer import train
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    train(tiny_config(data_dir, *QUIET), workdir)
    return workdir


def test_kills_inside_async_saves_then_reruns_end_like_an_uninterrupted_run(
        uninterrupted, tiny_config_args, tmp_path):
    workdir = str(tmp_path / 'killed')
    args = [*tiny_config_args, *QUIET]

    # 1. Killed while checkpoint 6 is fully written but not yet renamed into place.
    out = run_until(launch(args, workdir, stall='finalize:6'), STALLED)
    assert 'finalize of checkpoint 6' in out
    assert tmp_checkpoints(workdir), 'the half-written checkpoint should still be there'
    assert committed_steps(workdir) == []  # ... and never taken as the latest

    # 2. The rerun starts afresh, commits 6, and is killed just after it began writing 12.
    out = run_until(launch(args, workdir, stall='create:12'), STALLED)
    assert resumed_from(out) is None and 'create of checkpoint 12' in out
    assert committed_steps(workdir) == [6]

    # 3. The last rerun resumes from 6 and finishes; no checkpoint was reported damaged.
    out = finish(launch(args, workdir))
    assert resumed_from(out) == 6 and '[pixelgen] WARNING' not in out, out
    assert committed_steps(workdir) == [6, 12] and not tmp_checkpoints(workdir)
    assert_same_params(uninterrupted, workdir)


def test_a_save_that_fails_for_lack_of_space_keeps_the_previous_checkpoint(
        uninterrupted, tiny_config_args, data_dir, tmp_path):
    from conftest import tiny_config

    from pixelgen.trainer import train
    workdir = str(tmp_path / 'full')
    proc = launch([*tiny_config_args, *QUIET], workdir, file_size_limit='6:65536')
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert re.search(r'Saving checkpoint 12 in .* failed \(.*File too large.*\); checkpoint 6 is '
                     r'intact and a rerun resumes from it\. Free disk space', output), output
    assert committed_steps(workdir) == [6] and not tmp_checkpoints(workdir)
    train(tiny_config(data_dir, *QUIET), workdir)  # space is back: the same command resumes
    assert_same_params(uninterrupted, workdir)


def test_sigterm_that_lands_after_the_save_decision_is_saved_at_the_next_step(
        data_dir, tmp_path, monkeypatch):
    from conftest import tiny_config

    from pixelgen.metric_writer import MetricWriter
    from pixelgen.trainer import train
    write = MetricWriter.write

    def write_then_preempt(self, step, *args, **kwargs):  # SIGTERM while step 2 is logged
        write(self, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(MetricWriter, 'write', write_then_preempt)
    workdir = str(tmp_path / 'preempted')
    train(tiny_config(data_dir, *QUIET, '--config.log_every_steps=1'), workdir)
    assert committed_steps(workdir) == [3]


# Corruption: every damaged checkpoint is detected ------------------------------------------

def _full_state_target(workdir: str, step: int):
    """Restore targets for the whole training state of `workdir`'s checkpoint `step`."""
    import orbax.checkpoint as ocp
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))['state']
    finally:
        manager.close()
    return checkpoint.abstract(state)


def _damaged_copy(source: str, root: str, name: str, damage) -> tuple[str, str]:
    """A copy of workdir `source` in `root/name` (a fresh path each time: tensorstore caches
    by path) whose file picked and changed by `damage(files) -> (relative path, new bytes)`."""
    import shutil
    workdir = os.path.join(root, name)
    shutil.copytree(source, workdir)
    step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), '12')
    files = sorted(os.path.relpath(os.path.join(d, f), step_dir)
                   for d, _, names in os.walk(step_dir) for f in names)
    rel, data = damage(step_dir, files)
    with open(os.path.join(step_dir, rel), 'wb') as f:
        f.write(data)
    return workdir, rel


def _flip_bit(rng, path: str) -> bytes:
    data = bytearray(open(path, 'rb').read())
    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    return bytes(data)


def _restore(workdir: str, target, config):
    """Checkpoint 12 of `workdir`, restored whole and verified: the state, or the message of
    its CorruptCheckpointError."""
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        return checkpoint.restore(manager, 12, target, None, config)
    except checkpoint.CorruptCheckpointError as e:
        return str(e)
    finally:
        manager.close()


def _restore_fails(workdir: str, target, config) -> str:
    """The CorruptCheckpointError message of restoring checkpoint 12 of `workdir` whole."""
    result = _restore(workdir, target, config)
    assert isinstance(result, str), f'{workdir}: the damage was not detected'
    return result


def test_a_flipped_bit_in_any_data_file_fails_the_array_checksums_or_is_never_read(
        uninterrupted, tmp_path):
    from pixelgen.config import load_saved_config
    config, target = load_saved_config(uninterrupted), _full_state_target(uninterrupted, 12)
    rng = np.random.default_rng(0)
    step_dir = os.path.join(checkpoint.checkpoint_dir(uninterrupted), '12')
    data_files = sorted(os.path.relpath(os.path.join(d, f), step_dir)
                        for d, _, names in os.walk(step_dir) for f in names
                        if os.path.basename(d) == 'd')
    intact = [np.asarray(x) for x in jax.tree.leaves(_restore(uninterrupted, target, config))]
    caught_by_checksums = 0
    for i, data_file in enumerate(data_files):
        def flip(step_dir, files, data_file=data_file):
            os.remove(os.path.join(step_dir, checkpoint.DIGEST_FILE))  # arrays' sums alone
            return data_file, _flip_bit(rng, os.path.join(step_dir, data_file))
        workdir, _ = _damaged_copy(uninterrupted, str(tmp_path), f'flip{i}', flip)
        result = _restore(workdir, target, config)
        if isinstance(result, str):  # tree nodes carry CRCs (unreadable); arrays the sums
            assert re.search(r'differ from their saved checksum|unreadable', result), result
            caught_by_checksums += 'saved checksum' in result
        else:  # a file that no restore reads (OCDBT nodes superseded by the merged tree)
            for x, y in zip(intact, jax.tree.leaves(result), strict=True):
                np.testing.assert_array_equal(x, np.asarray(y))
    assert caught_by_checksums >= 1


def test_campaign_of_bit_flips_and_truncations_across_checkpoint_files_is_all_detected(
        uninterrupted, tmp_path):
    from pixelgen.config import load_saved_config
    config, target = load_saved_config(uninterrupted), _full_state_target(uninterrupted, 12)
    rng = np.random.default_rng(1)
    report = []
    for i in range(12):
        kind = 'flip' if i % 3 else 'truncate'

        def damage(step_dir, files, kind=kind):
            rel = str(rng.choice(files))
            path = os.path.join(step_dir, rel)
            if kind == 'flip':
                return rel, _flip_bit(rng, path)
            data = open(path, 'rb').read()
            return rel, data[:int(rng.integers(len(data)))]
        workdir, rel = _damaged_copy(uninterrupted, str(tmp_path), f'{kind}{i}', damage)
        report.append((kind, rel, _restore_fails(workdir, target, config)))
    assert len({rel for _, rel, _ in report}) >= 6, report  # spread over the files


def test_a_damaged_checkpoint_is_refused_by_readers_skipped_by_watch_set_aside_by_training(
        uninterrupted, data_dir, tmp_path, capsys):
    from conftest import tiny_config

    from pixelgen import evaluate
    from pixelgen.trainer import train
    rng = np.random.default_rng(2)

    def flip_params(step_dir, files):  # the largest array file: it holds the parameters
        rel = max((f for f in files if '/d/' in f),
                  key=lambda f: os.path.getsize(os.path.join(step_dir, f)))
        return rel, _flip_bit(rng, os.path.join(step_dir, rel))
    workdir, _ = _damaged_copy(uninterrupted, str(tmp_path), 'damaged', flip_params)

    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r'checkpoints/12 is damaged.*Load another step instead '
                             r'\(--step 6'):
        pixelgen.load(workdir)
    assert pixelgen.load(workdir, 6).step == 6

    assert evaluate.watch(workdir, ['loss'], timeout_s=0, poll_s=0,
                          num_examples=8) == [6]
    assert 'WARNING: skipped damaged checkpoint 12' in capsys.readouterr().out

    train(tiny_config(data_dir, *QUIET), workdir)  # moves 12 aside, resumes from 6
    out = capsys.readouterr().out
    assert re.search(r'WARNING: Checkpoint .*/12 is damaged.*Moved it to .*checkpoints_corrupt'
                     r'/12-.*falling back to the previous checkpoint', out), out
    assert 'resumed from' in out and out.count('resumed from') == 1
    assert_same_params(uninterrupted, workdir)


# The longer campaign ------------------------------------------------------------------------

def campaign(kills: int, data_dir: str, root: str, seed: int = 0) -> dict:
    """Kills a 48-step run (checkpoints every 4 steps) `kills` times at random points, rerunning
    the same command each time, and compares every finished run with an uninterrupted one.
    A run that finishes before its kill lands starts a fresh workdir."""
    rng = np.random.default_rng(seed)
    total, every = 48, 4
    args = ['--config', TINY, f'--config.data.data_dir={data_dir}', *QUIET,
            f'--config.total_steps={total}', f'--config.checkpoint_every_steps={every}',
            '--config.log_every_steps=1', '--config.optimizer.warmup_steps=4']
    reference = os.path.join(root, 'reference')
    start = time.perf_counter()
    finish(launch(args, reference))
    duration = time.perf_counter() - start
    report = {'uninterrupted_s': round(duration, 1), 'kills': [], 'finished_runs': []}
    workdir = os.path.join(root, 'run0')

    def compare(output: str) -> None:
        nonlocal workdir
        report['finished_runs'].append({'resumed_from': resumed_from(output), 'equal': all(
            np.allclose(x, y, atol=1e-6, rtol=0) for x, y in zip(
                params(reference), params(workdir), strict=True))})
        workdir = os.path.join(root, f'run{len(report["finished_runs"])}')

    while len(report['kills']) < kills:
        before = committed_steps(workdir) if os.path.isdir(workdir) else []
        done = before[-1] if before else 0
        # Once the last checkpoint is saved only the final evaluation is left: kill in time.
        kind = str(rng.choice(['create', 'finalize', 'step', 'time'] if done < total
                              else ['time']))
        if kind in ('create', 'finalize'):  # inside the save of a checkpoint still to come
            target = int(rng.choice(range(done + every, total + 1, every)))
            proc, marker = launch(args, workdir, stall=f'{kind}:{target}'), STALLED
        elif kind == 'step':  # once a step is done, wherever that falls between saves
            target = int(rng.integers(done + 1, total + 1))
            proc, marker = launch(args, workdir), f'step {target}/'
        else:  # a random moment, start-up included
            target = round(float(rng.uniform(0, duration)), 2)
            proc, marker = launch(args, workdir), None
        if marker is None:
            time.sleep(target)
            proc.send_signal(signal.SIGKILL)
            output = proc.communicate()[0]
        else:
            output = run_until(proc, marker)
        reached = [int(s) for s in re.findall(r'^step (\d+)/', output, re.M)]
        after = committed_steps(workdir)
        report['kills'].append({
            'kind': kind, 'target': target, 'latest_before': before[-1] if before else None,
            'resumed_from': resumed_from(output),
            'step_reached': reached[-1] if reached else None,
            'latest_after': after[-1] if after else None,
            'damaged_warning': '[pixelgen] WARNING' in output})
        print(json.dumps(report['kills'][-1]), file=sys.stderr, flush=True)
        if proc.returncode == 0:  # it finished before the kill landed
            report['kills'][-1]['kind'] = f'{kind} (too late: run had finished)'
            compare(output)
    if os.path.isdir(workdir):
        compare(finish(launch(args, workdir)))
    return report


if __name__ == '__main__':
    import argparse
    import tempfile
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--kills', type=int, default=30)
    parser.add_argument('--data_dir', required=True, help='a tfds dir (shapes is built there)')
    parser.add_argument('--seed', type=int, default=0)
    flags = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        print(json.dumps(campaign(flags.kills, flags.data_dir, root, flags.seed), indent=1))
