"""A small CLIP on Fashion-MNIST with captions made from its labels ("a photo of a sneaker").

  python -m pixelgen.train --config configs/clip_fashion_mnist.py --workdir runs/clip_fmnist
  python -m pixelgen.evaluate --workdir runs/clip_fmnist --eval zeroshot

Needs the Debian package `dataset-fashion-mnist` (see README, Data). Only 10 distinct captions
exist, so a batch holds repeated captions: the contrastive targets then treat same-caption
pairs as negatives, which caps the loss but not the zero-shot accuracy.
Variants: '' (default) and 'tiny'.
"""

from pixelgen.config import parse_arg
from pixelgen.tasks.clip import base_config


def get_config(arg=None):
    a = parse_arg(arg, variant=('', 'tiny'))
    c = base_config()
    c.total_steps = 1000
    c.data.dataset = 'fashion_mnist'
    c.data.image_size = 28
    c.model.patch_size = 7
    c.model.context_length = 16
    c.sampling.num_images = 10
    c.evals.linear_probe.label_key = 'label'
    if a.variant == 'tiny':
        c.total_steps = 6
        c.batch_size = 8
        c.checkpoint_every_steps = 3
        c.log_every_steps = 3
        c.eval_every_steps = 3
        c.eval_examples = 16
        c.sample_every_steps = 6
        c.optimizer.warmup_steps = 1
        c.data.tokenizer_train_captions = 500
        c.model.vision_layers = c.model.text_layers = 1
        c.model.vision_width = c.model.text_width = 32
        c.model.vision_heads = c.model.text_heads = 2
        c.model.embed_dim = 16
        c.sampling.num_images = 2
        c.sampling.samples_per_image = 2
    return c
