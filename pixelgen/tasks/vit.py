"""The ViT task: supervised image classification (Dosovitskiy et al. 2021).

It knows its data (RGB images and the class-label feature `data.label_key`), its model
(pixelgen.models.vit), the cross-entropy loss, top-1 accuracy, and a picture of progress (a
grid of test images with the predicted class of each in a .txt beside it).

Config keys beyond the model and data shapes:
  data.label_key          the tfds ClassLabel feature to predict (shapes: 'shape')
  data.mean, data.std     per-channel statistics the model normalises images in [0, 1] with
  model.num_classes       -1: as many as the dataset's label feature has (resolved at start-up
                          and saved in config.json); N: the same, checked against the dataset
  model.pool              'token' (class token) or 'mean' (global average pooling)
  model.representation_size   0: a linear head (fine-tuning); N: the paper's pre-training head
  init_from, init_from_step   a workdir (and step; -1 = latest) whose parameters start the
                          run. At another data.image_size its position embeddings are
                          resampled bilinearly (`adapt_pretrained`); a head of another
                          number of classes is left out and starts at zero.
  data.random_crop_padding, data.random_flip   training augmentation
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelgen import flops, images, parallel, storage
from pixelgen.config import ConfigDict, ConfigError
from pixelgen.cpu.backend import use_native_attention
from pixelgen.data import pipeline
from pixelgen.models.clip import POOLS
from pixelgen.models.vit import ViT, resample_position_embedding
from pixelgen.nn.transformer import ACTIVATIONS
from pixelgen.tasks import DTYPES, defaults, model_problems, raise_problems


def base_config() -> ConfigDict:
    """Every key of a ViT config, with the values of configs/vit_shapes.py; the ViT configs
    and the hf-vit converter start from it and change values only."""
    c = defaults.training_loop('vit', total_steps=2400, batch_size=64,
                               checkpoint_every_steps=1200, log_every_steps=50,
                               eval_every_steps=1200, eval_examples=512, sample_every_steps=2400)

    c.data = ConfigDict()
    c.data.dataset = 'shapes'
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.image_size = 64           # shapes' own size: 8x8 patches of 8 pixels
    c.data.label_key = 'shape'     # shapes: also 'color', 'size'; most tfds datasets: 'label'
    c.data.mean = (0.5, 0.5, 0.5)  # images in [0, 1] -> (x - mean) / std inside the model
    c.data.std = (0.5, 0.5, 0.5)
    c.data.random_crop_padding = 0
    c.data.random_flip = True      # shapes' classes survive a mirror image
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.model = ConfigDict()
    c.model.patch_size = 8
    c.model.width = 64
    c.model.num_layers = 3
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.num_classes = -1
    c.model.pool = 'token'
    c.model.representation_size = 0
    c.model.norm_eps = 1e-6
    c.model.activation = 'gelu'
    c.model.dtype = 'float32'
    c.model.attention = 'block_sparse'  # or 'dense' (the reference)
    c.model.remat = 'none'

    c.optimizer = defaults.adamw(learning_rate=1e-3, warmup_steps=50, b2=0.999,
                                 weight_decay=0.1)

    c.sampling = ConfigDict()  # the prediction grid of write_samples
    c.sampling.num_images = 16

    # The eval job's evaluators (pixelgen/evaluators/vit.py), each with its --option values.
    c.evals = ConfigDict({'accuracy': {}})
    return c


def validate_config(config) -> None:
    """Checks what would otherwise fail later (after data building or compiling)."""
    m, d = config.model, config.data
    problems = []
    if d.image_size % m.patch_size:
        problems.append(f'data.image_size={d.image_size} must be divisible by '
                        f'model.patch_size={m.patch_size} (e.g. data.image_size='
                        f'{max(1, round(d.image_size / m.patch_size)) * m.patch_size})')
    if m.width % m.num_heads:
        problems.append(f'model.num_heads={m.num_heads} must divide model.width={m.width}')
    if m.pool not in POOLS:
        problems.append(f'model.pool={m.pool!r} must be one of {POOLS}')
    if m.activation not in ACTIVATIONS:
        problems.append(f'model.activation={m.activation!r} must be one of {sorted(ACTIVATIONS)}')
    if not isinstance(m.num_classes, int) or m.num_classes == 0 or m.num_classes < -1:
        problems.append(f'model.num_classes={m.num_classes!r} must be -1 (as many as the '
                        'dataset has) or a positive count')
    for key in ('mean', 'std'):
        if len(d[key]) != 3:
            problems.append(f'data.{key}={tuple(d[key])} must hold 3 values (R, G, B)')
    if any(s <= 0 for s in d.std):
        problems.append(f'data.std={tuple(d.std)} must be positive')
    problems += model_problems(m)
    raise_problems(problems)


def build_model(config, rngs: nnx.Rngs) -> ViT:
    validate_config(config)
    m, d = config.model, config.data
    if m.num_classes == -1:
        raise ConfigError('model.num_classes=-1 is resolved from the dataset when training '
                          'starts; to build the model without data set it to the number of '
                          'classes, e.g. --config.model.num_classes=6.')
    model = ViT(image_size=d.image_size, patch_size=m.patch_size, width=m.width,
                num_layers=m.num_layers, num_heads=m.num_heads, num_classes=m.num_classes,
                mlp_ratio=m.mlp_ratio, pool=m.pool, representation_size=m.representation_size,
                image_mean=tuple(d.mean), image_std=tuple(d.std), norm_eps=m.norm_eps,
                activation=m.activation, dtype=DTYPES[m.dtype], attention_impl=m.attention,
                remat=m.remat, rngs=rngs)
    return use_native_attention(model)


def _is(path, name: str) -> bool:
    return name in jax.tree_util.keystr(path)


def adapt_pretrained(config, loaded: dict, wanted: dict) -> dict:
    """Pretrained parameters {path: array} made to fit this run's {path: shape}: position
    embeddings of another grid are resampled bilinearly to this one (fine-tuning at another
    resolution, paper §3.2), and a head of another shape is left out, so it starts at zero
    (fine-tuning on other classes). Called by the trainer for `config.init_from`."""
    out = dict(loaded)
    for path, shape in wanted.items():
        if path not in loaded or tuple(loaded[path].shape) == tuple(shape):
            continue
        if _is(path, 'position_embedding'):
            class_token = config.model.pool == 'token'
            grid = int(round((shape[0] - class_token) ** 0.5))
            out[path] = resample_position_embedding(jnp.asarray(loaded[path]), grid,
                                                    class_token=class_token)
            if jax.process_index() == 0:
                print(f'[vit] position embeddings resampled bilinearly {tuple(loaded[path].shape)}'
                      f' -> {tuple(shape)}', flush=True)
        elif _is(path, "'head'"):
            del out[path]
    return out


def class_names(source, label_key: str) -> list[str]:
    """The names of the dataset's label classes (their ids where the feature has none)."""
    feature = source.dataset_info.features[label_key]
    names = getattr(feature, 'names', None)
    return list(names) if names else [str(i) for i in range(feature.num_classes)]


