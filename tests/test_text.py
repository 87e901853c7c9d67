"""The caption tokenizer: lowercased BPE, fixed length, truncation counted, dropout on request."""

from __future__ import annotations

import numpy as np
import pytest

from pixelgen.data.text import TextTokenizer

CAPTIONS = [f'a {size} {color} {shape} to the left of a small white square'
            for size in ('small', 'large') for color in ('red', 'green', 'blue')
            for shape in ('circle', 'star', 'triangle')] * 4


@pytest.fixture(scope='module')
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=400)


def test_round_trip_and_lowercasing(tokenizer, tmp_path):
    encoded = tokenizer.encode(['A Large RED Star', 'a small blue circle'], 16, add_sot_eot=True)
    assert encoded.ids.shape == (2, 16) and encoded.ids.dtype == np.int32
    assert tokenizer.decode(encoded.ids) == ['a large red star', 'a small blue circle']
    assert encoded.num_truncated == 0
    assert encoded.ids[0, 0] == tokenizer.sot_id
    assert encoded.ids[0, encoded.lengths[0] - 1] == tokenizer.eot_id
    assert (encoded.ids[0, encoded.lengths[0]:] == tokenizer.pad_id).all()
    path = str(tmp_path / 'tokenizer.json')
    tokenizer.save(path)
    again = TextTokenizer.load(path)
    assert again.vocab_size == tokenizer.vocab_size
    np.testing.assert_array_equal(again.encode(['a red star'], 8).ids,
                                  tokenizer.encode(['a red star'], 8).ids)
    assert {tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id} == {0, 1, 2}
    assert tokenizer.vocab_size <= 400


def test_truncation_is_counted_and_keeps_eot(tokenizer):
    long = ' '.join(CAPTIONS[:3])
    encoded = tokenizer.encode([long, 'a red star', long], 6, add_sot_eot=True)
    assert encoded.num_truncated == 2
    assert list(encoded.lengths) == [6, 5, 6]
    assert encoded.ids[0, -1] == tokenizer.eot_id
    plain = tokenizer.encode([long], 6)
    assert plain.num_truncated == 1 and tokenizer.eot_id not in plain.ids
    assert tokenizer.decode(plain.ids)[0] == tokenizer.decode(
        tokenizer.encode([long], 200).ids[:, :6])[0]


def test_bpe_dropout_only_when_asked(tokenizer):
    text = ['a large green triangle to the left of a small white square'] * 20
    plain = tokenizer.encode(text, 64)
    assert (plain.ids == plain.ids[0]).all()  # deterministic without dropout
    dropped = tokenizer.encode(text, 64, dropout=0.5)
    assert (dropped.lengths > plain.lengths[0]).any()  # merges skipped -> more tokens
    assert tokenizer.decode(dropped.ids) == tokenizer.decode(plain.ids)  # same text
    again = tokenizer.encode(text, 64)  # asking once does not leave dropout switched on
    np.testing.assert_array_equal(again.ids, plain.ids)


def test_bad_inputs_are_refused_clearly(tokenizer, tmp_path):
    with pytest.raises(TypeError, match='sequence of texts'):
        tokenizer.encode('a red star', 8)
    with pytest.raises(ValueError, match='dropout'):
        tokenizer.encode(['a red star'], 8, dropout=1.5)
    with pytest.raises(FileNotFoundError, match='TextTokenizer.save'):
        TextTokenizer.load(str(tmp_path / 'missing.json'))
