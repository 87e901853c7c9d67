"""A small dVAE on the embedded `shapes` dataset (64x64 -> 16x16 codes): the CPU demo and tests.

  python -m pixelgen.train --config configs/dvae_shapes.py --workdir runs/dvae_shapes
  python -m pixelgen.train --config configs/dvae_shapes.py:tiny --workdir /tmp/t   # seconds

Variants: '' (default, about 5 minutes on 2 CPU cores), 'tiny' (tests: 32x32 -> 8x8 codes).
The architecture is the release's with three groups (downsampling 4) and narrow widths; the
schedules are the paper's shapes, shortened to fit the run. The objective differs from the
paper's for this short run (see pixelgen/tasks/dvae.py): beta = 0 and the mutual-information
terms (loss.code_entropy_weight, loss.diversity_weight) instead, because in 1.5k steps the
KL to the uniform prior leaves argmax codes that all name one code; and a Gaussian likelihood
of fixed std instead of the logit-Laplace, under which no code carried the objects' colour.
"""

import ml_collections

from pixelgen.data.pipeline import add_stream_config
from pixelgen.parallel import DEFAULT_RULES


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = 'dvae'
    c.seed = 0
    c.total_steps = 1500
    c.batch_size = 16
    c.grad_accum_steps = 1
    c.concurrent_microbatches = 1  # passes per micro-batch run side by side (2 on a CPU)
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.log_every_steps = 50
    c.eval_every_steps = 750
    c.eval_examples = 128          # periodic eval; the final one uses the whole test split
    c.sample_every_steps = 750
    c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (pixelgen/parallel.py)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = 'shapes'
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.image_size = 64
    c.data.holdout_phrases = ()    # training drops images whose caption contains any of them
    c.data.num_threads = 2
    c.data.prefetch = 4
    add_stream_config(c.data, captions=False)  # webdataset: / parquet: (docs/data.md)

    c.model = ml_collections.ConfigDict()
    c.model.codebook_size = 128    # 8192 in the paper; about 40 of these end up used
    c.model.encoder_width = 16     # the release's n_hid (256 there)
    c.model.decoder_width = 16
    c.model.decoder_init_width = 16  # the release's n_init (128 there)
    c.model.width_multipliers = (1, 2, 4)  # one group per entry; downsampling 2^(groups - 1)
    c.model.blocks_per_group = 1
    c.model.dtype = 'float32'

    c.loss = ml_collections.ConfigDict()
    # beta, reached after kl_warmup_steps (cosine from 0). 0 here: with the paper's balance
    # (6.6 / 4 for latents covering 4x4x3 sub-pixels) short runs end with every argmax code the
    # same (measured: 27 codes, colour and shape at chance); the terms below replace it.
    c.loss.kl_weight = 0.0
    c.loss.kl_warmup_steps = 300
    c.loss.temperature_start = 1.0
    c.loss.temperature_end = 1 / 16
    c.loss.temperature_steps = 900  # cosine from start to end over this many steps
    c.loss.straight_through = False
    c.loss.code_entropy_weight = 0.25  # with diversity_weight: maximise I(patch; code)
    c.loss.diversity_weight = 0.25
    c.loss.laplace_scale = 0.0  # 0: learned (the decoder's ln b)
    # The paper's logit-Laplace ('logit_laplace') pulls every pixel error alike; in 1.5k steps
    # it decoded every object in one beige (colour at chance). A Gaussian's squared error pulls
    # hardest on the largest errors, the wrong hues (measured: colour 15% -> 78%, README).
    c.loss.likelihood = 'gaussian'
    c.loss.gaussian_scale = 0.05  # std on mapped pixels; 0.1 gave colour 42%, 0.025 77%

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.min_learning_rate_ratio = 0.0125  # 1e-4 -> 1.25e-6 in the paper
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.skip_nonfinite_updates = 5
    c.optimizer.ema_decay = 0.0    # the paper's 0.999 lags a 1500-step run; > 0: load uses the EMA

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_images = 8      # originals above their reconstructions

    if arg == 'tiny':
        c.total_steps = 6
        c.batch_size = 4
        c.checkpoint_every_steps = 3
        c.log_every_steps = 3
        c.eval_every_steps = 3
        c.eval_examples = 8
        c.sample_every_steps = 6
        c.data.image_size = 32
        c.model.codebook_size = 32
        c.model.encoder_width = 8
        c.model.decoder_width = 8
        c.model.decoder_init_width = 8
        c.model.width_multipliers = (1, 2)
        c.loss.kl_warmup_steps = 4
        c.loss.temperature_steps = 4
        c.optimizer.warmup_steps = 1
        c.sampling.num_images = 2
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of dvae_shapes; expected '' or 'tiny'.")
    return c
