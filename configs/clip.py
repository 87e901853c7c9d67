"""CLIP in the paper's shapes (Radford et al. 2021, Tables 19-20), plus a tiny one for CPU.

  python -m pixelgen.train --config configs/clip.py:b32 --workdir W \
      --config.data.dataset=NAME --config.data.data_dir=DIR      # a captioned tfds dataset
  python -m pixelgen.train --config configs/clip.py:tiny --workdir /tmp/t

Variants: b32 (ViT-B/32, 151M parameters), b16 (ViT-B/16, 150M), l14 (ViT-L/14, 428M), tiny.
The paper's training: batch 32768, AdamW (β2 0.98, ε 1e-6, weight decay 0.2), 2000 warm-up
steps then cosine decay, 32 epochs of 400M pairs, temperature 0.07 at init, capped at 100.
The dataset must have an `image` and a text feature `data.caption_key` ('caption').
The text side is CLIP's: 77 tokens and a vocabulary of 49408. By default a BPE is trained on
the captions; to use OpenAI's, pass --config.data.tokenizer=DIR (with vocab.json and
merges.txt) --config.model.eot_id=49407. To start from OpenAI's weights instead, convert
them (`python -m pixelgen.convert --from hf-clip`) and train from that workdir.
"""

from pixelgen.config import ConfigDict, parse_arg
from pixelgen.tasks.clip import base_config

# variant: (vision layers, width, heads, patch), (text layers, width, heads), embed dim, lr
SHAPES = {
    'b32': ((12, 768, 12, 32), (12, 512, 8), 512, 5e-4),
    'b16': ((12, 768, 12, 16), (12, 512, 8), 512, 5e-4),
    'l14': ((24, 1024, 16, 14), (12, 768, 12), 768, 4e-4),
}


def get_config(arg=None):
    a = parse_arg(arg, variant=(*SHAPES, 'tiny'))
    c = base_config()
    if a.variant == 'tiny':
        return c  # configs/clip_shapes.py's default: a few minutes on a CPU
    (v_layers, v_width, v_heads, patch), (t_layers, t_width, t_heads), embed, lr = SHAPES[a.variant]
    c.total_steps = 390_000        # 32 epochs of 400M pairs at batch 32768
    c.batch_size = 32768
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.eval_examples = 10000
    c.sample_every_steps = 10000
    c.data.image_size = 224
    c.data.tokenizer_train_captions = 1_000_000
    c.data.num_threads = 16
    c.data.prefetch = 8
    c.model.embed_dim = embed
    c.model.patch_size = patch
    c.model.vision_layers, c.model.vision_width, c.model.vision_heads = v_layers, v_width, v_heads
    c.model.text_layers, c.model.text_width, c.model.text_heads = t_layers, t_width, t_heads
    c.model.vocab_size = 49408
    c.model.context_length = 77
    c.model.dtype = 'bfloat16'
    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.2  # kernels and embeddings only (trainer.weight_decay_mask)
    c.optimizer.grad_clip_norm = 1.0
    c.evals = ConfigDict({'retrieval': {}})  # add zeroshot/linear_probe for labelled data
    return c
