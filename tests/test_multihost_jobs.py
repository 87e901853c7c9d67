"""The read-only jobs on two processes (launch/local_multiprocess.sh --module ...): each
process computes its own rows of a split that does not divide evenly between them, and the
results equal those of one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, tiny_config
from PIL import Image

from pixelgen import evaluate
from pixelgen.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = os.path.join(REPO, 'launch', 'local_multiprocess.sh')
EXAMPLES = 13  # process 0 gets examples 0..6, process 1 gets 6..13


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('igpt'))
    train(tiny_config(data_dir), workdir)
    return workdir


def _two_processes(module: str, *args: str) -> tuple[str, str]:
    """(process 0's output, process 1's log) of `module` run on two processes."""
    done = subprocess.run(['bash', SCRIPT, '2', '--module', module, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHON': sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log_dir = re.search(r'logs of processes 1\.\. in (\S+)', done.stderr)[1]
    with open(os.path.join(log_dir, 'process_1.log')) as f:
        return done.stdout, f.read()


def test_evaluate_splits_an_uneven_split_between_processes_and_matches_one(trained, data_dir):
    options = {'batch_size': '4', 'data_dir': data_dir}
    one = evaluate.evaluate_step(trained, ['loss', 'probe'], num_examples=EXAMPLES,
                                 options=options)['evaluators']
    out0, out1 = _two_processes(
        'pixelgen.evaluate', '--workdir', trained, '--eval', 'loss,probe',
        '--num_examples', str(EXAMPLES), '--option', 'batch_size=4',
        '--option', f'data_dir={data_dir}')
    # Each process read its own share (the probe reads train and test: two lines each).
    assert '[p0] [eval] process 0 of 2: examples 0..6 of 13 (6 rows)' in out0
    assert '[eval] process 1 of 2: examples 6..13 of 13 (7 rows)' in out1
    two = evaluate.read_report(trained, evaluate.checkpoint_steps(trained)[-1])['evaluators']
    assert two['loss']['metrics']['num_examples'] == EXAMPLES
    for name in ('loss', 'probe'):
        for key, value in one[name]['metrics'].items():
            assert two[name]['metrics'][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_sample_draws_each_process_rows_and_writes_what_one_process_writes(trained,
                                                                             tmp_path):
    from pixelgen import sample
    assert sample.main(['--workdir', trained, '--num', '3', '--out', str(tmp_path / 'one'),
                        '--out_dir', str(tmp_path / 'one_images')]) == 0
    _two_processes('pixelgen.sample', '--workdir', trained, '--num', '3',
                   '--out', str(tmp_path / 'two' / 'grid.png'),
                   '--out_dir', str(tmp_path / 'two_images'))
    one_grid, = [f for f in os.listdir(tmp_path / 'one') if f.startswith('unconditional')]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'two' / 'grid.png')),
                                  np.asarray(Image.open(tmp_path / 'one' / one_grid)))
    names = sorted(os.listdir(tmp_path / 'two_images'))
    assert names == sorted(os.listdir(tmp_path / 'one_images'))
    assert [n for n in names if n.startswith('unconditional')] == [
        'unconditional_000.png', 'unconditional_001.png', 'unconditional_002.png']


def test_dvae_encode_writes_each_process_share_and_matches_one_process(data_dir, tmp_path):
    from pixelgen import dvae
    from pixelgen.config import parse_config_args
    from pixelgen.data import codes as codes_lib
    dvae_config = os.path.join(REPO, 'configs', 'dvae_shapes.py') + ':tiny'
    config, _ = parse_config_args(['--config', dvae_config, f'--config.data.data_dir={data_dir}'])
    workdir = str(tmp_path / 'dvae')
    train(config, workdir)
    common = ['--workdir', workdir, '--dataset', 'shapes', '--split', 'test', '--data_dir',
              data_dir, '--num_examples', str(EXAMPLES), '--batch_size', '4']
    assert dvae.main(['encode', *common, '--out', str(tmp_path / 'one')]) == 0
    out0, out1 = _two_processes('pixelgen.dvae', 'encode', *common,
                                '--out', str(tmp_path / 'two'))
    shards = sorted(f for f in os.listdir(tmp_path / 'two') if f.startswith('codes-test'))
    assert shards == ['codes-test.array_record-00000-of-00002',
                      'codes-test.array_record-00001-of-00002']  # one per process
    one = codes_lib.open_codes(str(tmp_path / 'one'), 'test')
    two = codes_lib.open_codes(str(tmp_path / 'two'), 'test')
    assert len(two) == len(one) == EXAMPLES
    for i in range(EXAMPLES):
        np.testing.assert_array_equal(two[i]['codes'], one[i]['codes'])
        assert two[i]['caption'] == one[i]['caption']
