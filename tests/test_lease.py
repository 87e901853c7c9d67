"""One trainer per workdir: the lease `W/trainer.lock` is created only if absent, so of
trainers starting together exactly one runs; a live holder is named; a stale lock (dead
holder on this host, or an old heartbeat) is taken over with a message."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from pixelgen import lease


def _write_lock(workdir, **holder) -> None:
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'token': 'x',
              'started': time.time(), 'heartbeat': time.time(), **holder}
    os.makedirs(workdir, exist_ok=True)
    with open(lease.lock_path(str(workdir)), 'w') as f:
        json.dump(record, f)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def _contend(workdir: str, start, done, results, index: int) -> None:
    """A process that tries to take the lock when all are ready, and holds it until all
    have tried."""
    held = lease.Lease(workdir)
    start.wait()
    try:
        held.acquire()
        results[index] = 'won'
    except lease.WorkdirLockedError as e:
        results[index] = str(e)
    done.wait()
    if results[index] == 'won':
        held.release()


def _race(workdir: str, contenders: int = 6) -> list[str]:
    # Forked, not spawned (which would import JAX in each): the children run only the lock's
    # plain-Python code, never JAX, so JAX's threads in the parent cannot deadlock them.
    context = multiprocessing.get_context('fork')
    start, done = context.Barrier(contenders), context.Barrier(contenders)
    results = context.Manager().list([''] * contenders)
    procs = [context.Process(target=_contend, args=(workdir, start, done, results, i))
             for i in range(contenders)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return list(results)


FORK_OK = pytest.mark.filterwarnings('ignore:os.fork:RuntimeWarning')


@FORK_OK
def test_of_trainers_starting_together_exactly_one_takes_the_lock(tmp_path):
    results = _race(str(tmp_path))
    assert results.count('won') == 1, results
    assert all('Another trainer is using' in r for r in results if r != 'won')
    assert not os.path.exists(lease.lock_path(str(tmp_path)))  # released at the end


@FORK_OK
def test_of_trainers_taking_over_one_stale_lock_together_exactly_one_wins(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    results = _race(str(tmp_path))
    assert results.count('won') == 1, results


def test_a_second_trainer_is_refused_at_once_naming_the_holder(tmp_path):
    from conftest import TINY

    from pixelgen import train
    _write_lock(tmp_path, host='node-7')  # a live holder: a fresh heartbeat
    start = time.monotonic()
    with pytest.raises(lease.WorkdirLockedError,
                       match=rf"pid {os.getpid()} on host 'node-7'.*holds .*trainer.lock"):
        train.main(['--config', TINY, '--workdir', str(tmp_path)])
    assert time.monotonic() - start < 10
    assert sorted(os.listdir(tmp_path)) == ['trainer.lock']  # nothing else was written


def test_a_lock_of_an_ended_process_on_this_host_is_taken_over(tmp_path, capsys):
    _write_lock(tmp_path, pid=_dead_pid(), heartbeat=time.time())
    held = lease.Lease(str(tmp_path))
    held.acquire()
    assert 'took over the stale lock' in capsys.readouterr().out
    with open(lease.lock_path(str(tmp_path))) as f:
        assert json.load(f)['pid'] == os.getpid()
    held.release()


def test_a_lock_whose_heartbeat_is_older_than_lock_stale_minutes_is_taken_over(
        tmp_path, capsys):
    _write_lock(tmp_path, host='elsewhere', heartbeat=time.time() - 5 * 60)
    with pytest.raises(lease.WorkdirLockedError, match='heartbeat 300 s ago'):
        lease.Lease(str(tmp_path), stale_minutes=10).acquire()
    held = lease.Lease(str(tmp_path), stale_minutes=4)
    held.acquire()
    assert re.search(r"took over the stale lock .* host 'elsewhere'.*heartbeat is 5.0 minutes "
                     r'old \(over --lock_stale_minutes=4\)', capsys.readouterr().out)
    held.release()


def test_the_holder_beats_its_heartbeat_and_removes_its_lock(tmp_path):
    held = lease.Lease(str(tmp_path), stale_minutes=0.01)  # a beat every 0.15 s
    held.acquire()
    path = lease.lock_path(str(tmp_path))
    first = json.load(open(path))['heartbeat']
    time.sleep(0.6)
    assert json.load(open(path))['heartbeat'] > first
    held.release()
    assert not os.path.exists(path)


def test_lock_stale_minutes_must_be_positive_and_is_checked_before_anything_is_written(
        tmp_path):
    from conftest import TINY

    from pixelgen import train
    from pixelgen.config import ConfigError
    workdir = tmp_path / 'w'
    with pytest.raises(ConfigError, match='--lock_stale_minutes=0 must be positive'):
        train.main(['--config', TINY, '--workdir', str(workdir), '--lock_stale_minutes', '0'])
    assert not workdir.exists()


@pytest.mark.slow
def test_the_lock_on_gcs_refuses_a_second_trainer_and_takes_over_a_stale_one(tmp_path):
    """Against the GCS emulator of tests/test_gcs.py. The emulator ignores preconditions
    (ifGenerationMatch), so the race itself is tested on local disk (above); here the lock
    object, the refusal, the takeover and the release."""
    pytest.importorskip('gcp_storage_emulator')
    import test_gcs
    from gcp_storage_emulator.server import create_server
    with socket.socket() as s:
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    server = create_server('localhost', port, in_memory=True, default_bucket=test_gcs.BUCKET)
    server.start()
    url = f'http://localhost:{port}'
    env = {**os.environ, 'STORAGE_EMULATOR_HOST': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
    try:
        out = test_gcs.job((url, env), str(tmp_path), code=f'''
            import json, time
            from pixelgen import lease, storage
            workdir = 'gs://{test_gcs.BUCKET}/locked'
            path = lease.lock_path(workdir)
            first = lease.Lease(workdir)
            first.acquire()
            assert json.loads(storage.read_text(path))['token'] == first.token
            try:
                lease.Lease(workdir).acquire()
                raise AssertionError('a second trainer took the lock')
            except lease.WorkdirLockedError as e:
                print('refused:', e)
            first.release()
            assert not storage.exists(path)
            storage.write_text(path, json.dumps({{'host': 'far', 'pid': 1, 'started': 0,
                                                  'heartbeat': time.time() - 3600}}))
            second = lease.Lease(workdir)
            second.acquire()
            second.release()
            assert not storage.exists(path)
        ''')
    finally:
        server.stop()
    assert re.search(r'refused: Another trainer is using gs://bkt/locked: pid \d+ on host', out)
    assert "took over the stale lock gs://bkt/locked/trainer.lock of pid 1 on host 'far'" in out
