"""benchmarks/decode_floor.py: the decoding matmuls alone, on one device or split over two."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

PATH = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'decode_floor.py')
spec = importlib.util.spec_from_file_location('decode_floor', PATH)
decode_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode_floor)
SPLITS = ('one', 'tensor', 'pipeline', 'clients', 'halves')


@pytest.mark.slow
def test_every_split_computes_the_one_device_chain():
    out = subprocess.run([sys.executable, PATH, '--layers', '2', '4', '--split', *SPLITS,
                          '--steps', '3', '--width', '16', '--repeats', '1'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(line['layers'], line['split']) for line in lines] == [
        (layers, split) for layers in (2, 4) for split in SPLITS]
    for line in lines:
        assert line['rel_err'] < 1e-5, line
        assert line['ms_per_step'] > 0


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        decode_floor.parse(['--layers', '3', '--split', 'pipeline'])
    with pytest.raises(SystemExit):
        decode_floor.parse(['--parts', '2', '--split', 'tensor'])
    with pytest.raises(SystemExit):
        decode_floor.parse(['--layers', '0'])
    assert decode_floor.parse(['--layers', '3']).layers == [3]
