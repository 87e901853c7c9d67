"""The CLIP task: (image, caption) pairs, a symmetric contrastive loss over the global batch.

It knows its data (images in [0, 1] and BPE caption tokens), its model, its loss and metrics
(loss, in-batch retrieval accuracy, the logit scale), and a picture of progress (for a few
captions, the test images the model ranks highest). The workdir keeps the tokenizer
(`tokenizer.json`), trained on the training captions on first use or CLIP's own BPE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelgen import assets, flops, images, parallel, storage
from pixelgen.config import ConfigDict, ConfigError
from pixelgen.cpu.backend import use_native_attention
from pixelgen.data import clip_bpe, pipeline
from pixelgen.data.text import TextTokenizer
from pixelgen.models.clip import CLIP, OPENAI_MEAN, OPENAI_STD, contrastive_loss
from pixelgen.nn.transformer import ACTIVATIONS
from pixelgen.tasks import DTYPES, defaults, model_problems, raise_problems

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_IS = "the tokenizer that gives the model's text tokens their ids"


def base_config() -> ConfigDict:
    """Every key of a CLIP config, with the values of configs/clip_shapes.py; the CLIP configs
    and the hf-clip converter start from it and change values only."""
    # The contrastive softmax spans the whole global batch, but grad_accum_steps and
    # concurrent_microbatches contrast within each micro-batch.
    c = defaults.training_loop('clip', total_steps=800, batch_size=64,
                               checkpoint_every_steps=400, log_every_steps=50,
                               eval_every_steps=400, eval_examples=256, sample_every_steps=800)

    c.data = ConfigDict()
    c.data.dataset = 'shapes'
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.image_size = 64         # shapes' own size: 8x8 patches of 8 pixels
    c.data.caption_key = 'caption'
    c.data.holdout_phrases = ()    # training drops captions containing any (as DALL·E's)
    c.data.tokenizer = ''          # '' = train a BPE on the captions; or a folder holding
    #                                CLIP's vocab.json + merges.txt (then model.eot_id=49407)
    c.data.tokenizer_train_captions = 10000
    # Hard negatives (NegCLIP): groups of interchangeable words, each a comma-separated string
    # ('circle,square,star'). Each training caption also meets, in its image's softmax over
    # texts, a copy with one of its group words swapped for another of the group (never one
    # that names a held-out phrase). () = none.
    c.data.hard_negative_words = ()
    c.data.num_threads = 2
    c.data.prefetch = 4
    pipeline.add_stream_config(c.data)  # webdataset: / parquet: sources (docs/data.md)

    c.model = ConfigDict()
    c.model.embed_dim = 64
    c.model.patch_size = 8
    c.model.vision_width = 96
    c.model.vision_layers = 3
    c.model.vision_heads = 4
    c.model.vocab_size = 320       # the trained BPE holds at most this many (>= 259)
    c.model.context_length = 24
    c.model.text_width = 64
    c.model.text_layers = 2
    c.model.text_heads = 4
    c.model.eot_id = 2             # TextTokenizer's [EOT]; CLIP's BPE: 49407
    c.model.mlp_ratio = 4
    c.model.activation = 'quick_gelu'
    c.model.image_mean = OPENAI_MEAN
    c.model.image_std = OPENAI_STD
    c.model.dtype = 'float32'
    c.model.attention = 'block_sparse'  # or 'dense' (the reference)
    c.model.remat = 'none'

    c.optimizer = defaults.adamw(learning_rate=1e-3, warmup_steps=50, b2=0.98, eps=1e-6,
                                 weight_decay=0.1)  # the paper's β2 and ε

    c.sampling = ConfigDict()  # the retrieval grid of write_samples
    c.sampling.num_images = 6
    c.sampling.samples_per_image = 5

    # The eval job's evaluators (pixelgen/evaluators/clip.py), each with its --option values.
    c.evals = ConfigDict({'zeroshot': {}, 'retrieval': {}, 'linear_probe': {'label_key': 'shape'}})
    return c


def validate_config(config) -> None:
    """Checks what would otherwise fail later (after data building or compiling)."""
    m, d = config.model, config.data
    problems = []
    if d.image_size % m.patch_size:
        problems.append(f'data.image_size={d.image_size} must be divisible by '
                        f'model.patch_size={m.patch_size} (e.g. data.image_size='
                        f'{max(1, round(d.image_size / m.patch_size)) * m.patch_size})')
    for part in ('vision', 'text'):
        width, heads = m[f'{part}_width'], m[f'{part}_heads']
        if width % heads:
            problems.append(f'model.{part}_heads={heads} must divide model.{part}_width={width}')
    if not 0 <= m.eot_id < m.vocab_size:
        problems.append(f'model.eot_id={m.eot_id} must be a token id below '
                        f'model.vocab_size={m.vocab_size}')
    if m.activation not in ACTIVATIONS:
        problems.append(f'model.activation={m.activation!r} must be one of {sorted(ACTIVATIONS)}')
    for group in d.get('hard_negative_words', ()):
        if not isinstance(group, str) or len(set(group.split(','))) < 2:
            problems.append(f'data.hard_negative_words: {group!r} must be a comma-separated '
                            "string of at least two words, e.g. 'circle,square,star'")
    problems += model_problems(m)
    raise_problems(problems)


def build_model(config, rngs: nnx.Rngs) -> CLIP:
    validate_config(config)
    m = config.model
    model = CLIP(image_size=config.data.image_size, patch_size=m.patch_size,
                 vision_width=m.vision_width, vision_layers=m.vision_layers,
                 vision_heads=m.vision_heads, vocab_size=m.vocab_size,
                 context_length=m.context_length, text_width=m.text_width,
                 text_layers=m.text_layers, text_heads=m.text_heads, embed_dim=m.embed_dim,
                 eot_id=m.eot_id, mlp_ratio=m.mlp_ratio, activation=m.activation,
                 image_mean=tuple(m.image_mean), image_std=tuple(m.image_std),
                 dtype=DTYPES[m.dtype], attention_impl=m.attention, remat=m.remat, rngs=rngs)
    return use_native_attention(model)


def caption_text(value) -> str:
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def load_tokenizer(path: str) -> TextTokenizer:
    """A saved tokenizer: CLIP's own BPE (special tokens <|startoftext|>, <|endoftext|>) or
    one trained by TextTokenizer."""
    if clip_bpe.is_clip_bpe(path):
        return clip_bpe.ClipBPETokenizer.load(path)
    return TextTokenizer.load(path)


def load_or_make_tokenizer(config, workdir: str, train_source=None) -> TextTokenizer:
    """The workdir's tokenizer (a resumed run keeps its token ids); else CLIP's BPE from
    `data.tokenizer` (a folder with vocab.json and merges.txt); else one trained on the
    training captions. Checked against the model's vocabulary and end-of-text id."""
    d, m = config.data, config.model
    path = storage.join(workdir, TOKENIZER_FILE)
    existed = assets.check(workdir, TOKENIZER_FILE, what=TOKENIZER_IS)  # or refused, if changed
    if existed:
        tokenizer = load_tokenizer(path)
    else:
        if d.tokenizer:
            tokenizer = clip_bpe.load_clip_bpe(d.tokenizer)  # a local or remote folder
        else:
            if train_source is None:
                train_source = pipeline.open_split(d, 'train')
            n = min(len(train_source), d.tokenizer_train_captions)
            print(f'[tokenizer] training a BPE of at most {m.vocab_size} tokens on {n} '
                  f'{d.dataset} captions...', flush=True)
            captions = (caption_text(train_source[i][d.caption_key]) for i in range(n))
            tokenizer = TextTokenizer.train(captions, vocab_size=m.vocab_size)
    if tokenizer.vocab_size > m.vocab_size or tokenizer.eot_id != m.eot_id:
        raise ConfigError(
            f'The tokenizer has {tokenizer.vocab_size} tokens and end-of-text id '
            f'{tokenizer.eot_id}, but config.model.vocab_size={m.vocab_size} and '
            f'model.eot_id={m.eot_id} (a trained byte-level BPE has at least 259 tokens). Set '
            f'--config.model.vocab_size={tokenizer.vocab_size} '
            f'--config.model.eot_id={tokenizer.eot_id}.')
    if not existed and jax.process_index() == 0:
        tokenizer.save(path)
        assets.record(workdir, TOKENIZER_FILE)
    return tokenizer


