"""The PyTorch peer of `python -m pixelgen.bench`: HuggingFace ImageGPT at the same shapes.

    python benchmarks/hf_imagegpt.py igpt_train igpt_sample --json

Shapes as pixelgen.bench (issue 8): 8 layers, width 256, 8 heads, 1024 positions, palette 512
(HF's vocab_size 513 = palette + sos), batch 4, float32, every dropout off, quick_gelu,
torch threads = os.cpu_count().

  igpt_train:  forward + backward + torch.optim.AdamW(betas=(0.9, 0.95)); the median of the
               timed steps after 2 warm-up steps. The input is sos + tokens[:, :-1] and the loss
               is cross-entropy against all 1024 tokens, as pixelgen's ImageGPT.
  igpt_sample: model.generate from the sos column, 256 new tokens, do_sample=True, top_k=0
               (no truncation), use_cache=True; tokens/s = batch * 256 / time.

Needs `pip install torch==2.13.0 transformers` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pixelgen.cpu import allocator

HOST_MALLOC = allocator.configure()  # as pixelgen's own jobs, before torch starts threads

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

SHAPE = dict(layers=8, width=256, heads=8, seq=1024, vocab=512, batch=4, dtype='float32')
NEW_TOKENS = 256
WARMUP_STEPS = 2


def log(message: str) -> None:
    print(f'[hf_imagegpt] {message}', file=sys.stderr, flush=True)


def build_model(shape: dict) -> ImageGPTForCausalImageModeling:
    config = ImageGPTConfig(
        vocab_size=shape['vocab'] + 1, n_positions=shape['seq'], n_embd=shape['width'],
        n_layer=shape['layers'], n_head=shape['heads'], activation_function='quick_gelu',
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return ImageGPTForCausalImageModeling(config)


def report(name: str, shape: dict, times: list[float], tokens_per_step: int) -> dict:
    step_s = statistics.median(times)
    return {'name': name, 'shape': shape, 'step_s': step_s, 'timed_steps': len(times),
            'tokens_per_s': tokens_per_step / step_s, 'torch_version': torch.__version__,
            'transformers_version': transformers.__version__,
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'host_malloc': HOST_MALLOC}


def igpt_train(shape: dict, steps: int) -> dict:
    model = build_model(shape).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape['vocab'], (shape['batch'], shape['seq']), generator=generator)
    sos = torch.full((shape['batch'], 1), shape['vocab'])
    inputs = torch.cat([sos, tokens[:, :-1]], dim=1)  # logits[:, i] predicts tokens[:, i]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits  # [batch, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shape['vocab']),
                                                 tokens.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.item()

    log(f'igpt_train: {WARMUP_STEPS} warm-up steps')
    for _ in range(WARMUP_STEPS):
        step()
    log(f'igpt_train: timing {steps} steps')
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()  # .item() waits for the step
        times.append(time.perf_counter() - start)
    return report('igpt_train', shape, times, shape['batch'] * shape['seq'])


def igpt_sample(shape: dict, steps: int) -> dict:
    shape = {**shape, 'new_tokens': NEW_TOKENS}
    model = build_model(shape).eval()
    sos = torch.full((shape['batch'], 1), shape['vocab'])

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(input_ids=sos, attention_mask=torch.ones_like(sos),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=True, top_k=0, temperature=1.0, use_cache=True,
                                 pad_token_id=shape['vocab'])
        if out.shape != (shape['batch'], 1 + NEW_TOKENS):
            raise RuntimeError(f'generate returned shape {tuple(out.shape)}; expected '
                               f'{(shape["batch"], 1 + NEW_TOKENS)}.')
        return out

    log('igpt_sample: warm-up run')
    generate()
    log(f'igpt_sample: timing {steps} runs of {NEW_TOKENS} tokens')
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return report('igpt_sample', shape, times, shape['batch'] * NEW_TOKENS)


CASES = {'igpt_train': igpt_train, 'igpt_sample': igpt_sample}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cases', nargs='+', metavar='case',
                        help=f'one or more of: {", ".join(CASES)}')
    parser.add_argument('--json', action='store_true',
                        help='one JSON line per case on stdout, nothing else')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per case (>= 3)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(),
                        help='torch intra-op threads (default: every core, %(default)s)')
    args = parser.parse_args(argv)
    for name in args.cases:
        if name not in CASES:
            parser.error(f'unknown case {name!r}; valid cases: {", ".join(CASES)}')
    if args.steps < 3:
        parser.error(f'--steps={args.steps}; the median needs at least 3 timed steps.')
    if args.threads < 1:
        parser.error(f'--threads={args.threads} must be >= 1.')
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    for name in args.cases:
        result = CASES[name](dict(SHAPE), args.steps)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
        log(f"{name}: {result['step_s']:.4f} s/step, {result['tokens_per_s']:.0f} tokens/s")


if __name__ == '__main__':
    main()
