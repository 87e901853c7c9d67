"""A small Image GPT on the embedded `shapes` dataset: the CPU demo and the test config.

  python -m pixelgen.train --config configs/igpt_shapes.py --workdir runs/igpt_shapes
  python -m pixelgen.train --config configs/igpt_shapes.py:tiny --workdir /tmp/t   # seconds

Variants: '' (default, about 10 minutes on 2 CPU cores), 'tiny' (for tests and smoke runs).
"""

import ml_collections

from pixelgen.data.pipeline import add_stream_config
from pixelgen.parallel import DEFAULT_RULES


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = 'igpt'
    c.objective = 'ar'             # or 'bert' (15% masked pixels, bidirectional)
    c.seed = 0
    c.total_steps = 1200
    c.batch_size = 8
    c.grad_accum_steps = 1         # micro-batches per step (batch_size is the whole step's)
    c.concurrent_microbatches = 1  # passes per micro-batch run side by side (2 on a CPU)
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.eval_every_steps = 400
    c.eval_examples = 256          # periodic eval; the final one uses the whole test split
    c.sample_every_steps = 400
    c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (pixelgen/parallel.py)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = 'shapes'
    c.data.data_dir = ''           # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.test_split = 'test'
    c.data.random_crop_padding = 0  # training augmentation: pad, then crop back at random
    c.data.random_flip = False      # training augmentation: mirror left-right half the time
    c.data.image_size = 20
    c.data.palette_size = 64
    c.data.palette_fit_images = 2000
    c.data.palette_fit_pixels_per_image = 64
    c.data.num_threads = 2
    c.data.prefetch = 4
    add_stream_config(c.data, captions=False)  # webdataset: / parquet: (docs/data.md)

    c.model = ml_collections.ConfigDict()
    c.model.num_layers = 4
    c.model.width = 128
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.dtype = 'float32'
    c.model.attention = 'block_sparse'  # 'dense' (the reference), 'splash', 'cudnn', 'auto'
    c.model.remat = 'none'              # 'full' or 'dots': recompute blocks to save memory
    c.model.scan_layers = False         # True: stack the layers and scan (fast compiles)
    c.model.num_classes = 0             # classifier head: 0 none, -1 from the dataset's labels

    # Fine-tuning (configs/igpt_finetune.py sets these): start from a pretrained workdir and
    # minimise L_GEN + classifier_loss_weight * L_CLF.
    c.init_from = ''
    c.init_from_step = -1          # -1: its latest checkpoint
    c.classifier_loss_weight = 1.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.min_learning_rate_ratio = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.skip_nonfinite_updates = 5  # skip NaN/Inf steps, stop after 5 in a row

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_images = 8
    c.sampling.samples_per_image = 2
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0           # 0 = off (the paper samples at temperature 1, no top-k)

    if arg == 'tiny':
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
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of igpt_shapes; expected '' or 'tiny'.")
    return c
