"""benchmarks/rounds.py: the issue's ratios in repeated rounds, alternating with the peers."""

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
        return {'tokens_per_s': next(rates[side]), 'mfu': 0.3, 'step_s': 1.0}

    monkeypatch.setattr(rounds, 'run_json', fake_run)
    rounds.main(['igpt_train', '--rounds', '3', '--steps', '3'])
    assert ran == ['pixelgen', 'hf', 'hf', 'pixelgen', 'pixelgen', 'hf']
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line['ratios']['vs_hf'] for line in lines[:3]] == [3.0, 5.0, 2.0]
    assert lines[-1]['median'] == {'vs_hf': 3.0}
    assert lines[-1]['rounds_at_target'] == {'vs_hf': 3}
    assert (lines[-1]['min']['vs_hf'], lines[-1]['max']['vs_hf']) == (2.0, 5.0)


def test_dalle_rounds_read_the_speedups_and_the_torch_peer(monkeypatch, capsys):
    ran = []
    layer_s = iter([(0.03, 0.04, 0.05), (0.02, 0.08, 0.03)])

    def fake_run(command):
        if any('torch_dalle_attention' in part for part in command):
            ran.append('torch')
            return {'step_s': 0.1, 'variants': {'dense_masked': {'step_s': 0.1}}}
        ran.append(command[3])
        if command[3] == 'dalle_train':
            return {'speedup_vs_dense': 2.5, 'mfu': 0.4, 'step_s': 0.8}
        kinds = {kind: {'step_s': s, 'speedup_vs_dense': 0.12 / s}
                 for kind, s in zip(('row', 'column', 'conv'), next(layer_s), strict=True)}
        return {'kinds': kinds, 'mfu': 0.3, 'step_s': sum(k['step_s'] for k in kinds.values())}

    monkeypatch.setattr(rounds, 'run_json', fake_run)
    rounds.main(['dalle_attention', 'dalle_train', '--rounds', '2', '--steps', '3'])
    assert ran == ['dalle_attention', 'torch', 'torch', 'dalle_attention',
                   'dalle_train', 'dalle_train']
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    attention, train = lines[2], lines[5]
    assert attention['ratios']['row'] == pytest.approx([4.0, 6.0])
    assert attention['ratios']['conv_vs_torch'] == pytest.approx([2.0, 0.1 / 0.03])
    assert attention['rounds_at_target'] == {'row': 2, 'column': 1, 'conv': 1}
    assert train['median'] == {'vs_dense': 2.5} and train['rounds_at_target'] == {'vs_dense': 2}


def test_a_failing_run_says_which_command_and_why():
    with pytest.raises(RuntimeError, match='exit 3'):
        rounds.run_json([sys.executable, '-c', 'import sys; print("boom", file=sys.stderr); '
                         'sys.exit(3)'])
    assert rounds.run_json([sys.executable, '-c', 'print("log"); print(\'{"a": 1}\')']) == {'a': 1}


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        rounds.main(['igpt_train', '--rounds', '0'])
    with pytest.raises(SystemExit):
        rounds.main(['dalle_sample'])
