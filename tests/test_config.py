"""Configs: variants, typed overrides, and clear errors for unknown keys and bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, TINY

from pixelgen.config import (
    CONFIG_VERSION,
    REQUIRED_KEYS,
    ConfigError,
    load_config_file,
    load_saved_config,
    parse_arg,
    parse_config_args,
    save_config,
)


def test_variant_and_overrides_keep_types():
    config, rest = parse_config_args(['--config', TINY, '--config.batch_size=8',
                                      '--config.model.num_layers', '3',
                                      '--config.optimizer.learning_rate=1', '--workdir', 'w'])
    assert rest == ['--workdir', 'w']
    assert config.batch_size == 8 and config.model.num_layers == 3
    assert config.model.width == 32  # from the 'tiny' variant
    lr = config.optimizer.learning_rate
    assert isinstance(lr, float) and lr == 1.0
    for key in REQUIRED_KEYS:
        assert key in config


def test_misspelled_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"model\.num_layrs.*model\.num_layers"):
        parse_config_args(['--config', TINY, '--config.model.num_layrs=2'])
    with pytest.raises(ConfigError, match=r"batch_sise.*batch_size"):
        parse_config_args(['--config', TINY, '--config.batch_sise=2'])


def test_wrong_type_names_the_expected_type():
    with pytest.raises(ConfigError, match=r'model\.num_layers.*int'):
        parse_config_args(['--config', TINY, '--config.model.num_layers=two'])


def test_missing_file_and_bad_variant_are_clear():
    with pytest.raises(ConfigError, match='does not exist'):
        parse_config_args(['--config', 'configs/nope.py'])
    with pytest.raises(ValueError, match="unknown variant 'huge'; expected one of '', 'tiny'"):
        parse_config_args(['--config', TINY.replace(':tiny', ':huge')])
    with pytest.raises(ConfigError, match='No --config'):
        parse_config_args(['--workdir', 'w'])


def test_config_is_locked_against_typos_in_code():
    config, _ = parse_config_args(['--config', TINY])
    with pytest.raises(AttributeError):
        _ = config.model.num_layrs


def test_saved_config_round_trips(tmp_path):
    config, _ = parse_config_args(['--config', TINY, '--config.seed=7'])
    save_config(config, str(tmp_path))
    again = load_saved_config(str(tmp_path))
    assert again.to_dict() == config.to_dict()


def test_shipped_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    """After a non-editable install there is no configs/ folder beside the user: the shipped
    configs (the package pixelgen.configs) answer to the same names."""
    monkeypatch.chdir(tmp_path)
    config, _ = parse_config_args(['--config', 'configs/igpt_shapes.py:tiny'])
    assert config.task == 'igpt' and config.total_steps == 12
    assert parse_config_args(['--config', 'clip_shapes.py'])[0].task == 'clip'
    with pytest.raises(ConfigError, match='available: .*configs/igpt.py'):
        parse_config_args(['--config', 'configs/nope.py'])


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path):
    pytest.importorskip('setuptools', reason='builds the wheel without build isolation')
    import glob
    import zipfile
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '--no-build-isolation', REPO, '-w', str(tmp_path)], check=True,
                   capture_output=True, cwd=tmp_path)
    names = zipfile.ZipFile(glob.glob(str(tmp_path / '*.whl'))[0]).namelist()
    assert {'pixelgen/configs/igpt.py', 'pixelgen/configs/dalle_shapes.py',
            'pixelgen/bench/__main__.py', 'pixelgen/demo_page.html'} <= set(names)


def test_an_older_saved_config_is_upgraded_on_load(tmp_path):
    """config.json from before config_version 2 lacks the DALL·E keys added since; loading
    fills in the values that reproduce those runs, and a newer file's version is refused."""
    import json
    import os
    config, _ = parse_config_args(['--config', os.path.join(REPO, 'configs',
                                                            'dalle_shapes.py:tiny')])
    save_config(config, str(tmp_path))
    path = tmp_path / 'config.json'
    tree = json.loads(path.read_text())
    assert tree['config_version'] == CONFIG_VERSION
    del tree['config_version'], tree['model']['conv_wraparound'], tree['loss']['caption_dropout']
    del tree['init_from'], tree['init_from_step']
    path.write_text(json.dumps(tree))
    old = load_saved_config(str(tmp_path))
    assert old.model.conv_wraparound is False and old.loss.caption_dropout == 0.0
    assert old.to_dict() == config.to_dict()
    path.write_text(json.dumps({**tree, 'config_version': 99}))
    with pytest.raises(ConfigError, match='config_version 99'):
        load_saved_config(str(tmp_path))


@pytest.mark.slow
def test_cli_reports_unknown_key_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'pixelgen.train', '--config', TINY,
         '--config.model.num_layrs=2', '--workdir', str(tmp_path / 'w')],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert 'model.num_layrs' in result.stderr and 'model.num_layers' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'w').exists()  # nothing written before the config is valid


