"""Image GPT cases: `igpt_train` (one full train step) and `igpt_sample` (KV-cache
sampling), at the shapes the PyTorch peers in benchmarks/ use."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelgen import flops, sampling, trainer
from pixelgen.bench.common import (
    OPTIMIZER,
    Options,
    attention_kwargs,
    compile_jit,
    log,
    report,
    time_steps,
    timed,
)
from pixelgen.cpu import core_split, decode_clients
from pixelgen.cpu.backend import use_native_attention
from pixelgen.models.igpt import ImageGPT
from pixelgen.tasks import DTYPES
from pixelgen.tasks.igpt import token_loss

# The shapes of issue 8, shared with benchmarks/hf_imagegpt.py: Image GPT, 8 layers, width 256,
# 8 heads, 32x32 = 1024 tokens, palette 512, batch 4, float32; sampling generates 256 tokens.
IGPT_SHAPE = dict(layers=8, width=256, heads=8, seq=1024, vocab=512, batch=4, dtype='float32')


IGPT_SAMPLE_SHAPE = dict(IGPT_SHAPE, new_tokens=256)


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
                    model_flops, compile_s, sampling.compiled_sampler(
                        model, batch_size=shape['batch'], **sample_kwargs),
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

