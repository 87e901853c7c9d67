"""python -m pixelgen.sample --workdir W [--num 16] [--step N] [--temperature 1] [--top_k 0]

Writes PNG grids from a trained Image GPT: unconditional samples, and completions of test
images (the top half given, the bottom half sampled), into W/samples/ (or --out).
"""

from __future__ import annotations

import argparse
import math
import os

from pixelgen import cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.sample', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--num', type=int, default=16, help='images per grid')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--top_k', type=int, default=0, help='0 = sample from the full softmax')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None, help='output folder (default: WORKDIR/samples)')
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f'--num must be at least 1, got {args.num}')

    import jax

    import pixelgen
    from pixelgen import images, parallel, sampling, tasks

    loaded = pixelgen.load(args.workdir, args.step)
    if loaded.config.task != 'igpt':
        raise cli.ConfigError(f'{args.workdir} holds a {loaded.config.task!r} model; '
                              'pixelgen.sample draws Image GPT samples.')
    out = args.out or os.path.join(args.workdir, 'samples')
    rng = jax.random.PRNGKey(args.seed)
    top_k = args.top_k or None
    tokens = sampling.sample(loaded.model, rng, batch_size=args.num,
                             temperature=args.temperature, top_k=top_k)
    task = tasks.make(loaded.config, args.workdir)
    cols = math.ceil(math.sqrt(args.num))
    pictures = task.to_images(parallel.to_host(tokens))
    rows = [pictures[i:i + cols] for i in range(0, args.num, cols)]
    path = images.save_png(images.make_grid(rows),
                           os.path.join(out, f'unconditional_{loaded.step:07d}.png'))
    print(f'[samples] {path}')
    with loaded.config.unlocked():
        loaded.config.sampling.temperature = args.temperature
        loaded.config.sampling.top_k = args.top_k
    rows = task.completions(loaded.model, jax.random.fold_in(rng, 1), min(args.num, 8),
                            samples_per_image=3)
    path = images.save_png(images.make_grid(rows),
                           os.path.join(out, f'sample_completions_{loaded.step:07d}.png'))
    print(f'[samples] {path}')
    return 0


if __name__ == '__main__':
    cli.run(main)
