"""Score images against texts with a trained CLIP, and keep the best (DALL·E's reranking).

    clip = pixelgen.load('runs/clip_shapes')            # or a converted hf-clip workdir
    scores = score(clip, images, ['a red star', ...])    # cosine similarities [n_images, n_texts]
    best, scores = rerank(clip, images, 'a red star', top=4)

Images are float [n, h, w, 3] in [0, 1] (or uint8); each is centre-cropped and resized to the
CLIP input size exactly as training images are. The command line does the same for PNG files
or a PNG grid:

    python -m pixelgen.rerank --workdir runs/clip_shapes --text 'a large red star' \\
        --images a.png b.png c.png --top 2 --out best.png
    python -m pixelgen.rerank --workdir runs/clip_shapes --text 'a large red star' \\
        --grid samples.png --grid_shape 4x8 --top 4 --out best.png

The CLIP's parameters are loaded sharded over --mesh (default: its run's config.mesh fitted
to the devices here), e.g. --mesh data=1,fsdp=-1. With the distributed flags of
`pixelgen.train`, every process embeds its own share of the images and process 0 prints and
writes the result.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from pixelgen import cli, images, parallel, pretrained
from pixelgen.data import pipeline

BATCH = 64  # images or texts per compiled call (the last batch is padded)


@nnx.jit
def _image_embeddings(model, pixels):
    return model.encode_image(pixels)


@nnx.jit
def _text_embeddings(model, tokens):
    return model.encode_text(tokens)


def _batched(fn, model, rows: np.ndarray) -> np.ndarray:
    """fn(model, rows[i:i+BATCH]) for every batch, the last padded to BATCH, concatenated."""
    out = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        pad = BATCH - len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        out.append(np.asarray(fn(model, jnp.asarray(padded)))[:len(chunk)])
    return np.concatenate(out)


def to_model_images(imgs, image_size: int) -> np.ndarray:
    """float [n, h, w, 3] in [0, 1] (or uint8, or grayscale) -> uint8 [n, size, size, 3]."""
    imgs = np.asarray(imgs)
    if imgs.dtype != np.uint8:
        imgs = np.round(np.clip(imgs, 0.0, 1.0) * 255).astype(np.uint8)
    return np.stack([pipeline.to_rgb_square(image, image_size) for image in imgs])


def embed_images(clip, imgs) -> np.ndarray:
    """L2-normalised image embeddings [n, embed_dim] of `clip` (a pixelgen.load result)."""
    if len(imgs) == 0:
        raise ValueError('No images to embed.')
    pixels = to_model_images(imgs, clip.model.image_size)
    return _batched(_image_embeddings, clip.model, pixels)


def embed_texts(clip, texts: Sequence[str]) -> np.ndarray:
    """L2-normalised text embeddings [n, embed_dim], through the workdir's tokenizer."""
    if isinstance(texts, str):
        raise TypeError('texts is a list of strings; wrap a single text in a list.')
    tokenizer = clip.assets.get('tokenizer')
    if tokenizer is None:
        raise FileNotFoundError(f'{clip.workdir} has no tokenizer.json; a CLIP training run '
                                'writes one, and hf-clip conversion copies vocab.json + '
                                'merges.txt from --src.')
    tokens = tokenizer.encode(list(texts), clip.model.text.context_length, add_sot_eot=True).ids
    return _batched(_text_embeddings, clip.model, tokens)


def score(clip, imgs, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarities float32 [n_images, n_texts] (logits / the logit scale)."""
    return embed_images(clip, imgs) @ embed_texts(clip, texts).T


def rerank(clip, imgs, text: str, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int [top] of the best-matching images, best first; scores [n_images])."""
    if not 1 <= top <= len(imgs):
        raise ValueError(f'top={top} must be in [1, {len(imgs)}] (the number of images).')
    scores = score(clip, imgs, [text])[:, 0]
    return np.argsort(-scores, kind='stable')[:top], scores


def split_grid(grid: np.ndarray, rows: int, cols: int, gap: int = 2) -> np.ndarray:
    """The tiles of a grid written by `images.make_grid` (a `gap`-pixel border around each
    tile): [H, W, 3] -> [rows * cols, h, w, 3], row by row."""
    height, width = grid.shape[:2]
    th, tw = (height - gap) / rows - gap, (width - gap) / cols - gap
    if not (th.is_integer() and tw.is_integer()) or th < 1 or tw < 1:
        raise ValueError(f'A {width}x{height} grid does not split into {rows}x{cols} tiles with '
                         f'{gap}-pixel gaps; check --grid_shape and --gap.')
    th, tw = int(th), int(tw)
    return np.stack([grid[gap + r * (th + gap):gap + r * (th + gap) + th,
                          gap + c * (tw + gap):gap + c * (tw + gap) + tw]
                     for r in range(rows) for c in range(cols)])


def main(argv: list[str]) -> int:
    import pixelgen

    parser = argparse.ArgumentParser(prog='python -m pixelgen.rerank', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True, help='a CLIP workdir (trained or converted)')
    parser.add_argument('--step', type=int, default=None, help='checkpoint (default: latest)')
    parser.add_argument('--text', required=True, help='the text to match')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--images', nargs='+', help='PNG (or any PIL-readable) files')
    source.add_argument('--grid', help='one PNG grid of images (see --grid_shape, --gap)')
    parser.add_argument('--grid_shape', default=None, help='ROWSxCOLS of --grid, e.g. 4x8')
    parser.add_argument('--gap', type=int, default=2, help='pixels between grid tiles')
    parser.add_argument('--top', type=int, default=1, help='how many images to keep')
    parser.add_argument('--out', default=None, help='write the kept images as a PNG row here')
    pretrained.add_mesh_argument(parser)
    parallel.add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    parallel.initialize_from_args(args)

    if args.grid:
        if not args.grid_shape or 'x' not in args.grid_shape:
            parser.error('--grid needs --grid_shape ROWSxCOLS, e.g. --grid_shape 4x8.')
        rows, cols = (int(v) for v in args.grid_shape.split('x'))
        imgs = split_grid(images.read_rgb(args.grid), rows, cols, args.gap)
        names = [f'{args.grid}[{r},{c}]' for r in range(rows) for c in range(cols)]
    else:
        imgs, names = [images.read_rgb(p) for p in args.images], list(args.images)
        if len({im.shape for im in imgs}) > 1:  # resize each alone, then stack
            imgs = [np.asarray(Image.fromarray(im).resize(imgs[0].shape[1::-1])) for im in imgs]
        imgs = np.stack(imgs)
    clip = pixelgen.load(args.workdir, step=args.step, mesh=args.mesh)
    if clip.config.task != 'clip':
        parser.error(f'{args.workdir} holds a {clip.config.task!r} model, not a CLIP.')
    # Each process of a multi-host job embeds its share of the images; all of them score.
    text = embed_texts(clip, [args.text])  # [1, embed_dim]
    start, end = parallel.host_range(len(imgs))
    local = (embed_images(clip, imgs[start:end]) if end > start else
             np.zeros((0, text.shape[1]), np.float32))
    scores = (parallel.gather_rows(local, len(imgs)) @ text.T)[:, 0]
    best = np.argsort(-scores, kind='stable')[:min(args.top, len(imgs))]
    if jax.process_index() != 0:
        return 0
    for rank, i in enumerate(best, 1):
        print(f'{rank}\t{scores[i]:.4f}\t{names[i]}')
    if args.out:
        images.save_png(images.make_grid([imgs[best]]), args.out)
        print(f'[rerank] wrote the best {len(best)} to {args.out}')
    return 0


if __name__ == '__main__':
    cli.run(main)
