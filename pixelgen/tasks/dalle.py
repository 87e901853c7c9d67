"""The DALL·E task: captions (BPE) followed by dVAE image codes, next-token prediction.

Data: a codes dataset (`pixelgen.data.codes`, written by the dVAE encode job) at
`config.data.codes_dir`. The BPE tokenizer is trained on first use on `data.tokenizer_captions`
training captions, evenly spaced over the split, and kept in the workdir (`tokenizer.json`),
so a resumed run and `pixelgen.load` use the same ids. Captions are tokenised in the input
pipeline. Captions containing any of `config.data.holdout_phrases` are left out of training
(for testing unseen attribute combinations): at encoding (`dvae encode --exclude_phrases`),
so that start-up reads no caption beyond the tokenizer's sample, or else by a scan of the
split at start-up. Captions longer than `model.text_len` tokens are truncated; their number
among the sample is printed at start and the fraction logged as `text_truncated`.

Loss (the paper's §2.2): cross-entropy of the next text tokens and of the image codes, each
averaged over its own tokens, combined as text_weight · text + image_weight · image (1/8, 7/8).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelgen import assets, flops, images, parallel, storage
from pixelgen.config import ConfigDict, ConfigError
from pixelgen.cpu.backend import use_native_attention
from pixelgen.data import pipeline
from pixelgen.data.codes import codes_info, open_codes
from pixelgen.data.text import MIN_VOCAB_SIZE, TextTokenizer
from pixelgen.models.dalle import PAD_ID, DallE
from pixelgen.nn.masks import DALLE_KINDS, dalle_layer_kinds, dalle_mask
from pixelgen.sampling import generate
from pixelgen.tasks import DTYPES, defaults, model_problems, raise_problems

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_IS = "the tokenizer that gives the model's caption tokens their ids"


# One colour/shape pair per colour, each shape at least once: never seen in training.
SHAPES_HOLDOUT_PHRASES = ('red star', 'green circle', 'blue triangle', 'yellow square',
                          'purple diamond', 'orange cross', 'white star')


def base_config() -> ConfigDict:
    """Every key of a DALL·E config, with the values of configs/dalle_shapes.py; the DALL·E
    configs start from it and change values only."""
    c = defaults.training_loop('dalle', total_steps=1000, batch_size=16,
                               checkpoint_every_steps=250, log_every_steps=50,
                               eval_every_steps=500, eval_examples=128, sample_every_steps=500,
                               keep_checkpoints=2)
    c.dvae_workdir = 'runs/dvae_shapes'  # decodes samples ('' = show codes in false colour)

    c.data = ConfigDict()
    c.data.codes_dir = 'runs/shapes_codes'  # written by the dVAE encode job (data/codes.py)
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.holdout_phrases = SHAPES_HOLDOUT_PHRASES  # training drops captions holding any
    c.data.bpe_dropout = 0.1       # the paper's; training only
    # Captions the BPE is trained on, evenly spaced over the training split (0: every one).
    c.data.tokenizer_captions = 100_000
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.model = ConfigDict()
    c.model.text_vocab_size = 1024  # BPE vocabulary (trained on the captions; <= this)
    c.model.text_len = 16          # shapes captions are at most 14 tokens with [SOT] and [EOT]
    c.model.image_vocab_size = 128  # the codebook of configs/dvae_shapes.py
    c.model.grid_size = 16         # 64x64 images -> 16x16 codes
    c.model.num_layers = 4         # row, column, row, conv
    c.model.width = 128
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.layer_kinds = ()       # () = the paper's schedule; or e.g. ('causal',) * 4 (dense)
    c.model.conv_wraparound = False  # True: the conv window wraps across rows (pixelgen.nn.masks)
    c.model.dtype = 'float32'
    c.model.attention = 'block_sparse'  # 'dense' (the reference), 'splash', 'cudnn', 'auto'
    c.model.remat = 'none'

    c.loss = ConfigDict()
    c.loss.text_weight = 1 / 8     # the paper's weights; each part is a mean over its tokens
    c.loss.image_weight = 7 / 8
    c.loss.caption_dropout = 0.0   # > 0: learn p(image) too, for classifier-free guidance

    # The paper's AdamW betas, eps and weight decay.
    c.optimizer = defaults.adamw(learning_rate=2e-3, warmup_steps=50, b2=0.96,
                                 weight_decay=4.5e-2, min_learning_rate_ratio=0.05,
                                 grad_clip_norm=4.0)

    c.sampling = ConfigDict()
    c.sampling.num_captions = 4    # test captions per picture, one row each
    c.sampling.samples_per_caption = 4
    c.sampling.temperature = 1.0   # the paper: temperature 1, no top-k, no top-p
    c.sampling.top_k = 0           # 0 = off
    c.sampling.top_p = 1.0         # 1 = off

    # The eval job's evaluators (pixelgen/evaluators/dalle.py), each with its --option values;
    # attribute_accuracy is for models of `shapes` codes.
    c.evals = ConfigDict({'attribute_accuracy': {}})
    return c


def validate_config(config) -> None:
    """Checks what would otherwise fail later (after data loading or compiling)."""
    m, lo = config.model, config.loss
    problems = []
    if m.width % m.num_heads:
        problems.append(f'model.num_heads={m.num_heads} must divide model.width={m.width}')
    if m.text_len < 2:
        problems.append(f'model.text_len={m.text_len} must be at least 2 ([SOT] and [EOT])')
    if m.text_vocab_size < MIN_VOCAB_SIZE:
        problems.append(f'model.text_vocab_size={m.text_vocab_size} must be at least '
                        f'{MIN_VOCAB_SIZE} (a byte-level BPE: 256 bytes and 3 special tokens)')
    if not 2 <= m.image_vocab_size <= 65536:
        problems.append(f'model.image_vocab_size={m.image_vocab_size} must be in [2, 65536]')
    if m.layer_kinds and (len(m.layer_kinds) != m.num_layers
                          or any(k not in DALLE_KINDS for k in m.layer_kinds)):
        problems.append(f'model.layer_kinds={tuple(m.layer_kinds)} must be () (the paper\'s '
                        f'schedule) or {m.num_layers} entries from {DALLE_KINDS}')
    if m.attention == 'cudnn' and (sparse := sorted(set(layer_kinds(config)) - {'causal'})):
        problems.append(f"model.attention='cudnn' runs causal and full masks only, not the "
                        f"{sparse} layers; use model.attention='auto' (splash on TPU, "
                        "block_sparse elsewhere) or 'block_sparse'")
    if lo.text_weight < 0 or lo.image_weight < 0 or lo.text_weight + lo.image_weight <= 0:
        problems.append(f'loss.text_weight={lo.text_weight} and loss.image_weight='
                        f'{lo.image_weight} must be >= 0, not both 0')
    if not 0 <= config.data.bpe_dropout < 1:
        problems.append(f'data.bpe_dropout={config.data.bpe_dropout} must be in [0, 1)')
    problems += model_problems(m)
    raise_problems(problems)


def layer_kinds(config) -> tuple[str, ...]:
    return tuple(config.model.layer_kinds) or dalle_layer_kinds(config.model.num_layers)


def build_model(config, rngs: nnx.Rngs) -> DallE:
    validate_config(config)
    m = config.model
    model = DallE(text_vocab_size=m.text_vocab_size, image_vocab_size=m.image_vocab_size,
                  text_len=m.text_len, grid_size=m.grid_size, num_layers=m.num_layers,
                  width=m.width, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                  layer_kinds=layer_kinds(config), dtype=DTYPES[m.dtype],
                  attention_impl=m.attention, remat=m.remat,
                  conv_wraparound=m.conv_wraparound, rngs=rngs)
    return use_native_attention(model)


def num_params(config) -> int:
    """Parameter count of the config's model, from shapes alone (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: nnx.state(build_model(config, nnx.Rngs(0)), nnx.Param))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


