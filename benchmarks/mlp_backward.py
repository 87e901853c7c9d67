"""Forward + backward of one MLP: pixelgen's hand-written backward pass against autodiff.

    python benchmarks/mlp_backward.py [--batch 2] [--length 1280] [--width 256]

The shape defaults to one DALL·E `dalle_train` layer (batch 2 x 1280 tokens, 256 -> 1024 ->
256, quick_gelu, fp32); `--batch 4 --length 1024` is `igpt_train`'s. 'autodiff' is the
formula on [batch, length, width] differentiated by JAX (the MLP before); 'pixelgen' is
what `pixelgen.nn.transformer.MLP` runs now. Prints one JSON line per variant with the
median milliseconds of a jitted gradient of sum(mlp(x) * g) with respect to x and both kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pixelgen.cpu import allocator

allocator.configure()  # as pixelgen's jobs, before JAX's CPU client

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pixelgen.nn.transformer import ACTIVATIONS, mlp  # noqa: E402


def autodiff_mlp(x, w_in, w_out):
    """The formula on [batch, length, width], differentiated by JAX (the old MLP)."""
    return ACTIVATIONS['quick_gelu'](x @ w_in) @ w_out


def pixelgen_mlp(x, w_in, w_out):
    """What pixelgen.nn.transformer.MLP does: 2-D rows and the hand-written backward."""
    y = mlp(x.reshape(-1, x.shape[-1]), w_in, w_out, None, 'quick_gelu')
    return y.reshape(x.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--length', type=int, default=1280)
    parser.add_argument('--width', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    rows = (args.batch, args.length)
    x = jax.random.normal(keys[0], (*rows, args.width))
    w_in = 0.05 * jax.random.normal(keys[1], (args.width, 4 * args.width))
    w_out = 0.05 * jax.random.normal(keys[2], (4 * args.width, args.width))
    cotangent = jax.random.normal(keys[3], (*rows, args.width))
    variants = {}
    for name, fn in (('autodiff', autodiff_mlp), ('pixelgen', pixelgen_mlp)):
        def loss(x, w_in, w_out, fn=fn):
            return jnp.sum(fn(x, w_in, w_out) * cotangent)
        variants[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for grad in variants.values():
        jax.block_until_ready(grad(x, w_in, w_out))  # compile
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, grad in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(grad(x, w_in, w_out))
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(json.dumps({'name': 'mlp_backward', 'variant': name, 'batch': args.batch,
                          'length': args.length, 'width': args.width,
                          'ms': round(1e3 * statistics.median(ts), 1)}))


if __name__ == '__main__':
    main()
