"""The Image GPT task: palette-quantised pixels in raster order, next-pixel prediction.

It knows its data (images -> palette tokens), its model, its loss and metrics, and how to
show progress as pictures (completions: the top half given, the bottom half sampled).

Config keys beyond the model and data shapes:
  objective               'ar' (next pixel, causal) or 'bert' (15% of pixels masked,
                          bidirectional, loss on the masked ones only; masks come from the
                          step's RNG, so runs are reproducible and resume exactly)
  model.num_classes       0: no classifier; -1: a classification head with as many classes as
                          the dataset's tfds `label` feature (resolved at start-up and saved
                          in config.json); N: the same, checked against the dataset
  classifier_loss_weight  w in the fine-tuning objective L_GEN + w * L_CLF
  init_from, init_from_step   a pretrained workdir (and step; -1 = latest) whose parameters
                          start the run (see pixelgen/trainer.py); its palette is reused
  data.random_crop_padding, data.random_flip   training augmentation (pipeline.random_crop_flip)

BERT models are evaluated as in the paper: every example is masked 5 independent ways; the
loss averages the masked-pixel losses of the 5 and the class prediction is their modal one.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelgen import checkpoint, flops, images, parallel, sampling, storage
from pixelgen.config import ConfigDict, ConfigError, upgrade
from pixelgen.cpu.backend import use_native_attention
from pixelgen.data import palette as palette_lib
from pixelgen.data import pipeline
from pixelgen.models.igpt import OBJECTIVES, ImageGPT, bert_mask
from pixelgen.tasks import DTYPES, defaults, model_problems, raise_problems

BERT_EVAL_MASKS = 5  # P2 §4.6: BERT is evaluated as an ensemble over 5 masks


def base_config() -> ConfigDict:
    """Every key of an Image GPT config, with the values of configs/igpt_shapes.py; the iGPT
    configs and the converters start from it and change values only."""
    c = defaults.training_loop('igpt', total_steps=1200, batch_size=8,
                               checkpoint_every_steps=200, log_every_steps=50,
                               eval_every_steps=400, eval_examples=256, sample_every_steps=400)
    c.objective = 'ar'             # or 'bert' (15% masked pixels, bidirectional)
    # Fine-tuning (configs/igpt_finetune.py): minimise L_GEN + classifier_loss_weight * L_CLF.
    c.classifier_loss_weight = 1.0

    c.data = ConfigDict()
    c.data.dataset = 'shapes'
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.test_split = 'test'
    c.data.random_crop_padding = 0  # training augmentation: pad, then crop back at random
    c.data.random_flip = False      # training augmentation: mirror left-right half the time
    c.data.image_size = 20
    c.data.palette_size = 64
    c.data.palette_fit_images = 2000
    c.data.palette_fit_pixels_per_image = 64
    c.data.num_threads = 2
    c.data.prefetch = 4
    pipeline.add_stream_config(c.data, captions=False)  # webdataset: / parquet: (docs/data.md)

    c.model = ConfigDict()
    c.model.num_layers = 4
    c.model.width = 128
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.dtype = 'float32'
    c.model.attention = 'block_sparse'  # 'dense' (the reference), 'splash', 'cudnn', 'auto'
    c.model.remat = 'none'              # 'full' or 'dots': recompute blocks to save memory
    c.model.scan_layers = False         # True: stack the layers and scan (fast compiles)
    c.model.num_classes = 0             # classifier head: 0 none, -1 from the dataset's labels

    c.optimizer = defaults.adamw(learning_rate=3e-3, warmup_steps=100, b2=0.95,
                                 weight_decay=0.0)

    c.sampling = ConfigDict()
    c.sampling.num_images = 8
    c.sampling.samples_per_image = 2
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0           # 0 = off (the paper samples at temperature 1, no top-k)

    # The eval job's evaluators (pixelgen/evaluators/igpt.py), each with its --option values.
    c.evals = ConfigDict({'loss': {}, 'probe': {}, 'samples': {}})
    return c


def objective(config) -> str:
    """'ar' or 'bert'."""
    return config.objective


def num_classes(config) -> int:
    return config.model.num_classes


def validate_config(config) -> None:
    """Checks what would otherwise fail later (after data building or compiling)."""
    m, d = config.model, config.data
    problems = []
    if m.width % m.num_heads:
        problems.append(f'model.num_heads={m.num_heads} must divide model.width={m.width}')
    if not 2 <= d.palette_size <= 65535:
        problems.append(f'data.palette_size={d.palette_size} must be in [2, 65535]')
    if d.image_size < 2:
        problems.append(f'data.image_size={d.image_size} must be at least 2')
    if objective(config) not in OBJECTIVES:
        problems.append(f'objective={objective(config)!r} must be one of {OBJECTIVES}')
    if not isinstance(num_classes(config), int) or num_classes(config) < -1:
        problems.append(f'model.num_classes={num_classes(config)!r} must be 0 (no classifier), '
                        '-1 (as many as the dataset has) or a positive count')
    problems += model_problems(m)
    raise_problems(problems)


def validate_init_from(config) -> dict | None:
    """The pretrained workdir's config (as a dict) if `config.init_from` names one; errors if it
    does not exist or its model cannot initialise this config's."""
    init_from = config.init_from
    if not init_from:
        return None
    saved = storage.join(init_from, 'config.json')
    if not storage.is_file(saved):
        raise ConfigError(f'init_from={init_from!r} is not a pixelgen workdir (no {saved}). '
                          'Point --config.init_from at the workdir of a pretraining run.')
    pretrained = upgrade(json.loads(storage.read_text(saved)), saved)  # an older run's too
    wanted = {'objective': objective(config), 'data.image_size': config.data.image_size,
              'data.palette_size': config.data.palette_size,
              **{f'model.{k}': config.model[k]
                 for k in ('num_layers', 'width', 'num_heads', 'mlp_ratio')}}
    # model.scan_layers may differ: trainer.init_params_from converts the layer layout.
    differences = []
    for key, value in wanted.items():
        node = pretrained
        for part in key.split('.'):
            node = node[part]
        if node != value:
            differences.append(f'{key}: {init_from} has {node!r}, this config {value!r}')
    if differences:
        raise ConfigError('init_from: the pretrained model does not fit this config:\n  '
                          + '\n  '.join(differences)
                          + '\nSet these keys to the pretrained values (--config.<key>=...).')
    return pretrained