# The objective ------------------------------------------------------------------------------
def nll_sums(model: DallE, batch: dict, weights: jax.Array) -> dict[str, jax.Array]:
    """Summed cross-entropies (nats) and token counts of the text and image parts.

    Text targets are the tokens after the first that are not padding; image targets are all
    codes. weights [b] (0 for padding rows) multiply each row."""
    text, image = batch['text'], batch['image']
    text_logits, image_logits = model(text, image)
    targets = text[:, 1:]
    text_w = (targets != PAD_ID) * weights[:, None]
    text_nll = optax.softmax_cross_entropy_with_integer_labels(text_logits, targets)
    image_nll = optax.softmax_cross_entropy_with_integer_labels(image_logits, image)
    return {'text_nll': jnp.sum(text_nll * text_w), 'text_count': jnp.sum(text_w),
            'image_nll': jnp.sum(image_nll * weights[:, None]),
            'image_count': jnp.sum(weights) * image.shape[1]}


def combine(sums: dict, text_weight: float, image_weight: float) -> dict:
    """{loss, text_loss, image_loss, image_bits_per_token}: each part is the mean over its
    own tokens (the paper normalises by the count of each kind), then weighted."""
    text_loss = sums['text_nll'] / jnp.maximum(sums['text_count'], 1)
    image_loss = sums['image_nll'] / jnp.maximum(sums['image_count'], 1)
    return {'loss': text_weight * text_loss + image_weight * image_loss,
            'text_loss': text_loss, 'image_loss': image_loss,
            'image_bits_per_token': image_loss / math.log(2)}


