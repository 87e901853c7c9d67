"""Benchmarks: `python -m pixelgen.bench <case> [<case> ...] [--json] [--steps N]`.

Each case prints one JSON object: the shape, the median step time after compilation,
tokens/s, model FLOPs (pixelgen.flops), achieved TFLOP/s, MFU against the device peak (on
CPU a float32 matmul rate measured in the same process), compile time and peak memory. With
--json every case is exactly one line on stdout; progress goes to stderr.

    python -m pixelgen.bench igpt_train igpt_sample --json
    python -m pixelgen.bench dalle_attention dalle_train --json  # sparse vs dense masked
    python -m pixelgen.bench igpt_train --attention dense       # the dense reference
    python -m pixelgen.bench input_pipeline --json  # images/s decoded: in-process, 1, 2 workers
    python -m pixelgen.bench igpt_train --attention auto        # splash on TPU, cuDNN on GPU
    PIXELGEN_NATIVE_ATTENTION=0 python -m pixelgen.bench dalle_attention  # XLA's tiles on CPU
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \
        python -m pixelgen.bench igpt_train --profile /tmp/prof    # + where the time goes

The PyTorch peers at the same shapes are in benchmarks/ (see benchmarks/README.md).
Cases live in CASES (name -> function(shape, Options) -> dict); `run_case` runs one with
optional shape overrides, as the tests do at a tiny shape.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pixelgen import flops
from pixelgen.bench import dalle, igpt
from pixelgen.bench.common import ATTENTION_CHOICES, Options, attention_kwargs, log
from pixelgen.cpu import allocator
from pixelgen.data import throughput
from pixelgen.nn.attention import cudnn_unavailable

TRAIN_CASES = ('igpt_train', 'dalle_train')  # the cases with a train step


def default_concurrent_microbatches(case: str, batch: int) -> int:
    """igpt_train: 2 on a CPU with two or more cores for this process (and an even batch),
    else 1. XLA:CPU runs each op on one thread, and one pass leaves a core idle a third of
    the step; a second, independent pass keeps it busy (`benchmarks/README.md`).
    dalle_train: 1. Its sparse step
    gained nothing from two passes (1.10 against 1.07 s) while its dense twin slowed (4.10
    against 3.01 s), which would flatter the ratio."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    cpu_pair = jax.default_backend() == 'cpu' and (cores or 1) >= 2
    return 2 if case == 'igpt_train' and cpu_pair and batch % 2 == 0 else 1


def input_pipeline(shape: dict[str, Any], options: Options) -> dict:
    """Streamed 256² JPEG pairs decoded per second (pixelgen.data.throughput); no model."""
    del options
    return throughput.measure(shape)


CASES: dict[str, Callable[[dict[str, Any], Options], dict]] = {
    'igpt_train': igpt.igpt_train,
    'igpt_sample': igpt.igpt_sample,
    'dalle_attention': dalle.dalle_attention,
    'dalle_train': dalle.dalle_train,
    'input_pipeline': input_pipeline,
}
SHAPES: dict[str, dict[str, Any]] = {
    'igpt_train': igpt.IGPT_SHAPE,
    'igpt_sample': igpt.IGPT_SAMPLE_SHAPE,
    'dalle_attention': dalle.DALLE_ATTENTION_SHAPE,
    'dalle_train': dalle.DALLE_TRAIN_SHAPE,
    'input_pipeline': throughput.SHAPE,
}


def check_case(name: str) -> None:
    if name not in CASES:
        raise ValueError(f'Unknown bench case {name!r}; valid cases: {", ".join(CASES)}.')


def run_case(name: str, *, overrides: dict[str, Any] | None = None, steps: int = 5,
             attention: str | None = None, profile_dir: str | None = None,
             concurrent_microbatches: int | None = None) -> dict:
    """Runs case `name` at its shape with `overrides` (e.g. dict(layers=1, seq=16)); returns
    its report. `steps` timed steps (>= 3) follow compilation and one warm-up step; the
    train cases run `concurrent_microbatches` passes side by side (None: the case's default
    on this machine, `default_concurrent_microbatches`)."""
    check_case(name)
    if steps < 3:
        raise ValueError(f'steps={steps}; the median needs at least 3 timed steps.')
    shape = dict(SHAPES[name])
    unknown = set(overrides or {}) - set(shape)
    if unknown:
        raise ValueError(f'Unknown shape overrides {sorted(unknown)} for case {name!r}; '
                         f'expected keys among {sorted(shape)}.')
    shape.update(overrides or {})
    if concurrent_microbatches is None:
        concurrent_microbatches = default_concurrent_microbatches(name, shape['batch'])
    if name in TRAIN_CASES and shape['batch'] % concurrent_microbatches:
        raise ValueError(f'batch={shape["batch"]} does not split into {concurrent_microbatches} '
                         'concurrent micro-batches; choose a count that divides the batch.')
    return CASES[name](shape, Options(steps, attention, profile_dir, concurrent_microbatches))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cases', nargs='+', metavar='case',
                        help=f'one or more of: {", ".join(CASES)}')
    parser.add_argument('--json', action='store_true',
                        help='one JSON line per case on stdout, nothing else')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per case (>= 3)')
    parser.add_argument('--attention', choices=ATTENTION_CHOICES, default=None,
                        help="attention implementation (default: the model's default)")
    parser.add_argument('--concurrent-microbatches', type=int, default=None, metavar='N',
                        help='independent passes per train step, run side by side (default: '
                             'igpt_train 2 on a CPU with 2+ cores, else 1; 1 = one pass)')
    parser.add_argument('--profile', metavar='DIR', default=None,
                        help='also trace one step per case into DIR (jax.profiler; perfetto) '
                             'and print its top ops to stderr')
    args = parser.parse_args(argv)
    host_malloc = allocator.configure()  # as every pixelgen job, before JAX's CPU client
    for name in args.cases:
        if name not in CASES:
            parser.error(f'unknown case {name!r}; valid cases: {", ".join(CASES)}')
    if args.steps < 3:
        parser.error(f'--steps={args.steps}; the median needs at least 3 timed steps.')
    try:
        attention_kwargs(args.attention)
    except ValueError as e:
        parser.error(str(e))
    if args.concurrent_microbatches is not None and args.concurrent_microbatches < 1:
        parser.error(f'--concurrent-microbatches={args.concurrent_microbatches}; use 1 or more.')
    if args.attention == 'cudnn' and (reason := cudnn_unavailable(jnp.bfloat16)):
        parser.error(f'--attention cudnn {reason}; use --attention auto or block_sparse.')

    peak, source = flops.peak_flops_per_device()
    log(f'peak {peak / 1e12:.3f} TFLOP/s per device ({source})')
    for name in args.cases:
        profile_dir = os.path.join(args.profile, name) if args.profile else None
        result = run_case(name, steps=args.steps, attention=args.attention,
                          profile_dir=profile_dir,
                          concurrent_microbatches=args.concurrent_microbatches)
        result['host_malloc'] = host_malloc
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(json.dumps(result, indent=2), flush=True)
        if 'images_per_s' in result:
            log(f"{name}: images/s {result['images_per_s']}")
        else:
            log(f"{name}: {result['step_s']:.4f} s/step, {result['tokens_per_s']:.0f} "
                f"tokens/s, {result['achieved_tflops']:.3f} TFLOP/s, MFU {result['mfu']:.1%}")
