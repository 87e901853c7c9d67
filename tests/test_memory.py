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


def test_activation_arithmetic_follows_remat_and_the_batch_split():
    from pixelgen.memory import activation_bytes_per_device
    full, none = (activation_bytes_per_device(parse_config_args(
        ['--config', TINY, f'--config.model.remat={remat}'])[0], 1) for remat in ('full', 'none'))
    config, _ = parse_config_args(['--config', TINY])
    b, n, d, layers = config.batch_size, config.data.image_size ** 2, config.model.width, 2
    assert full['saved_bytes_per_layer'] == b * n * d * 4  # the float32 residual stream
    assert none['saved_bytes_per_layer'] == none['layer_internals_bytes'] > 8 * b * n * d * 4
    assert full['activation_bytes'] == (layers * full['saved_bytes_per_layer']
                                        + full['layer_internals_bytes'] + full['head_bytes'])
    assert none['activation_bytes'] == layers * none['saved_bytes_per_layer'] + none['head_bytes']
    split, _ = parse_config_args(['--config', TINY, '--config.model.remat=full',
                                  '--config.mesh.data=1', '--config.mesh.fsdp=-1'])
    two = activation_bytes_per_device(split, 2)
    assert two['rows_per_device'] == b / 2
    assert two['activation_bytes'] == pytest.approx(full['activation_bytes'] / 2, rel=1e-3)


@pytest.mark.slow
def test_compiled_temporaries_of_scanned_layers_match_the_arithmetic():
    """With scanned layers XLA's (CPU) analysis sees that remat=full keeps one layer's
    internals instead of every layer's (a Python loop hid that), and its temporaries are
    the arithmetic's activations plus the gradients."""
    from pixelgen.memory import activation_bytes_per_device, compiled_memory

    def measured(remat):
        config, _ = parse_config_args(['--config', TINY, f'--config.model.remat={remat}',
                                       '--config.model.num_layers=4', '--config.batch_size=8'])
        with config.unlocked():  # configs/igpt_shapes.py predates the key (default False)
            config.model.scan_layers = True
        estimate = (activation_bytes_per_device(config, 1)['activation_bytes']
                    + state_bytes_per_device(config, 1)['grads_bytes'])
        return compiled_memory(config), estimate
    (full, full_estimate), (none, none_estimate) = measured('full'), measured('none')
    assert full['temp_size_in_bytes'] < 0.6 * none['temp_size_in_bytes']
    assert full['temp_size_in_bytes'] == pytest.approx(full_estimate, rel=0.15)
    assert none['temp_size_in_bytes'] == pytest.approx(none_estimate, rel=0.15)
    assert full['total_bytes'] == (full['argument_size_in_bytes'] + full['temp_size_in_bytes']
                                   + full['output_size_in_bytes']
                                   - full['alias_size_in_bytes'])
