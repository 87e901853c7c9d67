"""Benchmarks: `python -m pixelgen.bench <case> [<case> ...] [--json] [--steps N]`.

Each case prints one JSON object: the shape, the median step time after compilation,
tokens/s, model FLOPs (pixelgen.flops), achieved TFLOP/s, MFU against the device peak (on
CPU a float32 matmul rate measured in the same process), compile time and peak memory. With
--json every case is exactly one line on stdout; progress goes to stderr.

    python -m pixelgen.bench igpt_train igpt_sample --json
    python -m pixelgen.bench dalle_attention dalle_train --json  # sparse vs dense masked
    python -m pixelgen.bench igpt_train --attention dense       # the dense reference
    python -m pixelgen.bench input_pipeline --json  # images/s decoded: in-process, 1, 2 workers
    python -m pixelgen.bench igpt_train --attention auto        # splash on TPU, cuDNN on GPU
    PIXELGEN_NATIVE_ATTENTION=0 python -m pixelgen.bench dalle_attention  # XLA's tiles on CPU
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \
        python -m pixelgen.bench igpt_train --profile /tmp/prof    # + where the time goes

The PyTorch peers at the same shapes are in benchmarks/ (see benchmarks/README.md).
Cases live in CASES (name -> function(shape, Options) -> dict); `run_case` runs one with
optional shape overrides, as the tests do at a tiny shape.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import inspect
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pixelgen import cli, flops, sampling, trainer
from pixelgen.cpu import core_split, decode_clients, host_memory, native_attention
from pixelgen.cpu.backend import use_native_attention
from pixelgen.cpu.native_attention import native_plan
from pixelgen.data import throughput
from pixelgen.models.dalle import DallE
from pixelgen.models.igpt import ImageGPT
from pixelgen.nn.attention import IMPLEMENTATIONS, MultiHeadAttention, cudnn_unavailable
from pixelgen.nn.masks import dalle_layer_kinds, dalle_mask, dalle_mask_spec
from pixelgen.tasks import DTYPES
from pixelgen.tasks.dalle import DalleLoss
from pixelgen.tasks.igpt import token_loss

ATTENTION_CHOICES = IMPLEMENTATIONS  # off TPU 'splash' is Pallas interpret mode: no speed path

# The shapes of issue 8, shared with benchmarks/hf_imagegpt.py: Image GPT, 8 layers, width 256,
# 8 heads, 32x32 = 1024 tokens, palette 512, batch 4, float32; sampling generates 256 tokens.
IGPT_SHAPE = dict(layers=8, width=256, heads=8, seq=1024, vocab=512, batch=4, dtype='float32')
IGPT_SAMPLE_SHAPE = dict(IGPT_SHAPE, new_tokens=256)
# DALL·E (issue 8): 256 text + 32x32 = 1024 image tokens, width 256, 8 heads, batch 2, float32;
# one attention layer per mask kind, and an 8-layer model with the paper's vocabularies.
DALLE_ATTENTION_SHAPE = dict(layers=1, width=256, heads=8, text=256, grid=32, seq=1280,
                             batch=2, dtype='float32')
DALLE_TRAIN_SHAPE = dict(DALLE_ATTENTION_SHAPE, layers=8, text_vocab=16384, image_vocab=8192)
DALLE_SPARSE_KINDS = ('row', 'column', 'conv')
TRAIN_CASES = ('igpt_train', 'dalle_train')  # the cases with a train step

# AdamW with iGPT's beta2 = 0.95 (and torch.optim.AdamW's default weight decay, as the peer).
OPTIMIZER = ml_collections.ConfigDict(dict(
    learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.0, b1=0.9, b2=0.95,
    eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0, skip_nonfinite_updates=5))


@dataclasses.dataclass(frozen=True)
class Options:
    """How to run a case. steps: timed steps after compilation and one warm-up step (>= 3);
    attention: ImageGPT attention_impl (None = the model's default); profile_dir: where to
    write a jax.profiler trace of one extra step (None = no trace); concurrent_microbatches:
    the train steps' passes run side by side (`trainer.make_train_step`)."""
    steps: int = 5
    attention: str | None = None
    profile_dir: str | None = None
    concurrent_microbatches: int = 1


def default_concurrent_microbatches(case: str, batch: int) -> int:
    """igpt_train: 2 on a CPU with two or more cores for this process (and an even batch),
    else 1. XLA:CPU runs each op on one thread, and one pass leaves a core idle a third of
    the step; a second, independent pass keeps it busy (`benchmarks/README.md`).
    dalle_train: 1. Its sparse step
    gained nothing from two passes (1.10 against 1.07 s) while its dense twin slowed (4.10
    against 3.01 s), which would flatter the ratio."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    cpu_pair = jax.default_backend() == 'cpu' and (cores or 1) >= 2
    return 2 if case == 'igpt_train' and cpu_pair and batch % 2 == 0 else 1


def log(message: str) -> None:
    print(f'[bench] {message}', file=sys.stderr, flush=True)


# Helpers -------------------------------------------------------------------------------------
def attention_kwargs(attention: str | None) -> tuple[dict[str, str], str]:
    """(constructor kwargs, implementation name) for ImageGPT with `attention` (None = default).

    Models without an `attention_impl` argument compute dense attention, so only 'dense' (or
    None) is accepted for them.
    """
    if attention is not None and attention not in ATTENTION_CHOICES:
        raise ValueError(f'attention={attention!r}; expected one of {ATTENTION_CHOICES}.')
    parameter = inspect.signature(ImageGPT.__init__).parameters.get('attention_impl')
    if parameter is None:
        if attention not in (None, 'dense'):
            raise ValueError(f'attention={attention!r} is not available: this ImageGPT has no '
                             "attention_impl argument and always computes dense attention; "
                             "use --attention dense or leave it out.")
        return {}, 'dense'
    impl = parameter.default if attention is None else attention
    return {'attention_impl': impl}, impl


def build_igpt(shape: dict[str, Any], attention: str | None, seed: int = 0
               ) -> tuple[ImageGPT, str]:
    if shape['dtype'] not in DTYPES:
        raise ValueError(f"dtype={shape['dtype']!r}; expected one of {sorted(DTYPES)}.")
    kwargs, impl = attention_kwargs(attention)
    model = ImageGPT(vocab_size=shape['vocab'], seq_len=shape['seq'], num_layers=shape['layers'],
                     width=shape['width'], num_heads=shape['heads'],
                     dtype=DTYPES[shape['dtype']], rngs=nnx.Rngs(seed), **kwargs)
    return use_native_attention(model), impl


def build_sampling_igpt(shape: dict[str, Any], attention: str | None = None
                        ) -> tuple[ImageGPT, str]:
    """`build_igpt` with a random head: the zero-initialised one makes every draw uniform
    (the same cost, odd samples)."""
    model, impl = build_igpt(shape, attention)
    model.head.kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    return model, impl


def random_tokens(shape: dict[str, Any], seed: int = 0) -> jax.Array:
    """Seeded uniform palette indices [batch, seq] int32."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, shape['vocab'], (shape['batch'], shape['seq']), np.int32))


def compile_jit(fn: Callable, *args) -> tuple[Any, float]:
    """(compiled executable, seconds to trace, lower and compile) of jitted `fn` at `args`."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


# On CPU the peak is re-measured after every timed step (3 matmuls, not timed as the step):
# on a shared VM the matmul rate moves by up to 2x within a minute, and a peak caught in a
# slow moment once gave an MFU above 100%. MFU is against the best rate seen in the process.
_cpu_peak_samples: list[float] = []


def timed(step: Callable[[], Any]) -> float:
    """Wall seconds of one call of `step`, waited for with block_until_ready (on CPU, then
    a peak sample, outside the time)."""
    start = time.perf_counter()
    jax.block_until_ready(step())
    seconds = time.perf_counter() - start
    if jax.devices()[0].platform == 'cpu':
        _cpu_peak_samples.append(flops.measure_matmul_flops(1024, repeats=3))
    return seconds


def time_steps(step: Callable[[], Any], options: Options) -> list[float]:
    """Wall seconds of `options.steps` calls of `step`; then one more call under the
    profiler if `options.profile_dir`."""
    times = [timed(step) for _ in range(options.steps)]
    if options.profile_dir:
        with jax.profiler.trace(options.profile_dir, create_perfetto_trace=True):
            jax.block_until_ready(step())
        log(f'profile of one step in {options.profile_dir}; top ops:\n'
            + format_top_ops(options.profile_dir))
    return times


def format_top_ops(profile_dir: str, top: int = 15) -> str:
    """The `top` XLA op kinds (fusion names without their .N suffix) of the newest perfetto
    trace under `profile_dir`, by time summed over threads. XLA's CPU runtime records its ops
    only with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true; without it this lists nothing.
    """
    paths = sorted(glob.glob(os.path.join(profile_dir, '**', 'perfetto_trace.json.gz'),
                             recursive=True), key=os.path.getmtime)
    if not paths:
        return '  (no perfetto_trace.json.gz written)'
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for event in events:
        if event.get('ph') == 'X' and 'hlo_op' in event.get('args', {}):
            kind = re.sub(r'\.\d+$', '', event['args']['hlo_op'])
            total[kind] += event['dur']
            count[kind] += 1
    if not total:
        return ('  (no XLA op events: on CPU set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true; '
                f'open {paths[-1]} in Perfetto)')
    all_us = sum(total.values())
    lines = [f'  {us / 1e3:10.1f} ms {us / all_us:6.1%} {count[kind]:6d}x  {kind}'
             for kind, us in total.most_common(top)]
    return '\n'.join([*lines, f'  {all_us / 1e3:10.1f} ms in all XLA ops (thread time)'])


def peak_memory(compiled) -> tuple[int | None, str]:
    """(bytes, source): the device allocator's peak where it keeps one (GPU, TPU), else the
    compiled executable's own footprint (arguments + outputs - donated aliases + temporaries)."""
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
        return int(stats['peak_bytes_in_use']), 'device.memory_stats peak_bytes_in_use (process)'
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None, 'unavailable'
    total = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    return int(total), 'compiled.memory_analysis: temp + argument + output - alias'


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {'platform': device.platform, 'device_kind': device.device_kind,
            'device_count': jax.device_count(), 'cpu_count': os.cpu_count()}


def report(name: str, shape: dict[str, Any], times: list[float], tokens_per_step: int,
           model_flops: float, compile_s: float, compiled, attention_impl: str) -> dict:
    step_s = statistics.median(times)
    peak, peak_source = flops.peak_flops_per_device()
    if _cpu_peak_samples and max(_cpu_peak_samples) > peak:
        peak = max(_cpu_peak_samples)
        peak_source += (f'; raised to the fastest of 3-run samples after each of '
                        f'{len(_cpu_peak_samples)} timed steps so far')
    memory, memory_source = peak_memory(compiled)
    achieved = model_flops / step_s
    return {
        'name': name, 'shape': shape, 'step_s': step_s, 'timed_steps': len(times),
        'tokens_per_s': tokens_per_step / step_s, 'model_flops_per_step': model_flops,
        'achieved_tflops': achieved / 1e12, 'mfu': achieved / peak,
        'peak_tflops': peak / 1e12, 'peak_source': peak_source, 'compile_s': compile_s,
        'peak_memory_bytes': memory, 'memory_source': memory_source,
        'attention_impl': attention_impl, 'native_attention': native_attention_ran(compiled),
        'jax_version': jax.__version__, 'device': device_info(),
    }


def native_attention_ran(compiled) -> bool:
    """Whether the compiled step computes attention with the fused native CPU kernel
    (`pixelgen.cpu.native_attention`; PIXELGEN_NATIVE_ATTENTION=0 keeps XLA's tiles)."""
    return native_attention.FORWARD_TARGET in compiled.as_text()


# Cases ---------------------------------------------------------------------------------------
class NextTokenTask:
    """The trainer's task interface, reduced to the loss: mean next-token cross-entropy, as
    pixelgen.tasks.igpt.ImageGPTTask.loss but without data on disk."""

    def loss(self, model: ImageGPT, batch: dict, rng: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        del rng, step
        tokens = batch['tokens']
        total, count = token_loss(model(tokens), tokens, jnp.ones(tokens.shape[0]))
        return total / count, {'loss': total / count}


def igpt_train(shape: dict[str, Any], options: Options) -> dict:
    """One full train step (forward, backward, clipped AdamW) of pixelgen.trainer."""
    model, impl = build_igpt(shape, options.attention)
    tx, schedule = trainer.make_optimizer(OPTIMIZER, total_steps=1000)
    graphdef, rest, state = trainer.init_state(model, tx, seed=0)
    del model
    passes = options.concurrent_microbatches
    train_step = jax.jit(trainer.make_train_step(NextTokenTask(), graphdef, rest, tx, schedule,
                                                 concurrent_microbatches=passes),
                         donate_argnums=0)
    batch = {'tokens': random_tokens(shape)}
    log(f'igpt_train: compiling ({impl} attention, {passes} concurrent pass(es))')
    compiled, compile_s = compile_jit(train_step, state, batch)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return state, metrics

    log('igpt_train: warm-up step')
    _, metrics = jax.block_until_ready(step())
    if not np.isfinite(float(metrics['loss'])):
        raise FloatingPointError(f"igpt_train: loss is {float(metrics['loss'])} at {shape}.")
    log(f'igpt_train: timing {options.steps} steps')
    times = time_steps(step, options)
    model_flops = flops.igpt_flops_per_step(shape['layers'], shape['width'], shape['seq'],
                                            shape['vocab'], shape['batch'])
    return {**report('igpt_train', shape, times, shape['batch'] * shape['seq'], model_flops,
                     compile_s, compiled, impl), 'concurrent_microbatches': passes}


def igpt_sample(shape: dict[str, Any], options: Options) -> dict:
    """pixelgen.sampling.sample of `new_tokens` tokens from the start token with the KV cache,
    from a model of `seq` positions. Model FLOPs: one causal forward over the new tokens.

    A sample() without `num_tokens` generates all seq positions; new_tokens then says so.
    """
    if 'num_tokens' in inspect.signature(sampling.sample).parameters:
        sample_kwargs = {'num_tokens': shape['new_tokens']}
    else:
        sample_kwargs = {}
        shape = {**shape, 'new_tokens': shape['seq']}
    model, impl = build_sampling_igpt(shape, options.attention)
    keys = iter(jax.random.split(jax.random.key(0), options.steps + 3))

    def generate():  # as a user calls it: on CPU, rows split over one-thread clients per core
        return sampling.sample(model, next(keys), batch_size=shape['batch'], **sample_kwargs)

    log(f'igpt_sample: compiling ({impl} attention) and one run')
    compile_s = timed(generate)  # the first call: compilation on every decode device + a run
    log('igpt_sample: warm-up run')
    jax.block_until_ready(generate())
    log(f'igpt_sample: timing {options.steps} runs of {shape["new_tokens"]} tokens')
    times = time_steps(generate, options)
    model_flops = flops.igpt_forward_flops(shape['layers'], shape['width'], shape['new_tokens'],
                                           shape['vocab'], shape['batch'])
    result = report('igpt_sample', shape, times, shape['batch'] * shape['new_tokens'],
                    model_flops, compile_s, _whole_batch_sampler(model, sample_kwargs, shape),
                    impl)
    devices = decode_clients.decode_devices(nnx.state(model), shape['batch'])
    result['decode'] = ('2 one-thread CPU clients, half the heads and MLP units on each '
                        '(pixelgen.cpu.core_split)' if core_split.applies(nnx.state(model))
                        else f'{len(devices)} one-thread CPU clients, {shape["batch"]} rows '
                             'split between them (pixelgen.cpu.decode_clients)' if devices
                        else f'on {jax.devices()[0].platform}:0 ({decode_clients.ENV}='
                             f'{decode_clients.mode()})')
    result['compile_s_source'] = 'first call: compilation on every decode device plus one run'
    return result


def _whole_batch_sampler(model: ImageGPT, sample_kwargs: dict, shape: dict[str, Any]):
    """The sampler compiled for the whole batch on the default device (for its memory
    analysis; each core's share of the rows needs less)."""
    graphdef, state = nnx.split(model)
    num_tokens = sample_kwargs.get('num_tokens', model.seq_len)
    prompt = jnp.zeros((shape['batch'], 0), jnp.int32)
    return sampling._sample_jit.lower(
        graphdef, state, jax.random.key(0), prompt, batch_size=shape['batch'], temperature=1.0,
        top_k=None, top_p=None, phase_ends=sampling._phase_ends(num_tokens),
        row_start=np.int32(0), row_count=shape['batch']).compile()


def dalle_seq(shape: dict[str, Any]) -> dict[str, Any]:
    """The shape with seq = text + grid² (so overrides of text or grid stay consistent)."""
    if shape['dtype'] not in DTYPES:
        raise ValueError(f"dtype={shape['dtype']!r}; expected one of {sorted(DTYPES)}.")
    return {**shape, 'seq': shape['text'] + shape['grid'] ** 2}


def interleaved_times(steps: dict[str, Callable[[], Any]], options: Options
                      ) -> dict[str, list[float]]:
    """Wall seconds of `options.steps` rounds, each calling every step once in turn, so a
    change in machine load hits every variant alike; one more round under the profiler if
    `options.profile_dir`."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(options.steps):
        for name, step in steps.items():
            times[name].append(timed(step))
    if options.profile_dir:
        with jax.profiler.trace(options.profile_dir, create_perfetto_trace=True):
            for step in steps.values():
                jax.block_until_ready(step())
        log(f'profile of one round in {options.profile_dir}; top ops:\n'
            + format_top_ops(options.profile_dir))
    return times


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
    loss = DalleLoss(ml_collections.ConfigDict(dict(loss=dict(text_weight=1 / 8,
                                                             image_weight=7 / 8))))
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


def input_pipeline(shape: dict[str, Any], options: Options) -> dict:
    """Streamed 256² JPEG pairs decoded per second (pixelgen.data.throughput); no model."""
    del options
    return throughput.measure(shape)


CASES: dict[str, Callable[[dict[str, Any], Options], dict]] = {
    'igpt_train': igpt_train,
    'igpt_sample': igpt_sample,
    'dalle_attention': dalle_attention,
    'dalle_train': dalle_train,
    'input_pipeline': input_pipeline,
}
SHAPES: dict[str, dict[str, Any]] = {
    'igpt_train': IGPT_SHAPE,
    'igpt_sample': IGPT_SAMPLE_SHAPE,
    'dalle_attention': DALLE_ATTENTION_SHAPE,
    'dalle_train': DALLE_TRAIN_SHAPE,
    'input_pipeline': throughput.SHAPE,
}


def check_case(name: str) -> None:
    if name not in CASES:
        raise ValueError(f'Unknown bench case {name!r}; valid cases: {", ".join(CASES)}.')


def run_case(name: str, *, overrides: dict[str, Any] | None = None, steps: int = 5,
             attention: str | None = None, profile_dir: str | None = None,
             concurrent_microbatches: int | None = None) -> dict:
    """Runs case `name` at its shape with `overrides` (e.g. dict(layers=1, seq=16)); returns
    its report. `steps` timed steps (>= 3) follow compilation and one warm-up step; the
    train cases run `concurrent_microbatches` passes side by side (None: the case's default
    on this machine, `default_concurrent_microbatches`)."""
    check_case(name)
    if steps < 3:
        raise ValueError(f'steps={steps}; the median needs at least 3 timed steps.')
    shape = dict(SHAPES[name])
    unknown = set(overrides or {}) - set(shape)
    if unknown:
        raise ValueError(f'Unknown shape overrides {sorted(unknown)} for case {name!r}; '
                         f'expected keys among {sorted(shape)}.')
    shape.update(overrides or {})
    if concurrent_microbatches is None:
        concurrent_microbatches = default_concurrent_microbatches(name, shape['batch'])
    if name in TRAIN_CASES and shape['batch'] % concurrent_microbatches:
        raise ValueError(f'batch={shape["batch"]} does not split into {concurrent_microbatches} '
                         'concurrent micro-batches; choose a count that divides the batch.')
    return CASES[name](shape, Options(steps, attention, profile_dir, concurrent_microbatches))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cases', nargs='+', metavar='case',
                        help=f'one or more of: {", ".join(CASES)}')
    parser.add_argument('--json', action='store_true',
                        help='one JSON line per case on stdout, nothing else')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per case (>= 3)')
    parser.add_argument('--attention', choices=ATTENTION_CHOICES, default=None,
                        help="attention implementation (default: the model's default)")
    parser.add_argument('--concurrent-microbatches', type=int, default=None, metavar='N',
                        help='independent passes per train step, run side by side (default: '
                             'igpt_train 2 on a CPU with 2+ cores, else 1; 1 = one pass)')
    parser.add_argument('--profile', metavar='DIR', default=None,
                        help='also trace one step per case into DIR (jax.profiler; perfetto) '
                             'and print its top ops to stderr')
    args = parser.parse_args(argv)
    host_malloc = host_memory.configure()  # as every pixelgen job, before JAX's CPU client
    for name in args.cases:
        if name not in CASES:
            parser.error(f'unknown case {name!r}; valid cases: {", ".join(CASES)}')
    if args.steps < 3:
        parser.error(f'--steps={args.steps}; the median needs at least 3 timed steps.')
    try:
        attention_kwargs(args.attention)
    except ValueError as e:
        parser.error(str(e))
    if args.concurrent_microbatches is not None and args.concurrent_microbatches < 1:
        parser.error(f'--concurrent-microbatches={args.concurrent_microbatches}; use 1 or more.')
    if args.attention == 'cudnn' and (reason := cudnn_unavailable(jnp.bfloat16)):
        parser.error(f'--attention cudnn {reason}; use --attention auto or block_sparse.')

    peak, source = flops.peak_flops_per_device()
    log(f'peak {peak / 1e12:.3f} TFLOP/s per device ({source})')
    for name in args.cases:
        profile_dir = os.path.join(args.profile, name) if args.profile else None
        result = run_case(name, steps=args.steps, attention=args.attention,
                          profile_dir=profile_dir,
                          concurrent_microbatches=args.concurrent_microbatches)
        result['host_malloc'] = host_malloc
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(json.dumps(result, indent=2), flush=True)
        if 'images_per_s' in result:
            log(f"{name}: images/s {result['images_per_s']}")
        else:
            log(f"{name}: {result['step_s']:.4f} s/step, {result['tokens_per_s']:.0f} "
                f"tokens/s, {result['achieved_tflops']:.3f} TFLOP/s, MFU {result['mfu']:.1%}")


if __name__ == '__main__':
    cli.run(main)