class DalleLoss:
    """The weighted text + image objective alone (no data needed)."""

    def __init__(self, config):
        self.text_weight = float(config.loss.text_weight)
        self.image_weight = float(config.loss.image_weight)
        self.caption_dropout = float(config.loss.caption_dropout)
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f'loss.caption_dropout={self.caption_dropout} must be in [0, 1): '
                              'the share of captions replaced by the empty caption.')

    def loss(self, model: DallE, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """With loss.caption_dropout p, each row's caption is the empty one (every position
        its pad) with probability p, so the model also learns p(image) alone: what
        classifier-free guidance (`sampling.generate(guidance_scale=...)`) contrasts with."""
        del step
        if self.caption_dropout:
            dropped = jax.random.bernoulli(rng, self.caption_dropout, (batch['text'].shape[0],))
            batch = {**batch, 'text': jnp.where(dropped[:, None], PAD_ID, batch['text'])}
        sums = nll_sums(model, batch, jnp.ones(batch['text'].shape[0]))
        metrics = combine(sums, self.text_weight, self.image_weight)
        if 'truncated' in batch:
            metrics['text_truncated'] = jnp.mean(batch['truncated'])
        return metrics['loss'], metrics


def make_loss(config) -> DalleLoss:
    return DalleLoss(config)


# Data -----------------------------------------------------------------------------------
def sampled_captions(source, count: int) -> list[str]:
    """`count` captions evenly spaced over `source` (all of them if count is 0 or more than
    it holds): what the BPE is trained on, read without scanning a large split."""
    n = len(source)
    if not count or count >= n:
        return [source[i]['caption'] for i in range(n)]
    return [source[int(i)]['caption'] for i in np.unique(np.linspace(0, n - 1, count).round())]


def excluded_at_encoding(info: dict, phrases) -> bool:
    """Whether the codes' training split was written without `phrases` (`dvae encode
    --exclude_phrases`), so that nothing is left to drop at start-up."""
    dropped = {p.lower() for p in info['metadata'].get('train_excluded_phrases', ())}
    return {p.lower() for p in phrases} <= dropped


def check_codes(config) -> dict:
    """The codes dataset's info, after checking it matches the model's grid and vocabulary."""
    info = codes_info(config.data.codes_dir)
    m = config.model
    if info['grid_size'] != m.grid_size or info['codebook_size'] != m.image_vocab_size:
        raise ConfigError(
            f'{config.data.codes_dir} holds {info["grid_size"]}x{info["grid_size"]} codes from '
            f'a codebook of {info["codebook_size"]}, but model.grid_size={m.grid_size} and '
            f'model.image_vocab_size={m.image_vocab_size}. Set --config.model.grid_size='
            f'{info["grid_size"]} --config.model.image_vocab_size={info["codebook_size"]}.')
    return info


def load_or_train_tokenizer(config, workdir: str,
                            captions: Callable[[], list[str]]) -> TextTokenizer:
    """The workdir's tokenizer if it has one (resumed runs keep their ids); else, fine-tuning
    (`config.init_from`), the pretrained run's, copied, since its embeddings are indexed by
    those ids; else a new one trained on `captions()` (by process 0; the others read its
    file)."""
    path = storage.join(workdir, TOKENIZER_FILE)
    existed = assets.check(workdir, TOKENIZER_FILE, what=TOKENIZER_IS)  # or refused, if changed
    if not existed and config.init_from:
        source = storage.join(config.init_from, TOKENIZER_FILE)
        if not storage.is_file(source):
            raise ConfigError(f'config.init_from={config.init_from!r} has no {TOKENIZER_FILE}, '
                              'and fine-tuning must keep the token ids its text embeddings '
                              'were trained with: pass the workdir of a DALL·E run.')
        if jax.process_index() == 0:
            print(f'[dalle] fine-tuning: the tokenizer of {config.init_from}', flush=True)
            storage.write_bytes(path, storage.read_bytes(source))
            assets.record(workdir, TOKENIZER_FILE)
    elif not existed and jax.process_index() == 0:
        texts = captions()
        print(f'[dalle] training a BPE tokenizer (vocab <= {config.model.text_vocab_size}) on '
              f'{len(texts)} captions...', flush=True)
        TextTokenizer.train(texts, vocab_size=config.model.text_vocab_size).save(path)
        assets.record(workdir, TOKENIZER_FILE)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('dalle_tokenizer')
    tokenizer = TextTokenizer.load(path)
    if tokenizer.vocab_size > config.model.text_vocab_size or tokenizer.pad_id != PAD_ID:
        raise ConfigError(f'{path} has {tokenizer.vocab_size} tokens (pad id '
                          f'{tokenizer.pad_id}), which model.text_vocab_size='
                          f'{config.model.text_vocab_size} cannot hold. Use a new --workdir or '
                          f'--config.model.text_vocab_size={tokenizer.vocab_size}.')
    return tokenizer


def encode_example(tokenizer: TextTokenizer, text_len: int, dropout: float):
    """Per-example map: codes dataset record -> {'text' [T], 'image' [N], 'truncated'}."""
    def prepare(record: dict) -> dict:
        encoded = tokenizer.encode([record['caption']], text_len, dropout=dropout,
                                   add_sot_eot=True)
        return {'text': encoded.ids[0], 'image': record['codes'].reshape(-1).astype(np.int32),
                'truncated': np.float32(encoded.num_truncated)}
    return prepare


def render_codes(codes: np.ndarray, dvae=None) -> np.ndarray:
    """codes [n, g, g] -> uint8 pictures: decoded by the dVAE model if given, otherwise a
    false-colour map of the code ids (one fixed colour per code)."""
    codes = np.asarray(codes)
    if dvae is not None:
        pictures = np.asarray(decode_codes(dvae, jnp.asarray(codes, jnp.int32)))
        return np.clip(np.round(pictures * 255), 0, 255).astype(np.uint8)
    return _false_colours()[codes]


@functools.cache
def _false_colours() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (65536, 3), np.uint8)


