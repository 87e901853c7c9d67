"""A small Image GPT on the embedded `shapes` dataset: the CPU demo and the test config.

  python -m pixelgen.train --config configs/igpt_shapes.py --workdir runs/igpt_shapes
  python -m pixelgen.train --config configs/igpt_shapes.py:tiny --workdir /tmp/t   # seconds

The arg: '' (default, about 10 minutes on 2 CPU cores) or 'tiny' (for tests and smoke runs).
Every key and its meaning: pixelgen/tasks/igpt.py's base_config.
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.igpt import base_config


def get_config(arg=None):
    a = parse_arg(arg, variant=('', 'tiny'))
    c = base_config()
    if a.variant == 'tiny':
        c.total_steps = 12
        c.batch_size = 4
        c.checkpoint_every_steps = 6
        c.log_every_steps = 3
        c.eval_every_steps = 6
        c.eval_examples = 8
        c.sample_every_steps = 12
        c.data.image_size = 8
        c.data.palette_size = 16
        c.data.palette_fit_images = 64
        c.data.palette_fit_pixels_per_image = 16
        c.model.num_layers = 2
        c.model.width = 32
        c.model.num_heads = 2
        c.optimizer.warmup_steps = 2
        c.sampling.num_images = 2
        c.sampling.samples_per_image = 1
    return c
