"""Shared, session-scoped fixtures: the embedded dataset is built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import pixelgen  # noqa: F401  (sets host memory reuse before any test starts JAX's client)

# Samplers decode on the main client here (and in the jobs tests start), compiling once: the
# per-core clients compile once per core, seconds per tiny model that these tests do not need.
# tests/test_cpu_decode.py turns them on and checks them against this path.
os.environ.setdefault('PIXELGEN_CPU_DECODE', 'shared')
# The CPU backend only, in this process and the jobs it starts: with libtpu installed (the
# [tpu] extra, for tests/test_aot.py) JAX would also load the TPU plugin, whose profiler
# crashes jax.profiler on a host without a TPU. AOT compilation needs no TPU backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One JAX compilation cache for the whole session, subprocess jobs included (they inherit the
# environment, and pytest-xdist's workers that of the process that collected them): the
# tiny configs' train steps are compiled by many jobs; each compiles once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='pixelgen-jax-cache-'))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'igpt_shapes.py') + ':tiny'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
    """A tfds data dir holding the embedded `shapes` dataset."""
    from pixelgen.data import builders
    path = str(tmp_path_factory.mktemp('tfds'))
    builders.ensure_built('shapes', path)
    return path


@pytest.fixture(scope='session')
def tiny_config_args(data_dir) -> list[str]:
    return ['--config', TINY, f'--config.data.data_dir={data_dir}']


def tiny_config(data_dir: str, *overrides: str):
    from pixelgen.config import parse_config_args
    config, rest = parse_config_args(['--config', TINY, f'--config.data.data_dir={data_dir}',
                                      *overrides])
    assert not rest
    return config


def run_python(code: str, devices: int, timeout: int = 300) -> str:
    """Runs `code` in a fresh Python on `devices` simulated CPU devices (the device count is
    fixed when JAX starts) from the repository root; returns its stdout, fails with its
    output's tail."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def pytest_collection_modifyitems(config, items):
    """Tests of a tool that is missing here are skipped, naming it: `native` tests need a C++
    compiler to build pixelgen's kernels, `launch` tests' shellcheck needs shellcheck."""
    compiler = os.environ.get('CXX', 'g++')
    no_compiler = pytest.mark.skipif(
        shutil.which(compiler) is None,
        reason=f'no C++ compiler ({compiler}) to build pixelgen\'s native CPU kernels')
    for item in items:
        if item.get_closest_marker('native'):
            item.add_marker(no_compiler)