@nnx.jit
def decode_codes(dvae, codes: jax.Array) -> jax.Array:
    """A dVAE's images float [n, h, w, 3] in [0, 1] of codes int [n, g, g]."""
    return dvae.decode(codes)


class DalleTask(DalleLoss):
    """Data, model, loss and pictures for DALL·E."""

    def __init__(self, config, workdir: str):
        validate_config(config)  # before any data is read
        super().__init__(config)
        self.config, self.workdir = config, workdir
        d, m = config.data, config.model
        info = check_codes(config)
        source = open_codes(d.codes_dir, d.train_split)
        self.eval_source = open_codes(d.codes_dir, d.eval_split)
        # The held-out pairs leave the training data at encoding (nothing to read here) or,
        # for codes encoded without them, by a scan of the split's captions.
        if d.train_split == 'train' and excluded_at_encoding(info, d.holdout_phrases):
            self.train_source, dropped = source, 'at encoding'
        else:
            self.train_source = pipeline.without_phrases(source, d.holdout_phrases)
            dropped = f'{len(source) - len(self.train_source)} here'
        sample = functools.cache(lambda: sampled_captions(self.train_source,
                                                          d.tokenizer_captions))
        self.tokenizer = load_or_train_tokenizer(config, workdir, sample)
        if jax.process_index() == 0:
            truncated = self.tokenizer.encode(sample(), m.text_len,
                                              add_sot_eot=True).num_truncated
            print(f'[dalle] {len(self.train_source)} training examples (data.holdout_phrases '
                  f'dropped {dropped}); {truncated} of {len(sample())} sampled captions are '
                  f'longer than model.text_len={m.text_len} tokens and are truncated; '
                  f'tokenizer vocabulary {self.tokenizer.vocab_size}.', flush=True)
        self.seq_len = m.text_len + m.grid_size ** 2
        self.tokens_per_example = self.seq_len
        self._dvae = None

    def build_model(self, rngs: nnx.Rngs) -> DallE:
        return build_model(self.config, rngs)

    def model_flops_per_step(self, batch_size: int) -> float:
        """Training FLOPs of one step: matmuls as for any transformer, attention over the
        (query, key) pairs that each layer's mask allows (3 × forward)."""
        m = self.config.model
        matmul = 2.0 * flops.igpt_matmul_params(m.num_layers, m.width,
                                                m.text_vocab_size + m.image_vocab_size,
                                                m.mlp_ratio) * self.seq_len
        attention = sum(4.0 * m.width * _allowed_pairs(kind, m.text_len, m.grid_size)
                        for kind in layer_kinds(self.config))
        return 3.0 * batch_size * (matmul + attention)

    def train_iterator(self, global_batch: int):
        d = self.config.data
        return pipeline.train_iterator(
            self.train_source, batch_size=global_batch, seed=self.config.seed,
            prepare=encode_example(self.tokenizer, self.config.model.text_len, d.bpe_dropout),
            num_threads=d.num_threads, prefetch=d.prefetch)

    def eval_batches(self, per_host_batch: int, num_examples: int | None = None):
        return pipeline.eval_batches(
            self.eval_source, batch_size=per_host_batch,
            prepare=encode_example(self.tokenizer, self.config.model.text_len, 0.0),
            num_examples=num_examples)

    def eval_sums(self, model: DallE, batch: dict) -> dict[str, jax.Array]:
        return nll_sums(model, batch, batch['mask'])

    def eval_summary(self, sums: dict[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in combine(sums, self.text_weight,
                                                self.image_weight).items()}

    # Pictures --------------------------------------------------------------------------
    def dvae(self):
        """The dVAE model of config.dvae_workdir (None if unset or not trained yet)."""
        path = self.config.dvae_workdir
        if self._dvae is None and path and storage.is_dir(storage.join(path, 'checkpoints')):
            import pixelgen
            self._dvae = pixelgen.load(path).model
        return self._dvae

    def write_samples(self, model: DallE, step: int, rng: jax.Array) -> str:
        """One row per test caption: its dataset image (the codes, decoded), then samples."""
        s, m = self.config.sampling, self.config.model
        records = [self.eval_source[i] for i in range(s.num_captions)]
        text = self.tokenizer.encode([r['caption'] for r in records], m.text_len,
                                     add_sot_eot=True).ids
        text = np.repeat(text, s.samples_per_caption, axis=0)
        codes = parallel.to_host(generate(
            model, rng, jnp.asarray(text), temperature=s.temperature, top_k=s.top_k or None,
            top_p=s.top_p if s.top_p < 1 else None))
        side = m.grid_size
        originals = render_codes(np.stack([r['codes'] for r in records]), self.dvae())
        samples = render_codes(codes.reshape(-1, side, side), self.dvae()).reshape(
            s.num_captions, s.samples_per_caption, *originals.shape[1:])
        rows = [np.concatenate([o[None], row]) for o, row in zip(originals, samples,
                                                                  strict=True)]
        path = storage.join(self.workdir, 'samples', f'generations_{step:07d}.png')
        if jax.process_index() == 0:
            images.save_png(images.make_grid(rows), path)
            storage.write_text(path[:-4] + '.txt', '\n'.join(r['caption'] for r in records)
                               + '\n')
        return path


@functools.cache
def _allowed_pairs(kind: str, text_len: int, grid_size: int) -> int:
    return int(dalle_mask(kind, text_len, grid_size).sum())


Task = DalleTask


def load_assets(config, workdir: str) -> dict:
    del config
    if not assets.check(workdir, TOKENIZER_FILE, what=TOKENIZER_IS, required=False):
        return {}  # pixelgen.sample says what it needs
    return {'tokenizer': TextTokenizer.load(storage.join(workdir, TOKENIZER_FILE))}
