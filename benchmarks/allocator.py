"""What the host allocator setting (`pixelgen.cpu.allocator`) does to XLA:CPU, in isolation.

    python benchmarks/allocator.py

Runs itself twice in subprocesses, with PIXELGEN_MALLOC=default (glibc as it comes) and
reuse (pixelgen's default), and prints one JSON line per (allocator, case) with the median and
fastest of 21 timed calls:

  fresh_output  a jitted batched [4·8, 512, 32] · [4·8, 32, 512] product returning its
                32 MiB result: a new output buffer every call
  temporary     a jitted [4·8, 1024, 32] · [4·8, 32, 1024] product reduced to its maximum:
                a 128 MiB temporary inside the executable, allocated every call
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

CASES = ('fresh_output', 'temporary')


def measure(allocator: str) -> None:
    from pixelgen.cpu import allocator
    setting = allocator.configure()
    import jax
    import jax.numpy as jnp

    q = jax.random.normal(jax.random.key(0), (4, 8, 1024, 32))
    k = jax.random.normal(jax.random.key(1), (4, 8, 1024, 32))
    cases = {
        'fresh_output': (jax.jit(lambda q, k: jnp.einsum('bhqd,bhkd->bhqk', q, k)),
                         (q[:, :, :512], k[:, :, :512])),
        'temporary': (jax.jit(lambda q, k: jnp.einsum('bhqd,bhkd->bhqk', q, k).max()),
                      (q, k)),
    }
    for name, (fn, args) in cases.items():
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(21):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        print(json.dumps({'name': 'allocator', 'case': name, 'allocator': allocator,
                          'host_malloc': setting,
                          'median_ms': round(1e3 * statistics.median(times), 2),
                          'fastest_ms': round(1e3 * min(times), 2)}), flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == '--child':
        measure(sys.argv[2])
        return
    for allocator in ('default', 'reuse'):
        subprocess.run([sys.executable, __file__, '--child', allocator], check=True,
                       env={**os.environ, 'PIXELGEN_MALLOC': allocator})


if __name__ == '__main__':
    main()
