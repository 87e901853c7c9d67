"""Phased KV-cache decoding against one loop over the whole cache, in one process.

    python benchmarks/sample_phases.py [--tokens 1024] [--repeats 3]

`pixelgen.sampling.sample` decodes in up to MAX_PHASES loops, each with a cache only as long
as its last position, so that early steps read a short cache. This times it against
MAX_PHASES = 1 (one loop, the whole cache at every step) on `igpt_sample`'s model (8 layers,
width 256, batch 4), interleaved, and prints one JSON line per variant: the compile-and-first-
call seconds and the median seconds of the later calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pixelgen.cpu import allocator

allocator.configure()  # as pixelgen's jobs, before JAX's CPU client

import jax  # noqa: E402

from pixelgen import bench, sampling  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokens', type=int, default=1024)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    shape = dict(bench.igpt.IGPT_SAMPLE_SHAPE, new_tokens=args.tokens)
    model, _ = bench.igpt.build_sampling_igpt(shape)
    variants = {'phased': sampling.MAX_PHASES, 'one_loop': 1}

    def draw(variant: str, seed: int) -> float:
        sampling.MAX_PHASES = variants[variant]  # one compiled sampler per phase plan
        start = time.perf_counter()
        jax.block_until_ready(sampling.sample(model, jax.random.key(seed), batch_size=4,
                                              num_tokens=args.tokens))
        return time.perf_counter() - start

    first = {}
    for variant in variants:
        first[variant] = draw(variant, 0)
    times = {variant: [] for variant in variants}
    for seed in range(1, args.repeats + 1):  # interleaved, so load changes hit both alike
        for variant in variants:
            times[variant].append(draw(variant, seed))
    for variant, ts in times.items():
        seconds = statistics.median(ts)
        print(json.dumps({'name': 'sample_phases', 'variant': variant, 'tokens': args.tokens,
                          'first_call_s': round(first[variant], 2), 's': round(seconds, 3),
                          'tokens_per_s': round(4 * args.tokens / seconds, 1)}))


if __name__ == '__main__':
    main()
