"""ViT in the paper's shapes (Dosovitskiy et al. 2021, Table 1), on ImageNet at 224 pixels.

  python -m pixelgen.train --config configs/vit.py:b16 --workdir W \
      --config.data.data_dir=DIR                     # tfds imagenet2012, label 'label'
  python -m pixelgen.train --config configs/vit.py:b16 --workdir W384 \
      --config.init_from=W --config.data.image_size=384   # fine-tune at 384 (paper §3.2)

Variants: b16 (ViT-B/16, 86.6M parameters with a 1000-class head), l16 (ViT-L/16, 304.3M);
the counts equal transformers' ViTForImageClassification of the same shape. Training follows
the paper's ImageNet recipe (Table 3): Adam (β1 0.9, β2 0.999), batch 4096, learning rate
3e-3 with 10k warm-up steps then cosine decay, weight decay 0.3, gradient clipping at 1,
300 epochs. The head is one linear layer (the fine-tuning head, and HF's); the paper's
pre-training MLP head is --config.model.representation_size=768 (1024 for L).
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.vit import base_config

# variant: (layers, width, heads, patch)
SHAPES = {'b16': (12, 768, 12, 16), 'l16': (24, 1024, 16, 16)}


def get_config(arg=None):
    a = parse_arg(arg, variant=tuple(SHAPES))
    layers, width, heads, patch = SHAPES[a.variant]
    c = base_config()
    c.total_steps = 93_750          # 300 epochs of 1.28M images at batch 4096
    c.batch_size = 4096
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.eval_examples = 10000
    c.sample_every_steps = 10000
    c.data.dataset = 'imagenet2012'
    c.data.eval_split = 'validation'
    c.data.image_size = 224
    c.data.label_key = 'label'
    c.data.random_flip = True
    c.data.num_threads = 16
    c.data.prefetch = 8
    c.model.patch_size = patch
    c.model.num_layers, c.model.width, c.model.num_heads = layers, width, heads
    c.model.num_classes = 1000
    c.model.dtype = 'bfloat16'
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 10_000
    c.optimizer.weight_decay = 0.3
    c.optimizer.grad_clip_norm = 1.0
    return c
