"""PNG grids that a person can look at, and reading the user's own pictures."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

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


def split_grid(grid: np.ndarray, *, rows: int, cols: int, gap: int = 2) -> np.ndarray:
    """The tiles of a full `rows` x `cols` picture that make_grid drew: uint8 [rows, cols, th,
    tw, 3], each tile's size being the picture's less its gaps, shared evenly."""
    height, width = grid.shape[:2]
    tile_h, tile_w = (height - gap) // rows - gap, (width - gap) // cols - gap
    if (tile_h + gap) * rows + gap != height or (tile_w + gap) * cols + gap != width:
        raise ValueError(f'a {width}x{height} picture is not a make_grid of {rows} rows and '
                         f'{cols} columns with gap {gap}')
    return np.stack([np.stack([
        grid[gap + r * (tile_h + gap):gap + r * (tile_h + gap) + tile_h,
             gap + c * (tile_w + gap):gap + c * (tile_w + gap) + tile_w]
        for c in range(cols)]) for r in range(rows)])


def font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at `size` pixels (its fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def labelled_panels(panels: list[tuple[str, np.ndarray]], row_labels: list[str], *,
                    gap: int = 2, panel_gap: int = 24) -> np.ndarray:
    """Panels side by side, each a titled make_grid of its rows of tiles ([rows, n, h, w, 3]
    uint8, every panel the same rows), with `row_labels[r]` left of row r: uint8 [H, W, 3]."""
    grids = [make_grid(list(tiles), gap=gap) for _, tiles in panels]
    text, title = font(13), font(14)
    label_width = 8 + max(int(text.getlength(label)) for label in row_labels)
    top = 28
    width = label_width + sum(g.shape[1] for g in grids) + panel_gap * (len(grids) - 1)
    height = top + max(g.shape[0] for g in grids)
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    x = label_width
    for (name, _), grid in zip(panels, grids, strict=True):
        canvas.paste(Image.fromarray(grid), (x, top))
        draw.text((x + gap, 6), name, fill='black', font=title)
        x += grid.shape[1] + panel_gap
    row_height = (grids[0].shape[0] - gap) / len(row_labels)
    for r, label in enumerate(row_labels):
        draw.text((4, top + gap + r * row_height + row_height / 2 - 8), label, fill='black',
                  font=text)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: str) -> str:
    """Writes uint8 [H, W, 3] to `path` (local or a URL) whole or not at all: a crash never
    leaves half a PNG."""
    return storage.write_bytes(path, storage.png_bytes(image))
