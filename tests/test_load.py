"""Loading at scale: `pixelgen.load` restores the parameters only (never the optimizer state)
straight into the shards of a mesh, the run's config.mesh fitted to the devices here or the
one given (--mesh on the jobs); the memory report of loading and sampling."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_python, tiny_config
from flax import nnx

import pixelgen
from pixelgen import checkpoint, parallel, tasks
from pixelgen.checkpoint import CheckpointMismatchError
from pixelgen.config import ConfigError


def delete_optimizer_state(workdir: str, step: int) -> list[str]:
    """Deletes the optimizer state of checkpoint `step`: its arrays' entries in the state's
    OCDBT index (Orbax keeps every array of a checkpoint in one key-value database under
    checkpoints/<step>/state/) and the data files under state/ocdbt.process_*/d/ that held
    only optimizer state. Returns the files removed."""
    import tensorstore as ts

    state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
    url = f'file://{os.path.abspath(state_dir)}/'
    base = ts.KvStore.open(url).result()

    def entries(node):
        for entry in ts.ocdbt.dump(base, node).result().get('entries', []):
            if 'key' in entry:
                yield entry
            else:  # an interior node of the b-tree
                yield from entries(entry.get('node') or entry['location'])
    root = ts.ocdbt.dump(base).result()['versions'][-1]['root']['location']
    optimizer_keys, optimizer_files, other_files = [], set(), set()
    for entry in entries(root):
        # 'value:ocdbt.process_0/:d/<file>:<offset>:<length>' for values not kept in the index
        where = entry.get('indirect_value', '').split(':')
        data_file = os.path.join(where[1], where[2]) if len(where) > 2 else None
        if entry['key'].startswith(b'opt_state.'):
            optimizer_keys.append(entry['key'])
            optimizer_files.add(data_file)
        else:
            other_files.add(data_file)
    assert optimizer_keys, 'the checkpoint holds no optimizer state to delete'
    index = ts.KvStore.open({'driver': 'ocdbt', 'base': url}).result()
    txn = ts.Transaction()
    for key in optimizer_keys:
        index.with_transaction(txn).delete_range(ts.KvStore.KeyRange(key, key + b'\0'))
    txn.commit_sync()
    removed = sorted(f for f in optimizer_files - other_files if f)
    for name in removed:
        os.remove(os.path.join(state_dir, name))
    # The checkpoint no longer matches the file digest written with it: drop the digest, as
    # anyone editing a checkpoint must (its arrays' checksums still verify what is read).
    os.remove(os.path.join(workdir, 'checkpoints', str(step), checkpoint.DIGEST_FILE))
    return removed


def saved_workdir(path, *overrides: str, state=None) -> str:
    """A tiny iGPT workdir with a checkpoint at step 0 of fresh parameters (no training):
    the whole training state, or `state(params)`'s tree."""
    from pixelgen.config import save_config
    from pixelgen.trainer import init_state, make_optimizer

    config = tiny_config(str(path / 'no-data'), *overrides)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    _, _, full = init_state(tasks.model_builder(config)(nnx.Rngs(config.seed)), tx,
                            config.seed)
    workdir = str(path / 'run')
    manager = checkpoint.make_manager(workdir, async_save=False)
    checkpoint.save(manager, 0, full if state is None else state(full), None, config)
    manager.wait_until_finished()
    manager.close()
    save_config(config, workdir)
    from pixelgen.data.palette import save_palette  # training writes it before any checkpoint
    save_palette(np.linspace(-1, 1, config.data.palette_size * 3, dtype=np.float32).reshape(
        -1, 3), workdir)
    return workdir


def params_of(loaded) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param))]


