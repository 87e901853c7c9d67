"""Checkpoints move between meshes of different sizes (8 devices -> 2 -> 1 and back, each
in its own subprocess, since the device count is fixed when JAX starts) and end where a
one-device run ends. Its own module so that pytest-xdist runs it beside test_sharding.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, run_python
from jax.sharding import PartitionSpec as P

TRAIN = '''
from conftest import tiny_config
from pixelgen.trainer import train
config = tiny_config({data_dir!r}, '--config.batch_size=8', {mesh})
train(config, {workdir!r}, stop_after={stop})
'''


def _train_on(devices: int, mesh: str, data_dir: str, workdir: str, stop: int | None) -> None:
    code = 'import sys; sys.path.insert(0, "tests")\n' + TRAIN.format(
        data_dir=data_dir, workdir=workdir, stop=stop,
        mesh=', '.join(repr(f'--config.mesh.{k}={v}') for k, v in
                       zip(('data', 'fsdp', 'tensor'), mesh.split('x'), strict=True)))
    run_python(code, devices=devices)


def _params(workdir):
    import jax

    import pixelgen
    return [np.asarray(x) for x in jax.tree.leaves(pixelgen.load(workdir).model)]


@pytest.fixture(scope='module')
def one_device_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('mesh_1'))
    _train_on(1, '1x1x1', data_dir, workdir, None)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize('path', [
    [(8, '1x8x1', 4), (2, '2x1x1', 8), (1, '1x1x1', None)],   # 8 devices -> 2 -> 1
    [(1, '1x1x1', 4), (8, '4x1x2', 8), (8, '1x4x2', None)],   # and the way back
], ids=['8-2-1', '1-8-8'])
def test_checkpoint_restores_onto_another_mesh(path, one_device_run, data_dir, tmp_path):
    workdir = str(tmp_path / 'moving')
    for devices, mesh, stop in path:
        _train_on(devices, mesh, data_dir, workdir, stop)
    for a, b in zip(_params(one_device_run), _params(workdir), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
    assert TINY  # the same tiny config throughout


def test_a_dimension_that_does_not_divide_stays_replicated():
    import types

    from pixelgen import parallel
    mesh = types.SimpleNamespace(shape={'data': 1, 'fsdp': 4, 'tensor': 2})
    rules = (('embed', 'fsdp'), ('heads', 'tensor'), ('mlp', ('fsdp', 'tensor')))
    assert parallel.logical_to_mesh(('embed', 'heads'), (8, 2), mesh, rules) == P('fsdp',
                                                                                 'tensor')
    assert parallel.logical_to_mesh(('embed', 'heads'), (6, 3), mesh, rules) == P(None, None)
    # fsdp is taken by the first dimension: the second may not reuse it
    assert parallel.logical_to_mesh(('embed', 'mlp'), (8, 16), mesh, rules) == P('fsdp',
                                                                                'tensor')
