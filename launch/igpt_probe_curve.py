"""Image GPT's claim on real data, in one command: train, probe every checkpoint, compare
with raw pixels.

    python launch/igpt_probe_curve.py WORKDIR                       # configs/igpt_fashion_mnist.py
    python launch/igpt_probe_curve.py WORKDIR --config.total_steps=2400   # any config override
    python launch/igpt_probe_curve.py WORKDIR --config configs/igpt_shapes.py:tiny --num_examples 64

1. Trains the config into WORKDIR (resuming from its last checkpoint if killed).
2. Runs the eval job's linear probe (`python -m pixelgen.evaluate --eval probe --step S
   --num_examples N`) on every kept checkpoint not probed before: logistic regression on
   every block's features, and on the raw pixels of the same images with the same code and
   the same choice of C. Each report is saved in WORKDIR/eval/<step>/, so a killed run
   resumes.
3. Writes WORKDIR/probe_results.json and WORKDIR/probe_curve.png (the best layer's test
   accuracy at each step against the raw-pixel baseline); the last step's per-layer figure
   is WORKDIR/eval/<step>/probe_accuracy.png.

probe_results.json: `steps`, and per step `best_layer`, `best_layer_test_accuracy`,
`layers_test_accuracy` (block 0 first; the embedding is not a block) and
`pixels_test_accuracy`; `final` (the last step's), `beats_pixels`, `train_minutes` (the
training time of this run, summed over resumes) and the probe's `num_examples`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, '..', 'configs', 'igpt_fashion_mnist.py')


def _train(workdir: str, config_args: list[str]) -> None:
    from pixelgen.config import parse_config_args
    from pixelgen.trainer import train

    config, rest = parse_config_args(config_args)
    if rest:
        raise SystemExit(f'igpt_probe_curve.py: unknown arguments {rest}')
    seconds_file = os.path.join(workdir, 'train.seconds')
    start = time.perf_counter()
    train(config, workdir)
    before = float(open(seconds_file).read()) if os.path.exists(seconds_file) else 0.0
    with open(seconds_file, 'w') as f:
        f.write(f'{before + time.perf_counter() - start:.1f}')


def probe_all(workdir: str, num_examples: int, batch_size: int) -> dict:
    from pixelgen import evaluate, probe

    steps = evaluate.checkpoint_steps(workdir)
    per_step = {}
    for step in steps:
        report = evaluate.read_report(workdir, step)
        if 'probe' not in report.get('evaluators', {}):
            print(f'[probe_curve] probing step {step}', flush=True)
            report = evaluate.evaluate_step(workdir, ['probe'], step, num_examples=num_examples,
                                            options={'batch_size': str(batch_size)})
        m = report['evaluators']['probe']['metrics']
        layers = sorted(k for k in m if k.startswith('layer_') and k.endswith('/test_accuracy'))
        per_step[step] = {'best_layer': int(m['best_layer']),
                          'best_layer_test_accuracy': m['best_layer_test_accuracy'],
                          'layers_test_accuracy': [m[k] for k in layers],
                          'pixels_test_accuracy': m['pixels/test_accuracy'],
                          'test_examples': int(m['test_examples'])}
    if not per_step:
        raise SystemExit(f'igpt_probe_curve.py: {workdir} has no checkpoint to probe.')
    final = per_step[steps[-1]]
    seconds_file = os.path.join(workdir, 'train.seconds')
    results = {
        'steps': steps, 'per_step': {str(s): v for s, v in per_step.items()}, 'final': final,
        'beats_pixels': final['best_layer_test_accuracy'] > final['pixels_test_accuracy'],
        'train_minutes': (float(open(seconds_file).read()) / 60
                          if os.path.exists(seconds_file) else None),
        'num_examples': num_examples}
    probe.curve_plot(steps, [per_step[s]['best_layer_test_accuracy'] for s in steps],
                     os.path.join(workdir, 'probe_curve.png'),
                     baseline=final['pixels_test_accuracy'])
    with open(os.path.join(workdir, 'probe_results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('workdir')
    parser.add_argument('--num_examples', type=int, default=10_000,
                        help='train and test images of each probe (the first N of each split)')
    parser.add_argument('--batch_size', type=int, default=200, help='feature batches')
    args, config_args = parser.parse_known_args(argv)
    if not any(a == '--config' or a.startswith('--config=') for a in config_args):
        config_args = ['--config', DEFAULT_CONFIG, *config_args]
    _train(args.workdir, config_args)
    results = probe_all(args.workdir, args.num_examples, args.batch_size)
    final = results['final']
    print(f"[probe_curve] step {results['steps'][-1]}: best layer {final['best_layer']} "
          f"{final['best_layer_test_accuracy']:.4f}, raw pixels "
          f"{final['pixels_test_accuracy']:.4f}; wrote {args.workdir}/probe_results.json and "
          'probe_curve.png', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
