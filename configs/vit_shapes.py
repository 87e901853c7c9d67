"""A small ViT classifier on the embedded `shapes` dataset: the CPU demo and the test config.

  python -m pixelgen.train --config configs/vit_shapes.py --workdir runs/vit_shapes
  python -m pixelgen.train --config configs/vit_shapes.py:tiny --workdir /tmp/t   # seconds
  python -m pixelgen.evaluate --workdir runs/vit_shapes --eval accuracy

The arg is `[tiny][,label=shape|color|size]`: the variant, '' (default: 64×64 images, 2400
steps, about 14 minutes on 2 busy CPU cores) or 'tiny' (for tests and smoke runs), and the
label to classify (`data.label_key`: 'shape', 6 classes, by default; or 'color', 'size').
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.vit import base_config


def get_config(arg=None):
    a = parse_arg(arg, variant=('', 'tiny'), label=('shape', 'color', 'size'))
    c = base_config()
    c.data.label_key = a.label
    if a.variant == 'tiny':
        c.total_steps = 4
        c.batch_size = 8
        c.checkpoint_every_steps = 2
        c.log_every_steps = 2
        c.eval_every_steps = 2
        c.eval_examples = 16
        c.sample_every_steps = 4
        c.data.image_size = 16
        c.model.patch_size = 8
        c.model.width = 32
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.optimizer.warmup_steps = 1
        c.sampling.num_images = 4
    return c