def _has_checkpoint(workdir: str) -> bool:
    path = checkpoint.checkpoint_dir(workdir)
    return any(name.isdigit() for name in storage.listdir(path))


def build_model(config, rngs: nnx.Rngs) -> ImageGPT:
    validate_config(config)
    if num_classes(config) == -1:
        raise ConfigError('model.num_classes=-1 is resolved from the dataset when training '
                          'starts; to build the model without data set it to the number of '
                          'classes, e.g. --config.model.num_classes=10.')
    m = config.model
    model = ImageGPT(vocab_size=config.data.palette_size, seq_len=config.data.image_size ** 2,
                     num_layers=m.num_layers, width=m.width, num_heads=m.num_heads,
                     mlp_ratio=m.mlp_ratio, dtype=DTYPES[m.dtype],
                     attention_impl=m.attention, remat=m.remat, objective=objective(config),
                     num_classes=num_classes(config),
                     scan_layers=m.get('scan_layers', False), rngs=rngs)
    return use_native_attention(model)


def load_or_fit_palette(config, workdir: str, open_train=None) -> np.ndarray:
    """The workdir's palette if it has one (a resumed run must keep its tokens), else the
    pretrained workdir's (`config.init_from`: its model knows only those tokens), else a new
    fit on the training split (`open_train()`, default: open it from the config). A workdir
    with checkpoints but without its palette, or with a changed one, is refused
    (`pixelgen.assets`): refitting would change what every token means."""
    centres = palette_lib.load_palette(workdir)
    if centres is None and config.init_from:
        centres = palette_lib.load_palette(config.init_from)
        if centres is None:
            raise ConfigError(f'init_from={config.init_from!r} holds no palette.npy, so its '
                              'tokens are unknown. Point it at an Image GPT workdir.')
        if jax.process_index() == 0:
            palette_lib.save_palette(centres, workdir)
    k = config.data.palette_size
    if centres is not None:
        if centres.shape != (k, 3):
            raise ConfigError(f'{workdir}/palette.npy has {centres.shape[0]} colours but '
                              f'config.data.palette_size={k}. Use a new --workdir or set '
                              f'--config.data.palette_size={centres.shape[0]}.')
        return centres
    d = config.data
    train_source = open_train() if open_train is not None else pipeline.open_split(d, 'train')
    print(f'[palette] fitting {k} colours on {d.palette_fit_images} {d.dataset} images...',
          flush=True)
    pixels = pipeline.sample_pixels(train_source, image_size=d.image_size,
                                    num_images=d.palette_fit_images,
                                    pixels_per_image=d.palette_fit_pixels_per_image,
                                    seed=config.seed)
    centres = palette_lib.fit_palette(pixels, k, seed=config.seed)
    if jax.process_index() == 0:
        palette_lib.save_palette(centres, workdir)
    return centres


