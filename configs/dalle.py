"""DALL·E at the paper's shapes (Ramesh et al. 2021): 256 BPE text tokens (vocab 16384) then
32×32 dVAE codes (vocab 8192), 1280 tokens; row/column/conv sparse layers (App. B.1).

  python -m pixelgen.train --config configs/dalle.py:12b --workdir gs://B/runs/dalle_12b \\
      --config.data.codes_dir=gs://B/codes/cc12m --config.dvae_workdir=gs://B/runs/dvae

Variants (same sequence and vocabularies; depth and width shrink; MLP 4× width):
  12b     64 layers, 62 heads × 64 = width 3968     12.29B parameters (the paper's)
  1.3b    24 layers, 16 heads × 128 = width 2048     1.31B (ruDALL-E Malevich's shape)
  350m    24 layers, 16 heads × 64 = width 1024      0.35B
  120m    12 layers, 12 heads × 64 = width 768       0.12B
Counts: `pixelgen.tasks.dalle.num_params(config)` (tested for 12b in tests/test_dalle.py).

Optimiser (App. B.2): AdamW β = (0.9, 0.96), ε = 1e-8, weight decay 4.5e-2, gradient-norm
clip 4, linear warm-up to 4.5e-4 over 5000 updates (a cosine decay here, not the paper's
halving on plateau), batch 1024. The paper trains in fp16 with per-resblock gradient scaling;
here compute is bf16 with fp32 parameters, which needs no loss scaling.

FSDP mesh recipe for 12b. Parameters (12.3B × 4 bytes = 49 GB) plus Adam moments (98 GB) plus
gradients (49 GB) are ~200 GB of state, far beyond one chip, so every weight is sharded over
the `fsdp` mesh axis (the sharding rules put each weight's `embed` dimension on it; optimizer
state follows its parameter), and activations are rematerialised per block (model.remat =
'full'). Per chip that is ~200 GB / fsdp of state plus the activations of its batch rows.
  - v5p-256 (128 chips, 95 GB HBM each):  --config.mesh.data=1 --config.mesh.fsdp=128
    state ~1.6 GB/chip; batch 1024 = 8 sequences of 1280 tokens per chip.
  - v4-512 (256 chips, 32 GB):           --config.mesh.data=2 --config.mesh.fsdp=128
  - 8× H100 (one node, 80 GB):           --config.mesh.fsdp=8  (25 GB of state per GPU;
    lower batch_size or raise grad_accum_steps until the activations fit).
Add --config.mesh.tensor=4 (heads, MLP and vocab over `tensor`) when the per-chip batch gets
too small for FSDP's all-gathers to hide behind compute (62 heads: use tensor=2).
"""

from pixelgen.config import ConfigDict, parse_arg
from pixelgen.tasks import defaults
from pixelgen.tasks.dalle import base_config

VARIANTS = {  # num_layers, num_heads, head width
    '12b': (64, 62, 64),
    '1.3b': (24, 16, 128),
    '350m': (24, 16, 64),
    '120m': (12, 12, 64),
}


def get_config(arg=None):
    a = parse_arg(arg, variant=tuple(VARIANTS))
    num_layers, num_heads, head_dim = VARIANTS[a.variant]
    c = base_config()
    c.total_steps = 430_000        # the paper's updates
    c.batch_size = 1024
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.eval_examples = 8192
    c.sample_every_steps = 10_000
    c.dvae_workdir = ''            # the dVAE that encoded data.codes_dir (decodes samples)
    c.mesh = defaults.FULLY_SHARDED

    c.data.codes_dir = ''          # a codes dataset (pixelgen.data.codes), e.g. gs://B/codes
    c.data.holdout_phrases = ()
    c.data.num_threads = 8
    c.data.prefetch = 8

    c.model.text_vocab_size = 16384
    c.model.text_len = 256
    c.model.image_vocab_size = 8192
    c.model.grid_size = 32
    c.model.num_layers = num_layers
    c.model.width = num_heads * head_dim
    c.model.num_heads = num_heads
    c.model.dtype = 'bfloat16'
    c.model.attention = 'auto'  # splash on TPU (every mask kind), block_sparse elsewhere
    c.model.remat = 'full'

    c.optimizer.learning_rate = 4.5e-4
    c.optimizer.warmup_steps = 5000
    c.optimizer.min_learning_rate_ratio = 1 / 32  # about five halvings, as the paper's

    c.sampling.num_captions = 8
    c.evals = ConfigDict()  # attribute_accuracy is for `shapes` codes only
    return c
