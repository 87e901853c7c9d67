"""What every benchmark case shares: options, timing, the report (step time, tokens/s,
model FLOPs, MFU, compile time, peak memory) and profiling."""

from __future__ import annotations

import collections
import dataclasses
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

from pixelgen import flops
from pixelgen.cpu import native_attention
from pixelgen.models.igpt import ImageGPT
from pixelgen.nn.attention import IMPLEMENTATIONS
from pixelgen.tasks import defaults

ATTENTION_CHOICES = IMPLEMENTATIONS  # off TPU 'splash' is Pallas interpret mode: no speed path


# AdamW with iGPT's beta2 = 0.95 (and torch.optim.AdamW's default weight decay, as the peer).
OPTIMIZER = defaults.adamw(learning_rate=1e-3, warmup_steps=10, b2=0.95, weight_decay=0.01)


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
