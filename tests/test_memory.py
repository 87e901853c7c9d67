"""Memory arithmetic per device and the paper configs' parameter counts."""

from __future__ import annotations

import jax
import pytest
from conftest import REPO, TINY
from flax import nnx

from pixelgen import tasks
from pixelgen.config import parse_config_args
from pixelgen.memory import state_bytes_per_device


def test_state_bytes_follow_the_sharding():
    config, _ = parse_config_args(['--config', TINY])
    one = state_bytes_per_device(config, 1)
    config, _ = parse_config_args(['--config', TINY, '--config.mesh.data=1',
                                   '--config.mesh.fsdp=-1'])
    two = state_bytes_per_device(config, 2)
    assert one['params_bytes'] == 4 * one['num_params']  # float32
    assert two['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 1}
    # Every parameter has an 'embed' axis, which the rules put on 'fsdp'.
    assert one['params_bytes'] / 2 <= two['params_bytes'] < 0.6 * one['params_bytes']
    assert one['optimizer_bytes'] == pytest.approx(2 * one['params_bytes'], abs=64)


@pytest.mark.parametrize('size,paper', [('s', 76e6), ('m', 455e6), ('l', 1362e6),
                                        ('xl', 6801e6)])
def test_paper_sizes_match_the_paper_within_two_percent(size, paper):
    config, _ = parse_config_args(['--config', f'{REPO}/configs/igpt.py:{size}'])
    shapes = nnx.eval_shape(lambda: tasks.model_builder(config)(nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(shapes)))
    assert abs(count - paper) / paper < 0.02
