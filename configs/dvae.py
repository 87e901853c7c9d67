"""DALL·E's dVAE at the paper's size (Ramesh et al. 2021, App. A; OpenAI's `dall_e` release).

  python -m pixelgen.train --config configs/dvae.py --workdir W --config.data.dataset=NAME

256x256 images -> 32x32 codes over 8192 entries. Widths as the release: base 256 (groups of
256, 512, 1024, 2048), the decoder's first conv 8192 -> 128, two blocks per group.
Optimisation as App. A.2: AdamW (0.9, 0.999, 1e-8), weight decay 1e-4, learning rate 1e-4
cosine-decayed to 1.25e-6 over 1.2M updates, batch 512; beta cosine 0 -> 6.6 over 5k
updates, tau cosine 1 -> 1/16 over 150k updates. Differences: the paper keeps training at
the floor learning rate up to 3M updates and keeps an EMA of the weights (0.999); the
generic trainer ends at `total_steps` and keeps no EMA. The gradient clip is a safety net,
not in the paper. The dataset must be prepared in array_record format (see README).
"""

import ml_collections

from pixelgen.data.pipeline import add_stream_config
from pixelgen.parallel import DEFAULT_RULES


def get_config(arg=None):
    if arg:
        raise ValueError(f'configs/dvae.py takes no variant (got {arg!r}); override fields '
                         'with --config.<key>=<value>.')
    c = ml_collections.ConfigDict()
    c.task = 'dvae'
    c.seed = 0
    c.total_steps = 1_200_000
    c.batch_size = 512
    c.grad_accum_steps = 1
    c.concurrent_microbatches = 1  # passes per micro-batch run side by side (2 on a CPU)
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.eval_every_steps = 10000
    c.eval_examples = 2048
    c.sample_every_steps = 10000
    c.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1})
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (pixelgen/parallel.py)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = 'imagenet2012'
    c.data.data_dir = ''
    c.data.train_split = 'train'
    c.data.eval_split = 'validation'
    c.data.image_size = 256
    c.data.holdout_phrases = ()    # training drops images whose caption contains any of them
    c.data.num_threads = 16
    c.data.prefetch = 8
    add_stream_config(c.data, captions=False)  # webdataset: / parquet: (docs/data.md)

    c.model = ml_collections.ConfigDict()
    c.model.codebook_size = 8192
    c.model.encoder_width = 256
    c.model.decoder_width = 256
    c.model.decoder_init_width = 128
    c.model.width_multipliers = (1, 2, 4, 8)
    c.model.blocks_per_group = 2
    c.model.dtype = 'bfloat16'     # the release runs its convs in fp16; logits stay float32

    c.loss = ml_collections.ConfigDict()
    c.loss.kl_weight = 6.6
    c.loss.kl_warmup_steps = 5000
    c.loss.temperature_start = 1.0
    c.loss.temperature_end = 1 / 16
    c.loss.temperature_steps = 150_000
    # Aids for short runs (pixelgen/tasks/dvae.py); the paper trains without them.
    c.loss.straight_through = False
    c.loss.code_entropy_weight = 0.0
    c.loss.diversity_weight = 0.0
    c.loss.laplace_scale = 0.0  # 0: learned (the decoder's ln b)
    c.loss.likelihood = 'logit_laplace'  # or 'gaussian' (fixed std, see pixelgen/tasks/dvae.py)
    c.loss.gaussian_scale = 0.0  # the Gaussian's std on mapped pixels

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.min_learning_rate_ratio = 0.0125  # 1.25e-6
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-4  # kernels and embeddings only (trainer.weight_decay_mask)
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.ema_decay = 0.999  # the paper's: encode and decode use the moving average
    c.optimizer.skip_nonfinite_updates = 5

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_images = 8
    return c
