"""python -m pixelgen.sample --workdir W [--num 16] [--step N] [--temperature 1] [--top_k 0]
       [--mesh data=1,fsdp=-1]

Writes PNG grids from a trained model into W/samples/ (or --out); what it draws depends on the
workdir's task:

Image GPT: unconditional samples, and completions of test images (the top half given, the
bottom half sampled). With --prime_image FILE [--prime_rows N], completions of your own
picture instead: it is resized to the model's image size and quantised by the palette, its
top N pixel rows (default half) are given and the rest drawn (--num of them).

DALL·E: images for a caption, decoded by the config's dVAE (or --dvae_workdir):
  python -m pixelgen.sample --workdir runs/dalle_shapes --prompt "a large red star" \\
      --num 64 --top 8 [--clip_workdir runs/clip_shapes] [--top_p 0.9]
With --clip_workdir the --num candidates are reranked by CLIP and the best --top kept (best
first). With --prime_index I --prime_rows R the top R rows of test example I's codes are
given and the rest completed (image-to-image); its caption is used unless --prompt is given.
With --prime_image FILE --prime_rows R, your own picture is encoded by the dVAE and its top R
code rows given (--prompt is then required).

--out names the grid PNG (default: W/samples/<what>_<step>.png; a folder, or a name without
.png, is taken as the folder to write into). --out_dir DIR also writes every generated image
as a PNG of its own, named by caption (or `unconditional`) and index, e.g.
DIR/a_large_red_star_003.png, for checking results with other tools.

Only the parameters are read, sharded over --mesh (default: the run's config.mesh fitted to
the devices here); `python -m pixelgen.memory --config ... --sample_batch N` gives the
memory per device of loading and of sampling N images. With the distributed flags of
`pixelgen.train`, every process draws its own rows of the --num (the same images one
process draws: each row's noise is its own) and process 0 writes the files.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from pixelgen import cli, parallel, pretrained, storage

DALLE_ONLY = ('prompt', 'top', 'clip_workdir', 'dvae_workdir', 'prime_index', 'guidance_scale')


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.sample', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--num', type=int, default=16, help='images to draw')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--top_k', type=int, default=0, help='0 = sample from the full softmax')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data_dir', default=None,
                        help="Image GPT completions: where the run's dataset is prepared "
                             "(default: the config's data.data_dir)")
    parser.add_argument('--out', default=None,
                        help='the grid PNG to write (default: WORKDIR/samples/...); a folder '
                             'or a name without .png is the folder to write it into')
    parser.add_argument('--out_dir', default=None,
                        help='also write each generated image as a PNG of its own here')
    pretrained.add_mesh_argument(parser)
    parallel.add_distributed_arguments(parser)
    dalle = parser.add_argument_group('DALL·E workdirs')
    dalle.add_argument('--prompt', default=None, help='the caption to draw')
    dalle.add_argument('--top', type=int, default=None,
                       help='keep the best TOP of --num by CLIP score (needs --clip_workdir)')
    dalle.add_argument('--clip_workdir', default=None, help='a CLIP workdir for reranking')
    dalle.add_argument('--guidance_scale', type=float, default=None,
                       help='classifier-free guidance scale s: logits u + s (c - u) of the '
                            'empty caption u and the caption c (1 = off; the model needs '
                            'training with loss.caption_dropout > 0)')
    dalle.add_argument('--dvae_workdir', default=None,
                       help="decode with this dVAE (default: the config's dvae_workdir)")
    dalle.add_argument('--prime_index', type=int, default=None,
                       help='complete test example PRIME_INDEX of the codes dataset')
    parser.add_argument('--top_p', type=float, default=None, help='nucleus sampling mass')
    parser.add_argument('--prime_image', default=None,
                        help='complete this image (any PIL-readable file, local or gs://): its '
                             'top --prime_rows rows are given, the rest drawn')
    parser.add_argument('--prime_rows', type=int, default=None,
                        help='rows given to the model with --prime_image or --prime_index: '
                             'pixel rows for Image GPT (default half), code rows for DALL·E')
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f'--num must be at least 1, got {args.num}')
    if not args.temperature > 0:
        raise cli.ConfigError(f'--temperature {args.temperature} must be > 0 (1 samples the '
                              'distribution the model learned); for greedy decoding pass '
                              '--top_k 1.')
    if args.top_k < 0:
        raise cli.ConfigError(f'--top_k {args.top_k} must be 0 (off) or positive.')
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise cli.ConfigError(f'--top_p {args.top_p} must be in (0, 1], or left out.')
    parallel.initialize_from_args(args)

    import pixelgen

    loaded = pixelgen.load(args.workdir, args.step, mesh=args.mesh)
    if loaded.config.task == 'igpt':
        given = [f'--{k}' for k in DALLE_ONLY if getattr(args, k) is not None]
        if given:
            parser.error(f'{" ".join(given)} apply to DALL·E workdirs; {args.workdir} holds an '
                         'Image GPT.')
        return sample_igpt(args, loaded)
    if loaded.config.task == 'dalle':
        return sample_dalle(args, loaded, parser)
    raise cli.ConfigError(f'{args.workdir} holds a {loaded.config.task!r} model; '
                          'pixelgen.sample draws from Image GPT and DALL·E workdirs.')


def _grid_rows(pictures, cols: int) -> list:
    return [pictures[i:i + cols] for i in range(0, len(pictures), cols)]


def slug(text: str) -> str:
    """A file-name stem for a caption: 'A large red star!' -> 'a_large_red_star'."""
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:60] or 'empty'


def file_stem(path: str) -> str:
    """'photos/My Cat.png' -> 'my_cat'."""
    return slug(path.rstrip('/').rsplit('/', 1)[-1].rsplit('.', 1)[0])


def grid_path(args, name: str, *, main: bool = True) -> str:
    """Where the grid file `name` goes: when --out names a PNG, the main grid is --out and the
    others go beside it; else every grid goes into the folder --out (default W/samples)."""
    if args.out and args.out.lower().endswith('.png'):
        return args.out if main else storage.join(storage.parent(args.out), name)
    return storage.join(args.out or storage.join(args.workdir, 'samples'), name)


def write_images(out_dir: str, stem: str, pictures) -> None:
    """Each picture (uint8 [h, w, 3]) as out_dir/<stem>_<index>.png."""
    from pixelgen import images
    for i, picture in enumerate(pictures):
        images.save_png(picture, storage.join(out_dir, f'{stem}_{i:03d}.png'))
    print(f'[samples] {len(pictures)} images -> {storage.join(out_dir, stem)}_*.png')


def sample_igpt(args, loaded) -> int:
    import jax
    import numpy as np

    from pixelgen import images, parallel, sampling, tasks
    from pixelgen.data.pipeline import DataError

    if args.prime_image is not None:
        return complete_igpt(args, loaded)
    if args.prime_rows is not None:
        raise cli.ConfigError('--prime_rows goes with --prime_image FILE for Image GPT.')
    rng = jax.random.PRNGKey(args.seed)
    top_k = args.top_k or None
    rows = parallel.host_range(args.num)  # this process's rows of the --num
    tokens = sampling.sample(loaded.model, rng, batch_size=args.num, rows=rows,
                             temperature=args.temperature, top_k=top_k, top_p=args.top_p)
    task = tasks.make(loaded.config, args.workdir)
    pictures = parallel.gather_rows(task.to_images(np.asarray(tokens)), args.num)
    with loaded.config.unlocked():
        loaded.config.sampling.temperature = args.temperature
        loaded.config.sampling.top_k = args.top_k
        if args.data_dir is not None:
            loaded.config.data.data_dir = args.data_dir
    try:  # completions continue test images: the only part that needs the dataset
        completions = task.completions(loaded.model, jax.random.fold_in(rng, 1),
                                       min(args.num, 8), samples_per_image=3)  # every process
    except DataError as e:  # e.g. a converted workdir, whose config names imagenet2012
        completions = []
        if jax.process_index() == 0:
            print(f'[samples] no completions: they continue test images of '
                  f'{loaded.config.data.dataset!r}, which cannot be opened here ({e}) To draw '
                  'them, pass --data_dir DIR, where that dataset is prepared.', file=sys.stderr)
    if jax.process_index() != 0:
        return 0
    grid = images.make_grid(_grid_rows(pictures, math.ceil(math.sqrt(args.num))))
    path = images.save_png(grid, grid_path(args, f'unconditional_{loaded.step:07d}.png'))
    print(f'[samples] {path}')
    if completions:
        path = images.save_png(images.make_grid(completions), grid_path(
            args, f'sample_completions_{loaded.step:07d}.png', main=False))
        print(f'[samples] {path}')
    if args.out_dir:
        write_images(args.out_dir, 'unconditional', pictures)
        if completions:
            write_images(args.out_dir, 'completions', [p for row in completions for p in row])
    return 0


def quantize_picture(loaded, picture):
    """A picture (uint8 [h, w, 3]) as an Image GPT prompt: (uint8 [side, side, 3] resized and
    centre-cropped to the model's images, its palette tokens int [1, side * side])."""
    from pixelgen.data import palette as palette_lib
    from pixelgen.data import pipeline

    original = pipeline.to_rgb_square(picture, loaded.config.data.image_size)
    return original, palette_lib.quantize(original[None], loaded.palette).reshape(1, -1)


def complete_rows(loaded, task, tokens, given_rows: int, num: int, seed: int, *,
                  temperature: float = 1.0, top_k: int = 0, top_p: float | None = None):
    """uint8 [num, side, side, 3]: `num` Image GPT completions of the top `given_rows` pixel
    rows of `tokens` [1, side * side], drawn from PRNGKey(seed) (each process its rows of the
    num; every process gets all of them)."""
    import jax
    import numpy as np

    from pixelgen import parallel, sampling

    side = loaded.config.data.image_size
    first, end = parallel.host_range(num)  # this process's rows of the num
    drawn = sampling.sample(
        loaded.model, jax.random.PRNGKey(seed), batch_size=num, rows=(first, end),
        prompt=np.repeat(tokens[:, :given_rows * side], end - first, axis=0),
        temperature=temperature, top_k=top_k or None, top_p=top_p)
    return parallel.gather_rows(task.to_images(np.asarray(drawn)), num)


def complete_igpt(args, loaded) -> int:
    """--prime_image: --num completions of the picture's top --prime_rows pixel rows."""
    import jax
    import numpy as np

    from pixelgen import images, tasks

    task = tasks.make(loaded.config, args.workdir)
    if task.objective == 'bert':
        raise cli.ConfigError(f'{args.workdir} holds a BERT-objective Image GPT, which fills in '
                              'masked pixels and cannot complete rows; prime an '
                              'autoregressive one.')
    side = loaded.config.data.image_size
    given_rows = side // 2 if args.prime_rows is None else args.prime_rows
    if not 1 <= given_rows < side:
        raise cli.ConfigError(f'--prime_rows {given_rows} must be in [1, {side - 1}]: pixel '
                              f'rows of the model\'s {side}x{side} images.')
    original, tokens = quantize_picture(loaded, images.read_rgb(args.prime_image))
    pictures = complete_rows(loaded, task, tokens, given_rows, args.num, args.seed,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if jax.process_index() != 0:
        return 0
    stem = file_stem(args.prime_image)
    rows = [np.stack([original, task.to_images(tokens)[0]]),
            *_grid_rows(pictures, math.ceil(math.sqrt(args.num)))]
    path = images.save_png(images.make_grid(rows), grid_path(
        args, f'prime_{stem}_{given_rows}rows_{loaded.step:07d}.png'))
    print(f'[samples] {path}  (the picture and its quantisation, then {args.num} completions '
          f'of its top {given_rows} rows)')
    if args.out_dir:
        write_images(args.out_dir, f'prime_{stem}', pictures)
    return 0


def load_dvae(loaded, dvae_workdir: str | None = None):
    """The dVAE model that decodes the DALL·E `loaded`'s codes: that of `dvae_workdir`, or of
    its config's dvae_workdir; a ConfigError when there is none or its codebook differs."""
    import pixelgen

    dvae_dir = dvae_workdir or loaded.config.dvae_workdir
    if not dvae_dir:
        raise cli.ConfigError('No dVAE to decode with: the config has no dvae_workdir. Pass '
                              '--dvae_workdir DIR (the dVAE that wrote the training codes).')
    dvae = pixelgen.load(dvae_dir).model
    if dvae.codebook_size != loaded.model.image_vocab_size:
        raise cli.ConfigError(f'The dVAE in {dvae_dir} has {dvae.codebook_size} codes but the '
                              f'model draws from {loaded.model.image_vocab_size}: pass the '
                              'dVAE that encoded its training data.')
    return dvae


def draw_dalle(model, dvae, text_ids, num: int, seed: int, *, image_prompt=None,
               temperature: float = 1.0, top_k: int = 0, top_p: float | None = None,
               guidance_scale: float | None = None):
    """uint8 [num, h, w, 3]: `num` DALL·E images for one caption's ids [1, text_len], drawn
    from PRNGKey(seed) and decoded by `dvae`; image_prompt [num, given codes] or None. Each
    process draws its rows of the num; every process gets all of them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pixelgen import parallel
    from pixelgen.sampling import generate
    from pixelgen.tasks.dalle import render_codes

    first, end = parallel.host_range(num)  # this process's rows of the num
    text = jnp.asarray(np.repeat(text_ids, end - first, axis=0))
    codes = np.asarray(generate(
        model, jax.random.PRNGKey(seed), text,
        image_prompt=None if image_prompt is None else image_prompt[first:end],
        temperature=temperature, top_k=top_k or None, top_p=top_p,
        rows=(first, end), batch_size=num,
        guidance_scale=1.0 if guidance_scale is None else guidance_scale))
    side = model.grid_size
    pictures = (render_codes(codes.reshape(end - first, side, side), dvae) if end > first else
                np.zeros((0, side * dvae.downsampling, side * dvae.downsampling, 3), np.uint8))
    return parallel.gather_rows(pictures, num)


def sample_dalle(args, loaded, parser) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pixelgen
    from pixelgen import images

    config, model = loaded.config, loaded.model
    tokenizer = loaded.assets.get('tokenizer')
    if tokenizer is None:
        raise FileNotFoundError(f'{args.workdir} has no tokenizer.json (a DALL·E training run '
                                'writes one before its first step).')
    if args.top is not None and not 1 <= args.top <= args.num:
        parser.error(f'--top must be in [1, --num={args.num}], got {args.top}')
    if args.top is not None and args.top < args.num and not args.clip_workdir:
        parser.error('--top keeps the best images by CLIP score: pass --clip_workdir too '
                     '(or leave --top out to keep all --num).')
    primed = args.prime_index is not None or args.prime_image is not None
    if args.prime_index is not None and args.prime_image is not None:
        parser.error('--prime_index and --prime_image are two ways to give the top rows; '
                     'pass one.')
    if primed != (args.prime_rows is not None):
        parser.error('--prime_rows goes with --prime_index or --prime_image (code rows).')
    if args.prime_image is not None and args.prompt is None:
        parser.error('--prime_image needs --prompt "a caption" (what the rest should show).')
    prompt, image_prompt = args.prompt, None
    if args.prime_index is not None:
        from pixelgen.data.codes import open_codes
        if not 1 <= args.prime_rows < model.grid_size:
            parser.error(f'--prime_rows must be in [1, {model.grid_size - 1}].')
        record = open_codes(config.data.codes_dir, config.data.eval_split)[args.prime_index]
        prompt = prompt if prompt is not None else record['caption']
        given = record['codes'][:args.prime_rows].reshape(-1).astype(np.int32)
        image_prompt = jnp.asarray(np.repeat(given[None], args.num, axis=0))
    if prompt is None:
        parser.error('a DALL·E workdir needs --prompt "a caption" (or --prime_index).')

    encoded = tokenizer.encode([prompt], model.text_len, add_sot_eot=True)
    if encoded.num_truncated:
        print(f'warning: the prompt is longer than model.text_len={model.text_len} tokens; '
              f'it was cut to "{tokenizer.decode(encoded.ids)[0]}"', file=sys.stderr)
    dvae = load_dvae(loaded, args.dvae_workdir)
    if args.prime_image is not None:  # the top code rows of the user's picture
        from pixelgen.data import pipeline
        if not 1 <= args.prime_rows < model.grid_size:
            parser.error(f'--prime_rows must be in [1, {model.grid_size - 1}] (code rows).')
        side = dvae.downsampling * model.grid_size
        picture = pipeline.to_rgb_square(images.read_rgb(args.prime_image), side)
        codes = np.asarray(dvae.encode(jnp.asarray(picture[None], jnp.float32) / 255.0))
        given = codes[0, :args.prime_rows].reshape(-1).astype(np.int32)
        image_prompt = jnp.asarray(np.repeat(given[None], args.num, axis=0))

    pictures = draw_dalle(model, dvae, encoded.ids, args.num, args.seed,
                          image_prompt=image_prompt, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p,
                          guidance_scale=args.guidance_scale)
    if jax.process_index() != 0:
        return 0
    order = np.arange(args.num)
    if args.clip_workdir:
        from pixelgen import rerank
        clip = pixelgen.load(args.clip_workdir)
        order, scores = rerank.rerank(clip, pictures, prompt, args.top or args.num)
        print('[rerank] CLIP scores of the kept images, best first: '
              + ', '.join(f'{scores[i]:.3f}' for i in order))
    kept = pictures[order]
    primed_by = args.prime_index if args.prime_image is None else file_stem(args.prime_image)
    name = f'dalle_{slug(prompt)}_{loaded.step:07d}' + (
        f'_prime{primed_by}x{args.prime_rows}' if image_prompt is not None else '')
    path = images.save_png(images.make_grid(_grid_rows(kept, math.ceil(math.sqrt(len(kept))))),
                           grid_path(args, name + '.png'))
    print(f'[samples] {path}  ({len(kept)} images for "{prompt}")')
    if args.out_dir:  # best first when reranked
        write_images(args.out_dir, slug(prompt), kept)
    return 0


if __name__ == '__main__':
    cli.run(main)
