"""Attention alone, forward + backward: the native CPU kernel, XLA's tiles and dense attention.

    python benchmarks/attention_kernels.py [CASE ...] [--rounds 7] [--forward] [--profile DIR]
    taskset -c 0 python benchmarks/attention_kernels.py dalle_conv   # one core
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \
        python benchmarks/attention_kernels.py dalle_conv --profile /tmp/prof  # XLA's top ops

q, k, v [batch, length, heads, head_dim] -> out, and the gradients of sum(out · r) for a fixed
random r (or the forward alone, --forward), timed in interleaved rounds in one process:
`native` (`pixelgen.cpu.native_attention`), `native_every_pair` (the same kernel over every
block pair, masked ones too: dense masked attention, fused), `tiles` (XLA's tiles,
`block_sparse_attention`; only for masks that have a tiling) and `dense` (dense masked
attention in XLA). Prints
one JSON line per case: the shape, each variant's median and fastest milliseconds, and the
native kernel's speed-up over the others. The projections of a layer are not included (the
bench's `dalle_attention` has them). With --profile, one more call of each variant is traced
into DIR/CASE/VARIANT and its top XLA ops go to stderr (`pixelgen.bench.common.format_top_ops`; the
native kernel is one op there, `ffi_call`, whose helper threads the trace does not show).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

from pixelgen.cpu import allocator

allocator.configure()  # as the pixelgen jobs, before JAX's CPU client

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pixelgen.bench.common import format_top_ops  # noqa: E402
from pixelgen.cpu import native_attention  # noqa: E402
from pixelgen.nn.attention import dot_product_attention  # noqa: E402
from pixelgen.nn.block_sparse import (  # noqa: E402
    block_sparse_attention,
    dense_in_tile_order,
    make_tiling,
    transpose_image,
)
from pixelgen.nn.masks import CAUSAL, FULL, dalle_mask_spec  # noqa: E402

# name -> ((batch, length, heads, head_dim), mask): the bench's DALL·E and Image GPT layers,
# an Image GPT BERT layer, a ViT-B/16 layer (197 tokens) and CLIP's text layer (77 tokens).
CASES = {
    'dalle_row': ((2, 1280, 8, 32), dalle_mask_spec('row', 256, 32)),
    'dalle_column': ((2, 1280, 8, 32), dalle_mask_spec('column', 256, 32)),
    'dalle_conv': ((2, 1280, 8, 32), dalle_mask_spec('conv', 256, 32)),
    'igpt_causal': ((4, 1024, 8, 32), CAUSAL),
    'bert_full': ((4, 1024, 8, 32), FULL),
    'vit_full': ((8, 197, 12, 64), FULL),
    'clip_text': ((32, 77, 8, 64), CAUSAL),
}


def variants(mask, length: int) -> dict:
    dense_mask = jnp.asarray(mask.dense(length))[None, None]
    every_pair = native_attention.plan_from_dense(dense_in_tile_order(mask, length), skip=False)
    transpose = mask.is_dalle and mask.column_major(length)

    def native_every_pair(q, k, v):  # no block skipped: what the fusion alone gives
        if transpose:
            q, k, v = (transpose_image(x, mask.text_len, mask.grid_width) for x in (q, k, v))
        out = native_attention.attention(q, k, v, every_pair)
        return transpose_image(out, mask.text_len, mask.grid_width) if transpose else out

    found = {'native': functools.partial(native_attention.attend, mask=mask),
             'native_every_pair': native_every_pair,
             'dense': lambda q, k, v: dot_product_attention(q, k, v, dense_mask)}
    if make_tiling(mask, length) is not None:
        found['tiles'] = functools.partial(block_sparse_attention, mask=mask)
    return found


def run(name: str, rounds: int, forward: bool, profile_dir: str | None = None) -> dict:
    shape, mask = CASES[name]
    q, k, v, weights = (jax.random.normal(jax.random.key(i), shape) for i in range(4))
    steps = {}
    for variant, attend in variants(mask, shape[1]).items():
        if forward:
            fn = jax.jit(attend)
        else:
            fn = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v) * weights),
                                  argnums=(0, 1, 2)))
        steps[variant] = functools.partial(fn, q, k, v)
        jax.block_until_ready(steps[variant]())  # compile and warm up
    times = {variant: [] for variant in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[variant].append(time.perf_counter() - start)
    for variant, step in steps.items() if profile_dir else ():
        folder = os.path.join(profile_dir, name, variant)
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            jax.block_until_ready(step())
        print(f'[attention_kernels] {name} {variant}: top ops\n{format_top_ops(folder)}',
              file=sys.stderr, flush=True)
    median = {variant: 1e3 * statistics.median(t) for variant, t in times.items()}
    axes = ('batch', 'length', 'heads', 'head_dim')
    return {'name': name, 'shape': dict(zip(axes, shape, strict=True)),
            'mask': mask.kind, 'pass': 'forward' if forward else 'forward+backward',
            'median_ms': median,
            'min_ms': {variant: 1e3 * min(t) for variant, t in times.items()},
            'native_speedup': {variant: median[variant] / median['native']
                               for variant in median if variant != 'native'}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cases', nargs='*', default=list(CASES), metavar='CASE',
                        help=f'any of {", ".join(CASES)} (default: all)')
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds (median reported)')
    parser.add_argument('--forward', action='store_true', help='time the forward pass alone')
    parser.add_argument('--profile', metavar='DIR', default=None,
                        help='also trace each variant once into DIR and print its top ops')
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f'unknown case(s) {unknown}; valid: {", ".join(CASES)}')
    if not native_attention.available(jnp.zeros((1, 32, 1, 32))):
        sys.exit('The native attention kernel does not run here (it needs the CPU and the '
                 'library pixelgen.cpu.native builds; PIXELGEN_NATIVE_ATTENTION must not be 0).')
    for name in args.cases:
        print(json.dumps(run(name, args.rounds, args.forward, args.profile)), flush=True)


if __name__ == '__main__':
    main()
