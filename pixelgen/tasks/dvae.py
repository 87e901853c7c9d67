"""The dVAE task of DALL·E (Ramesh et al. 2021, App. A): images -> a grid of K codes -> images.

Training maximises the evidence lower bound with a Gumbel-softmax relaxation of the codes:

    z ~ softmax((logits + Gumbel) / tau)                 tau: cosine 1 -> 1/16
    loss = -log p(x | z) / (h w 3) + beta KL(q || U_K) / (h w 3)
                                                         beta: cosine 0 -> 6.6

with a logit-Laplace likelihood of the pixels mapped into [eps, 1 - eps], eps = 0.1. Both are
divided by the number of sub-pixels as in the paper, so KL per latent is weighted beta/f^2/3.

Options for short runs (off in the paper config; on in configs/dvae_shapes.py, whose runs are
3000x shorter than the paper's). In a short run the ELBO settles where every position spreads
its posterior over many codes that decode alike, so the argmax codes that `encode` returns
(as the paper does) all name one code and carry no picture:
  loss.straight_through   the decoder sees the one-hot of the Gumbel sample; gradients flow
                          through the relaxation (hard forward, soft backward).
  loss.code_entropy_weight  + w mean H(q) (nats per latent), ramped like beta: rewards
                          confident posteriors, so the argmax is the code the decoder saw.
  loss.diversity_weight   + w KL(mean_batch q || U_K): keeps the batch using many codes, which
                          confident posteriors alone would collapse onto a few.
  loss.laplace_scale      > 0: a fixed logit-Laplace scale b instead of the decoder's ln b.
                          A learned b grows where the decoder is unsure (small objects), which
                          silences exactly the errors the codes should fix.
  loss.likelihood         'logit_laplace' (the paper) or 'gaussian': a Gaussian of fixed
                          std loss.gaussian_scale on the mapped pixels, its mean the sigmoid of
                          the decoder's location channels (the ln b channels go unused). Its
                          squared error keeps a gradient proportional to each colour error,
                          where the Laplace's |error| gives every error the same pull; in short
                          runs only the Gaussian made codes carry the objects' hue.
With equal weights the two terms are w (log K - I(position; code)): they maximise the mutual
information between what the encoder sees and the code it picks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelgen import images, parallel, storage
from pixelgen.config import ConfigDict
from pixelgen.data import pipeline
from pixelgen.models.dvae import DVAE, map_pixels, stats_to_images
from pixelgen.tasks import DTYPES, defaults, model_problems, raise_problems


def base_config() -> ConfigDict:
    """Every key of a dVAE config, with the values of configs/dvae_shapes.py; the dVAE configs
    start from it and change values only."""
    c = defaults.training_loop('dvae', total_steps=1500, batch_size=16,
                               checkpoint_every_steps=500, log_every_steps=50,
                               eval_every_steps=750, eval_examples=128, sample_every_steps=750,
                               keep_checkpoints=2)

    c.data = ConfigDict()
    c.data.dataset = 'shapes'
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.image_size = 64
    c.data.holdout_phrases = ()    # training drops images whose caption contains any of them
    c.data.num_threads = 2
    c.data.prefetch = 4
    pipeline.add_stream_config(c.data, captions=False)  # webdataset: / parquet: (docs/data.md)

    c.model = ConfigDict()
    c.model.codebook_size = 128    # 8192 in the paper
    c.model.encoder_width = 16     # the release's n_hid (256 there)
    c.model.decoder_width = 16
    c.model.decoder_init_width = 16  # the release's n_init (128 there)
    c.model.width_multipliers = (1, 2, 4)  # one group per entry; downsampling 2^(groups - 1)
    c.model.blocks_per_group = 1
    c.model.dtype = 'float32'

    c.loss = ConfigDict()
    c.loss.kl_weight = 0.0         # beta, reached after kl_warmup_steps (cosine from 0)
    c.loss.kl_warmup_steps = 300
    c.loss.temperature_start = 1.0
    c.loss.temperature_end = 1 / 16
    c.loss.temperature_steps = 900  # cosine from start to end over this many steps
    # Aids for short runs (see the module docstring); the paper trains without them.
    c.loss.straight_through = False
    c.loss.code_entropy_weight = 0.25  # with diversity_weight: maximise I(patch; code)
    c.loss.diversity_weight = 0.25
    c.loss.laplace_scale = 0.0     # 0: learned (the decoder's ln b)
    c.loss.likelihood = 'gaussian'  # or 'logit_laplace' (the paper's)
    c.loss.gaussian_scale = 0.05   # the Gaussian's std on mapped pixels

    c.optimizer = defaults.adamw(learning_rate=2e-3, warmup_steps=50, b2=0.999,
                                 weight_decay=1e-4, min_learning_rate_ratio=0.0125)

    c.sampling = ConfigDict()
    c.sampling.num_images = 8      # originals above their reconstructions

    # The eval job's evaluators (pixelgen/evaluators/dvae.py), each with its --option values.
    c.evals = ConfigDict({'reconstruction': {}})
    return c


def validate_config(config) -> None:
    """Checks what would otherwise fail later (after data building or compiling)."""
    m, d, lo = config.model, config.data, config.loss
    problems = []
    if not m.width_multipliers:
        problems.append('model.width_multipliers is empty; give one multiplier per group, '
                        'e.g. (1, 2, 4, 8)')
    else:
        factor = 2 ** (len(m.width_multipliers) - 1)
        if d.image_size % factor:
            problems.append(
                f'data.image_size={d.image_size} is not divisible by the downsampling factor '
                f'{factor} (2^(groups - 1) for {len(m.width_multipliers)} groups in '
                f'model.width_multipliers); use an image size that is a multiple of {factor}')
        for key in ('encoder_width', 'decoder_width'):
            bad = [m[key] * k for k in m.width_multipliers if m[key] * k % 4 or m[key] * k < 4]
            if bad:
                problems.append(f'model.{key}={m[key]} gives block widths {bad}; every block '
                                'width must be a positive multiple of 4')
    if m.blocks_per_group < 1:
        problems.append(f'model.blocks_per_group={m.blocks_per_group} must be at least 1')
    if not 2 <= m.codebook_size <= 65536:
        problems.append(f'model.codebook_size={m.codebook_size} must be in [2, 65536] '
                        '(codes are stored as uint16)')
    if not 0 <= config.optimizer.ema_decay < 1:
        problems.append(f'optimizer.ema_decay={config.optimizer.ema_decay} must be in [0, 1) '
                        '(0: no moving average; the paper uses 0.999)')
    likelihood = lo.get('likelihood', 'logit_laplace')
    if likelihood not in LIKELIHOODS:
        problems.append(f'loss.likelihood={likelihood!r} is not one of {LIKELIHOODS}')
    elif likelihood == 'gaussian' and not lo.get('gaussian_scale', 0.0) > 0:
        problems.append(f"loss.likelihood='gaussian' needs loss.gaussian_scale > 0 (the std "
                        f"on mapped pixels, e.g. 0.05); got {lo.get('gaussian_scale', 0.0)}")
    if likelihood == 'gaussian' and lo.get('laplace_scale', 0.0):
        problems.append(f"loss.laplace_scale={lo.laplace_scale} has no effect with "
                        "loss.likelihood='gaussian' (its std is loss.gaussian_scale); set "
                        "loss.laplace_scale=0 or loss.likelihood='logit_laplace'")
    negative = [k for k in ('kl_weight', 'code_entropy_weight', 'diversity_weight',
                            'laplace_scale')
                if lo.get(k, 0.0) < 0]
    if negative:
        problems.append(f'loss.{negative[0]}={lo[negative[0]]} must be >= 0 (0 turns it off)')
    if lo.kl_warmup_steps < 1 or lo.temperature_steps < 1:
        problems.append('loss.kl_warmup_steps and loss.temperature_steps must be at least 1')
    if not 0 < lo.temperature_end <= lo.temperature_start:
        problems.append(f'loss.temperature_end={lo.temperature_end} must be in '
                        f'(0, loss.temperature_start={lo.temperature_start}]')
    problems += model_problems(m)
    raise_problems(problems)


def build_model(config, rngs: nnx.Rngs) -> DVAE:
    validate_config(config)
    m = config.model
    return DVAE(codebook_size=m.codebook_size, encoder_width=m.encoder_width,
                decoder_width=m.decoder_width, decoder_init_width=m.decoder_init_width,
                width_multipliers=tuple(m.width_multipliers),
                blocks_per_group=m.blocks_per_group, dtype=DTYPES[m.dtype], rngs=rngs)


# Schedules and the objective --------------------------------------------------------------
def temperature_schedule(loss_config) -> optax.Schedule:
    """tau: cosine from temperature_start to temperature_end over temperature_steps, then flat."""
    lo = loss_config
    return optax.cosine_decay_schedule(lo.temperature_start, lo.temperature_steps,
                                       alpha=lo.temperature_end / lo.temperature_start)


def kl_ramp(loss_config) -> optax.Schedule:
    """Cosine from 0 up to 1 over kl_warmup_steps, then flat: beta = kl_weight * ramp."""
    fall = optax.cosine_decay_schedule(1.0, loss_config.kl_warmup_steps, alpha=0.0)
    return lambda step: 1.0 - fall(step)


def kl_weight_schedule(loss_config) -> optax.Schedule:
    """beta: cosine from 0 up to kl_weight over kl_warmup_steps, then flat."""
    ramp = kl_ramp(loss_config)
    return lambda step: loss_config.kl_weight * ramp(step)


def logit_laplace_log_prob(x: jax.Array, mu: jax.Array, log_scale: jax.Array) -> jax.Array:
    """log f(x | mu, b) = -|logit(x) - mu| / b - log(2 b x (1 - x)), elementwise, for x in
    (0, 1) (the mapped pixels), b = exp(log_scale)."""
    return (-jnp.abs(jax.scipy.special.logit(x) - mu) * jnp.exp(-log_scale)
            - math.log(2.0) - log_scale - jnp.log(x) - jnp.log1p(-x))


def gaussian_log_prob(x: jax.Array, mu: jax.Array, scale: float) -> jax.Array:
    """log N(x | sigmoid(mu), scale^2), elementwise, for x the mapped pixels in (0, 1)."""
    return (-0.5 * jnp.square((x - jax.nn.sigmoid(mu)) / scale)
            - math.log(scale) - 0.5 * math.log(2 * math.pi))


LIKELIHOODS = ('logit_laplace', 'gaussian')


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """KL(softmax(logits) || uniform over K) per position, in nats: [..., K] -> [...]."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])


