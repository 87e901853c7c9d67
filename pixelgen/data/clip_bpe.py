"""CLIP's own byte-level BPE (OpenAI's vocab.json + merges.txt, special tokens
<|startoftext|> and <|endoftext|>), rebuilt with `tokenizers` exactly as transformers'
CLIPTokenizer builds it, behind the TextTokenizer interface. Used by CLIP runs that train with
the released tokenizer (`data.tokenizer`), by the hf-clip converter and by export."""

from __future__ import annotations

import threading

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from pixelgen import storage
from pixelgen.data.text import TextTokenizer

SOT, EOT = '<|startoftext|>', '<|endoftext|>'
# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py, as in transformers).
CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


class ClipBPETokenizer(TextTokenizer):
    """CLIP's BPE (special tokens <|startoftext|>, <|endoftext|>; padding with <|endoftext|>,
    as transformers does) behind the TextTokenizer interface."""

    def __init__(self, tokenizer: Tokenizer):  # the special tokens differ from TextTokenizer's
        missing = [t for t in (SOT, EOT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f'Not a CLIP tokenizer: it lacks the special tokens {missing}.')
        self._tokenizer = tokenizer
        self._by_dropout = {0.0: tokenizer}
        self._lock = threading.Lock()
        self.vocab_size = tokenizer.get_vocab_size()
        self.sot_id, self.eot_id = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
        self.pad_id = self.eot_id

    def decode(self, ids) -> list[str]:
        return [' '.join(t.replace('</w>', ' ').split()) for t in super().decode(ids)]


def clip_bpe_tokenizer(vocab_path: str, merges_path: str) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to transformers' CLIPTokenizer for these files."""
    vocab, merges = models.BPE.read_file(vocab_path, merges_path)
    tokenizer = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix='',
                                     end_of_word_suffix='</w>', fuse_unk=False, unk_token=EOT))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([SOT, EOT])  # never split, whatever the text around them
    return tokenizer


def load_clip_bpe(folder: str) -> ClipBPETokenizer:
    """CLIP's tokenizer from `folder` (local or a URL): vocab.json + merges.txt, else a
    tokenizer.json."""
    vocab, merges = storage.join(folder, 'vocab.json'), storage.join(folder, 'merges.txt')
    if storage.exists(vocab) and storage.exists(merges):
        with storage.local_file(vocab) as vocab, storage.local_file(merges) as merges:
            return ClipBPETokenizer(clip_bpe_tokenizer(vocab, merges))
    path = storage.join(folder, 'tokenizer.json')
    if storage.exists(path):
        return ClipBPETokenizer(Tokenizer.from_str(storage.read_text(path)))
    raise FileNotFoundError(f'{folder} holds neither vocab.json + merges.txt nor tokenizer.json '
                            "(CLIP's BPE files, as in the released checkpoints).")


def load_folder_tokenizer(folder: str) -> TextTokenizer:
    """The tokenizer of a CLIPModel folder: CLIP's BPE (`load_clip_bpe`), or the tokenizer.json
    of a BPE trained by pixelgen (written by `pixelgen.export --to hf-clip`; its post-processor
    and truncation are for transformers, TextTokenizer adds [SOT]/[EOT] itself)."""
    path = storage.join(folder, 'tokenizer.json')
    if storage.exists(path) and not is_clip_bpe(path):
        tokenizer = Tokenizer.from_str(storage.read_text(path))
        tokenizer.post_processor = None
        tokenizer.no_truncation()
        return TextTokenizer(tokenizer)
    return load_clip_bpe(folder)


def is_clip_bpe(path: str) -> bool:
    """Whether the tokenizer JSON file at `path` is CLIP's BPE (not a TextTokenizer)."""
    return Tokenizer.from_str(storage.read_text(path)).token_to_id(EOT) is not None
