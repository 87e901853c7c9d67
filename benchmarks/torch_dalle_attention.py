"""The PyTorch peer of `python -m pixelgen.bench dalle_attention`: one attention layer with
DALL·E's masks computed densely by torch.nn.functional.scaled_dot_product_attention.

    python benchmarks/torch_dalle_attention.py --json

Shape as pixelgen.bench (issue 8): 256 text + 32×32 = 1024 image tokens, width 256, 8 heads,
batch 2, float32, torch threads = os.cpu_count(). The layer is pixelgen's: bias-free q, k, v and
output projections around the attention; forward plus backward (gradients of the parameters and
the input) against a fixed random cotangent; the median of the timed steps after 2 warm-up steps.

Variants (one JSON object, `variants`):
  dense_masked: SDPA with the boolean row mask (pixelgen.nn.masks.dalle_mask); every [1280, 1280]
                logit is computed whatever the mask, so the column and conv masks cost the same.
  causal:       SDPA with is_causal=True (no mask tensor; PyTorch's fastest dense path), a
                lower bound for any dense DALL·E layer.

Needs `pip install torch==2.13.0` (see benchmarks/README.md).
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
import torch.nn.functional as F  # noqa: E402

from pixelgen.nn.masks import dalle_mask  # noqa: E402

SHAPE = dict(layers=1, width=256, heads=8, text=256, grid=32, seq=1280, batch=2,
             dtype='float32')
WARMUP_STEPS = 2


def log(message: str) -> None:
    print(f'[torch_dalle_attention] {message}', file=sys.stderr, flush=True)


class Attention(torch.nn.Module):
    """pixelgen.nn.attention.MultiHeadAttention's layer: bias-free projections + SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (
            torch.nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, width = x.shape

        def heads(t):  # [b, n, width] -> [b, heads, n, head_dim]
            return t.view(b, n, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(out.transpose(1, 2).reshape(b, n, width))


def time_variant(shape: dict, mask: torch.Tensor | None, steps: int) -> list[float]:
    torch.manual_seed(0)
    layer = Attention(shape['width'], shape['heads'])
    x = torch.randn(shape['batch'], shape['seq'], shape['width'], requires_grad=True)
    cotangent = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x, mask) * cotangent).sum().backward()

    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()  # backward() returns when the gradients are computed (CPU)
        times.append(time.perf_counter() - start)
    return times


def dalle_attention(shape: dict, steps: int) -> dict:
    row = torch.from_numpy(dalle_mask('row', shape['text'], shape['grid']))  # True = attend
    variants = {}
    for name, mask in (('dense_masked', row), ('causal', None)):
        log(f'{name}: timing {steps} steps after {WARMUP_STEPS} warm-up steps')
        times = time_variant(shape, mask, steps)
        step_s = statistics.median(times)
        variants[name] = {'step_s': step_s, 'timed_steps': len(times),
                          'tokens_per_s': shape['batch'] * shape['seq'] / step_s}
    return {'name': 'dalle_attention', 'shape': shape, **variants['dense_masked'],
            'variants': variants, 'torch_version': torch.__version__,
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'host_malloc': HOST_MALLOC}


CASES = {'dalle_attention': dalle_attention}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cases', nargs='*', default=list(CASES), metavar='case',
                        help=f'one or more of: {", ".join(CASES)} (default: all)')
    parser.add_argument('--json', action='store_true',
                        help='one JSON line per case on stdout, nothing else')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per case (>= 3)')
    args = parser.parse_args(argv)
    for name in args.cases:
        if name not in CASES:
            parser.error(f'unknown case {name!r}; valid cases: {", ".join(CASES)}')
    if args.steps < 3:
        parser.error(f'--steps={args.steps}; the median needs at least 3 timed steps.')
    torch.set_num_threads(os.cpu_count())
    for name in args.cases:
        result = CASES[name](dict(SHAPE), args.steps)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
        log(f"{name}: {result['step_s']:.4f} s/step (dense masked), "
            f"{result['variants']['causal']['step_s']:.4f} s/step (causal)")


if __name__ == '__main__':
    main()
