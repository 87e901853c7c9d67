"""DALL·E's dVAE at the paper's size (Ramesh et al. 2021, App. A; OpenAI's `dall_e` release).

  python -m pixelgen.train --config configs/dvae.py --workdir W --config.data.dataset=NAME

256x256 images -> 32x32 codes over 8192 entries. Widths as the release: base 256 (groups of
256, 512, 1024, 2048), the decoder's first conv 8192 -> 128, two blocks per group.
Optimisation as App. A.2: AdamW (0.9, 0.999, 1e-8), weight decay 1e-4, learning rate 1e-4
cosine-decayed to 1.25e-6 over 1.2M updates, batch 512; beta cosine 0 -> 6.6 over 5k
updates, tau cosine 1 -> 1/16 over 150k updates, an EMA of the weights (0.999) that encoding
and decoding use. Differences: the paper keeps training at the floor learning rate up to 3M
updates; the generic trainer ends at `total_steps`. The gradient clip is a safety net, not in
the paper. The dataset must be prepared in array_record format (see README).
"""

from pixelgen.config import parse_arg
from pixelgen.tasks import defaults
from pixelgen.tasks.dvae import base_config


def get_config(arg=None):
    parse_arg(arg)  # no variant and no options: override fields with --config.<key>=<value>
    c = base_config()
    c.total_steps = 1_200_000
    c.batch_size = 512
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.eval_every_steps = 10000
    c.eval_examples = 2048
    c.sample_every_steps = 10000
    c.mesh = defaults.FULLY_SHARDED

    c.data.dataset = 'imagenet2012'
    c.data.eval_split = 'validation'
    c.data.image_size = 256
    c.data.num_threads = 16
    c.data.prefetch = 8

    c.model.codebook_size = 8192
    c.model.encoder_width = 256
    c.model.decoder_width = 256
    c.model.decoder_init_width = 128
    c.model.width_multipliers = (1, 2, 4, 8)
    c.model.blocks_per_group = 2
    c.model.dtype = 'bfloat16'     # the release runs its convs in fp16; logits stay float32

    c.loss.kl_weight = 6.6
    c.loss.kl_warmup_steps = 5000
    c.loss.temperature_steps = 150_000
    c.loss.code_entropy_weight = 0.0
    c.loss.diversity_weight = 0.0
    c.loss.likelihood = 'logit_laplace'
    c.loss.gaussian_scale = 0.0

    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.ema_decay = 0.999  # the paper's: encode and decode use the moving average
    return c
