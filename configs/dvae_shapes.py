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

from pixelgen.config import parse_arg
from pixelgen.tasks.dvae import base_config


def get_config(arg=None):
    a = parse_arg(arg, variant=('', 'tiny'))
    c = base_config()
    if a.variant == 'tiny':
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
    return c
