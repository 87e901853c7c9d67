"""pixelgen against its PyTorch peer in alternating rounds, one ratio per round.

    python benchmarks/rounds.py igpt_train igpt_sample [--rounds 5] [--steps 5]

Each round runs `python -m pixelgen.bench CASE --json` and `python benchmarks/hf_imagegpt.py
CASE --json`, each in its own process, one right after the other, and takes the ratio of
their tokens/s. The order flips every round (pixelgen first, then HF first), so a machine
that slows down or speeds up during the run hits both sides alike. On a shared VM, whose
matmul rate moves by up to 2× within minutes, a ratio from one pair of runs says little; the
median over rounds, with its spread, says more.

Prints one JSON line per round and case, then one summary line per case:
{"name": CASE, "rounds": N, "ratios": [...], "median_ratio": ..., "min_ratio": ...,
"max_ratio": ..., "target": ..., "rounds_at_target": k, "mfu": [...]} (mfu: pixelgen's, per round).

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
# The targets: pixelgen's tokens/s over the peer's (benchmarks/README.md).
TARGETS = {'igpt_train': 1.5, 'igpt_sample': 5.0}


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
    return {'pixelgen': [sys.executable, '-m', 'pixelgen.bench', case, '--json',
                         '--steps', str(steps)],
            'hf': [sys.executable, os.path.join(HERE, 'hf_imagegpt.py'), case, '--json',
                   '--steps', str(steps)]}


def summary(case: str, rounds: list[dict]) -> dict:
    ratios = [r['ratio'] for r in rounds]
    target = TARGETS[case]
    return {'name': case, 'rounds': len(rounds), 'ratios': ratios,
            'median_ratio': statistics.median(ratios), 'min_ratio': min(ratios),
            'max_ratio': max(ratios), 'target': target,
            'rounds_at_target': sum(r >= target for r in ratios),
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
        for index in range(args.rounds):
            order = ['pixelgen', 'hf'] if index % 2 == 0 else ['hf', 'pixelgen']
            results = {}
            for side in order:
                log(f'{case} round {index + 1}/{args.rounds}: {side}')
                results[side] = run_json(commands(case, args.steps)[side])
            row = {'name': case, 'round': index + 1, 'order': order,
                   'pixelgen_tokens_per_s': results['pixelgen']['tokens_per_s'],
                   'hf_tokens_per_s': results['hf']['tokens_per_s'],
                   'ratio': results['pixelgen']['tokens_per_s'] / results['hf']['tokens_per_s'],
                   'mfu': results['pixelgen']['mfu']}
            print(json.dumps(row), flush=True)
            rounds.append(row)
        result = summary(case, rounds)
        print(json.dumps(result), flush=True)
        log(f"{case}: median {result['median_ratio']:.2f}x (range {result['min_ratio']:.2f}-"
            f"{result['max_ratio']:.2f}x), {result['rounds_at_target']}/{len(rounds)} rounds at "
            f"the {result['target']}x target")


if __name__ == '__main__':
    main()
