"""The k-means palette: fitting, quantise/dequantise round trips, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from pixelgen.data import palette


def _pixels(colours: np.ndarray, n_per: int = 200, noise: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    px = np.repeat(colours, n_per, axis=0).astype(int) + rng.integers(-noise, noise + 1,
                                                                      (len(colours) * n_per, 3))
    return np.clip(px, 0, 255).astype(np.uint8)


COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255],
                    [128, 128, 0], [0, 128, 128], [200, 100, 50]], np.uint8)


def test_fit_recovers_well_separated_colours():
    centres = palette.fit_palette(_pixels(COLOURS), k=len(COLOURS), seed=0)
    assert centres.shape == (len(COLOURS), 3) and centres.dtype == np.float32
    recovered = palette.dequantize(np.arange(len(COLOURS)), centres).astype(int)
    for colour in COLOURS.astype(int):
        assert np.min(np.abs(recovered - colour).max(axis=1)) <= 3


def test_round_trip_tokens_and_pixels():
    centres = palette.fit_palette(_pixels(COLOURS), k=len(COLOURS), seed=0)
    tokens = np.random.default_rng(1).integers(0, len(COLOURS), (4, 5, 5))
    images = palette.dequantize(tokens, centres)
    assert images.shape == (4, 5, 5, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(palette.quantize(images, centres), tokens)
    # Quantising any pixel picks the nearest centre.
    px = _pixels(COLOURS, n_per=3, noise=20, seed=2)
    idx = palette.quantize(px, centres)
    dist = ((palette.to_unit(px)[:, None] - centres[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, dist.argmin(-1))


def test_fit_is_deterministic_for_a_seed():
    px = _pixels(COLOURS, noise=40)
    a = palette.fit_palette(px, k=16, seed=3)
    b = palette.fit_palette(px, k=16, seed=3)
    np.testing.assert_array_equal(a, b)


def test_save_and_load(tmp_path):
    centres = palette.fit_palette(_pixels(COLOURS), k=4, seed=0)
    assert palette.load_palette(str(tmp_path)) is None
    palette.save_palette(centres, str(tmp_path))
    np.testing.assert_array_equal(palette.load_palette(str(tmp_path)), centres)


def test_bad_palette_size_is_rejected():
    with pytest.raises(ValueError, match='65535'):
        palette.fit_palette(_pixels(COLOURS), k=70000)
