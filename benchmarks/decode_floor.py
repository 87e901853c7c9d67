"""The floor of `igpt_sample` on this machine: only the matmuls of one token step.

    python benchmarks/decode_floor.py [--parts 1 2] [--layers 8 4]
                                      [--split one tensor pipeline clients halves packed]

Runs the layers' projections and MLP matmuls (width 256, batch 4, fp32; no attention, norms
or cache) for 256 steps in one `jax.lax.fori_loop`, as the sampler does, and prints ms per
step and tokens/s. If this is as slow as `python -m pixelgen.bench igpt_sample`, the sampler
is bound by XLA:CPU's small matmuls, not by its attention or cache.

- `--parts 2` splits the batch into independent chains, which XLA could run on two cores.
- `--layers 8 4 2` runs the floor with fewer layers: each layer's weights are 3 MiB, so this
  shows where they stop fitting in a core's caches (time per layer jumps there).
- `--split tensor pipeline` shares the weights of the 8 layers between two CPU devices of one
  client (`--xla_force_host_platform_device_count=2`, set here): `tensor` gives each device
  half the heads and half the MLP hidden units (two `psum`s per layer), `pipeline` half the
  layers, with the batch's two halves in flight (one `ppermute` per half step); `clients` is
  that pipeline on two one-thread clients, one per core (`pixelgen.cpu.decode_clients`), swapping
  through an `io_callback`. Each device then holds half the weights, so they can stay in its
  caches; the collectives or callbacks are the price. `halves` is the tensor split on those
  two clients with the sum the sampler uses (`pixelgen.cpu.core_split`, a C++ custom call), and
  `packed` that split with the sampler's matmuls: each weight packed once before the loop and
  streamed by a native kernel (`pixelgen.cpu.packed_matmul`). Every variant's result is checked
  against the same chain computed on one device (`rel_err`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import sys
import time

WIDTH, BATCH, STEPS = 256, 4, 256
SPLITS = ('one', 'tensor', 'pipeline', 'clients', 'halves', 'packed')


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--parts', type=int, nargs='+', default=[1], choices=[1, 2, 4])
    parser.add_argument('--layers', type=int, nargs='+', default=[8])
    parser.add_argument('--split', nargs='+', default=['one'], choices=SPLITS)
    parser.add_argument('--steps', type=int, default=STEPS)
    parser.add_argument('--width', type=int, default=WIDTH)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args(argv)
    if any(layers < 1 for layers in args.layers):
        parser.error('--layers must be at least 1')
    if set(args.split) - {'one'}:
        if args.parts != [1]:
            parser.error('--split tensor/pipeline runs the whole batch; leave --parts at 1')
        if any(layers % 2 for layers in args.layers):
            parser.error('--split pipeline/tensor needs an even number of --layers')
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if set(args.split) & {'tensor', 'pipeline'}:  # two CPU devices, before JAX starts
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                                   + ' --xla_force_host_platform_device_count=2')
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from pixelgen.cpu import allocator
    allocator.configure()  # as pixelgen's jobs, before JAX's CPU client

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    width, steps = args.width, args.steps

    def weights(layers: int) -> list[dict[str, jax.Array]]:
        """One dict per layer, separate arrays as the (unscanned) model holds them: slices of
        one stacked [layers, ...] array were copied every step and ran about 30% slower."""
        shapes = {'qkv': (width, 3 * width), 'out': (width, width),
                  'fc1': (width, 4 * width), 'fc2': (4 * width, width)}
        keys = jax.random.split(jax.random.key(0), layers * len(shapes))
        return [{name: 0.02 * jax.random.normal(keys[layer * len(shapes) + i], shape)
                 for i, (name, shape) in enumerate(shapes.items())} for layer in range(layers)]

    def normed(h):  # keeps 256 steps of residual growth finite, as the model's norms do
        return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)

    def token_step(w, h):
        for layer in w:
            h = h + (h @ layer['qkv'])[:, :width] @ layer['out']
            h = normed(h + jax.nn.gelu(h @ layer['fc1']) @ layer['fc2'])
        return h

    def start(rows: int) -> jax.Array:
        return jax.random.normal(jax.random.key(1), (rows, width))

    def one(w, parts: int):
        @jax.jit
        def run(w):
            chains = tuple(jnp.split(start(BATCH), parts))
            return jnp.concatenate(jax.lax.fori_loop(
                0, steps, lambda i, hs: tuple(token_step(w, h) for h in hs), chains))
        return run, (w,)

    def party_half(w, me: int):
        """Party `me`'s heads [me·W/2, (me+1)·W/2) (its q, k, v columns side by side) and MLP
        units [me·2W, (me+1)·2W), per layer."""
        half = width // 2
        return [dict(qkv=jnp.concatenate([layer['qkv'][:, j * width + me * half:
                                                        j * width + (me + 1) * half]
                                          for j in range(3)], axis=1),
                     out=layer['out'][me * half:(me + 1) * half],
                     fc1=layer['fc1'][:, me * 2 * width:(me + 1) * 2 * width],
                     fc2=layer['fc2'][me * 2 * width:(me + 1) * 2 * width]) for layer in w]

    def half_steps(w, h, total, times=jnp.matmul):
        """`steps` token steps on one party's half, `total` summing the halves, `times(h,
        weight)` multiplying."""
        def body(i, h):
            for layer in w:
                q = times(h, layer['qkv'])[:, :width // 2]
                h = h + total(times(q, layer['out']))
                h = normed(h + total(times(jax.nn.gelu(times(h, layer['fc1'])),
                                           layer['fc2'])))
            return h
        return jax.lax.fori_loop(0, steps, body, h)

    def tensor(w):
        mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
        split = jax.tree.map(lambda a, b: jnp.stack([a, b]), party_half(w, 0), party_half(w, 1))
        split = jax.device_put(split, NamedSharding(mesh, P('x')))

        def local(w, h):
            return half_steps(jax.tree.map(lambda a: a[0], w), h,
                              lambda x: jax.lax.psum(x, 'x'))
        run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P('x'), P()), out_specs=P(),
                                    check_vma=False))
        return run, (split, start(BATCH))

    def pipeline(w):
        mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
        stages = len(w) // 2  # device 0: layers [0, L/2), device 1: [L/2, L)
        split = [jax.tree.map(lambda a, b: jnp.stack([a, b]), w[i], w[stages + i])
                 for i in range(stages)]
        split = jax.device_put(split, NamedSharding(mesh, P('x')))

        def local(w, h):  # h: this device's half of the batch
            stage = [jax.tree.map(lambda a: a[0], layer) for layer in w]

            def body(i, h):  # stage 0's output goes on to stage 1, stage 1's back to stage 0
                return jax.lax.ppermute(token_step(stage, h), 'x', [(0, 1), (1, 0)])
            return jax.lax.fori_loop(0, 2 * steps, body, h)
        run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P('x'), P('x')),
                                    out_specs=P('x'), check_vma=False))
        return run, (split, jax.device_put(start(BATCH), NamedSharding(mesh, P('x'))))

    def clients(w):
        """The pipeline on two one-thread clients, one per core
        (`pixelgen.cpu.decode_clients`), which
        swap their stage's output through an `io_callback` after every half step."""
        import queue

        from jax.experimental import io_callback

        from pixelgen.cpu import decode_clients
        devices = decode_clients.core_devices()[:2]
        if len(devices) < 2:
            raise SystemExit('--split clients needs two cores')
        inbox = (queue.Queue(1), queue.Queue(1))  # what each stage receives

        def swap(me: int, h: np.ndarray) -> np.ndarray:
            inbox[1 - me].put(np.asarray(h))
            return inbox[me].get(timeout=60)

        stages = len(w) // 2
        executables, inputs = [], []
        for me, device in enumerate(devices):
            def local(w, h, me=me):
                def body(i, h):
                    out = token_step(w, h)
                    return io_callback(functools.partial(swap, me),
                                       jax.ShapeDtypeStruct(out.shape, out.dtype), out)
                return jax.lax.fori_loop(0, 2 * steps, body, h)
            rows = np.split(np.asarray(start(BATCH)), 2)[me]
            args = jax.device_put((w[me * stages:(me + 1) * stages], rows), device)
            executables.append(jax.jit(local).lower(*args).compile())
            inputs.append(args)
        pool = decode_clients._pool(2)

        def run():
            calls = [pool.submit(lambda i=i: np.asarray(executables[i](*inputs[i])))
                     for i in range(2)]
            return np.concatenate([call.result() for call in calls])
        return run, ()

    def halves(w, packed: bool = False):
        """The tensor split on the two per-core clients, the halves summed by the custom call
        the sampler uses (`pixelgen.cpu.core_split.pair_sum`); with `packed`, the matmuls by the
        sampler's native kernel over weights packed before the loop
        (`pixelgen.cpu.packed_matmul`)."""
        from pixelgen.cpu import core_split, decode_clients, native, packed_matmul
        devices = decode_clients.core_devices()[:2]
        if len(devices) < 2 or native.library() is None:
            raise SystemExit('--split halves/packed needs two cores and the native library')
        executables, inputs = [], []
        for me, device in enumerate(devices):
            def local(w, h, me=me):
                total = functools.partial(core_split.pair_sum, party=me)
                if not packed:
                    return half_steps(w, h, total)
                panel = native.panel()
                w = [{name: (packed_matmul.pack(a, 1, panel), a.shape[1])
                      for name, a in layer.items()} for layer in w]
                return half_steps(w, h, total,
                                  lambda x, weight: packed_matmul.product(x, *weight))
            args = jax.device_put((party_half(w, me), start(BATCH)), device)
            executables.append(jax.jit(local).lower(*args).compile())
            inputs.append(args)
        pool = concurrent.futures.ThreadPoolExecutor(2)
        cores = sorted(os.sched_getaffinity(0))[:2]

        def call(me):
            os.sched_setaffinity(0, {cores[me]})
            return np.asarray(executables[me](*inputs[me]))

        def run():
            native.library().pixelgen_pair_sum_reset(core_split.TIMEOUT_MS)
            return list(pool.map(call, range(2)))[0]
        return run, ()

    def reference(w, split: str) -> np.ndarray:
        """The same chain on one device. In the pipeline the second half of the batch starts
        on stage 1, so it runs (stage 0 after stage 1) `steps` times."""
        h = np.asarray(start(BATCH), np.float64)
        w = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in w]

        def layers(part, h):
            for layer in part:
                h = h + (h @ layer['qkv'])[:, :width] @ layer['out']
                pre = h @ layer['fc1']
                gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
                h = h + gelu @ layer['fc2']
                h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6)
            return h
        top, bottom = h[:BATCH // 2], h[BATCH // 2:]
        first, second = w[:len(w) // 2], w[len(w) // 2:]
        for _ in range(steps):
            top = layers(w, top)
            bottom = (layers(first, layers(second, bottom)) if split in ('pipeline', 'clients')
                      else layers(w, bottom))
        return np.concatenate([top, bottom])

    variants = {}
    for layers in args.layers:
        w = weights(layers)
        for split in args.split:
            for parts in (args.parts if split == 'one' else [1]):
                run, inputs = (one(w, parts) if split == 'one'
                               else {'tensor': tensor, 'pipeline': pipeline,
                                     'clients': clients, 'halves': halves,
                                     'packed': functools.partial(halves, packed=True)}[split](w))
                out = np.asarray(jax.block_until_ready(run(*inputs)))  # compile, and check
                ref = reference(w, split)
                rel = float(np.abs(out - ref).max() / np.abs(ref).max())
                variants[(layers, split, parts)] = (run, inputs, rel)
    times = {key: [] for key in variants}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for key, (run, inputs, _) in variants.items():
            begin = time.perf_counter()
            jax.block_until_ready(run(*inputs))
            times[key].append(time.perf_counter() - begin)
    for (layers, split, parts), ts in times.items():
        seconds = statistics.median(ts)
        print(json.dumps({'name': 'decode_floor', 'layers': layers, 'split': split,
                          'parts': parts, 'weights_mib': round(layers * 12 * width ** 2 * 4
                                                               / 2 ** 20, 1),
                          'ms_per_step': round(1e3 * seconds / steps, 3),
                          'tokens_per_s': round(BATCH * steps / seconds, 1),
                          'rel_err': variants[(layers, split, parts)][2]}), flush=True)


if __name__ == '__main__':
    main()