def test_the_saved_mesh_is_fitted_to_the_devices_here():
    assert parallel.fit_mesh({'data': 1, 'fsdp': 128, 'tensor': 1}, 8) == (
        {'data': 1, 'fsdp': 8, 'tensor': 1}, True)
    assert parallel.fit_mesh({'data': 1, 'fsdp': 128, 'tensor': 1}, 1) == (
        {'data': 1, 'fsdp': 1, 'tensor': 1}, True)
    assert parallel.fit_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, 8) == (
        {'data': 8, 'fsdp': 1, 'tensor': 1}, False)
    # The -1 axis takes what the others leave; the parameter axes keep the most.
    assert parallel.fit_mesh({'data': -1, 'fsdp': 16}, 8)[0] == {'data': 1, 'fsdp': 8,
                                                                 'tensor': 1}
    assert parallel.fit_mesh({'data': 4, 'fsdp': 4, 'tensor': 4}, 8)[0] == {
        'data': 1, 'fsdp': 2, 'tensor': 4}
    # A shrunk axis divides the saved one (what training split stays split); data takes the
    # devices left.
    assert parallel.fit_mesh({'data': 1, 'fsdp': 128}, 6)[0] == {'data': 3, 'fsdp': 2,
                                                                 'tensor': 1}
    with pytest.raises(ValueError, match='unknown axes'):
        parallel.fit_mesh({'model': 2}, 8)


def test_mesh_syntax_errors_name_the_axes():
    assert parallel.parse_mesh('data=1,fsdp=-1') == {'data': 1, 'fsdp': -1}
    assert parallel.parse_mesh(' tensor = 2 ') == {'tensor': 2}
    for text, message in [('data=1,fsdp', 'AXIS=SIZE'), ('model=2', "unknown axis 'model'"),
                          ('fsdp=0', 'positive integer or -1'), ('fsdp=x', 'positive'),
                          ('data=1,data=2', 'twice'), ('', 'AXIS=SIZE')]:
        with pytest.raises(ValueError, match=message) as e:
            parallel.parse_mesh(text)
        assert 'data, fsdp, tensor' in str(e.value) or 'twice' in message or 'positive' in \
            message


@pytest.mark.parametrize('job', [
    ['pixelgen.evaluate', '--eval', 'loss'], ['pixelgen.sample'],
    ['pixelgen.rerank', '--text', 'x', '--images', 'a.png'],
    ['pixelgen.dvae', 'encode', '--dataset', 'shapes', '--out', 'o'],
    ['pixelgen.dvae', 'decode', '--codes', 'c', '--out', 'o.png']])
