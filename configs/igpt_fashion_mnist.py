"""A small Image GPT on Fashion-MNIST (Debian package dataset-fashion-mnist): the real CPU run.

  python launch/igpt_probe_curve.py runs/igpt_fmnist   # train, probe every checkpoint vs pixels
  python -m pixelgen.train --config configs/igpt_fashion_mnist.py --workdir runs/igpt_fmnist
  python -m pixelgen.evaluate --workdir runs/igpt_fmnist --eval probe --num_examples 10000

Images are box-downsampled 28x28 -> 14x14 (an exact 2x2 average) and quantised to a 16-colour
palette (the images are grayscale, so 16 gray levels): 196 tokens per image. 4 layers of width
256 (3.2M parameters), 2400 steps of 32 images (1.3 epochs); a checkpoint every 600 steps is
kept for the probe curve (docs/igpt.md#fashion-mnist).
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.igpt import base_config


def get_config(arg=None):
    parse_arg(arg)  # no variant and no options
    c = base_config()
    # The final eval is over the whole 10000-image test split.
    c.total_steps = 2400
    c.batch_size = 32
    c.checkpoint_every_steps = 600
    c.keep_checkpoints = 4  # every checkpoint: launch/igpt_probe_curve.py probes each
    c.log_every_steps = 20
    c.eval_every_steps = 2400
    c.eval_examples = 256
    c.sample_every_steps = 2400

    c.data.dataset = 'fashion_mnist'
    c.data.image_size = 14
    c.data.palette_size = 16
    c.data.palette_fit_images = 2000
    c.data.palette_fit_pixels_per_image = 32

    c.model.num_layers = 4
    c.model.width = 256
    c.model.num_heads = 8
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 60
    c.sampling.num_images = 4
    return c
