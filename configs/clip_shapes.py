"""A small CLIP on the embedded `shapes` dataset (captions like "a large blue star"): the CPU
demo and the test config.

  python -m pixelgen.train --config configs/clip_shapes.py --workdir runs/clip_shapes
  python -m pixelgen.train --config configs/clip_shapes.py:tiny --workdir /tmp/t   # seconds
  python -m pixelgen.evaluate --workdir runs/clip_shapes --eval zeroshot

Variants: '' (default, a few minutes on 2 CPU cores), 'tiny' (for tests and smoke runs).
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.clip import base_config


def get_config(arg=None):
    a = parse_arg(arg, variant=('', 'tiny'))
    c = base_config()
    if a.variant == 'tiny':
        c.total_steps = 6
        c.batch_size = 8
        c.checkpoint_every_steps = 3
        c.log_every_steps = 3
        c.eval_every_steps = 3
        c.eval_examples = 16
        c.sample_every_steps = 6
        c.data.image_size = 16
        c.data.tokenizer_train_captions = 500
        c.model.embed_dim = 16
        c.model.patch_size = 8
        c.model.vision_width = 32
        c.model.vision_layers = 1
        c.model.vision_heads = 2
        c.model.vocab_size = 272
        c.model.context_length = 20
        c.model.text_width = 32
        c.model.text_layers = 1
        c.model.text_heads = 2
        c.optimizer.warmup_steps = 1
        c.sampling.num_images = 2
        c.sampling.samples_per_image = 2
    return c
