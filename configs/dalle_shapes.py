"""A small DALL·E on dVAE codes of the embedded `shapes` dataset: the CPU demo and the tests.

  # 1. a dVAE and its codes (see configs/dvae_shapes.py): runs/dvae_shapes, runs/shapes_codes
  # 2. the transformer (a few minutes on 2 CPU cores):
  python -m pixelgen.train --config configs/dalle_shapes.py --workdir runs/dalle_shapes
  # 3. images from a caption, decoded by the dVAE:
  python -m pixelgen.sample --workdir runs/dalle_shapes --prompt "a large red star" --num 16

Colour/shape pairs named in `data.holdout_phrases` never occur in the training captions,
so prompts with them test compositional generalisation. Variants: '' (default), 'tiny'
(tests: point data.codes_dir at a tiny codes dataset).
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.dalle import SHAPES_HOLDOUT_PHRASES, base_config

HOLDOUT_PHRASES = SHAPES_HOLDOUT_PHRASES  # launch/dalle_shapes.sh reads it


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
        c.dvae_workdir = ''
        c.data.holdout_phrases = ('red star',)
        c.data.num_threads = 1
        c.model.text_vocab_size = 320
        c.model.text_len = 8
        c.model.image_vocab_size = 16
        c.model.grid_size = 4
        c.model.num_layers = 2
        c.model.width = 32
        c.model.num_heads = 2
        c.optimizer.warmup_steps = 1
        c.sampling.num_captions = 2
        c.sampling.samples_per_caption = 2
    return c