def token_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array,
                                                                                  jax.Array]:
    """Cross-entropy in nats. logits [b, l, k], tokens [b, l], weights [b] (per example) or
    [b, l] (per position) -> (weighted sum, total weight)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [b, l]
    weights = jnp.broadcast_to(weights if weights.ndim == 2 else weights[:, None], nll.shape)
    return jnp.sum(nll * weights), jnp.sum(weights)


def example_keys(rng: jax.Array, tokens: jax.Array) -> jax.Array:
    """One key per example [batch], from `rng` and the example's tokens: an example gets the
    same BERT evaluation masks whatever batch, position or host it comes in."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.uint32)
    digest = jnp.sum(tokens.astype(jnp.uint32) * (positions * jnp.uint32(2654435761)
                                                  + jnp.uint32(1)), axis=1)  # wraps mod 2^32
    return jax.vmap(lambda d: jax.random.fold_in(rng, d))(digest)


def ensemble_masks(tokens: jax.Array, rng: jax.Array, mask_token: int,
                   num_masks: int = BERT_EVAL_MASKS) -> tuple[jax.Array, jax.Array]:
    """`num_masks` independent BERT maskings of every example: tokens [b, l] -> (inputs
    [num_masks, b, l], is_masked bool [num_masks, b, l])."""
    def one(k):
        keys = example_keys(jax.random.fold_in(rng, k), tokens)
        return jax.vmap(lambda key, row: bert_mask(row, key, mask_token))(keys, tokens)
    return jax.vmap(one)(jnp.arange(num_masks))


def map_over_masks(model: ImageGPT, fn, inputs: jax.Array):
    """fn(model, inputs[i]) for each of the stacked maskings, one at a time (memory of one)."""
    graphdef, state = nnx.split(model)
    return jax.lax.map(lambda x: fn(nnx.merge(graphdef, state), x), inputs)


def probe_features(model: ImageGPT, tokens: jax.Array, *, objective: str,
                   rng: jax.Array) -> jax.Array:
    """Linear-probe features of every layer: tokens [batch, length] -> [num_layers, batch,
    width] float32. 'ar': model.hidden_features(tokens). 'bert': their average over 5
    independent maskings of the input (P2 §4.6; each example's masks depend only on `rng`
    and the example, see `example_keys`)."""
    if objective != model.objective:
        raise ValueError(f'probe_features(objective={objective!r}) but the model was trained '
                         f'with {model.objective!r}.')
    if objective == 'ar':
        return model.hidden_features(tokens)
    inputs, _ = ensemble_masks(tokens, rng, model.mask_token)
    return map_over_masks(model, lambda m, x: m.hidden_features(x), inputs).mean(axis=0)