def test_the_jobs_refuse_a_bad_mesh_naming_the_axes(job, capsys):
    import importlib
    main = importlib.import_module(job[0]).main
    with pytest.raises(SystemExit) as e:
        main([*job[1:], '--workdir', 'nowhere', '--mesh', 'model=2'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --mesh: --mesh 'model=2': unknown axis 'model'" in err
    assert 'data, fsdp, tensor' in err


def test_a_saved_fsdp_mesh_loads_on_one_device_with_one_line(tmp_path, capsys):
    workdir = saved_workdir(tmp_path, '--config.mesh.data=1', '--config.mesh.fsdp=128')
    loaded = pixelgen.load(workdir)
    assert dict(loaded.mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
    lines = [line for line in capsys.readouterr().out.splitlines() if 'loading onto' in line]
    assert len(lines) == 1 and "'fsdp': 128" in lines[0] and "'fsdp': 1," in lines[0]
    assert loaded.step == 0


def test_missing_steps_and_unfitting_meshes_are_clear_errors(tmp_path):
    workdir = saved_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'No checkpoint for step 7 .*available '
                                                r'steps: \[0\]'):
        pixelgen.load(workdir, 7)
    with pytest.raises(ConfigError, match=r'needs 2 devices but 1 are available.*-1'):
        pixelgen.load(workdir, mesh={'fsdp': 2})
    with pytest.raises(ConfigError, match='unknown axes'):
        pixelgen.load(workdir, mesh={'model': 1})
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'config.json').write_text((tmp_path / 'run' / 'config.json').read_text())
    with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
        pixelgen.load(str(empty))


def test_a_checkpoint_without_optimizer_state_loads(tmp_path):
    """A converted workdir may hold the parameters alone."""
    full = saved_workdir(tmp_path / 'full')
    bare = saved_workdir(tmp_path / 'bare', state=lambda s: {'params': s['params'],
                                                             'step': s['step']})
    for a, b in zip(params_of(pixelgen.load(full)), params_of(pixelgen.load(bare)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_without_params_names_the_fix(tmp_path):
    workdir = saved_workdir(tmp_path, state=lambda s: {'step': s['step'], 'rng': s['rng']})
    with pytest.raises(CheckpointMismatchError, match=r"holds no parameters \(its state has "
                                                      r"\['rng', 'step'\].*pixelgen.convert"):
        pixelgen.load(workdir)
    partial = saved_workdir(tmp_path / 'partial', state=lambda s: {
        'params': {k: v for k, v in s['params'].items() if k != 'sos'}})
    with pytest.raises(CheckpointMismatchError, match=r"lacks 1 of the model's parameters "
                                                      r'\(sos.value\)'):
        pixelgen.load(partial)


def test_memory_reports_loading_and_sampling_per_device(capsys):
    from conftest import TINY

    from pixelgen import memory
    from pixelgen.config import parse_config_args
    config, _ = parse_config_args(['--config', TINY])
    one = memory.load_bytes_per_device(config, 1)
    eight = memory.load_bytes_per_device(config, 8, {'data': 1, 'fsdp': -1})
    assert one['params_bytes'] == one['params_bytes_total'] == \
        memory.state_bytes_per_device(config, 1)['params_bytes']
    assert eight['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
    assert eight['params_bytes'] == one['params_bytes'] / 8  # every tiny weight splits
    # The saved mesh (data=-1) fitted to 8 devices replicates the parameters.
    assert memory.load_bytes_per_device(config, 8)['mesh'] == {'data': 8, 'fsdp': 1,
                                                               'tensor': 1}
    m, n = config.model, config.data.image_size ** 2
    sample = memory.sample_bytes_per_device(config, 8, 4, {'fsdp': -1})
    keys_values = m.num_layers * 2 * 4 * n * m.width * 4  # k and v, float32, 4 rows
    fused = m.num_layers * 3 * m.width * m.width * 4      # q/k/v kernels small layers fuse
    assert keys_values <= sample['kv_cache_bytes'] <= keys_values + fused
    assert sample['total_bytes'] == eight['params_bytes'] + sample['kv_cache_bytes']
    assert memory.main(['--config', TINY, '--devices', '8', '--mesh', 'fsdp=-1',
                        '--sample_batch', '4']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['load']['mesh'] == eight['mesh']
    assert report['load_gib_per_device'] == eight['params_bytes'] / 2**30
    assert report['sample']['kv_cache_bytes'] == sample['kv_cache_bytes']
    assert report['sample_gib_per_device'] == sample['total_bytes'] / 2**30
    clip, _ = parse_config_args(['--config', os.path.join(os.path.dirname(TINY.split(':')[0]),
                                                          'clip_shapes.py')])
    assert memory.sample_bytes_per_device(clip, 1, 4) is None


EIGHT_DEVICES = '''
import json, sys
import jax, numpy as np
sys.path.insert(0, 'tests')
from flax import nnx
import pixelgen
from pixelgen import checkpoint, tasks
from pixelgen.config import ConfigError, load_saved_config
from pixelgen.trainer import abstract_state, init_state, make_optimizer
workdir, moved = {workdir!r}, {moved!r}
out = {{}}

# The optimizer state is gone: the whole training state no longer restores.
config = load_saved_config(workdir)
tx, _ = make_optimizer(config.optimizer, config.total_steps)
_, _, state = abstract_state(lambda: init_state(
    tasks.model_builder(config)(nnx.Rngs(0)), tx, config.seed))
manager = checkpoint.make_manager(workdir, async_save=False)
try:
    checkpoint.restore(manager, manager.latest_step(), state, None, config)
    out['full_restore'] = 'worked'
except checkpoint.CorruptCheckpointError as e:
    out['full_restore'] = str(e)
manager.close()

def shards(loaded):
    return {{'.'.join(checkpoint.path_names(p)): [list(x.shape),
             list(x.addressable_shards[0].data.shape), len(x.addressable_shards)]
            for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(loaded.model))[0]}}

fsdp = pixelgen.load(workdir, mesh={{'data': 1, 'fsdp': -1}})
out['fsdp_mesh'] = dict(fsdp.mesh.shape)
out['fsdp'] = shards(fsdp)
default = pixelgen.load(workdir)
out['default_mesh'] = dict(default.mesh.shape)
out['default'] = shards(default)
tokens = np.arange(2 * fsdp.model.seq_len).reshape(2, -1) % fsdp.model.vocab_size
a, b = (np.asarray(nnx.jit(lambda m, t: m(t))(x.model, tokens)) for x in (fsdp, default))
out['logits_diff'] = float(np.abs(a - b).max())
out['params'] = [np.asarray(x).tolist() for x in jax.tree.leaves(nnx.state(fsdp.model))]
moved_load = pixelgen.load(moved)
out['moved_mesh'] = dict(moved_load.mesh.shape)
out['moved'] = shards(moved_load)
for mesh in ({{'tensor': 8}}, {{'fsdp': 16}}):
    try:
        pixelgen.load(workdir, mesh=mesh)
    except ConfigError as e:
        out[str(mesh)] = str(e)
from pixelgen import evaluate, sample
evaluate.main(['--workdir', workdir, '--eval', 'loss', '--num_examples', '16',
               '--mesh', 'data=1,fsdp=-1'])
sample.main(['--workdir', workdir, '--num', '2', '--mesh', 'data=1,fsdp=-1'])
print('RESULT' + json.dumps(out))
'''


@pytest.mark.slow
def test_eight_devices_hold_an_eighth_of_each_parameter_without_optimizer_state(
        data_dir, tmp_path, capfd):
    """Trains the tiny config, deletes its optimizer state, and loads it on 8 simulated
    devices: fsdp=8 holds 1/8 of every parameter per device; the loss job and sampling run
    with --mesh; the run's own mesh (data=-1) and a saved fsdp=128 (fitted to fsdp=8) load."""
    import shutil

    from pixelgen.trainer import train
    workdir = str(tmp_path / 'run')
    train(tiny_config(data_dir, '--config.sample_every_steps=0',
                      '--config.eval_every_steps=0'), workdir, stop_after=2)
    reference = params_of(pixelgen.load(workdir))
    removed = delete_optimizer_state(workdir, 2)
    assert all(f.startswith('ocdbt.process_0/d/') for f in removed)
    moved = str(tmp_path / 'fsdp128')
    shutil.copytree(workdir, moved)
    with open(os.path.join(moved, 'config.json')) as f:
        saved = json.load(f)
    saved['mesh'] = {'data': 1, 'fsdp': 128, 'tensor': 1}
    with open(os.path.join(moved, 'config.json'), 'w') as f:
        json.dump(saved, f)

    stdout = run_python(EIGHT_DEVICES.format(workdir=workdir, moved=moved), devices=8,
                        timeout=600)
    out = json.loads(stdout.split('RESULT', 1)[1])
    assert 'opt_state' in out['full_restore']  # the deletion bites a whole-state restore
    assert out['fsdp_mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
    for name, (shape, shard, count) in out['fsdp'].items():
        assert count == 8
        assert np.prod(shard) * 8 == np.prod(shape), (name, shape, shard)  # 1/8 per device
    # The run's own mesh (data=-1) replicates; a saved fsdp=128 is fitted to fsdp=8.
    assert out['default_mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
    assert all(shard == shape for shape, shard, _ in out['default'].values())
    assert out['moved_mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
    assert out['moved'] == out['fsdp']
    assert "loading onto {'data': 1, 'fsdp': 8, 'tensor': 1}" in stdout
    for a, b in zip(reference, out['params'], strict=True):
        np.testing.assert_array_equal(a, np.asarray(b, a.dtype))
    assert out['logits_diff'] < 1e-4
    assert "does not divide" in out["{'tensor': 8}"] and "'heads'" in out["{'tensor': 8}"]
    assert 'tensor=2' in out["{'tensor': 8}"]
    assert 'needs 16 devices but 8 are available' in out["{'fsdp': 16}"]
    assert os.path.isfile(os.path.join(workdir, 'eval', '2', 'report.json'))
    assert any(f.startswith('unconditional_') for f in os.listdir(os.path.join(workdir,
                                                                                'samples')))
