"""Every user error a job meets is one `error:` line that names the file, key or value and the
fix, with exit code 2 and no traceback (`pixelgen.cli.run`); any other exception keeps its
traceback. The cases run through the jobs' own `main` in this process (one of them also as a
real `python -m` subprocess), and a test fails on any traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY, tiny_config
from ml_collections import ConfigDict
from safetensors.numpy import save_file

from pixelgen import assets, cli
from pixelgen.config import save_config
from pixelgen.convert.__main__ import main as convert_main
from pixelgen.data.palette import save_palette
from pixelgen.evaluate import main as evaluate_main
from pixelgen.sample import main as sample_main
from pixelgen.train import main as train_main
from pixelgen.trainer import FlatLossWatch, NonFiniteLossError, _check_finite

SHAPES = os.path.join(REPO, 'configs', 'igpt_shapes.py')


def user_error(main, argv: list[str], monkeypatch, capsys) -> str:
    """Runs `main(argv)` as its `python -m` entry point does; returns the error line after
    checking that it is the only output on stderr, that it has no traceback and exit code 2."""
    monkeypatch.setattr(sys, 'argv', ['pixelgen-job', *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main)
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


# Configs and the command line ------------------------------------------------------------

def test_unknown_variant_names_the_variants(tmp_path, monkeypatch, capsys):
    line = user_error(train_main, ['--config', f'{SHAPES}:huge', '--workdir', str(tmp_path)],
                      monkeypatch, capsys)
    assert "'huge'" in line and "'tiny'" in line and 'igpt_shapes.py:huge' in line


def test_config_file_with_a_syntax_error_names_file_and_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / 'bad.py'
    bad.write_text('import ml_collections\n\n\ndef get_config(arg=None)\n    return None\n')
    line = user_error(train_main, ['--config', str(bad), '--workdir', str(tmp_path / 'w')],
                      monkeypatch, capsys)
    assert f'{bad}, line 4' in line


def test_none_for_a_typed_key_is_refused(tmp_path, monkeypatch, capsys):
    line = user_error(train_main, ['--config', TINY, '--config.total_steps=None',
                                   '--workdir', str(tmp_path)], monkeypatch, capsys)
    assert '--config.total_steps=None' in line and 'int' in line and '12' in line


@pytest.mark.parametrize('override, named', [
    ('--config.optimizer.learning_rate=-0.001', 'optimizer.learning_rate=-0.001 must be > 0'),
    ('--config.optimizer.learning_rate=0', 'optimizer.learning_rate=0.0 must be > 0'),
    ('--config.total_steps=0', 'total_steps=0 must be at least 1'),
    ('--config.optimizer.warmup_steps=12', 'optimizer.warmup_steps=12 must be in [0, '
                                           'total_steps=12)'),
    ('--config.model.num_heads=3', 'model.num_heads=3 must divide model.width=32'),
])
def test_loop_settings_are_refused_before_anything_is_written(override, named, tmp_path,
                                                              monkeypatch, capsys):
    workdir = tmp_path / 'run'
    line = user_error(train_main, ['--config', TINY, override, '--workdir', str(workdir)],
                      monkeypatch, capsys)
    assert named in line
    assert not workdir.exists()  # no palette.npy, lock or config.json left behind


def test_temperature_zero_names_the_greedy_alternative(tmp_path, monkeypatch, capsys):
    line = user_error(sample_main, ['--workdir', str(tmp_path), '--temperature', '0'],
                      monkeypatch, capsys)
    assert '--temperature 0.0 must be > 0' in line and '--top_k 1' in line


# Workdirs --------------------------------------------------------------------------------

@pytest.mark.parametrize('content, named', [
    ('{"task": "igpt", "model": {"wid', 'is not valid JSON (line 1'),  # truncated
    ('{"task": "igpt"}', 'is incomplete: it lacks total_steps'),
    ('[1, 2]', 'is incomplete'),
])
def test_damaged_config_json_names_the_file(content, named, tmp_path, monkeypatch, capsys):
    (tmp_path / 'config.json').write_text(content)
    line = user_error(sample_main, ['--workdir', str(tmp_path)], monkeypatch, capsys)
    assert f'{tmp_path}/config.json' in line and named in line


def test_palette_of_another_size_names_file_and_both_fixes(tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / 'run')
    save_palette(np.zeros((16, 3), np.float32), workdir)
    line = user_error(train_main, ['--config', TINY, '--config.data.palette_size=8',
                                   '--workdir', workdir], monkeypatch, capsys)
    assert f'{workdir}/palette.npy has 16 colours' in line
    assert '--config.data.palette_size=16' in line and 'new --workdir' in line


# Converting released weights -------------------------------------------------------------

def hf_src(folder, tensors: dict[str, np.ndarray] | None = None) -> str:
    """An hf-imagegpt --src whose config and clusters are valid; weights as given."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'model_type': 'imagegpt', 'vocab_size': 5, 'n_embd': 4, 'n_head': 2,
                   'n_layer': 1, 'n_positions': 4}, f)
    with open(os.path.join(folder, 'preprocessor_config.json'), 'w') as f:
        json.dump({'clusters': np.zeros((4, 3)).tolist()}, f)
    if tensors is not None:
        save_file(tensors, os.path.join(folder, 'model.safetensors'))
    return str(folder)