class ViTLoss:
    """Softmax cross-entropy on the labels (no data needed)."""

    def loss(self, model: ViT, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        del rng, step  # deterministic
        logits = model(batch['image'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
        return loss, {'loss': loss, 'accuracy': accuracy}


class ViTTask(ViTLoss):
    """Data, model, loss and pictures for ViT classification.

    With `model.num_classes=-1` it sets `config.model.num_classes` from the dataset's
    `data.label_key` feature (so the saved config.json rebuilds the same head)."""

    def __init__(self, config, workdir: str):
        validate_config(config)  # before any data is built
        self.config, self.workdir = config, workdir
        d, m = config.data, config.model
        self.train_source = pipeline.open_source(d.dataset, d.train_split, d.data_dir)
        self.eval_source = pipeline.open_source(d.dataset, d.eval_split, d.data_dir)
        classes = pipeline.num_classes(self.train_source, d.label_key)
        if m.num_classes == -1:
            m.num_classes = classes
        elif m.num_classes != classes:
            raise ConfigError(f'model.num_classes={m.num_classes} but {d.dataset!r} has '
                              f'{classes} classes of {d.label_key!r}. Set it to {classes} or -1.')
        self.class_names = class_names(self.train_source, d.label_key)
        self.num_patches = (d.image_size // m.patch_size) ** 2
        self.tokens_per_example = self.num_patches + (m.pool == 'token')

    def build_model(self, rngs: nnx.Rngs) -> ViT:
        return build_model(self.config, rngs)

    def model_flops_per_step(self, batch_size: int) -> float:
        """Training FLOPs of one step: the encoder, patch embedding and head (maxtext
        convention; see pixelgen/flops.py)."""
        m = self.config.model
        encoder = flops.igpt_forward_flops(m.num_layers, m.width, self.tokens_per_example, 0,
                                           batch_size, m.mlp_ratio, causal=False)
        patch = 2.0 * 3 * m.patch_size ** 2 * m.width * self.num_patches * batch_size
        head = 2.0 * (m.representation_size or m.width) * m.num_classes * batch_size
        return 3.0 * (encoder + patch + head)

    # Data ------------------------------------------------------------------------------
    def _prepare(self, features: dict) -> dict:
        d = self.config.data
        return {'image': pipeline.to_rgb_square(features['image'], d.image_size),
                'label': np.int32(features[d.label_key])}

    def train_iterator(self, global_batch: int):
        d = self.config.data
        crop, flip = d.random_crop_padding, d.random_flip
        return pipeline.train_iterator(
            self.train_source, batch_size=global_batch, seed=self.config.seed,
            prepare=self._prepare,
            augment=pipeline.random_crop_flip(crop, flip) if crop or flip else None,
            num_threads=d.num_threads, prefetch=d.prefetch)

    def eval_batches(self, per_host_batch: int, num_examples: int | None = None,
                     split: str | None = None):
        """Batches (uint8 'image', 'label', 'mask') of `data.eval_split`, or of `split`."""
        d = self.config.data
        source = self.eval_source if split in (None, d.eval_split) else pipeline.open_source(
            d.dataset, split, d.data_dir)
        return pipeline.eval_batches(source, batch_size=per_host_batch, prepare=self._prepare,
                                     num_examples=num_examples)

    # Metrics ---------------------------------------------------------------------------
    def eval_sums(self, model: ViT, batch: dict) -> dict[str, jax.Array]:
        """Sums over the batch's real rows (`mask`): correct top-1 predictions, NLL, count."""
        logits = model(batch['image'])
        rows = batch['mask']
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
        correct = jnp.argmax(logits, -1) == batch['label']
        return {'correct': jnp.sum(correct * rows), 'nll_sum': jnp.sum(nll * rows),
                'count': jnp.sum(rows)}

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        count = max(sums['count'], 1)
        return {'loss': sums['nll_sum'] / count, 'accuracy': sums['correct'] / count}

    # Pictures --------------------------------------------------------------------------
    def write_samples(self, model: ViT, step: int, rng: jax.Array) -> str:
        """A grid of the first `sampling.num_images` test images; a .txt beside it gives the
        predicted and the true class of each."""
        del rng
        n = min(self.config.sampling.num_images, len(self.eval_source))
        pool = [self._prepare(self.eval_source[i]) for i in range(n)]
        pictures = np.stack([p['image'] for p in pool])
        logits = parallel.to_host(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pictures)))
        predicted = np.argmax(logits, axis=-1)
        path = storage.join(self.workdir, 'samples', f'predictions_{step:07d}.png')
        if jax.process_index() == 0:
            side = max(64, self.config.data.image_size)
            per_row = max(1, int(np.ceil(np.sqrt(n))))
            rows = [pictures[i:i + per_row] for i in range(0, n, per_row)]
            images.save_png(images.make_grid(rows, min_tile=side), path)
            storage.write_text(path[:-4] + '.txt', ''.join(
                f'image {i}: predicted {self.class_names[p]}, true '
                f'{self.class_names[int(e["label"])]}\n'
                for i, (p, e) in enumerate(zip(predicted, pool, strict=True))))
        return path


Task = ViTTask


def make_loss(config) -> ViTLoss:
    validate_config(config)
    return ViTLoss()
