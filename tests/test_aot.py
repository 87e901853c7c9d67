"""python -m pixelgen.aot: TPU compilation of the train, eval and decode steps, without a TPU.

Each case runs the command (or `tpu_hlo_text`) in a fresh Python, as a user would: libtpu
describes a v5e:2x2 slice and XLA:TPU compiles for it on this CPU host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip('libtpu', reason="TPU compilation needs libtpu: pip install -e '.[tpu]'")

pytestmark = pytest.mark.slow  # each case compiles for TPU in a fresh process (5-40 s)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGPT_TINY = 'configs/igpt_shapes.py:tiny'
DALLE_TINY = 'configs/dalle_shapes.py:tiny'
FIELDS = ('argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'generated_code_bytes',
          'total_bytes', 'xla_flops')


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # TPU executables are not cached on this host
    env.pop('XLA_FLAGS', None)
    return env


def aot(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'pixelgen.aot', *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def report(*args: str) -> dict:
    result = aot(*args, '--json')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize('config', [IGPT_TINY, DALLE_TINY])
def test_compiles_every_step_for_v5e(config):
    out = report('--config', config, '--topology', 'v5e:2x2')
    assert out['topology'] == 'v5e:2x2' and out['devices'] == 4
    assert out['chip'] == 'TPU v5e' and out['device_kind'] == 'TPU v5 lite'
    assert out['hbm_bytes_per_device'] == 16 * 2 ** 30
    assert out['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
    assert out['fits'] and out['shortfalls'] == [] and out['skipped'] == {}
    assert out['libtpu'] and out['jax'] and out['num_params'] > 0
    assert out['arithmetic']['state_bytes'] > 0
    assert set(out['steps']) == {'train', 'eval', 'decode'}
    for name, step in out['steps'].items():
        assert step['compiled'] and step['fits'], name
        for field in FIELDS:
            assert step[field] is not None and step[field] >= 0, (name, field)
        assert step['xla_flops'] > 0 and step['argument_bytes'] > 0, name
        assert step['total_bytes'] == (step['argument_bytes'] + step['output_bytes']
                                       - step['alias_bytes'] + step['temp_bytes']
                                       + step['generated_code_bytes']), name
    train = out['steps']['train']
    assert train['model_flops'] > 0  # the trainer's MFU count, per device
    # The new state is written over the donated old one, and it stays sharded as it came in
    # (out_shardings pinned): nearly all of the outputs alias the arguments.
    assert train['alias_bytes'] >= 0.9 * train['output_bytes']
    assert out['steps']['decode']['alias_bytes'] > 0  # the KV cache is updated in place
    # Data parallel: every device holds the parameters and Adam moments whole, 3/4 of the
    # arithmetic state (which counts the gradients too).
    assert train['argument_bytes'] >= out['arithmetic']['state_bytes'] * 0.7


def test_fsdp_shards_the_state():
    data = report('--config', IGPT_TINY, '--topology', 'v5e:2x2', '--steps', 'train')
    fsdp = report('--config', IGPT_TINY, '--topology', 'v5e:2x2', '--steps', 'train',
                  '--config.mesh.data=1', '--config.mesh.fsdp=-1')
    assert fsdp['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
    assert set(fsdp['steps']) == {'train'}
    # The state is split four ways, not replicated (the batch, the rng and a few vectors
    # that do not divide stay whole).
    assert fsdp['steps']['train']['argument_bytes'] < 0.5 * data['steps']['train'][
        'argument_bytes']


def test_human_readable_table():
    result = aot('--config', IGPT_TINY, '--topology', 'v5e:2x2', '--config.objective=bert')
    assert result.returncode == 0, result.stderr[-5000:]
    assert 'v5e:2x2: 4 x TPU v5e (16 GiB HBM each)' in result.stdout
    for line in ('train step', 'eval step', 'arguments', 'temporaries', 'of HBM'):
        assert line in result.stdout
    assert 'decode step: not compiled' in result.stdout  # a BERT model does not decode


def test_too_large_config_exits_naming_the_shortfall():
    result = aot('--config', IGPT_TINY, '--topology', 'v5e:2x2', '--steps', 'train', '--json',
                 '--config.model.width=4096', '--config.model.num_heads=32',
                 '--config.model.num_layers=6', '--config.model.scan_layers=true',
                 '--config.data.image_size=32', '--config.batch_size=64')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert not out['fits'] and not out['steps']['train']['fits']
    needed = out['steps']['train']['total_bytes'] / 2 ** 30
    assert needed > 16
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith('error: train step needs ')
    assert 'GiB per device, v5e has 16 GiB: ' in message
    assert 'remat=full' in message and 'larger topology' in message
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args, expected', [
    (['--topology', 'v5e:2x3'], 'libtpu cannot describe TPU topology'),
    (['--topology', 'v9z:2x2'], "Unknown TPU topology 'v9z:2x2'"),
    (['--topology', 'v5p-8'], 'v5p-8 is v5p:2x2x1'),
    (['--topology', 'v5e:2x2', '--config.mesh.data=3'], 'v5e:2x2 has 4 devices'),
    (['--topology', 'v5e:2x2', '--config.modle.width=8'], "Did you mean model.width"),
])
def test_user_errors_exit_2_without_traceback(args, expected):
    result = aot('--config', IGPT_TINY, *args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and 'Traceback' not in result.stderr


def test_missing_libtpu_names_the_extra():
    code = f"""
        import runpy, sys
        sys.modules['libtpu'] = None  # as if it were not installed
        sys.argv = ['pixelgen.aot', '--config', {IGPT_TINY!r}, '--topology', 'v5e:2x2']
        runpy.run_module('pixelgen.aot', run_name='__main__')
    """
    env = _env()
    env.pop('TPU_LIBRARY_PATH', None)  # `import libtpu` (importorskip above) sets it
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install -e '.[tpu]'" in result.stderr and 'Traceback' not in result.stderr


def test_tpu_graph_holds_no_cpu_only_machinery():
    """The train step lowered for TPU from this CPU host: no pixelgen custom call (the native
    attention kernel) and no optimization barrier (XLA:CPU's layout fences in nn/matmul.py),
    on a layer the native kernel would take on the CPU (float32, head_dim 32); 'auto' is
    splash there, a Mosaic kernel, not its interpreted form."""
    code = f"""
        import re
        from pixelgen import aot
        for attention in ('block_sparse', 'auto'):
            text = aot.tpu_hlo_text({IGPT_TINY!r}, 'v5e:2x2', {{
                'model.num_heads': 1, 'model.remat': 'none', 'model.attention': attention}})
            calls = sorted(set(re.findall(r'custom_call @([\\w.]+)', text)))
            print(attention, calls, text.count('optimization_barrier'),
                  text.count('stablehlo.while'))
    """
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = dict(line.split(' ', 1) for line in result.stdout.strip().splitlines())
    for attention, found in lines.items():
        assert 'pixelgen' not in found, (attention, found)
        calls, barriers, _ = found.rsplit(' ', 2)
        assert barriers == '0', (attention, found)
    assert 'tpu_custom_call' in lines['auto'], lines  # splash, compiled by Mosaic
