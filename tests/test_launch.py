"""launch/: -h, --dry-run and the real code paths of the three launch scripts, run against fake
gcloud / srun / scontrol / python executables; and shellcheck on all three."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time

import pytest

pytestmark = [pytest.mark.launch]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, 'launch', 'local_multiprocess.sh')
SLURM = os.path.join(REPO, 'launch', 'slurm_gpu.sbatch')
TPU = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SCRIPTS = [LOCAL, SLURM, TPU]

# Arguments for pixelgen.train, with words that need quoting.
TRAIN = ['--config', 'configs/igpt_shapes.py:tiny', '--workdir', 'gs://bucket/runs/a b',
         "--config.train.name=it's", '--config.train.steps=5']

# Records its call, then fails loudly: dry runs must never reach it.
LOUD = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_DIR/calls"
echo "FAKE $(basename "$0") CALLED IN A DRY RUN: $*" >&2
exit 99
"""

# A stand-in for `python`: prints its argv and environment, then behaves per FAKE_MODE.
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [[ ${1:-} == -c ]]; then exec python3 "$@"; fi
rank=''; prev=''
for a in "$@"; do [[ $prev == --process_id ]] && rank=$a; prev=$a; done
echo "$$" >> "$FAKE_DIR/pids"
printf 'argv:'; printf ' [%s]' "$@"; printf '\n'
echo "env: JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-} JAX_PLATFORMS=${JAX_PLATFORMS:-}" \
  "TFDS_DATA_DIR=${TFDS_DATA_DIR:-} FOO=${FOO:-}"
case "${FAKE_MODE:-ok}:$rank" in
  fail:1) echo "process 1 fails"; exit 3 ;;
  fail:*) sleep 30 & echo "$!" >> "$FAKE_DIR/pids"; wait ;;
esac
echo "process $rank done"
"""

# srun for one allocation: runs the command once per task with that task's SLURM_PROCID.
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_DIR/calls"
while [[ $1 == -* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
[[ "$1 $2 $3" == "show hostnames gpu[01-02]" ]] && printf 'gpu01\\ngpu02\\n'
"""

# gcloud that "has no TPU yet": describe fails, create/ssh succeed, scp keeps the tarball.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$(printf '%q ' gcloud "$@")" >> "$FAKE_DIR/calls"
case "$4" in
  describe) exit 1 ;;
  scp) cp "$5" "$FAKE_DIR/tarball.tar.gz" ;;
esac
"""


def _write(path, text):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, 0o755)


@pytest.fixture
def fakes(tmp_path):
    """A PATH dir of fakes (loud by default) and an env that puts it first."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('gcloud', 'srun', 'scontrol', 'sbatch', 'python'):
        _write(bin_dir / name, LOUD)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'TPU_', 'XLA_', 'NCCL_', 'COORDINATOR_PORT'))}
    env.update(PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}', FAKE_DIR=str(tmp_path),
               GRACE_S='5')
    env.pop('PYTHON', None)
    return bin_dir, env


