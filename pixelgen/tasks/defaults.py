"""The keys every task's config shares: the training loop, the mesh and AdamW.

Each task's `base_config()` (pixelgen/tasks/<task>.py) is built from `training_loop` and
`adamw` plus its own data, model and loss keys, and defines every key the task reads. The
configs in configs/ start from a base config and change values only.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from pixelgen.parallel import DEFAULT_RULES

# Small runs shard the batch over every device; the paper-size configs shard the weights.
DATA_PARALLEL = {'data': -1, 'fsdp': 1, 'tensor': 1}
FULLY_SHARDED = {'data': 1, 'fsdp': -1, 'tensor': 1}


def training_loop(task: str, *, total_steps: int, batch_size: int,
                  checkpoint_every_steps: int, log_every_steps: int, eval_every_steps: int,
                  eval_examples: int, sample_every_steps: int, keep_checkpoints: int = 3,
                  mesh: dict[str, int] | None = None) -> ConfigDict:
    """The task name and the loop's keys: steps, batch, checkpoints, logging, periodic eval and
    samples, the seed, the mesh and its sharding rules, and `init_from` (fine-tuning)."""
    c = ConfigDict()
    c.task = task
    c.seed = 0
    c.total_steps = total_steps
    c.batch_size = batch_size      # the whole step's, over every device and micro-batch
    c.grad_accum_steps = 1         # micro-batches per step
    c.concurrent_microbatches = 1  # passes per micro-batch run side by side (2 on a CPU)
    c.checkpoint_every_steps = checkpoint_every_steps
    c.keep_checkpoints = keep_checkpoints
    c.log_every_steps = log_every_steps
    c.eval_every_steps = eval_every_steps
    c.eval_examples = eval_examples  # periodic eval; the final one uses the whole test split
    c.sample_every_steps = sample_every_steps
    c.mesh = ConfigDict(dict(mesh or DATA_PARALLEL))
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (pixelgen/parallel.py)
    c.init_from = ''               # fine-tuning: a workdir whose parameters start this run
    c.init_from_step = -1          # its checkpoint; -1: the latest
    # How this process computes on a CPU, not what (pixelgen.cpu; environment overrides win):
    c.runtime = ConfigDict()
    c.runtime.native_attention = True  # the fused native attention kernel (False: XLA's tiles)
    c.runtime.cpu_decode = 'cores'     # samplers: 'cores', 'rows' or 'shared' (decode_clients)
    return c


def adamw(*, learning_rate: float, warmup_steps: int, b2: float, weight_decay: float,
          min_learning_rate_ratio: float = 0.0, b1: float = 0.9, eps: float = 1e-8,
          grad_clip_norm: float = 1.0, ema_decay: float = 0.0) -> ConfigDict:
    """AdamW with linear warm-up to `learning_rate`, then cosine decay to
    `learning_rate * min_learning_rate_ratio` at total_steps (pixelgen/trainer.py)."""
    c = ConfigDict()
    c.learning_rate = learning_rate
    c.warmup_steps = warmup_steps
    c.min_learning_rate_ratio = min_learning_rate_ratio
    c.b1 = b1
    c.b2 = b2
    c.eps = eps
    c.weight_decay = weight_decay  # kernels and embeddings only (trainer.weight_decay_mask)
    c.grad_clip_norm = grad_clip_norm
    c.skip_nonfinite_updates = 5   # skip NaN/Inf steps, stop after 5 in a row
    c.ema_decay = ema_decay        # > 0: keep a moving average of the weights; loading uses it
    return c