def hard_negative(caption: str, groups, banned_phrases, rng: np.random.Generator) -> str:
    """`caption` with one word of one of `groups` (sequences of interchangeable words) swapped
    for another word of its group, chosen by `rng` among the swaps whose caption names none of
    `banned_phrases`; '' when there is none."""
    words = caption.split(' ')
    banned = [p.lower() for p in banned_phrases]
    swaps = []
    for i, word in enumerate(words):
        for group in groups:
            if word in group:
                for other in group:
                    if other != word:
                        text = ' '.join(words[:i] + [other] + words[i + 1:])
                        if not any(p in text.lower() for p in banned):
                            swaps.append(text)
    return swaps[rng.integers(len(swaps))] if swaps else ''


def retrieval_hits(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """How many real rows of [n, n] logits rank their own pair first (image -> text)."""
    n = logits.shape[0]
    masked = jnp.where(weights[None, :] > 0, logits, -jnp.inf)
    return jnp.sum((jnp.argmax(masked, axis=1) == jnp.arange(n)) * weights)


class CLIPLoss:
    """The contrastive objective alone (no data needed)."""

    def loss(self, model: CLIP, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Symmetric cross-entropy over the global batch's [batch, batch] similarities."""
        del rng, step  # deterministic
        image = model.encode_image(batch['image'])
        logits = model.scale() * image @ model.encode_text(batch['tokens']).T
        if 'negative_tokens' in batch:  # data.hard_negative_words
            negatives = model.scale() * image @ model.encode_text(batch['negative_tokens']).T
            loss = contrastive_loss(logits, negatives=negatives,
                                    negative_weights=batch['negative_mask'])
        else:
            loss = contrastive_loss(logits)
        ones = jnp.ones(logits.shape[0])
        return loss, {'loss': loss, 'accuracy': retrieval_hits(logits, ones) / logits.shape[0],
                      'logit_scale': model.scale()}


class CLIPTask(CLIPLoss):
    """Data, model, loss and pictures for CLIP."""

    def __init__(self, config, workdir: str):
        validate_config(config)  # before any data is built
        self.config, self.workdir = config, workdir
        d = config.data
        self.train_source = pipeline.without_phrases(pipeline.open_split(d, 'train'),
                                                     d.holdout_phrases, d.caption_key)
        self.eval_source = pipeline.open_split(d, 'eval')
        self.tokenizer = load_or_make_tokenizer(config, workdir, self.train_source)
        m = config.model
        self.num_patches = (d.image_size // m.patch_size) ** 2
        self.tokens_per_example = self.num_patches + 1 + m.context_length

    def build_model(self, rngs: nnx.Rngs) -> CLIP:
        return build_model(self.config, rngs)

    def model_flops_per_step(self, batch_size: int) -> float:
        """Training FLOPs of one step: both transformers, the patch embedding and the
        projections (maxtext convention; see pixelgen/flops.py)."""
        m = self.config.model
        vision = flops.igpt_forward_flops(m.vision_layers, m.vision_width, self.num_patches + 1,
                                          0, batch_size, m.mlp_ratio, causal=False)
        text = flops.igpt_forward_flops(m.text_layers, m.text_width, m.context_length, 0,
                                        batch_size, m.mlp_ratio, causal=True)
        patch = 2.0 * 3 * m.patch_size ** 2 * m.vision_width * self.num_patches * batch_size
        heads = 2.0 * (m.vision_width + m.text_width + batch_size) * m.embed_dim * batch_size
        return 3.0 * (vision + text + patch + heads)

    # Data ------------------------------------------------------------------------------
    def _prepare(self, features: dict) -> dict:
        return {'image': pipeline.to_rgb_square(features['image'], self.config.data.image_size),
                'caption': caption_text(features[self.config.data.caption_key])}

    def _tokenize(self, batch: dict) -> dict:
        out = {'image': batch['image'],  # uint8; the model scales it to [0, 1]
               'tokens': self.tokenizer.encode(list(batch['caption']),
                                               self.config.model.context_length,
                                               add_sot_eot=True).ids}
        if 'mask' in batch:
            out['mask'] = batch['mask']
        if 'negative' in batch:
            negatives = list(batch['negative'])
            out['negative_tokens'] = self.tokenizer.encode(
                negatives, self.config.model.context_length, add_sot_eot=True).ids
            out['negative_mask'] = np.array([bool(t) for t in negatives], np.int32)
        return out

    def _add_hard_negative(self, example: dict, rng: np.random.Generator) -> dict:
        d = self.config.data
        groups = [group.split(',') for group in d.hard_negative_words]
        return {**example, 'negative': hard_negative(example['caption'], groups,
                                                     d.holdout_phrases, rng)}

    def train_iterator(self, global_batch: int):
        d = self.config.data
        return pipeline.train_iterator(
            self.train_source, batch_size=global_batch, seed=self.config.seed,
            prepare=self._prepare, batch_map=self._tokenize, num_threads=d.num_threads,
            prefetch=d.prefetch,
            augment=self._add_hard_negative if d.get('hard_negative_words') else None)

    def eval_batches(self, per_host_batch: int, num_examples: int | None = None):
        return pipeline.eval_batches(self.eval_source, batch_size=per_host_batch,
                                     prepare=self._prepare, batch_map=self._tokenize,
                                     num_examples=num_examples)

    # Metrics ---------------------------------------------------------------------------
    def eval_sums(self, model: CLIP, batch: dict) -> dict[str, jax.Array]:
        """Per eval batch (contrasted within the batch): loss, retrieval hits, real rows."""
        logits = model(batch['image'], batch['tokens'])
        weights = batch['mask']
        return {'loss_sum': contrastive_loss(logits, weights) * weights.sum(),
                'hits': retrieval_hits(logits, weights), 'count': weights.sum()}

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        count = max(sums['count'], 1)
        return {'loss': sums['loss_sum'] / count, 'accuracy': sums['hits'] / count}

    # Pictures --------------------------------------------------------------------------
    def write_samples(self, model: CLIP, step: int, rng: jax.Array) -> str:
        """A grid: row i shows test image i, then the `samples_per_image` test images (of the
        first 64) whose embeddings best match caption i; the captions go in a .txt beside it."""
        del rng
        s, d = self.config.sampling, self.config.data
        pool = [self._prepare(self.eval_source[i]) for i in range(min(64, len(self.eval_source)))]
        pictures = np.stack([p['image'] for p in pool])
        captions = [p['caption'] for p in pool[:s.num_images]]
        tokens = self.tokenizer.encode(captions, self.config.model.context_length,
                                       add_sot_eot=True).ids
        scores = parallel.to_host(nnx.jit(lambda m, x, t: m.encode_text(t) @ m.encode_image(x).T)(
            model, jnp.asarray(pictures), jnp.asarray(tokens)))  # [captions, pool]
        best = np.argsort(-scores, axis=1)[:, :s.samples_per_image]
        rows = [np.concatenate([pictures[i:i + 1], pictures[best[i]]]) for i in range(len(best))]
        path = storage.join(self.workdir, 'samples', f'retrieval_{step:07d}.png')
        if jax.process_index() == 0:
            images.save_png(images.make_grid(rows, min_tile=max(64, d.image_size)), path)
            storage.write_text(path[:-4] + '.txt',
                               ''.join(f'row {i}: {c}\n' for i, c in enumerate(captions)))
        return path


Task = CLIPTask


def make_loss(config) -> CLIPLoss:
    del config
    return CLIPLoss()


def load_assets(config, workdir: str) -> dict:
    """{'tokenizer': the workdir's TextTokenizer} (what turns texts into `encode_text` ids)."""
    del config
    if not assets.check(workdir, TOKENIZER_FILE, what=TOKENIZER_IS, required=False):
        return {}  # a CLIP converted without its tokenizer: images only
    return {'tokenizer': load_tokenizer(storage.join(workdir, TOKENIZER_FILE))}