def convert_error(src: str, workdir, monkeypatch, capsys) -> str:
    line = user_error(convert_main, ['--from', 'hf-imagegpt', '--src', src,
                                     '--workdir', str(workdir)], monkeypatch, capsys)
    assert not os.path.exists(workdir)  # refused before anything was written
    return line


def test_truncated_safetensors_names_the_file(tmp_path, monkeypatch, capsys):
    src = hf_src(tmp_path / 'src', {'wte.weight': np.ones((5, 4), np.float32)})
    path = os.path.join(src, 'model.safetensors')
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) - 20])
    line = convert_error(src, tmp_path / 'out', monkeypatch, capsys)
    assert f'{path} is not a readable safetensors file' in line and 'truncated' in line


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(bad, tmp_path, monkeypatch, capsys):
    wte = np.ones((5, 4), np.float32)
    wte[2, 1] = bad
    src = hf_src(tmp_path / 'src', {'transformer.wte.weight': wte,
                                    'transformer.wpe.weight': np.ones((4, 4), np.float32)})
    line = convert_error(src, tmp_path / 'out', monkeypatch, capsys)
    assert "tensor 'transformer.wte.weight'" in line and 'model.safetensors' in line
    assert ('1 NaN' if np.isnan(bad) else '1 Inf') in line


def test_shard_index_cannot_point_outside_src(tmp_path, monkeypatch, capsys):
    save_file({'secret': np.ones(2, np.float32)}, str(tmp_path / 'outside.safetensors'))
    src = hf_src(tmp_path / 'src')
    with open(os.path.join(src, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'weight_map': {'secret': '../outside.safetensors'}}, f)
    line = convert_error(src, tmp_path / 'out', monkeypatch, capsys)
    assert "'../outside.safetensors'" in line and 'outside --src' in line


def test_pickled_module_is_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip('torch')
    src = hf_src(tmp_path / 'src')
    path = os.path.join(src, 'pytorch_model.bin')
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: unpickling it runs code
    line = convert_error(src, tmp_path / 'out', monkeypatch, capsys)
    assert f'{path} could not be read as plain tensors' in line and 'state_dict()' in line


# The boundary itself ---------------------------------------------------------------------

def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    def main(argv):
        raise RuntimeError('a bug, not a user error')
    monkeypatch.setattr(sys, 'argv', ['pixelgen-job'])
    with pytest.raises(RuntimeError, match='a bug'):
        cli.run(main)


def test_the_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'pixelgen.train', '--config', f'{SHAPES}:huge',
         '--workdir', str(tmp_path / 'w')], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --config {SHAPES}:huge: unknown variant 'huge'; expected one of '', 'tiny'."]
    assert not (tmp_path / 'w').exists()


# Assets: the files that give a checkpoint's tokens their meaning ---------------------------

def fake_run(workdir, palette: np.ndarray | None) -> str:
    """A workdir as training leaves it, as far as the asset checks look: config.json, a
    checkpoint step folder and (if given) palette.npy with its recorded digest."""
    os.makedirs(os.path.join(workdir, 'checkpoints', '6'))
    save_config(tiny_config(''), str(workdir))
    if palette is not None:
        save_palette(palette, str(workdir))
    return str(workdir)


