"""Codes datasets: what the dVAE encode job writes is what DALL·E reads."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pixelgen.data.codes import CodesError, codes_info, open_codes, write_codes


def _examples(n: int, grid: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{'codes': rng.integers(0, 512, (grid, grid)).astype(np.uint16),
             'caption': f'a red circle number {i}', 'label': i % 6} for i in range(n)]


def test_write_then_read_round_trip(tmp_path):
    out = str(tmp_path / 'codes')
    train, test = _examples(9, 4, 0), _examples(3, 4, 1)
    assert write_codes(out, 'train', train, grid_size=4, codebook_size=512,
                       metadata={'dvae_workdir': '/runs/dvae'}) == 9
    assert write_codes(out, 'test', iter(test), grid_size=4, codebook_size=512) == 3
    info = codes_info(out)
    assert info == {'grid_size': 4, 'codebook_size': 512, 'splits': {'train': 9, 'test': 3},
                    'metadata': {'dvae_workdir': '/runs/dvae'}}
    source = open_codes(out, 'train')
    assert len(source) == 9
    for i in (0, 4, 8):
        got = source[i]
        assert got['codes'].dtype == np.uint16
        np.testing.assert_array_equal(got['codes'], train[i]['codes'])
        assert got['caption'] == train[i]['caption'] and got['label'] == train[i]['label']
    # A plain tfds reader opens it too (captions come back as bytes there).
    record = tfds.builder_from_directory(out).as_data_source('test')[2]
    assert record['caption'] == test[2]['caption'].encode()
    # Rewriting a split replaces it and keeps the other one.
    write_codes(out, 'train', train[:2], grid_size=4, codebook_size=512)
    assert codes_info(out)['splits'] == {'train': 2, 'test': 3}


def test_bad_codes_are_refused(tmp_path):
    out = str(tmp_path / 'codes')
    with pytest.raises(CodesError, match='expected'):
        write_codes(out, 'train', _examples(2, 3, 0), grid_size=4, codebook_size=512)
    with pytest.raises(CodesError, match='codebook_size=16'):
        write_codes(out, 'train', _examples(2, 4, 0), grid_size=4, codebook_size=16)
    write_codes(out, 'train', _examples(2, 4, 0), grid_size=4, codebook_size=512)
    with pytest.raises(CodesError, match='new directory'):
        write_codes(out, 'test', _examples(2, 8, 0), grid_size=8, codebook_size=512)
    with pytest.raises(CodesError, match="no split 'valid'"):
        open_codes(out, 'valid')
    with pytest.raises(CodesError, match='not a codes dataset'):
        open_codes(str(tmp_path / 'nothing'), 'train')


def test_a_killed_write_resumes_after_its_last_complete_chunk(tmp_path):
    """Chunks of 2: killed while the third is being written, the rerun keeps the first two
    (4 examples), asks only for the examples from the 5th on, and the split is whole."""
    out = str(tmp_path / 'codes')
    rows = _examples(7, 4, 0)
    asked = []

    def examples(done, fail_at=None):
        asked.append(done)
        for i in range(done, len(rows)):
            if i == fail_at:
                raise KeyboardInterrupt('killed')
            yield rows[i]

    kwargs = dict(grid_size=4, codebook_size=512, metadata={'dvae_step': 3}, rows=(0, 7),
                  chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        write_codes(out, 'train', lambda done: examples(done, fail_at=5), **kwargs)
    assert write_codes(out, 'train', examples, **kwargs) == 3
    assert asked == [0, 4]
    source = open_codes(out, 'train')
    assert len(source) == 7 and not (tmp_path / 'codes' / '.partial-train').exists()
    for i in range(7):
        np.testing.assert_array_equal(source[i]['codes'], rows[i]['codes'])
    assert codes_info(out)['metadata'] == {'dvae_step': 3}
    # Killed again, but rerun with another plan (another checkpoint's codes): starts over.
    with pytest.raises(KeyboardInterrupt):
        write_codes(out, 'test', lambda done: examples(done, fail_at=3), **kwargs)
    asked.clear()
    write_codes(out, 'test', examples, **{**kwargs, 'metadata': {'dvae_step': 4}})
    assert asked == [0] and len(open_codes(out, 'test')) == 7
    assert codes_info(out)['splits'] == {'train': 7, 'test': 7}