def kl_to_uniform_of_mean(logits: jax.Array) -> jax.Array:
    """KL(mean over positions of softmax(logits) || uniform over K), in nats: 0 when the batch
    uses every code equally, log K when every position picks the same code."""
    q = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, logits.shape[-1])
    mean = q.mean(axis=0)
    return jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-30))) + math.log(logits.shape[-1])


def codebook_usage(codes: jax.Array, codebook_size: int,
                   weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(perplexity, number of distinct codes) of the code histogram of a batch.

    codes [b, gh, gw] int; weights [b] (0 drops a padding row)."""
    one_hot = jax.nn.one_hot(codes, codebook_size, dtype=jnp.float32)
    if weights is not None:
        one_hot = one_hot * weights[:, None, None, None]
    counts = one_hot.sum(axis=(0, 1, 2))
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.sum(counts > 0).astype(jnp.float32)


def psnr(mse: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def to_unit(image: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]."""
    return image.astype(jnp.float32) / 255.0


class DVAELoss:
    """The relaxed ELBO (no data needed). `step` drives the tau and beta schedules."""

    def __init__(self, config):
        self.codebook_size = config.model.codebook_size
        self.temperature = temperature_schedule(config.loss)
        self.kl_weight = kl_weight_schedule(config.loss)
        self.kl_ramp = kl_ramp(config.loss)
        self.straight_through = config.loss.straight_through
        self.code_entropy_weight = config.loss.code_entropy_weight
        self.diversity_weight = config.loss.diversity_weight
        self.laplace_scale = config.loss.laplace_scale
        self.likelihood = config.loss.likelihood
        self.gaussian_scale = config.loss.gaussian_scale

    def loss(self, model: DVAE, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Negative ELBO per sub-pixel (nats), with metrics of the relaxed reconstruction."""
        step = jnp.zeros((), jnp.int32) if step is None else step
        tau, beta = self.temperature(step), self.kl_weight(step)
        x = to_unit(batch['image'])  # [b, h, w, 3]
        logits = model.logits(x)  # [b, gh, gw, K]
        gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
        soft_codes = jax.nn.softmax((logits + gumbel) / tau, axis=-1)
        if self.straight_through:  # the decoder sees the one-hot; gradients flow through soft
            hard = jax.nn.one_hot(jnp.argmax(soft_codes, -1), self.codebook_size)
            soft_codes = soft_codes + jax.lax.stop_gradient(hard - soft_codes)
        stats = model.decoder(soft_codes)  # [b, h, w, 6]
        if self.likelihood == 'gaussian':
            log_p = gaussian_log_prob(map_pixels(x), stats[..., :3], self.gaussian_scale)
        else:
            log_scale = stats[..., 3:]
            if self.laplace_scale:  # a fixed b: every pixel's error keeps its full weight
                log_scale = jnp.full_like(log_scale, math.log(self.laplace_scale))
            log_p = logit_laplace_log_prob(map_pixels(x), stats[..., :3], log_scale)
        nll = -jnp.mean(log_p)  # per sub-pixel
        kl = jnp.mean(kl_to_uniform(logits))  # per latent position
        latents_per_subpixel = logits.shape[1] * logits.shape[2] / (x.shape[1] * x.shape[2] * 3)
        loss = nll + beta * kl * latents_per_subpixel
        if self.code_entropy_weight:  # H(q) = log K - KL(q || U): confident posteriors
            entropy = math.log(self.codebook_size) - kl
            loss = loss + self.code_entropy_weight * self.kl_ramp(step) * entropy
        if self.diversity_weight:  # spread the batch's average posterior over the codebook
            loss = loss + self.diversity_weight * kl_to_uniform_of_mean(logits)
        mse = jnp.mean(jnp.square(stats_to_images(stats) - x))
        perplexity, used = codebook_usage(jnp.argmax(logits, -1), self.codebook_size)
        return loss, {'loss': loss, 'nll': nll, 'kl': kl, 'mse': mse, 'psnr': psnr(mse),
                      'perplexity': perplexity, 'codes_used': used, 'temperature': tau,
                      'kl_weight': beta}


class DVAETask(DVAELoss):
    """Data, model, loss and pictures for the dVAE."""

    def __init__(self, config, workdir: str):
        validate_config(config)  # before any data is built
        super().__init__(config)
        self.config, self.workdir = config, workdir
        d = config.data
        self.train_source = pipeline.without_phrases(pipeline.open_split(d, 'train'),
                                                     d.holdout_phrases)
        self.eval_source = pipeline.open_split(d, 'eval')
        self.tokens_per_example = d.image_size ** 2  # throughput is counted in pixels

    def build_model(self, rngs: nnx.Rngs) -> DVAE:
        return build_model(self.config, rngs)

    def model_flops_per_step(self, batch_size: int) -> float:
        """Training FLOPs of one step: 3 x the forward convs (encoder + decoder)."""
        return 3.0 * batch_size * forward_flops(self.config)

    # Data ------------------------------------------------------------------------------
    def train_iterator(self, global_batch: int):
        d = self.config.data
        return pipeline.train_iterator(
            self.train_source, batch_size=global_batch, seed=self.config.seed,
            prepare=pipeline.image_example(d.image_size), num_threads=d.num_threads,
            prefetch=d.prefetch)

    def eval_batches(self, per_host_batch: int, num_examples: int | None = None):
        return pipeline.eval_batches(
            self.eval_source, batch_size=per_host_batch,
            prepare=pipeline.image_example(self.config.data.image_size),
            num_examples=num_examples)

    # Metrics ---------------------------------------------------------------------------
    def eval_sums(self, model: DVAE, batch: dict) -> dict[str, jax.Array]:
        """Sums over real rows of the hard (argmax) reconstruction error and the KL, and the
        code usage of this batch (batch-level: the sums are scalars)."""
        x, mask = to_unit(batch['image']), batch['mask']
        logits = model.logits(x)
        codes = jnp.argmax(logits, -1)
        error = jnp.mean(jnp.square(model.decode(codes) - x), axis=(1, 2, 3))  # [b]
        kl = jnp.mean(kl_to_uniform(logits), axis=(1, 2))
        perplexity, used = codebook_usage(codes, self.codebook_size, mask)
        return {'sq_err_sum': jnp.sum(error * mask), 'kl_sum': jnp.sum(kl * mask),
                'count': jnp.sum(mask), 'perplexity_sum': perplexity,
                'codes_used_sum': used, 'batches': jnp.ones(())}

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        count, batches = max(sums['count'], 1), max(sums['batches'], 1)
        mse = sums['sq_err_sum'] / count
        return {'mse': mse, 'psnr': float(psnr(mse)), 'kl': sums['kl_sum'] / count,
                'batch_perplexity': sums['perplexity_sum'] / batches,
                'batch_codes_used': sums['codes_used_sum'] / batches}

    # Pictures --------------------------------------------------------------------------
    def write_samples(self, model: DVAE, step: int, rng: jax.Array) -> str:
        del rng  # reconstructions use the argmax codes
        n, size = self.config.sampling.num_images, self.config.data.image_size
        prepare = pipeline.image_example(size)
        originals = np.stack([prepare(self.eval_source[i])['image'] for i in range(n)])
        path = storage.join(self.workdir, 'samples', f'reconstructions_{step:07d}.png')
        write_reconstruction_grid(model, originals, path)
        return path


def reconstruct(model: DVAE, originals: np.ndarray) -> np.ndarray:
    """uint8 images [n, h, w, 3] -> their argmax-code reconstructions, uint8."""
    x = jnp.asarray(originals, jnp.float32) / 255.0
    return to_uint8(parallel.to_host(_round_trip(model, x)))


@nnx.jit
def _round_trip(model: DVAE, x: jax.Array) -> jax.Array:
    return model.decode(model.encode(x))


def to_uint8(images_01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(images_01), 0.0, 1.0) * 255).astype(np.uint8)


def write_reconstruction_grid(model: DVAE, originals: np.ndarray, path: str) -> str:
    """A PNG: the originals in the first row, their reconstructions below."""
    rows = [originals, reconstruct(model, originals)]
    if jax.process_index() == 0:
        images.save_png(images.make_grid(rows), path)
    return path


def forward_flops(config) -> float:
    """Forward FLOPs of encoder + decoder per image: 2 x multiply-adds of every conv."""
    m, side = config.model, config.data.image_size
    groups, k = len(m.width_multipliers), m.codebook_size

    def block(n_in, n_out, kernels, area):
        hid = n_out // 4
        widths = [n_in, hid, hid, hid, n_out]
        macs = sum(widths[i] * widths[i + 1] * kk * kk for i, kk in enumerate(kernels))
        return area * (macs + (n_in * n_out if n_in != n_out else 0))

    macs, area = 3 * m.encoder_width * m.width_multipliers[0] * 49 * side ** 2, side ** 2
    n_in = m.encoder_width * m.width_multipliers[0]
    for g, mult in enumerate(m.width_multipliers):
        for _ in range(m.blocks_per_group):
            macs += block(n_in, m.encoder_width * mult, (3, 3, 3, 1), area)
            n_in = m.encoder_width * mult
        if g < groups - 1:
            area //= 4
    grid_area = area
    macs += grid_area * n_in * k + grid_area * k * m.decoder_init_width
    n_in = m.decoder_init_width
    for g, mult in enumerate(reversed(m.width_multipliers)):
        for _ in range(m.blocks_per_group):
            macs += block(n_in, m.decoder_width * mult, (1, 3, 3, 3), area)
            n_in = m.decoder_width * mult
        if g < groups - 1:
            area *= 4
    macs += area * n_in * 6
    return 2.0 * macs


Task = DVAETask


def make_loss(config) -> DVAELoss:
    return DVAELoss(config)
