"""The floor of `igpt_sample` on this machine: only the matmuls of one token step.

    python benchmarks/decode_floor.py [--parts 1 2]

Runs the 8 layers' projections and MLP matmuls (width 256, batch 4, fp32; no attention, norms
or cache) for 256 steps in one `jax.lax.fori_loop`, as the sampler does, and prints ms per
step and tokens/s. If this is as slow as `python -m pixelgen.bench igpt_sample`, the sampler
is bound by XLA:CPU's small matmuls, not by its attention or cache. `--parts 2` splits the
batch into independent chains, which XLA could run on two cores at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pixelgen import host_memory

host_memory.configure()  # as pixelgen's jobs, before JAX's CPU client

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

LAYERS, WIDTH, BATCH, STEPS = 8, 256, 4, 256


def weights() -> list[dict[str, jax.Array]]:
    """One dict per layer, separate arrays as the (unscanned) model holds them: slices of one
    stacked [layers, ...] array were copied every step and ran about 30% slower."""
    shapes = {'qkv': (WIDTH, 3 * WIDTH), 'out': (WIDTH, WIDTH), 'fc1': (WIDTH, 4 * WIDTH),
              'fc2': (4 * WIDTH, WIDTH)}
    keys = jax.random.split(jax.random.key(0), LAYERS * len(shapes))
    return [{name: 0.02 * jax.random.normal(keys[layer * len(shapes) + i], shape)
             for i, (name, shape) in enumerate(shapes.items())} for layer in range(LAYERS)]


def token_step(w: list[dict[str, jax.Array]], h: jax.Array) -> jax.Array:
    for layer in w:
        h = h + (h @ layer['qkv'])[:, :WIDTH] @ layer['out']
        h = h + jax.nn.gelu(h @ layer['fc1']) @ layer['fc2']
    return h


def make_run(parts: int):
    @jax.jit
    def run(w):
        start = tuple(jnp.ones((BATCH // parts, WIDTH)) for _ in range(parts))
        return jax.lax.fori_loop(0, STEPS, lambda i, hs: tuple(token_step(w, h) for h in hs),
                                 start)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--parts', type=int, nargs='+', default=[1], choices=[1, 2, 4])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    w = weights()
    runs = {parts: make_run(parts) for parts in args.parts}
    for run in runs.values():
        jax.block_until_ready(run(w))  # compile
    times = {parts: [] for parts in runs}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for parts, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run(w))
            times[parts].append(time.perf_counter() - start)
    for parts, ts in times.items():
        seconds = statistics.median(ts)
        print(json.dumps({'name': 'decode_floor', 'parts': parts,
                          'ms_per_step': round(1e3 * seconds / STEPS, 3),
                          'tokens_per_s': round(BATCH * STEPS / seconds, 1)}))


if __name__ == '__main__':
    main()
