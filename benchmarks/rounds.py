"""The issue's ratios in repeated rounds, one set per round, with their median and spread.

    python benchmarks/rounds.py igpt_train igpt_sample dalle_attention dalle_train [--rounds 5]

- `igpt_train`, `igpt_sample`: each round runs `python -m pixelgen.bench CASE --json` and
  `python benchmarks/hf_imagegpt.py CASE --json`, each in its own process, one right after
  the other; the ratio `vs_hf` is pixelgen's tokens/s over HF's. The order flips every round,
  so a machine that slows down or speeds up during the run hits both sides alike.
- `dalle_attention`: each round runs the bench case (its row, column and conv layers, timed
  interleaved with the dense masked layer in one process) and then, or first on odd rounds,
  `benchmarks/torch_dalle_attention.py --json`; the ratios are each kind's speed-up over
  pixelgen's dense layer (`row`, `column`, `conv`) and over PyTorch's SDPA dense masked layer
  (`row_vs_torch`, ...).
- `dalle_train`: the bench case alone; `vs_dense` is the paper schedule's speed-up over the
  all-dense twin, timed interleaved in the same process.

On a shared VM, whose matmul rate moves by up to 2x within minutes, a ratio from one run says
little; the median over rounds, with its spread, says more.

Prints one JSON line per round, {"name": CASE, "round": i, "order": [...], "ratios": {...},
"mfu": ...}, then one summary line per case: {"name": CASE, "rounds": N, "ratios": {key:
[...]}, "median": {key: ...}, "min": {...}, "max": {...}, "targets": {key: target},
"rounds_at_target": {key: k}, "mfu": [...]} (mfu: pixelgen's, per round).

Needs the bench extra (`pip install -e '.[bench]'`, see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ('row', 'column', 'conv')
# The targets (benchmarks/README.md); ratios without one are reported only.
TARGETS = {'igpt_train': {'vs_hf': 1.5}, 'igpt_sample': {'vs_hf': 5.0},
           'dalle_attention': {'row': 3.0, 'column': 2.0, 'conv': 3.0},
           'dalle_train': {'vs_dense': 2.0}}


def log(message: str) -> None:
    print(f'[rounds] {message}', file=sys.stderr, flush=True)


def run_json(command: list[str]) -> dict:
    """The JSON object that `command` prints on its last stdout line."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f'{" ".join(command)} failed (exit {done.returncode}):\n'
                           f'{done.stderr[-3000:]}')
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f'{" ".join(command)} printed no JSON; stderr:\n{done.stderr[-3000:]}')
    return json.loads(lines[-1])


def commands(case: str, steps: int) -> dict[str, list[str]]:
    """The processes of one round: pixelgen's bench and the case's PyTorch peer, if any."""
    sides = {'pixelgen': [sys.executable, '-m', 'pixelgen.bench', case, '--json',
                          '--steps', str(steps)]}
    if case.startswith('igpt'):
        sides['hf'] = [sys.executable, os.path.join(HERE, 'hf_imagegpt.py'), case, '--json',
                       '--steps', str(steps)]
    elif case == 'dalle_attention':
        sides['torch'] = [sys.executable, os.path.join(HERE, 'torch_dalle_attention.py'),
                          '--json', '--steps', str(steps)]
    return sides


def ratios(case: str, results: dict[str, dict]) -> dict[str, float]:
    """One round's ratios from its processes' JSON."""
    ours = results['pixelgen']
    if case.startswith('igpt'):
        return {'vs_hf': ours['tokens_per_s'] / results['hf']['tokens_per_s']}
    if case == 'dalle_train':
        return {'vs_dense': ours['speedup_vs_dense']}
    torch_s = results['torch']['variants']['dense_masked']['step_s']
    kinds = ours['kinds']
    return {**{kind: kinds[kind]['speedup_vs_dense'] for kind in KINDS},
            **{f'{kind}_vs_torch': torch_s / kinds[kind]['step_s'] for kind in KINDS}}


def summary(case: str, rounds: list[dict]) -> dict:
    keys = list(rounds[0]['ratios'])
    series = {key: [r['ratios'][key] for r in rounds] for key in keys}
    targets = TARGETS[case]
    return {'name': case, 'rounds': len(rounds), 'ratios': series,
            'median': {key: statistics.median(v) for key, v in series.items()},
            'min': {key: min(v) for key, v in series.items()},
            'max': {key: max(v) for key, v in series.items()},
            'targets': targets,
            'rounds_at_target': {key: sum(r >= target for r in series[key])
                                 for key, target in targets.items()},
            'mfu': [r['mfu'] for r in rounds]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cases', nargs='+', choices=sorted(TARGETS), metavar='case',
                        help=f'one or more of: {", ".join(sorted(TARGETS))}')
    parser.add_argument('--rounds', type=int, default=5, help='rounds per case (>= 1)')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per run (>= 3)')
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f'--rounds={args.rounds}; at least one round is needed.')
    if args.steps < 3:
        parser.error(f'--steps={args.steps}; each side takes the median of at least 3 steps.')
    for case in args.cases:
        rounds = []
        sides = commands(case, args.steps)
        for index in range(args.rounds):
            order = list(sides) if index % 2 == 0 else list(sides)[::-1]
            results = {}
            for side in order:
                log(f'{case} round {index + 1}/{args.rounds}: {side}')
                results[side] = run_json(sides[side])
            row = {'name': case, 'round': index + 1, 'order': order,
                   'ratios': ratios(case, results), 'mfu': results['pixelgen']['mfu'],
                   'step_s': {side: results[side]['step_s'] for side in order}}
            print(json.dumps(row), flush=True)
            rounds.append(row)
        result = summary(case, rounds)
        print(json.dumps(result), flush=True)
        for key, median in result['median'].items():
            target = result['targets'].get(key)
            at = (f', {result["rounds_at_target"][key]}/{len(rounds)} rounds at the {target}x '
                  'target' if target else '')
            log(f'{case} {key}: median {median:.2f}x (range {result["min"][key]:.2f}-'
                f'{result["max"][key]:.2f}x){at}')


if __name__ == '__main__':
    main()