class ImageGPTLoss:
    """The training objective alone (no data needed): L_GEN, plus w * L_CLF when the model
    has a classification head."""

    def __init__(self, objective: str = 'ar', classifier_loss_weight: float = 1.0):
        self.objective = objective
        self.classifier_loss_weight = classifier_loss_weight

    def loss(self, model: ImageGPT, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Mean cross-entropy (nats/token) over the predicted pixels (all for 'ar', the masked
        ones for 'bert'), its bits per dim, and with a classifier the joint loss."""
        del step  # no in-loss schedule
        tokens = batch['tokens']
        if self.objective == 'bert':  # fresh masks every step, from the step's key
            inputs, is_masked = bert_mask(tokens, rng, model.mask_token)
            weights = is_masked.astype(jnp.float32)
        else:
            inputs, weights = tokens, jnp.ones(tokens.shape[0])
        logits, class_logits = model.logits_and_class_logits(inputs)
        total, count = token_loss(logits, tokens, weights)
        gen_loss = total / jnp.maximum(count, 1.0)
        metrics = {'loss': gen_loss, 'bits_per_dim': gen_loss / math.log(2)}
        if class_logits is None:
            return gen_loss, metrics
        clf_loss = optax.softmax_cross_entropy_with_integer_labels(
            class_logits, batch['label']).mean()
        loss = gen_loss + self.classifier_loss_weight * clf_loss
        accuracy = jnp.mean(jnp.argmax(class_logits, -1) == batch['label'])
        return loss, {**metrics, 'loss': loss, 'gen_loss': gen_loss, 'clf_loss': clf_loss,
                      'accuracy': accuracy}


class ImageGPTTask(ImageGPTLoss):
    """Data, model, loss and pictures for Image GPT.

    With `model.num_classes=-1` it sets `config.model.num_classes` from the dataset (so the
    saved config.json rebuilds the same classification head).
    """

    def __init__(self, config, workdir: str):
        validate_config(config)  # before any data is built
        if not _has_checkpoint(workdir):  # only a run that starts from init_from reads it
            validate_init_from(config)
        super().__init__(objective(config), config.classifier_loss_weight)
        self.config, self.workdir = config, workdir
        d = config.data
        self._sources: dict[str, object] = {}
        if num_classes(config):
            classes = pipeline.num_classes(self.train_source)
            if num_classes(config) == -1:
                config.model.num_classes = classes
            elif num_classes(config) != classes:
                raise ConfigError(f'model.num_classes={num_classes(config)} but {d.dataset!r} '
                                  f'has {classes} classes. Set it to {classes} or -1.')
        self.palette = load_or_fit_palette(config, workdir, lambda: self.train_source)
        self.seq_len = d.image_size ** 2
        self.tokens_per_example = self.seq_len

    def source(self, split: str):
        """A split of the dataset, opened on first use: a job that only samples (a converted
        workdir, say) never needs the dataset, and the DataError of one that does names it."""
        if split not in self._sources:
            d = self.config.data
            which = {d.train_split: 'train', d.eval_split: 'eval'}.get(split)
            self._sources[split] = (pipeline.open_split(d, which) if which else
                                    pipeline.open_source(d.dataset, split, d.data_dir))
        return self._sources[split]

    @property
    def train_source(self):
        return self.source(self.config.data.train_split)

    @property
    def eval_source(self):
        return self.source(self.config.data.eval_split)

    def build_model(self, rngs: nnx.Rngs) -> ImageGPT:
        return build_model(self.config, rngs)

    def model_flops_per_step(self, batch_size: int) -> float:
        """Training FLOPs of one step (maxtext convention; see pixelgen/flops.py)."""
        m = self.config.model
        return flops.igpt_flops_per_step(m.num_layers, m.width, self.seq_len,
                                         self.config.data.palette_size, batch_size,
                                         m.mlp_ratio, causal=self.objective == 'ar')

    # Data ------------------------------------------------------------------------------
    def _to_tokens(self, batch: dict) -> dict:
        out = {'tokens': palette_lib.quantize(batch['image'], self.palette).reshape(
            len(batch['image']), -1), 'label': batch['label']}
        if 'mask' in batch:
            out['mask'] = batch['mask']
        return out

    def train_iterator(self, global_batch: int):
        d = self.config.data
        crop, flip = d.get('random_crop_padding', 0), d.get('random_flip', False)
        return pipeline.train_iterator(
            self.train_source, batch_size=global_batch, seed=self.config.seed,
            prepare=pipeline.image_example(d.image_size), batch_map=self._to_tokens,
            augment=pipeline.random_crop_flip(crop, flip) if crop or flip else None,
            num_threads=d.num_threads, prefetch=d.prefetch)

    def eval_batches(self, per_host_batch: int, num_examples: int | None = None,
                     split: str | None = None):
        """Batches of `data.eval_split` (the held-out validation), or of `split`, e.g.
        `config.data.test_split`."""
        d = self.config.data
        source = self.source(split or d.eval_split)
        return pipeline.eval_batches(
            source, batch_size=per_host_batch, prepare=pipeline.image_example(d.image_size),
            batch_map=self._to_tokens, num_examples=num_examples)

    # Metrics ---------------------------------------------------------------------------
    def eval_sums(self, model: ImageGPT, batch: dict) -> dict[str, jax.Array]:
        """Sums over the batch's real rows (`mask`): predicted-pixel NLL and count, and with a
        classifier the correct predictions, class NLL and examples. BERT: over 5 maskings
        (`ensemble_masks`, seeded by config.seed), the class prediction being the modal one."""
        tokens, rows = batch['tokens'], batch['mask']
        if self.objective == 'ar':
            logits, class_logits = model.logits_and_class_logits(tokens)
            total, count = token_loss(logits, tokens, rows)
            votes = None if class_logits is None else jax.nn.one_hot(
                jnp.argmax(class_logits, -1), class_logits.shape[-1])
            class_nll = None if class_logits is None else (
                optax.softmax_cross_entropy_with_integer_labels(class_logits, batch['label']))
        else:
            inputs, is_masked = ensemble_masks(tokens, jax.random.PRNGKey(self.config.seed),
                                               model.mask_token)
            logits, class_logits = map_over_masks(
                model, lambda m, x: m.logits_and_class_logits(x), inputs)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[None])
            weights = is_masked * rows[None, :, None]
            total, count = jnp.sum(nll * weights), jnp.sum(weights)
            votes = None if class_logits is None else jax.nn.one_hot(
                jnp.argmax(class_logits, -1), class_logits.shape[-1]).sum(axis=0)
            class_nll = None if class_logits is None else (
                optax.softmax_cross_entropy_with_integer_labels(
                    class_logits, batch['label'][None]).mean(axis=0))
        sums = {'nll_sum': total, 'count': count}
        if votes is not None:  # modal prediction (ties go to the lower class id)
            correct = jnp.argmax(votes, -1) == batch['label']
            sums.update(correct=jnp.sum(correct * rows), class_nll_sum=jnp.sum(class_nll * rows),
                        examples=jnp.sum(rows))
        return sums

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        loss = sums['nll_sum'] / max(sums['count'], 1)
        summary = {'loss': loss, 'bits_per_dim': loss / math.log(2)}
        if 'examples' in sums:
            examples = max(sums['examples'], 1)
            summary.update(accuracy=sums['correct'] / examples,
                           clf_loss=sums['class_nll_sum'] / examples)
        return summary

    # Pictures --------------------------------------------------------------------------
    def completions(self, model: ImageGPT, rng: jax.Array, num_images: int,
                    samples_per_image: int) -> list[np.ndarray]:
        """Rows of uint8 images: originals, then `samples_per_image` completions of their top
        half, then the palette-quantised originals (what the model actually sees).
        BERT models cannot decode pixel by pixel: see `fill_ins`."""
        s = self.config.sampling
        side = self.config.data.image_size
        originals = self._originals(num_images)  # the same rows on every host
        tokens = palette_lib.quantize(originals, self.palette).reshape(num_images, -1)
        if self.objective == 'bert':
            return self.fill_ins(model, rng, originals, tokens, samples_per_image)
        half = (side // 2) * side
        rows = [originals]
        for i in range(samples_per_image):
            out = sampling.sample(model, jax.random.fold_in(rng, i), batch_size=num_images,
                                  prompt=jnp.asarray(tokens[:, :half]),
                                  temperature=s.temperature, top_k=s.top_k or None)
            rows.append(self.to_images(parallel.to_host(out)))
        rows.append(self.to_images(tokens))
        return rows

    def fill_ins(self, model: ImageGPT, rng: jax.Array, originals: np.ndarray,
                 tokens: np.ndarray, samples_per_image: int) -> list[np.ndarray]:
        """BERT rows: originals; then for each of `samples_per_image` random 15% maskings the
        masked input (masked pixels black) and the model's one-pass fill-in (sampled at the
        given temperature); then the palette-quantised originals."""
        temperature = self.config.sampling.temperature
        rows = [originals]
        for i in range(samples_per_image):
            mask_rng, sample_rng = jax.random.split(jax.random.fold_in(rng, i))
            inputs, is_masked = bert_mask(jnp.asarray(tokens), mask_rng, model.mask_token)
            logits = model(inputs) / max(temperature, 1e-6)
            guess = jax.random.categorical(sample_rng, logits)
            filled = parallel.to_host(jnp.where(is_masked, guess, tokens))
            masked = np.asarray(is_masked).reshape(originals.shape[:3])
            rows += [np.where(masked[..., None], 0, self.to_images(tokens)).astype(np.uint8),
                     self.to_images(filled)]
        rows.append(self.to_images(tokens))
        return rows

    def _originals(self, n: int) -> np.ndarray:
        prepare = pipeline.image_example(self.config.data.image_size)
        return np.stack([prepare(self.eval_source[i])['image'] for i in range(n)])

    def to_images(self, tokens: np.ndarray) -> np.ndarray:
        side = self.config.data.image_size
        return palette_lib.dequantize(np.asarray(tokens).reshape(-1, side, side), self.palette)

    def write_samples(self, model: ImageGPT, step: int, rng: jax.Array) -> str:
        s = self.config.sampling
        rows = self.completions(model, rng, s.num_images, s.samples_per_image)
        path = storage.join(self.workdir, 'samples', f'completions_{step:07d}.png')
        if jax.process_index() == 0:
            images.save_png(images.make_grid(rows), path)
        return path


Task = ImageGPTTask


def make_loss(config) -> ImageGPTLoss:
    validate_config(config)
    return ImageGPTLoss(objective(config), config.classifier_loss_weight)


def load_assets(config, workdir: str) -> dict:
    del config
    return {'palette': palette_lib.load_palette(workdir)}