def test_missing_palette_beside_checkpoints_is_refused_never_refitted(tmp_path, monkeypatch,
                                                                      capsys):
    workdir = fake_run(tmp_path / 'run', None)
    for main, argv in ((train_main, ['--config', TINY, '--workdir', workdir]),
                       (sample_main, ['--workdir', workdir, '--num', '1'])):
        line = user_error(main, argv, monkeypatch, capsys)
        assert f'{workdir}/palette.npy is missing' in line and 'never rebuilt' in line
        assert not os.path.exists(os.path.join(workdir, 'palette.npy'))


def test_changed_palette_is_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    workdir = fake_run(tmp_path / 'run', np.zeros((16, 3), np.float32))
    np.save(os.path.join(workdir, 'palette.npy'), np.ones((16, 3), np.float32))
    for main, argv in ((train_main, ['--config', TINY, '--workdir', workdir]),
                       (sample_main, ['--workdir', workdir, '--num', '1'])):
        line = user_error(main, argv, monkeypatch, capsys)
        assert f'{workdir}/palette.npy has changed since it was written' in line


def test_evaluate_without_a_checkpoint_creates_nothing(tmp_path, monkeypatch, capsys):
    save_config(tiny_config(''), str(tmp_path))
    line = user_error(evaluate_main, ['--workdir', str(tmp_path), '--eval', 'loss'],
                      monkeypatch, capsys)
    assert 'holds no checkpoint yet' in line and '--watch' in line
    assert sorted(os.listdir(tmp_path)) == ['config.json']
    os.makedirs(tmp_path / 'checkpoints' / '6')
    (tmp_path / 'checkpoints' / '6' / 'commit_success.txt').write_text('')
    line = user_error(evaluate_main, ['--workdir', str(tmp_path), '--eval', 'loss',
                                      '--step', '7'], monkeypatch, capsys)
    assert 'No checkpoint for step 7' in line and 'available steps: [6]' in line
    assert sorted(os.listdir(tmp_path)) == ['checkpoints', 'config.json']


def tiny_hf_imagegpt(folder) -> str:
    """A released-format iGPT (HF names) of 1 layer, width 8, 4 colours, 2x2 pixels."""
    d, colours, positions = 8, 4, 4
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.normal(0, 0.3, shape).astype(np.float32)
    tensors = {'transformer.wte.weight': w(colours + 1, d),
               'transformer.wpe.weight': w(positions, d),
               'transformer.ln_f.weight': np.ones(d, np.float32), 'lm_head.weight': w(colours, d)}
    for name, shape in {'attn.c_attn': (d, 3 * d), 'attn.c_proj': (d, d),
                        'mlp.c_fc': (d, 4 * d), 'mlp.c_proj': (4 * d, d)}.items():
        tensors[f'transformer.h.0.{name}.weight'] = w(*shape)
        tensors[f'transformer.h.0.{name}.bias'] = np.zeros(shape[1], np.float32)
    for norm in ('ln_1', 'ln_2'):
        tensors[f'transformer.h.0.{norm}.weight'] = np.ones(d, np.float32)
    src = hf_src(folder, tensors)
    with open(os.path.join(src, 'config.json'), 'w') as f:
        json.dump({'model_type': 'imagegpt', 'vocab_size': colours + 1, 'n_embd': d,
                   'n_head': 2, 'n_layer': 1, 'n_positions': positions}, f)
    with open(os.path.join(src, 'preprocessor_config.json'), 'w') as f:
        json.dump({'clusters': rng.uniform(-1, 1, (colours, 3)).tolist()}, f)
    return src


def test_converted_workdir_samples_without_its_dataset_and_says_what_completions_need(
        tmp_path, monkeypatch, capsys):
    """A converted iGPT's config names the paper's dataset (imagenet2012), absent here:
    unconditional samples need only the weights and the palette; completions need test
    images, and the job says which dataset and how to provide it."""
    workdir = str(tmp_path / 'converted')
    assert convert_main(['--from', 'hf-imagegpt', '--src', tiny_hf_imagegpt(tmp_path / 'src'),
                         '--workdir', workdir]) == 0
    monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'no_datasets_here'))
    capsys.readouterr()
    assert sample_main(['--workdir', workdir, '--num', '2']) == 0
    out, err = capsys.readouterr()
    assert os.path.isfile(os.path.join(workdir, 'samples', 'unconditional_0000000.png'))
    assert "test images of 'imagenet2012'" in err and '--data_dir DIR' in err
    assert not os.path.exists(os.path.join(workdir, 'samples',
                                           'sample_completions_0000000.png'))
    assert sorted(os.listdir(workdir)) == ['assets.json', 'checkpoints', 'config.json',
                                           'palette.npy', 'samples']
    line = user_error(evaluate_main, ['--workdir', workdir, '--eval', 'loss'], monkeypatch,
                      capsys)
    assert "Dataset 'imagenet2012' is not prepared" in line
    assert '--option data_dir=<that dir>' in line and '--config.data' not in line


