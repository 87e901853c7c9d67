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

import ml_collections

from pixelgen.parallel import DEFAULT_RULES

# One colour/shape pair per colour, each shape at least once: never seen in training.
HOLDOUT_PHRASES = ('red star', 'green circle', 'blue triangle', 'yellow square',
                   'purple diamond', 'orange cross', 'white star')


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = 'dalle'
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 16
    c.grad_accum_steps = 1
    c.concurrent_microbatches = 1  # passes per micro-batch run side by side (2 on a CPU)
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 2
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.eval_examples = 128          # periodic eval; the final one uses the whole test split
    c.sample_every_steps = 500
    c.dvae_workdir = 'runs/dvae_shapes'  # decodes samples ('' = show codes in false colour)
    c.init_from = ''               # fine-tuning: a DALL·E workdir (its tokenizer is kept)
    c.init_from_step = -1          # -1: its latest checkpoint
    c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (pixelgen/parallel.py)

    c.data = ml_collections.ConfigDict()
    c.data.codes_dir = 'runs/shapes_codes'  # written by the dVAE encode job (data/codes.py)
    c.data.train_split = 'train'
    c.data.eval_split = 'test'
    c.data.holdout_phrases = HOLDOUT_PHRASES  # training drops captions containing any of them
    c.data.bpe_dropout = 0.1       # the paper's; training only
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.model = ml_collections.ConfigDict()
    c.model.text_vocab_size = 1024  # BPE vocabulary (trained on the captions; <= this)
    c.model.text_len = 16          # shapes captions are at most 14 tokens with [SOT] and [EOT]
    c.model.image_vocab_size = 128  # the codebook of configs/dvae_shapes.py
    c.model.grid_size = 16         # 64x64 images -> 16x16 codes
    c.model.num_layers = 4         # row, column, row, conv
    c.model.width = 128
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.layer_kinds = ()       # () = the paper's schedule; or e.g. ('causal',) * 4 (dense)
    c.model.conv_wraparound = False  # True: the conv window wraps across rows (pixelgen.nn.masks)
    c.model.dtype = 'float32'
    c.model.attention = 'block_sparse'  # 'dense' (the reference), 'splash', 'cudnn', 'auto'
    c.model.remat = 'none'

    c.loss = ml_collections.ConfigDict()
    c.loss.text_weight = 1 / 8     # the paper's weights; each part is a mean over its tokens
    c.loss.image_weight = 7 / 8
    c.loss.caption_dropout = 0.0   # > 0: learn p(image) too, for classifier-free guidance

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.min_learning_rate_ratio = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.96          # the paper's AdamW betas, eps and weight decay
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 4.5e-2
    c.optimizer.grad_clip_norm = 4.0
    c.optimizer.skip_nonfinite_updates = 5

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_captions = 4    # test captions per picture, one row each
    c.sampling.samples_per_caption = 4
    c.sampling.temperature = 1.0   # the paper: temperature 1, no top-k, no top-p
    c.sampling.top_k = 0           # 0 = off
    c.sampling.top_p = 1.0         # 1 = off

    if arg == 'tiny':
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
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of dalle_shapes; expected '' or 'tiny'.")
    return c
