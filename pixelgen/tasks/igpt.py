"""The Image GPT task: palette-quantised pixels in raster order, next-pixel prediction.

It knows its data (images -> palette tokens), its model, its loss and metrics, and how to
show progress as pictures (completions: the top half given, the bottom half sampled).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelgen import flops, images, parallel, sampling
from pixelgen.config import ConfigError
from pixelgen.data import palette as palette_lib
from pixelgen.data import pipeline
from pixelgen.models.igpt import ImageGPT
from pixelgen.nn.attention import IMPLEMENTATIONS
from pixelgen.nn.transformer import REMAT_POLICIES

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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
    if m.dtype not in DTYPES:
        problems.append(f'model.dtype={m.dtype!r} must be one of {sorted(DTYPES)}')
    if m.attention not in IMPLEMENTATIONS:
        problems.append(f'model.attention={m.attention!r} must be one of {IMPLEMENTATIONS}')
    if m.remat not in REMAT_POLICIES:
        problems.append(f'model.remat={m.remat!r} must be one of {sorted(REMAT_POLICIES)}')
    if problems:
        raise ConfigError('Invalid config:\n  ' + '\n  '.join(problems)
                          + '\nFix them with --config.<key>=<value>.')


def build_model(config, rngs: nnx.Rngs) -> ImageGPT:
    validate_config(config)
    m = config.model
    return ImageGPT(vocab_size=config.data.palette_size, seq_len=config.data.image_size ** 2,
                    num_layers=m.num_layers, width=m.width, num_heads=m.num_heads,
                    mlp_ratio=m.mlp_ratio, dtype=DTYPES[m.dtype],
                    attention_impl=m.attention, remat=m.remat, rngs=rngs)


def load_or_fit_palette(config, workdir: str, train_source=None) -> np.ndarray:
    """The workdir's palette if it has one (a resumed run must keep its tokens), else a new fit."""
    centres = palette_lib.load_palette(workdir)
    k = config.data.palette_size
    if centres is not None:
        if centres.shape != (k, 3):
            raise ValueError(f'{workdir}/palette.npy has {centres.shape[0]} colours but '
                             f'config.data.palette_size={k}. Use a new --workdir or set '
                             f'--config.data.palette_size={centres.shape[0]}.')
        return centres
    d = config.data
    if train_source is None:
        train_source = pipeline.open_source(d.dataset, d.train_split, d.data_dir)
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
    """Cross-entropy in nats. logits [b, l, k], tokens [b, l], weights [b] -> (sum, count)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [b, l]
    return jnp.sum(nll * weights[:, None]), jnp.sum(weights) * tokens.shape[1]


class ImageGPTLoss:
    """The autoregressive objective alone (no data needed)."""

    def loss(self, model: ImageGPT, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Mean next-token cross-entropy (nats/token) and its bits per dim (per token)."""
        del rng, step  # the autoregressive objective is deterministic
        tokens = batch['tokens']
        total, count = token_loss(model(tokens), tokens, jnp.ones(tokens.shape[0]))
        loss = total / count
        return loss, {'loss': loss, 'bits_per_dim': loss / math.log(2)}


class ImageGPTTask(ImageGPTLoss):
    """Data, model, loss and pictures for Image GPT."""

    def __init__(self, config, workdir: str):
        validate_config(config)  # before any data is built
        self.config, self.workdir = config, workdir
        d = config.data
        self.train_source = pipeline.open_source(d.dataset, d.train_split, d.data_dir)
        self.eval_source = pipeline.open_source(d.dataset, d.eval_split, d.data_dir)
        self.palette = load_or_fit_palette(config, workdir, self.train_source)
        self.seq_len = d.image_size ** 2
        self.tokens_per_example = self.seq_len

    def build_model(self, rngs: nnx.Rngs) -> ImageGPT:
        return build_model(self.config, rngs)

    def model_flops_per_step(self, batch_size: int) -> float:
        """Training FLOPs of one step (maxtext convention; see pixelgen/flops.py)."""
        m = self.config.model
        return flops.igpt_flops_per_step(m.num_layers, m.width, self.seq_len,
                                         self.config.data.palette_size, batch_size,
                                         m.mlp_ratio, causal=True)

    # Data ------------------------------------------------------------------------------
    def _to_tokens(self, batch: dict) -> dict:
        out = {'tokens': palette_lib.quantize(batch['image'], self.palette).reshape(
            len(batch['image']), -1), 'label': batch['label']}
        if 'mask' in batch:
            out['mask'] = batch['mask']
        return out

    def train_iterator(self, global_batch: int):
        d = self.config.data
        return pipeline.train_iterator(
            self.train_source, batch_size=global_batch, seed=self.config.seed,
            prepare=pipeline.image_example(d.image_size), batch_map=self._to_tokens,
            num_threads=d.num_threads, prefetch=d.prefetch)

    def eval_batches(self, per_host_batch: int, num_examples: int | None = None):
        return pipeline.eval_batches(
            self.eval_source, batch_size=per_host_batch,
            prepare=pipeline.image_example(self.config.data.image_size),
            batch_map=self._to_tokens, num_examples=num_examples)

    # Metrics ---------------------------------------------------------------------------
    def eval_sums(self, model: ImageGPT, batch: dict) -> dict[str, jax.Array]:
        total, count = token_loss(model(batch['tokens']), batch['tokens'], batch['mask'])
        return {'nll_sum': total, 'count': count}

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        loss = sums['nll_sum'] / max(sums['count'], 1)
        return {'loss': loss, 'bits_per_dim': loss / math.log(2)}

    # Pictures --------------------------------------------------------------------------
    def completions(self, model: ImageGPT, rng: jax.Array, num_images: int,
                    samples_per_image: int) -> list[np.ndarray]:
        """Rows of uint8 images: originals, then `samples_per_image` completions of their top
        half, then the palette-quantised originals (what the model actually sees)."""
        s = self.config.sampling
        side = self.config.data.image_size
        originals = self._originals(num_images)  # the same rows on every host
        tokens = palette_lib.quantize(originals, self.palette).reshape(num_images, -1)
        half = (side // 2) * side
        rows = [originals]
        for i in range(samples_per_image):
            out = sampling.sample(model, jax.random.fold_in(rng, i), batch_size=num_images,
                                  prompt=jnp.asarray(tokens[:, :half]),
                                  temperature=s.temperature, top_k=s.top_k or None)
            rows.append(self.to_images(parallel.to_host(out)))
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
        path = os.path.join(self.workdir, 'samples', f'completions_{step:07d}.png')
        if jax.process_index() == 0:
            images.save_png(images.make_grid(rows), path)
        return path


Task = ImageGPTTask


def make_loss(config) -> ImageGPTLoss:
    del config
    return ImageGPTLoss()


def load_assets(config, workdir: str) -> dict:
    del config
    return {'palette': palette_lib.load_palette(workdir)}