# Runs that learn nothing ---------------------------------------------------------------

def test_a_run_whose_loss_stays_flat_with_zero_gradients_is_warned_once():
    watch = FlatLossWatch(logs=20)
    warnings = [watch.update(3 * i, {'loss': 2.0 + 1e-4 * (i % 2), 'grad_norm': 0.0})
                for i in range(1, 26)]
    assert warnings[:19] == [None] * 19
    assert 'nothing is learning' in warnings[19] and 'step 60' in warnings[19]
    assert warnings[20:] == [None] * 5  # once


@pytest.mark.parametrize('losses, grad_norms', [
    ([2.0 - 0.01 * i for i in range(30)], [0.0] * 30),   # the loss moves
    ([2.0] * 30, [0.0] * 15 + [0.5] + [0.0] * 14),        # a gradient in between
])
def test_a_run_that_learns_is_not_warned(losses, grad_norms):
    watch = FlatLossWatch(logs=20)
    assert not any(watch.update(i, {'loss': loss, 'grad_norm': norm})
                   for i, (loss, norm) in enumerate(zip(losses, grad_norms, strict=True)))


@pytest.mark.parametrize('last_saved, says', [
    (None, 'No checkpoint was saved yet, so a rerun starts from step 0.'),
    (6, 'Nothing after checkpoint 6 was saved; a rerun resumes from it.')])
def test_non_finite_message_names_the_checkpoint_a_rerun_starts_from(last_saved, says):

    class Manager:
        def wait_until_finished(self):
            pass
    metrics = [{'loss': float('nan'), 'params_finite': True, 'nonfinite_streak': 0}]
    with pytest.raises(NonFiniteLossError) as e:
        _check_finite(metrics, 9, last_saved, ConfigDict({'skip_nonfinite_updates': 0}),
                      Manager())
    assert says in str(e.value) and 'None' not in str(e.value)


def test_truncated_clip_config_names_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / 'src').mkdir()
    (tmp_path / 'src' / 'config.json').write_text('{"text_config": {"hidden')
    line = user_error(convert_main, ['--from', 'hf-clip', '--src', str(tmp_path / 'src'),
                                     '--workdir', str(tmp_path / 'out')], monkeypatch, capsys)
    assert f'{tmp_path}/src/config.json is not valid JSON' in line


def test_a_tokenizer_is_checked_like_a_palette(tmp_path):
    """`pixelgen.assets` on its own: written with a digest, refused when changed, optional
    where a workdir may lack it (a CLIP converted without its tokenizer)."""
    workdir = str(tmp_path)
    what = 'the tokenizer'
    assert assets.read(workdir, 'tokenizer.json', what=what) is None  # a new run: none yet
    os.makedirs(os.path.join(workdir, 'checkpoints', '0'))
    with pytest.raises(assets.AssetError, match='tokenizer.json is missing'):
        assets.check(workdir, 'tokenizer.json', what=what)
    assert not assets.check(workdir, 'tokenizer.json', what=what, required=False)
    assets.write(workdir, 'tokenizer.json', b'{"model": 1}')
    assert assets.read(workdir, 'tokenizer.json', what=what) == b'{"model": 1}'
    (tmp_path / 'tokenizer.json').write_bytes(b'{"model": 2}')
    for required in (True, False):
        with pytest.raises(assets.AssetError, match='tokenizer.json has changed'):
            assets.check(workdir, 'tokenizer.json', what=what, required=required)
    (tmp_path / 'tokenizer.json').unlink()  # recorded, so missing even where optional
    with pytest.raises(assets.AssetError, match='tokenizer.json is missing'):
        assets.check(workdir, 'tokenizer.json', what=what, required=False)
