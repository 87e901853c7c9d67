"""benchmarks/rounds.py: alternating pixelgen and peer runs, one ratio per round."""

import importlib.util
import json
import os
import sys

import pytest

PATH = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'rounds.py')
spec = importlib.util.spec_from_file_location('rounds', PATH)
rounds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rounds)


def test_rounds_alternate_the_order_and_report_each_ratio(monkeypatch, capsys):
    ran = []
    rates = {'pixelgen': iter([300.0, 500.0, 400.0]), 'hf': iter([100.0, 100.0, 200.0])}

    def fake_run(command):
        side = 'hf' if any('hf_imagegpt' in part for part in command) else 'pixelgen'
        ran.append(side)
        return {'tokens_per_s': next(rates[side]), 'mfu': 0.3}

    monkeypatch.setattr(rounds, 'run_json', fake_run)
    rounds.main(['igpt_train', '--rounds', '3', '--steps', '3'])
    assert ran == ['pixelgen', 'hf', 'hf', 'pixelgen', 'pixelgen', 'hf']
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line['ratio'] for line in lines[:3]] == [3.0, 5.0, 2.0]
    assert lines[-1]['median_ratio'] == 3.0 and lines[-1]['rounds_at_target'] == 3
    assert (lines[-1]['min_ratio'], lines[-1]['max_ratio']) == (2.0, 5.0)


def test_a_failing_run_says_which_command_and_why():
    with pytest.raises(RuntimeError, match='exit 3'):
        rounds.run_json([sys.executable, '-c', 'import sys; print("boom", file=sys.stderr); '
                         'sys.exit(3)'])
    assert rounds.run_json([sys.executable, '-c', 'print("log"); print(\'{"a": 1}\')']) == {'a': 1}


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        rounds.main(['igpt_train', '--rounds', '0'])
    with pytest.raises(SystemExit):
        rounds.main(['dalle_train'])
