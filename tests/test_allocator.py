"""Host memory reuse: applied once per process, before JAX's CPU client, and switchable off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ('from pixelgen.cpu import allocator; import sys; '
         'print(allocator.configure(), allocator.configure())')


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt is Linux-only')
def test_reuse_is_applied_once_and_can_be_switched_off():
    assert _run(PROBE).stdout.split() == ['reuse', 'reuse']
    assert _run(PROBE, PIXELGEN_MALLOC='default').stdout.split() == ['default', 'default']


def test_a_bad_setting_names_the_choices():
    result = _run(PROBE, PIXELGEN_MALLOC='jemalloc')
    assert result.returncode != 0
    assert "PIXELGEN_MALLOC='jemalloc'; expected reuse" in result.stderr


def test_entry_points_import_without_starting_jax():
    """`cli.run` configures malloc first; that only helps if importing a job's module has not
    already created JAX's CPU client (and its threads)."""
    code = ('import pixelgen.train, pixelgen.sample, pixelgen.evaluate, pixelgen.bench\n'
            'from jax._src import xla_bridge\n'
            'print(xla_bridge.backends_are_initialized())')
    result = _run(code)
    assert result.stdout.strip() == 'False', result.stderr
