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
