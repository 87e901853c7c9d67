"""A small Image GPT on Fashion-MNIST (Debian package dataset-fashion-mnist): the real CPU run.

  python -m pixelgen.train --config configs/igpt_fashion_mnist.py --workdir runs/igpt_fmnist
  python -m pixelgen.evaluate --workdir runs/igpt_fmnist --eval loss,probe

Images are box-downsampled 28x28 -> 14x14 (an exact 2x2 average) and quantised to a 16-colour
palette (the images are grayscale, so 16 gray levels): 196 tokens per image. The default trains
in about 25 minutes on 2 (shared) CPU cores.
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.igpt import base_config


def get_config(arg=None):
    parse_arg(arg)  # no variant and no options
    c = base_config()
    # Sized for a shared 2-core CPU (about 4 s a step there): 360 steps of 32 images, i.e. a
    # fifth of an epoch; the final eval is over the whole 10000-image test split.
    c.total_steps = 360
    c.batch_size = 32
    c.checkpoint_every_steps = 60
    c.keep_checkpoints = 3
    c.log_every_steps = 20
    c.eval_every_steps = 120
    c.eval_examples = 256
    c.sample_every_steps = 360

    c.data.dataset = 'fashion_mnist'
    c.data.image_size = 14
    c.data.palette_size = 16
    c.data.palette_fit_images = 2000
    c.data.palette_fit_pixels_per_image = 32

    c.model.num_layers = 5
    c.model.width = 96
    c.model.num_heads = 4
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 36
    c.sampling.num_images = 4
    return c
