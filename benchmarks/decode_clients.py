"""The samplers' decoding modes against each other, in one process.

    python benchmarks/decode_clients.py [--tokens 256] [--batch 4] [--repeats 7]

`pixelgen.sampling.sample` decodes on one-thread CPU clients, one per core: with the weights
split between two cores where `pixelgen.cpu.core_split` applies (PIXELGEN_CPU_DECODE=cores, the
default), or with the batch's rows split between the clients (=rows, `pixelgen.cpu.decode_clients`).
This times both against =shared (the whole batch on JAX's main CPU client and its intra-op
thread pool) on `igpt_sample`'s model (8 layers, width 256, 256 new tokens from the start
token), interleaved, checks that all draw the same tokens, and prints one JSON line per mode:
how it decoded, the compile-and-first-call seconds, the median seconds of the later calls and
tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pixelgen.cpu import allocator

allocator.configure()  # as pixelgen's jobs, before JAX's CPU client

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pixelgen import bench, sampling  # noqa: E402
from pixelgen.cpu import core_split, decode_clients  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokens', type=int, default=256)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    shape = dict(bench.igpt.IGPT_SAMPLE_SHAPE, new_tokens=args.tokens, batch=args.batch)
    model, _ = bench.igpt.build_sampling_igpt(shape)

    def draw(mode: str, seed: int) -> tuple[float, np.ndarray]:
        os.environ[decode_clients.ENV] = mode  # read at every call; each mode keeps its compiles
        start = time.perf_counter()
        tokens = np.asarray(sampling.sample(model, jax.random.key(seed), batch_size=args.batch,
                                            num_tokens=args.tokens))
        return time.perf_counter() - start, tokens

    modes = decode_clients.CHOICES
    first = {mode: draw(mode, 0) for mode in modes}
    if not all(np.array_equal(first[mode][1], first[modes[0]][1]) for mode in modes):
        raise SystemExit('the modes drew different tokens')
    times = {mode: [] for mode in modes}
    for seed in range(1, args.repeats + 1):  # interleaved, so load changes hit all alike
        for mode in modes:
            times[mode].append(draw(mode, seed)[0])
    devices = len(decode_clients.core_devices())
    os.environ[decode_clients.ENV] = 'cores'
    split = core_split.applies(nnx.state(model))
    how = {'cores': 'weights split' if split else 'rows split', 'rows': 'rows split',
           'shared': 'main client'}
    for mode, ts in times.items():
        seconds = statistics.median(ts)
        print(json.dumps({
            'name': 'decode_clients', 'mode': mode, 'decodes': how[mode],
            'clients': devices if mode != 'shared' else 1,
            'tokens': args.tokens, 'batch': args.batch, 'first_call_s': round(first[mode][0], 2),
            's': round(seconds, 3), 'all_s': [round(t, 3) for t in ts],
            'tokens_per_s': round(args.batch * args.tokens / seconds, 1)}))


if __name__ == '__main__':
    main()
