"""PNG grids that a person can look at."""

from __future__ import annotations

import numpy as np

from pixelgen import storage


def make_grid(rows: list[np.ndarray], *, min_tile: int = 64, gap: int = 2) -> np.ndarray:
    """Tiles rows of images into one picture.

    Args:
      rows: each [n, h, w, 3] uint8 (all the same h, w; rows may differ in n).
      min_tile: small images are enlarged (nearest neighbour) to at least this side.
    Returns:
      uint8 [H, W, 3] with a white gap between tiles.
    """
    h, w = rows[0].shape[1:3]
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (th + gap) + gap, ncols * (tw + gap) + gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = np.repeat(np.repeat(np.asarray(image, np.uint8), scale, 0), scale, 1)
            y, x = gap + r * (th + gap), gap + c * (tw + gap)
            grid[y:y + th, x:x + tw] = tile
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    """Writes uint8 [H, W, 3] to `path` (local or a URL) whole or not at all: a crash never
    leaves half a PNG."""
    return storage.write_bytes(path, storage.png_bytes(image))