def run(args, env, timeout=20):
    return subprocess.run(['bash', *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def calls(tmp_path):
    path = tmp_path / 'calls'
    return path.read_text().splitlines() if path.exists() else []


def commands(stdout):
    return [line for line in stdout.splitlines() if line and not line.startswith('#')]


def q(words):
    """Joins words the way the scripts print them: POSIX single quotes, only where needed."""
    return ' '.join(w if re.fullmatch(r'[A-Za-z0-9_@%+=:,./-]+', w)
                    else "'" + w.replace("'", "'\\''") + "'" for w in words)


# --- -h ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help(script, flag, fakes, tmp_path):
    _, env = fakes
    r = run([script, flag], env)
    assert r.returncode == 0, r.stderr
    assert 'Usage:' in r.stdout and '--dry-run' in r.stdout
    assert 'pixelgen.train' in r.stdout
    assert calls(tmp_path) == []


def test_help_mentions_gs_workdir():
    r = subprocess.run(['bash', TPU, '-h'], capture_output=True, text=True)
    assert 'gs://' in r.stdout and 'Orbax' in r.stdout


# --- local_multiprocess.sh --------------------------------------------------------------------

def test_local_dry_run(fakes, tmp_path):
    _, env = fakes
    r = run([LOCAL, '3', '--port', '12999', '--devices-per-process', '2', '--dry-run', *TRAIN],
            env)
    assert r.returncode == 0, r.stderr
    expected = [
        q(['JAX_NUM_CPU_DEVICES=2', 'JAX_PLATFORMS=cpu', 'python', '-m', 'pixelgen.train',
           '--coordinator_address', 'localhost:12999', '--num_processes', '3',
           '--process_id', str(i), *TRAIN])
        for i in range(3)]
    assert commands(r.stdout) == expected
    assert calls(tmp_path) == []  # nothing started: the fake python was never called


def test_local_dry_run_picks_one_port_and_passes_after_double_dash(fakes):
    _, env = fakes
    env['PYTHON'] = 'python3'
    r = run([LOCAL, '2', '--dry-run', '--', '--port', 'x', *TRAIN], env)
    assert r.returncode == 0, r.stderr
    argvs = [shlex.split(line) for line in commands(r.stdout)]
    assert len(argvs) == 2
    coords = {a[a.index('--coordinator_address') + 1] for a in argvs}
    assert len(coords) == 1 and coords.pop().startswith('localhost:')
    assert [a[a.index('--process_id') + 1] for a in argvs] == ['0', '1']
    assert all(a[-len(TRAIN) - 2:] == ['--port', 'x', *TRAIN] for a in argvs)


def test_local_rejects_bad_n(fakes):
    _, env = fakes
    r = run([LOCAL, 'two', '--dry-run', *TRAIN], env)
    assert r.returncode != 0 and 'positive integer' in r.stderr


def test_local_runs_n_processes(fakes, tmp_path):
    bin_dir, env = fakes
    _write(bin_dir / 'python', FAKE_PYTHON)
    workdir = tmp_path / 'work dir'
    r = run([LOCAL, '3', '--port', '12998', '--config', 'c.py', '--workdir', str(workdir)], env)
    assert r.returncode == 0, r.stderr
    p0 = r.stdout.splitlines()
    assert p0[0].startswith('[p0] argv: [-m] [pixelgen.train] [--coordinator_address] '
                            '[localhost:12998] [--num_processes] [3] [--process_id] [0] '
                            '[--config] [c.py] [--workdir]')
    assert '[p0] env: JAX_NUM_CPU_DEVICES=1 JAX_PLATFORMS=cpu' in r.stdout
    assert p0[-1] == '[p0] process 0 done'
    for i in (1, 2):
        log = (workdir / 'logs' / f'process_{i}.log').read_text()
        assert f'[--process_id] [{i}]' in log and f'process {i} done' in log
    assert not (workdir / 'logs' / 'process_0.log').exists()


def test_local_failure_stops_the_others(fakes, tmp_path):
    bin_dir, env = fakes
    _write(bin_dir / 'python', FAKE_PYTHON)
    env['FAKE_MODE'] = 'fail'
    t = time.time()
    r = run([LOCAL, '3', '--port', '12997', '--config', 'c.py', '--workdir', str(tmp_path / 'w')],
            env)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert time.time() - t < 10  # the others were stopped, not waited for (they sleep 30 s)
    assert 'process 1 exited with status 3' in r.stderr and 'process 1 fails' in r.stderr
    time.sleep(0.2)
    pids = [int(p) for p in (tmp_path / 'pids').read_text().split()]
    assert len(pids) == 5  # 3 processes + the 2 `sleep`s of those that hang
    assert not [pid for pid in pids if _alive(pid)]  # no process, nor child of one, is left


def _alive(pid):
    """True for a running process; a zombie (dead, not yet reaped by init) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return True


# --- slurm_gpu.sbatch -------------------------------------------------------------------------

SLURM_ENV = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'gpu[01-02]', 'SLURM_NNODES': '2',
             'SLURM_NTASKS': '2', 'SLURM_CPUS_PER_TASK': '16'}
SRUN_PREFIX = ['srun', '--kill-on-bad-exit=1', 'bash', '-c',
               'exec "$@" --process_id "$SLURM_PROCID"', 'pixelgen']


def test_slurm_header():
    head = open(SLURM).read().split('\nset -euo pipefail', 1)[0]
    for option in ('--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8', '--cpus-per-task=',
                   '--time=', '--output='):
        assert f'#SBATCH {option}' in head


def test_slurm_dry_run_outside_slurm(fakes, tmp_path):
    _, env = fakes
    r = run([SLURM, '--dry-run', *TRAIN], env)
    assert r.returncode == 0, r.stderr
    train = ['python', '-m', 'pixelgen.train', '--coordinator_address', '<head-node>:<port>',
             '--num_processes', '<SLURM_NTASKS>', *TRAIN]
    assert commands(r.stdout) == [
        'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9',
        'export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true',
        'export CUDA_DEVICE_MAX_CONNECTIONS=1',
        'export NCCL_DEBUG=WARN',
        q([*SRUN_PREFIX, *train])]
    assert f'# task i runs: {q([*train, "--process_id", "<SLURM_PROCID>"])}' in r.stdout
    assert calls(tmp_path) == []


def test_slurm_dry_run_in_allocation(fakes, tmp_path):
    bin_dir, env = fakes
    _write(bin_dir / 'scontrol', FAKE_SCONTROL)
    env.update(SLURM_ENV, XLA_PYTHON_CLIENT_MEM_FRACTION='.8')
    r = run([SLURM, '--dry-run', '--', *TRAIN], env)
    assert r.returncode == 0, r.stderr
    train = ['python', '-m', 'pixelgen.train', '--coordinator_address', 'gpu01:16242',
             '--num_processes', '2', *TRAIN]  # port 12000 + 4242
    cmds = commands(r.stdout)
    assert cmds[-1] == q([*SRUN_PREFIX, *train])
    assert 'export XLA_PYTHON_CLIENT_MEM_FRACTION=.8' in cmds  # kept when set
    assert 'export SRUN_CPUS_PER_TASK=16' in cmds
    for i in (0, 1):
        assert f'# task {i} runs: {q([*train, "--process_id", str(i)])}' in r.stdout
    assert calls(tmp_path) == ['scontrol show hostnames gpu[01-02]']  # srun never ran


def test_slurm_runs_srun_with_one_rank_per_task(fakes, tmp_path):
    bin_dir, env = fakes
    _write(bin_dir / 'scontrol', FAKE_SCONTROL)
    _write(bin_dir / 'srun', FAKE_SRUN)
    _write(bin_dir / 'python', FAKE_PYTHON)
    env.update(SLURM_ENV, COORDINATOR_PORT='23456')
    r = run([SLURM, *TRAIN], env)
    assert r.returncode == 0, r.stderr
    argv = ' '.join(f'[{a}]' for a in TRAIN)
    for i in (0, 1):
        assert (f'argv: [-m] [pixelgen.train] [--coordinator_address] [gpu01:23456] '
                f'[--num_processes] [2] {argv} [--process_id] [{i}]') in r.stdout


def test_slurm_refuses_to_run_outside_slurm(fakes, tmp_path):
    _, env = fakes
    r = run([SLURM, *TRAIN], env)
    assert r.returncode != 0 and 'not inside a SLURM job' in r.stderr
    assert calls(tmp_path) == []


# --- tpu_pod.sh -------------------------------------------------------------------------------

TPU_OPTS = ['--name', 'pg', '--zone', 'us-east5-a', '--accelerator-type', 'v5p-64', '--spot',
            '--project', 'proj', '--data-dir', 'gs://bucket/tfds', '--env', 'FOO=x y']
WHERE = ['--zone', 'us-east5-a', '--project', 'proj']
SSH = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pg', *WHERE, '--worker=all', '--command']


def _remote_command(line):
    argv = shlex.split(line)
    assert argv[:len(SSH)] == SSH, argv
    assert len(argv) == len(SSH) + 1
    return argv[-1]


def test_tpu_dry_run(fakes, tmp_path):
    _, env = fakes
    r = run([TPU, *TPU_OPTS, '--dry-run', '--', *TRAIN], env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 4
    tpu_vm = ['gcloud', 'compute', 'tpus', 'tpu-vm']
    assert cmds[0] == (
        q([*tpu_vm, 'describe', 'pg', *WHERE]) + ' >/dev/null 2>&1 || '
        + q([*tpu_vm, 'create', 'pg', *WHERE, '--accelerator-type', 'v5p-64',
             '--version', 'v2-alpha-tpuv5', '--spot']))
    assert cmds[1] == q(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', 'LOCAL_TARBALL',
                         'pg:pixelgen_src.tar.gz', *WHERE, '--worker=all'])
    setup = _remote_command(cmds[2])
    assert 'pip install -q -e "$HOME/pixelgen_src/pixelgen[tpu]"' in setup
    subprocess.run(['bash', '-n', '-c', setup], check=True)  # valid shell
    train = _remote_command(cmds[3])
    assert train.endswith(' ' + q(['python', '-m', 'pixelgen.train', '--distributed', *TRAIN]))
    assert "env TFDS_DATA_DIR=gs://bucket/tfds 'FOO=x y' python" in train
    assert 'gs://' in r.stdout and 'warning' not in r.stderr  # a gs:// workdir is passed through
    assert calls(tmp_path) == []  # gcloud was never called


def test_tpu_dry_run_remote_command_round_trips(fakes, tmp_path):
    """The remote training command, run by a shell on a 'worker', gives python exactly TRAIN."""
    _, env = fakes
    r = run([TPU, *TPU_OPTS, '--dry-run', *TRAIN], env)  # no `--`: unknown args pass through
    assert r.returncode == 0, r.stderr
    remote = _remote_command(commands(r.stdout)[-1])
    home = tmp_path / 'home'
    (home / 'pixelgen_src' / 'pixelgen').mkdir(parents=True)
    (home / 'pixelgen_venv' / 'bin').mkdir(parents=True)
    _write(home / 'pixelgen_venv' / 'bin' / 'python', FAKE_PYTHON)
    (home / 'pixelgen_venv' / 'bin' / 'activate').write_text(
        'export PATH="$HOME/pixelgen_venv/bin:$PATH"\n')
    out = subprocess.run(['bash', '-c', remote], env=dict(env, HOME=str(home)),
                         capture_output=True, text=True, check=True).stdout
    assert 'argv: ' + ' '.join(f'[{a}]' for a in ['-m', 'pixelgen.train', '--distributed', *TRAIN])\
        in out
    assert 'TFDS_DATA_DIR=gs://bucket/tfds FOO=x y' in out


def test_tpu_repo_install(fakes):
    _, env = fakes
    r = run([TPU, '--zone', 'z', '--repo', 'https://github.com/org/pixelgen@v1', '--dry-run',
             *TRAIN], env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert not any(' scp ' in c for c in cmds)  # nothing copied
    setup = shlex.split(cmds[1])[-1]
    assert "-e 'git+https://github.com/org/pixelgen@v1#egg=pixelgen'" in setup
    assert shlex.split(cmds[-1])[4:6] == ['ssh', 'pixelgen']  # default --name


def test_tpu_runs_gcloud(fakes, tmp_path):
    bin_dir, env = fakes
    _write(bin_dir / 'gcloud', FAKE_GCLOUD)
    r = run([TPU, *TPU_OPTS, *TRAIN], env)
    assert r.returncode == 0, r.stderr
    made = [shlex.split(line) for line in calls(tmp_path)]
    assert [c[4] for c in made] == ['describe', 'create', 'scp', 'ssh', 'ssh']
    assert made[1][-5:] == ['--accelerator-type', 'v5p-64', '--version', 'v2-alpha-tpuv5',
                            '--spot']
    assert all('--worker=all' in c for c in made[2:])
    assert made[4][-1].endswith(q(['python', '-m', 'pixelgen.train', '--distributed', *TRAIN]))
    with tarfile.open(tmp_path / 'tarball.tar.gz') as tar:
        names = set(tar.getnames())
    assert {'pyproject.toml', 'pixelgen/train.py', 'configs/igpt_shapes.py'} <= names
    assert not any(n.startswith('.git/') for n in names)


def test_tpu_needs_zone(fakes, tmp_path):
    _, env = fakes
    r = run([TPU, '--dry-run', *TRAIN], env)
    assert r.returncode != 0 and '--zone' in r.stderr


# --- shellcheck -------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (Debian/Ubuntu: apt-get install -y '
                    'shellcheck; scripts/test.sh installs it as root)')
def test_shellcheck():
    shellcheck = shutil.which('shellcheck')
    shared = os.path.join(REPO, 'launch', 'quoting.sh')  # sourced by two of them
    others = [os.path.join(REPO, 'launch', 'dalle_shapes.sh'),
              os.path.join(REPO, 'scripts', 'test.sh'), os.path.join(REPO, '.ci', 'run')]
    r = subprocess.run([shellcheck, '-x', *SCRIPTS, shared, *others], capture_output=True,
                       text=True, cwd='/')
    assert r.returncode == 0, r.stdout + r.stderr
