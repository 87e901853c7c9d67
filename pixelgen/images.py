"""PNG grids that a person can look at, and reading the user's own pictures."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelgen import storage
from pixelgen.config import ConfigError


def read_rgb(path: str) -> np.ndarray:
    """uint8 [h, w, 3] of a PIL-readable picture file (local or a URL)."""
    return decode_rgb(storage.read_bytes(path), path)


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """uint8 [h, w, 3] of a PIL-readable picture's bytes; `name` says where they came from in
    the error."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert('RGB'))
    except UnidentifiedImageError:
        raise ConfigError(f'{name}: not a readable picture (no image format that PIL reads); '
                          'pass a PNG or JPEG file.') from None
    except OSError as e:  # a known format, damaged
        raise ConfigError(f'{name}: not a readable picture ({e}); pass a PNG or JPEG file.'
                          ) from e


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
