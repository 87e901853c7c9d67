"""DALL·E's row, column and conv masks and the paper's layer schedule (App. B.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelgen.nn.masks import (
    CAUSAL,
    MaskSpec,
    dalle_layer_kinds,
    dalle_layer_masks,
    dalle_mask,
    dalle_mask_spec,
)

KINDS = ('row', 'column', 'conv', 'causal')


def _by_hand(kind: str, t: int, w: int, window: int = 11) -> np.ndarray:
    """The issue's rules, one (query, key) pair at a time, with rows and columns spelled out."""
    n = t + w * w
    mask = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(i + 1):  # never a future key
            if j < t or kind == 'causal':
                mask[i, j] = True
                continue
            p, q = i - t, j - t
            (pr, pc), (qr, qc) = divmod(p, w), divmod(q, w)
            if kind == 'row':
                mask[i, j] = p - q <= w
            elif kind == 'column':
                mask[i, j] = pc == qc
            else:
                mask[i, j] = abs(pr - qr) <= window // 2 and abs(pc - qc) <= window // 2
    return mask


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('t, w', [(6, 4), (3, 8), (0, 5)])
def test_masks_follow_the_rules_of_the_issue(kind, t, w):
    mask = dalle_mask(kind, t, w)
    assert mask.dtype == bool and mask.shape == (t + w * w,) * 2
    np.testing.assert_array_equal(mask, _by_hand(kind, t, w))


def test_paper_toy_case_row_window_reaches_the_previous_rows_column():
    # Fig. 11 (a): 6 text tokens, 4x4 image: each image token sees the previous 5 image tokens
    # at most (W + 1 with itself), and every text token.
    mask = dalle_mask('row', 6, 4)
    image_keys = mask[6:, 6:].sum(axis=1)
    np.testing.assert_array_equal(image_keys, np.minimum(np.arange(16), 4) + 1)
    assert mask[6:, :6].all()  # image -> text is full
    np.testing.assert_array_equal(mask[:6, :6], np.tril(np.ones((6, 6), bool)))


def test_conv_window_is_11x11_centred_and_does_not_wrap_columns():
    t, w = 2, 16
    mask = dalle_mask('conv', t, w)
    centre = t + 8 * w + 8
    assert mask[centre, t:].sum() == 5 * 11 + 6  # 5 full rows above, then 6 up to self
    left_edge = t + 8 * w  # row 8, column 0
    seen = np.flatnonzero(mask[left_edge, t:])
    assert (seen % w <= 5).all()  # never the far right of the rows above (no torus)
    assert mask[left_edge, t:].sum() == 5 * 6 + 1


# Fig. 11 (d)'s toy case read with wraparound: 6 text tokens, a 4x4 image, a 3x3 window.
# Image keys of each image query, written out one by one: the query and its left neighbour,
# and the three tokens centred on the one above it, all taken in raster order, so that the
# left neighbour of a row's first token is the previous row's last, and the upper-right
# neighbour of a row's last token is that row's first.
WRAPAROUND_4X4 = {0: [0], 1: [0, 1], 2: [1, 2], 3: [0, 2, 3], 4: [0, 1, 3, 4],
                  5: [0, 1, 2, 4, 5], 6: [1, 2, 3, 5, 6], 7: [2, 3, 4, 6, 7],
                  8: [3, 4, 5, 7, 8], 9: [4, 5, 6, 8, 9], 10: [5, 6, 7, 9, 10],
                  11: [6, 7, 8, 10, 11], 12: [7, 8, 9, 11, 12], 13: [8, 9, 10, 12, 13],
                  14: [9, 10, 11, 13, 14], 15: [10, 11, 12, 14, 15]}


def test_conv_wraparound_matches_the_toy_case_written_out_by_hand():
    spec = MaskSpec('conv', 6, 4, conv_window=3, conv_wraparound=True)
    mask = spec.dense(spec.sequence_length)
    for p, keys in WRAPAROUND_4X4.items():
        np.testing.assert_array_equal(np.flatnonzero(mask[6 + p, 6:]), keys, err_msg=str(p))
        assert mask[6 + p, :6].all()  # every text token
    clipped = MaskSpec('conv', 6, 4, conv_window=3).dense(22)
    assert not clipped[6 + 4, 6 + 3]  # clipped: row 1's first token never sees row 0's last
    assert dalle_mask_spec('conv', 6, 4) == MaskSpec('conv', 6, 4)  # clipped is the default
    with pytest.raises(ValueError, match='conv_wraparound needs an image at least as wide'):
        MaskSpec('conv', 6, 4, conv_window=5, conv_wraparound=True)


def test_column_sees_its_column_in_every_row_above():
    t, w = 1, 4
    mask = dalle_mask('column', t, w)
    np.testing.assert_array_equal(np.flatnonzero(mask[t + 14, t:]), [2, 6, 10, 14])


@pytest.mark.parametrize('kind', ['row', 'column', 'conv', 'conv_wraparound'])
def test_allowed_keys_and_decode_keys_agree_with_the_dense_mask(kind):
    spec = MaskSpec(kind.split('_')[0], 3, 8, conv_window=5,
                    conv_wraparound=kind == 'conv_wraparound')
    n = spec.sequence_length
    dense = spec.dense(n)
    row = jax.jit(lambda i: spec.allowed_keys(i, n))
    window = jax.jit(lambda i: spec.decode_keys(i, n))
    for i in range(n):
        np.testing.assert_array_equal(row(jnp.int32(i)), dense[i])
        keys, allowed = map(np.asarray, window(jnp.int32(i)))
        assert len(set(keys.tolist())) == len(keys) and keys.max() < n
        np.testing.assert_array_equal(allowed, dense[i, keys])
        assert allowed.sum() == dense[i].sum()  # the window holds every allowed key
    assert spec.decode_keys(0, n - 1) is None  # another cache length reads the whole row


def test_schedule_of_64_layers_matches_the_paper():
    kinds = dalle_layer_kinds(64)
    assert kinds[:4] == ('row', 'column', 'row', 'row')
    for i, kind in enumerate(kinds, start=1):
        expected = 'conv' if i == 64 else 'column' if (i - 2) % 4 == 0 else 'row'
        assert kind == expected
    assert (kinds.count('row'), kinds.count('column'), kinds.count('conv')) == (47, 16, 1)
    assert dalle_layer_kinds(1) == ('conv',)
    masks = dalle_layer_masks(8, 4, 3)
    assert [m.kind for m in masks] == list(dalle_layer_kinds(8))
    assert masks[0] == MaskSpec('row', 4, 3) and dalle_mask_spec('causal', 4, 3) == CAUSAL


def test_bad_kinds_and_shapes_are_refused():
    with pytest.raises(ValueError, match=r"'diagonal'.*row.*column.*conv"):
        dalle_mask('diagonal', 4, 2)
    with pytest.raises(ValueError, match="'full'"):
        dalle_mask('full', 4, 2)
    with pytest.raises(ValueError, match='grid_width'):
        MaskSpec('row')
    with pytest.raises(ValueError, match='conv_window=4'):
        MaskSpec('conv', 2, 4, conv_window=4)
    with pytest.raises(ValueError, match='num_layers=0'):
        dalle_layer_kinds(0)