@pytest.mark.slow
@pytest.mark.parametrize('override,message', [
    ('--config.model.num_heads=3', r'model\.num_heads=3 must divide model\.width=32'),
    ('--config.data.palette_size=70000', r'data\.palette_size=70000'),
    ('--config.model.dtype=float8', r'model\.dtype'),
    ('--config.model.attention=flash', r'model\.attention'),
    ('--config.mesh.data=3', r'config\.mesh'),
    ('--config.grad_accum_steps=3', r'batch_size=4 must divide.*grad_accum_steps=3'),
    ('--config.concurrent_microbatches=3', r'batch_size=4 must divide.*concurrent_microbatches=3'),
])
def test_bad_values_fail_before_any_work(override, message, data_dir, tmp_path):
    from conftest import tiny_config

    from pixelgen.trainer import train
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(data_dir, override), str(tmp_path / 'w'))
    assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_one_arg_grammar_a_bare_variant_then_typed_options():
    spec = {'size': ('s', 'm', 'l'), 'res': 0, 'scale': 1.0, 'flip': False, 'name': 'x'}
    assert parse_arg(None, **spec).to_dict() == {'size': 's', 'res': 0, 'scale': 1.0,
                                                 'flip': False, 'name': 'x'}
    a = parse_arg('l,res=48,scale=0.5,flip=true,name=abc', **spec)
    assert (a.size, a.res, a.scale, a.flip, a.name) == ('l', 48, 0.5, True, 'abc')
    assert parse_arg('res=64', **spec).size == 's'  # options alone keep the default variant
    for arg, message in [('xl', "unknown size 'xl'; expected one of 's', 'm', 'l'"),
                         ('s,rez=48', "unknown option 'rez'.*size=, res=, scale="),
                         ('s,m', 'only the first item may be a bare variant'),
                         ('s,res=big', 'res=big: expected an int'),
                         ('s,flip=maybe', 'flip=maybe: expected true or false')]:
        with pytest.raises(ValueError, match=message):
            parse_arg(arg, **spec)
    with pytest.raises(ValueError, match='this config takes no arg'):
        parse_arg('tiny')


def test_shipped_configs_take_options_in_that_grammar():
    import os
    vit = load_config_file(os.path.join(REPO, 'configs', 'vit_shapes.py:tiny,label=color'))
    assert vit.data.label_key == 'color' and vit.model.width == 32
    igpt = load_config_file(os.path.join(REPO, 'configs', 'igpt.py:l,res=48,objective=bert'))
    assert (igpt.model.num_layers, igpt.data.image_size, igpt.objective) == (48, 48, 'bert')
    with pytest.raises(ConfigError, match='res=40 in'):
        load_config_file(os.path.join(REPO, 'configs', 'igpt.py:s,res=40'))
    with pytest.raises(ConfigError, match='takes no arg'):
        load_config_file(os.path.join(REPO, 'configs', 'dvae.py:tiny'))


SHIPPED = ['clip.py', 'clip.py:b16', 'clip.py:l14', 'clip.py:tiny', 'clip_fashion_mnist.py',
           'clip_fashion_mnist.py:tiny', 'clip_shapes.py', 'clip_shapes.py:tiny', 'dalle.py',
           'dalle.py:1.3b', 'dalle.py:350m', 'dalle.py:120m', 'dalle_shapes.py',
           'dalle_shapes.py:tiny', 'dvae.py', 'dvae_shapes.py', 'dvae_shapes.py:tiny', 'igpt.py:s',
           'igpt.py:m', 'igpt.py:l,res=48', 'igpt.py:xl', 'igpt_fashion_mnist.py',
           'igpt_finetune.py', 'igpt_finetune.py:shapes', 'igpt_finetune.py:shapes_tiny',
           'igpt_shapes.py', 'igpt_shapes.py:tiny', 'vit.py:b16', 'vit.py:l16', 'vit_shapes.py',
           'vit_shapes.py:tiny']


def _keys(config, prefix=''):
    keys = set()
    for key, value in config.items():
        if hasattr(value, 'items') and key != 'evals' and key != 'mesh':
            keys |= _keys(value, f'{prefix}{key}.')
        else:
            keys.add(prefix + key)
    return keys


def test_every_shipped_config_defines_exactly_its_tasks_keys():
    """Each task's base_config defines every key the task reads; the shipped configs start
    from it and change values only, so no config lacks a key and none adds one."""
    import importlib
    import os
    assert {f for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py')} - {
        '__init__.py'} == {s.split(':')[0] for s in SHIPPED}
    for spec in SHIPPED:
        config = load_config_file(os.path.join(REPO, 'configs', spec))
        base = importlib.import_module(f'pixelgen.tasks.{config.task}').base_config()
        assert _keys(config) == _keys(base), spec
        evaluators = importlib.import_module(f'pixelgen.evaluators.{config.task}').EVALUATORS
        assert set(config.evals) <= set(evaluators), spec


def test_a_version_3_config_gets_the_keys_every_task_now_defines(tmp_path):
    """Versions 4 and 5 made every read key explicit; an older igpt config.json without them
    loads with the values its run had (no classifier, the AR objective, no EMA, the default
    CPU paths)."""
    import json
    import os
    config = load_config_file(os.path.join(REPO, 'configs', 'igpt_shapes.py:tiny'))
    save_config(config, str(tmp_path))
    path = tmp_path / 'config.json'
    tree = json.loads(path.read_text())
    tree['config_version'] = 3
    for key in ('objective', 'classifier_loss_weight', 'init_from', 'init_from_step', 'evals',
                'runtime'):
        del tree[key]
    del tree['model']['num_classes'], tree['model']['scan_layers']
    del tree['optimizer']['ema_decay']
    path.write_text(json.dumps(tree))
    old = load_saved_config(str(tmp_path))
    assert old.to_dict() == config.to_dict()
