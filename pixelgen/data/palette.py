"""The k-means colour palette of Image GPT: RGB pixels <-> palette indices.

As in openai/image-gpt, centres live in [-1, 1] RGB space (`x / 127.5 - 1`), quantisation is
the argmin of squared Euclidean distance, and dequantisation is `rint(127.5 * (c + 1))`.
The paper does not say how the k-means was fitted; we use k-means++ seeding and Lloyd
iterations on pixels sampled from the training split, vectorised in JAX and fully seeded.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

from pixelgen import assets

PALETTE_FILE = 'palette.npy'


def to_unit(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3] in [-1, 1]."""
    return pixels_uint8.astype(np.float32) / 127.5 - 1.0


def _nearest(points: jax.Array, centres: jax.Array) -> tuple[jax.Array, jax.Array]:
    """points [n, 3], centres [k, 3] -> (index [n] int32, squared distance [n])."""
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 ; |p|^2 is constant per row, so argmin ignores it.
    scores = jnp.sum(centres**2, axis=-1)[None, :] - 2.0 * points @ centres.T
    index = jnp.argmin(scores, axis=-1).astype(jnp.int32)
    dist = jnp.maximum(jnp.take_along_axis(scores, index[:, None], axis=-1)[:, 0]
                       + jnp.sum(points**2, axis=-1), 0.0)
    return index, dist


@jax.jit
def _lloyd_step(points: jax.Array, centres: jax.Array) -> tuple[jax.Array, jax.Array]:
    index, dist = _nearest(points, centres)
    one_hot = jax.nn.one_hot(index, centres.shape[0], dtype=points.dtype)  # [n, k]
    counts = one_hot.sum(0)
    sums = one_hot.T @ points
    # An empty cluster keeps its centre instead of collapsing to the origin.
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts[:, None], 1.0), centres)
    return new, dist.mean()


def fit_palette(pixels_uint8: np.ndarray, k: int, *, seed: int = 0,
                iterations: int = 30) -> np.ndarray:
    """k-means on RGB pixels.

    Args:
      pixels_uint8: [n, 3] uint8 training pixels.
      k: number of colours (512 in the paper).
    Returns:
      centres [k, 3] float32 in [-1, 1], sorted by brightness so that indices read naturally.
    """
    if not 2 <= k <= 65535:
        raise ValueError(f'palette size k={k} must be in [2, 65535] (token ids are uint16-safe).')
    pixels_uint8 = np.asarray(pixels_uint8).reshape(-1, 3)
    unique = np.unique(pixels_uint8, axis=0)
    if len(unique) < k:
        print(f'[palette] only {len(unique)} distinct colours for k={k}: '
              f'{k - len(unique)} palette entries will stay unused.', flush=True)
    points = jnp.asarray(to_unit(pixels_uint8))
    rng = np.random.default_rng(seed)
    # k-means++ seeding, on a subsample to keep it O(k * m).
    candidates = to_unit(unique if len(unique) <= 20000 else
                         unique[rng.choice(len(unique), 20000, replace=False)])
    centres = [candidates[rng.integers(len(candidates))]]
    closest = np.sum((candidates - centres[0]) ** 2, axis=-1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct colours than k: repeat far-away ones
            nxt = candidates[rng.integers(len(candidates))]
        else:
            nxt = candidates[rng.choice(len(candidates), p=closest / total)]
        centres.append(nxt)
        closest = np.minimum(closest, np.sum((candidates - nxt) ** 2, axis=-1))
    centres = jnp.asarray(np.stack(centres).astype(np.float32))
    for _ in range(iterations):
        centres, _ = _lloyd_step(points, centres)
    centres = np.asarray(centres)
    return centres[np.argsort(centres.sum(-1), kind='stable')].astype(np.float32)


def quantize(images_uint8: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] images -> int32 [...] palette indices (nearest centre). Vectorised numpy."""
    images_uint8 = np.asarray(images_uint8)
    flat = to_unit(images_uint8.reshape(-1, 3))
    scores = np.sum(centres**2, axis=-1)[None, :] - 2.0 * flat @ centres.T
    return np.argmin(scores, axis=-1).astype(np.int32).reshape(images_uint8.shape[:-1])


def dequantize(tokens: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """int [...] palette indices -> uint8 [..., 3] RGB."""
    rgb = np.rint(127.5 * (np.asarray(centres)[np.asarray(tokens)] + 1.0))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_palette(centres: np.ndarray, workdir: str) -> str:
    """Writes `workdir`/palette.npy and records its digest (`pixelgen.assets`)."""
    buf = io.BytesIO()
    np.save(buf, centres)
    return assets.write(workdir, PALETTE_FILE, buf.getvalue())


def load_palette(workdir: str) -> np.ndarray | None:
    """The workdir's palette [k, 3], checked against the digest recorded when it was written;
    None if it has none and no checkpoint needs one. A missing palette that checkpoints were
    trained with, or a changed one, is an AssetError naming the file: it is never refitted."""
    data = assets.read(workdir, PALETTE_FILE,
                       what="the colour palette that the model's tokens index")
    return None if data is None else np.load(io.BytesIO(data))
