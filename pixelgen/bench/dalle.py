"""DALL·E cases: `dalle_attention` (one layer per mask kind, sparse against dense masked)
and `dalle_train` (an 8-layer train step, sparse against dense)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelgen import flops, trainer
from pixelgen.bench.common import (
    OPTIMIZER,
    Options,
    compile_jit,
    interleaved_times,
    log,
    report,
)
from pixelgen.cpu import native_attention
from pixelgen.cpu.backend import use_native_attention
from pixelgen.cpu.native_attention import native_plan
from pixelgen.models.dalle import DallE
from pixelgen.nn.attention import MultiHeadAttention
from pixelgen.nn.masks import dalle_layer_kinds, dalle_mask, dalle_mask_spec
from pixelgen.tasks import DTYPES
from pixelgen.tasks import dalle as dalle_task
from pixelgen.tasks.dalle import DalleLoss

# DALL·E (issue 8): 256 text + 32x32 = 1024 image tokens, width 256, 8 heads, batch 2, float32;
# one attention layer per mask kind, and an 8-layer model with the paper's vocabularies.
DALLE_ATTENTION_SHAPE = dict(layers=1, width=256, heads=8, text=256, grid=32, seq=1280,
                             batch=2, dtype='float32')


DALLE_TRAIN_SHAPE = dict(DALLE_ATTENTION_SHAPE, layers=8, text_vocab=16384, image_vocab=8192)


DALLE_SPARSE_KINDS = ('row', 'column', 'conv')


def dalle_seq(shape: dict[str, Any]) -> dict[str, Any]:
    """The shape with seq = text + grid² (so overrides of text or grid stay consistent)."""
    if shape['dtype'] not in DTYPES:
        raise ValueError(f"dtype={shape['dtype']!r}; expected one of {sorted(DTYPES)}.")
    return {**shape, 'seq': shape['text'] + shape['grid'] ** 2}


def attention_layer_flops(shape: dict[str, Any], kind: str) -> float:
    """Forward + backward model FLOPs of one attention layer: the q, k, v and output
    projections, and 4·width FLOPs (q·k and p·v) per (query, key) pair the mask allows.
    Dense masked attention computes every pair but gets the same count (its useful work)."""
    n, width, batch = shape['seq'], shape['width'], shape['batch']
    pairs = int(dalle_mask(kind, shape['text'], shape['grid']).sum())
    return 3.0 * batch * (4 * 2 * n * width * width + 4 * width * pairs)


def dalle_attention(shape: dict[str, Any], options: Options) -> dict:
    """One attention layer (projections included) of each DALL·E kind, forward plus backward
    (gradients of the parameters and the input), block-sparse; and the same layer computed
    densely with the row mask (dense masked attention costs the same for every mask).

    The top-level fields describe one row, one column and one conv layer run in turn (step_s
    is the sum of their medians); `kinds` holds each layer's own report, its tiling's density
    (the fraction of the [seq, seq] logits computed: the native kernel's 32 × 32 block pairs,
    or XLA's tiles) and its speed-up over the dense layer.
    `options.attention` = 'dense' computes the three kinds densely too."""
    shape = dalle_seq(shape)
    dtype = DTYPES[shape['dtype']]
    x = jax.random.normal(jax.random.key(0), (shape['batch'], shape['seq'], shape['width']),
                          dtype)
    cotangent = jax.random.normal(jax.random.key(1), x.shape, dtype)
    sparse_impl = options.attention or 'block_sparse'
    variants = {kind: (kind, sparse_impl) for kind in DALLE_SPARSE_KINDS}
    variants['dense'] = ('row', 'dense')
    steps, compiled_of, compile_s, layers = {}, {}, {}, {}
    for name, (kind, impl) in variants.items():
        layers[name] = layer = use_native_attention(MultiHeadAttention(
            shape['width'], shape['heads'], mask=dalle_mask_spec(kind, shape['text'],
                                                                 shape['grid']),
            num_layers=shape['layers'], dtype=dtype, attention_impl=impl, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(layer)

        @jax.jit
        def forward_backward(params, x, graphdef=graphdef):
            def loss(params, x):
                return jnp.sum(nnx.merge(graphdef, params)(x) * cotangent)
            return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

        log(f'dalle_attention: compiling {name} ({kind} mask, {impl})')
        compiled_of[name], compile_s[name] = compile_jit(forward_backward, params, x)
        steps[name] = functools.partial(compiled_of[name], params, x)
        jax.block_until_ready(steps[name]())  # warm-up
    log(f'dalle_attention: timing {options.steps} rounds of {", ".join(steps)}')
    times = interleaved_times(steps, options)
    kinds = {}
    for name, (kind, _) in variants.items():
        layer = layers[name]
        kinds[name] = report(f'dalle_attention/{name}', {**shape, 'mask': kind}, times[name],
                             shape['batch'] * shape['seq'], attention_layer_flops(shape, kind),
                             compile_s[name], compiled_of[name], layer.implementation())
        tiling = layer.tiling(shape['seq']) if layer.implementation() == 'block_sparse' else None
        plan = native_plan(layer.mask, shape['seq']) if kinds[name]['native_attention'] else None
        kinds[name]['block_size'] = (native_attention.BLOCK if plan else
                                     tiling.block_size if tiling else None)
        kinds[name]['density'] = plan.density if plan else tiling.density if tiling else 1.0
    dense_s = kinds['dense']['step_s']
    for name in kinds:
        kinds[name]['speedup_vs_dense'] = dense_s / kinds[name]['step_s']
    sparse = [kinds[kind] for kind in DALLE_SPARSE_KINDS]
    step_s = sum(k['step_s'] for k in sparse)
    model_flops = sum(k['model_flops_per_step'] for k in sparse)
    result = report('dalle_attention', shape, [step_s], shape['batch'] * shape['seq'],
                    model_flops, sum(compile_s[k] for k in DALLE_SPARSE_KINDS),
                    compiled_of['row'], sparse_impl)
    result.update(timed_steps=options.steps,
                  peak_memory_bytes=max(k['peak_memory_bytes'] or 0 for k in sparse) or None,
                  dense_step_s=len(sparse) * dense_s,
                  speedup_vs_dense=len(sparse) * dense_s / step_s, kinds=kinds)
    return result


def dalle_train(shape: dict[str, Any], options: Options) -> dict:
    """One full train step (forward, backward, clipped AdamW) of pixelgen.trainer on a DALL·E
    transformer with the paper's layer schedule and the weighted text + image loss: block-
    sparse (the top-level fields), and the same model computed with dense masked attention
    (`dense`; the same function, every [seq, seq] logit computed). Random tokens; the text
    has no padding. `options.attention` = 'dense' makes both dense."""
    shape = dalle_seq(shape)
    rng = np.random.default_rng(0)
    batch = {'text': jnp.asarray(rng.integers(1, shape['text_vocab'],
                                              (shape['batch'], shape['text']), np.int32)),
             'image': jnp.asarray(rng.integers(0, shape['image_vocab'],
                                               (shape['batch'], shape['grid'] ** 2), np.int32))}
    loss = DalleLoss(dalle_task.base_config())  # the paper's 1/8 text + 7/8 image weights
    tx, schedule = trainer.make_optimizer(OPTIMIZER, total_steps=1000)
    variants = {'block_sparse': options.attention or 'block_sparse', 'dense': 'dense'}
    steps, compiled_of, compile_s, states = {}, {}, {}, {}
    for name, impl in variants.items():
        model = DallE(text_vocab_size=shape['text_vocab'], image_vocab_size=shape['image_vocab'],
                      text_len=shape['text'], grid_size=shape['grid'],
                      num_layers=shape['layers'], width=shape['width'],
                      num_heads=shape['heads'], dtype=DTYPES[shape['dtype']],
                      attention_impl=impl, rngs=nnx.Rngs(0))
        graphdef, rest, states[name] = trainer.init_state(use_native_attention(model), tx,
                                                          seed=0)
        del model
        train_step = jax.jit(trainer.make_train_step(
            loss, graphdef, rest, tx, schedule,
            concurrent_microbatches=options.concurrent_microbatches), donate_argnums=0)
        log(f'dalle_train: compiling ({name}: {impl} attention)')
        compiled_of[name], compile_s[name] = compile_jit(train_step, states[name], batch)

        def step(name=name):
            states[name], metrics = compiled_of[name](states[name], batch)
            return metrics

        steps[name] = step
        value = float(jax.block_until_ready(step())['loss'])  # warm-up
        if not np.isfinite(value):
            raise FloatingPointError(f'dalle_train ({name}): loss is {value} at {shape}.')
    log(f'dalle_train: timing {options.steps} rounds of {", ".join(steps)}')
    times = interleaved_times(steps, options)
    model_flops = dalle_flops_per_step(shape)
    results = {name: report('dalle_train' if name == 'block_sparse' else 'dalle_train/dense',
                            shape, times[name], shape['batch'] * shape['seq'], model_flops,
                            compile_s[name], compiled_of[name], impl)
               for name, impl in variants.items()}
    result = results['block_sparse']
    result.update(layer_kinds=list(dalle_layer_kinds(shape['layers'])), dense=results['dense'],
                  concurrent_microbatches=options.concurrent_microbatches,
                  speedup_vs_dense=results['dense']['step_s'] / result['step_s'])
    return result


def dalle_flops_per_step(shape: dict[str, Any]) -> float:
    """Train-step model FLOPs (3 × forward): 2 × the matmul parameters per token (transformer
    and both heads over all positions, as pixelgen.tasks.dalle counts them), plus 4·width per
    (query, key) pair that each layer's mask allows."""
    matmul = 2.0 * flops.igpt_matmul_params(shape['layers'], shape['width'],
                                            shape['text_vocab'] + shape['image_vocab'])
    attention = sum(4.0 * shape['width'] * dalle_mask(kind, shape['text'], shape['grid']).sum()
                    for kind in dalle_layer_kinds(shape['layers']))
    return 3.0 * shape['batch'] * (matmul * shape['seq'] + attention)
