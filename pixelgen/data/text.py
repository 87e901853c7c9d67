"""Caption text -> BPE token ids: a lowercased byte-level BPE trained with `tokenizers`.

Used by DALL·E (256 text tokens, vocab 16384, BPE dropout 0.1 in training, as in the paper)
and CLIP. Byte-level means every string encodes (no unknown token). The special tokens
'[PAD]', '[SOT]', '[EOT]' come first (ids 0, 1, 2). `encode` pads or truncates to a fixed
length and counts the captions it had to cut, so callers can report them.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pixelgen import storage

SPECIAL_TOKENS = ('[PAD]', '[SOT]', '[EOT]')
# Byte-level: the 256 byte symbols are always in the vocabulary, after the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclasses.dataclass
class Encoded:
    """ids int32 [n, length] padded with pad_id; lengths int32 [n] (tokens kept, with sot/eot);
    num_truncated: how many of the n texts were cut to fit `length`."""
    ids: np.ndarray
    lengths: np.ndarray
    num_truncated: int


class TextTokenizer:
    """A lowercased byte-level BPE tokenizer (wraps a `tokenizers.Tokenizer`)."""

    def __init__(self, tokenizer: Tokenizer):
        for token in SPECIAL_TOKENS:
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f'The tokenizer has no special token {token!r}; train one with '
                                 f'TextTokenizer.train so that it has {SPECIAL_TOKENS}.')
        self._tokenizer = tokenizer
        # One tokenizer per dropout rate: changing the rate on a shared one would leak
        # training-time dropout into evaluation running in another thread.
        self._by_dropout = {0.0: tokenizer}
        self._lock = threading.Lock()
        self.vocab_size: int = tokenizer.get_vocab_size()
        self.pad_id, self.sot_id, self.eot_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 16384,
              min_frequency: int = 2) -> TextTokenizer:
        """Trains on `texts`; the vocabulary holds at most `vocab_size` ids, specials included
        (fewer when the texts have fewer distinct merges)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f'vocab_size={vocab_size} is too small: a byte-level BPE needs '
                             f'{MIN_VOCAB_SIZE} ids (256 bytes and {len(SPECIAL_TOKENS)} '
                             'special tokens) before any merge.')
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str) -> TextTokenizer:
        """A tokenizer saved by `save` (a `tokenizers` JSON file, local or at a URL)."""
        try:
            return cls(Tokenizer.from_str(storage.read_text(path)))
        except Exception as e:  # tokenizers raises a bare Exception for a missing/bad file
            raise FileNotFoundError(f'Cannot read a tokenizer from {path!r} ({e}). It is written '
                                    'by TextTokenizer.save (a training run saves one in its '
                                    'workdir).') from e

    def save(self, path: str) -> None:
        storage.write_text(path, self._tokenizer.to_str(pretty=True))

    def _with_dropout(self, dropout: float) -> Tokenizer:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f'BPE dropout={dropout} must be in [0, 1).')
        with self._lock:
            if dropout not in self._by_dropout:
                tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
                tokenizer.model.dropout = dropout
                self._by_dropout[dropout] = tokenizer
            return self._by_dropout[dropout]

    def encode(self, texts: Sequence[str], length: int, *, dropout: float = 0.0,
               add_sot_eot: bool = False) -> Encoded:
        """Token ids [n, length], padded with pad_id. A text longer than `length` keeps its
        first tokens (and, with add_sot_eot, still ends with [EOT]); it is counted in
        `num_truncated`. `dropout` > 0 applies BPE dropout (for training only)."""
        if isinstance(texts, str):
            raise TypeError('encode takes a sequence of texts; wrap a single one in a list.')
        min_length = 2 if add_sot_eot else 1
        if length < min_length:
            raise ValueError(f'length={length} must be at least {min_length}.')
        encodings = self._with_dropout(dropout).encode_batch(list(texts),
                                                              add_special_tokens=False)
        ids = np.full((len(encodings), length), self.pad_id, np.int32)
        lengths = np.zeros(len(encodings), np.int32)
        num_truncated = 0
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            if add_sot_eot:
                tokens = [self.sot_id, *tokens, self.eot_id]
            if len(tokens) > length:
                num_truncated += 1
                tokens = tokens[:length - 1] + [self.eot_id] if add_sot_eot else tokens[:length]
            ids[row, :len(tokens)] = tokens
            lengths[row] = len(tokens)
        return Encoded(ids=ids, lengths=lengths, num_truncated=num_truncated)

    def decode(self, ids) -> list[str]:
        """Texts of token ids [n, length] (or one sequence [length]); special tokens dropped."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        special = {self.pad_id, self.sot_id, self.eot_id}
        rows = [[int(t) for t in row if int(t) not in special] for row in ids]
        return [text.strip() for text in self._tokenizer.decode_batch(rows)]
