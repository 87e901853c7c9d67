"""Model FLOPs and device peaks, for MFU in the maxtext style.

Model FLOPs count what the model needs, not what the compiler emits (maxtext's
`calculate_tflops_training_per_device`). Per token, forward:

    matmuls   2 · (params in matmuls)                 QKV, attention out, MLP, unembedding
    attention 4 · T · width per layer                 q·kᵀ and probs·v over T keys
              halved when causal (2 · T · width)      only the allowed half is counted

Embedding lookups, norms, activations and the softmax are not counted. A training step is
3 × forward (forward, plus a backward of twice its cost). MFU = model FLOPs / step time / peak.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# bf16 dense peak FLOP/s per device, matched against lower-cased `device_kind` in this order
# (more specific names first: 'TPU v5 lite' is a v5e, a plain 'TPU v5' is a v5p).
PEAK_FLOPS = (
    ('v5 lite', 197e12, 'TPU v5e'),
    ('v5e', 197e12, 'TPU v5e'),
    ('v5p', 459e12, 'TPU v5p'),
    ('tpu v5', 459e12, 'TPU v5p'),
    ('v4', 275e12, 'TPU v4'),
    ('a100', 312e12, 'A100'),
    ('h100', 989e12, 'H100'),
    ('h200', 989e12, 'H200'),
)


def igpt_matmul_params(num_layers: int, width: int, vocab_size: int, mlp_ratio: int = 4) -> int:
    """Parameters that multiply activations: per layer q, k, v, out (4·w²) and the MLP
    (2·mlp_ratio·w²), plus the unembedding head (w·vocab). Embeddings are lookups: excluded."""
    per_layer = 4 * width * width + 2 * mlp_ratio * width * width
    return num_layers * per_layer + width * vocab_size


def igpt_forward_flops(num_layers: int, width: int, seq_len: int, vocab_size: int,
                       batch_size: int, mlp_ratio: int = 4, causal: bool = True) -> float:
    """Model FLOPs of one forward pass over [batch_size, seq_len] tokens."""
    tokens = batch_size * seq_len
    matmul = 2.0 * igpt_matmul_params(num_layers, width, vocab_size, mlp_ratio) * tokens
    attention_per_token = 4.0 * seq_len * width * (0.5 if causal else 1.0)
    return matmul + num_layers * attention_per_token * tokens


def igpt_flops_per_step(num_layers: int, width: int, seq_len: int, vocab_size: int,
                        batch_size: int, mlp_ratio: int = 4, causal: bool = True) -> float:
    """Model FLOPs of one training step (forward + backward = 3 × forward)."""
    return 3.0 * igpt_forward_flops(num_layers, width, seq_len, vocab_size, batch_size,
                                    mlp_ratio, causal)


def measure_matmul_flops(size: int = 2048, repeats: int = 15) -> float:
    """FLOP/s of a jitted float32 [size, size] @ [size, size] on the default device: the
    fastest of `repeats` timed runs after a warm-up (2·size³ FLOPs each). The fastest, not
    the median: a peak is the best the device reached, and on a shared machine the median
    of a 16 ms kernel moved by up to 2x between processes (0.08-0.17 TFLOP/s)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.dot)
    jax.block_until_ready(matmul(a, b))  # compile
    jax.block_until_ready(matmul(a, b))  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - start)
    return 2.0 * size ** 3 / min(times)


def table_peak_flops(device_kind: str) -> tuple[float, str] | None:
    """(bf16 dense peak FLOP/s, chip name) for an accelerator `device_kind`, or None."""
    for key, peak, name in PEAK_FLOPS:
        if key in device_kind.lower():
            return peak, name
    return None


# float32 FLOPs per cycle per core of a CPU's widest FMA units: (flag in /proc/cpuinfo,
# vendor or '' for any, FLOPs per cycle), first match wins. AVX-512: Intel server cores have
# two 512-bit FMA units (64), AMD Zen 4 splits 512-bit FMAs over two 256-bit passes (32),
# Zen 5 (family 26) has full 512-bit units (64); AVX2 + FMA: two 256-bit FMA units (32);
# Arm NEON: up to four 128-bit FMA units (32, Neoverse V1/V2).
CPU_FLOPS_PER_CYCLE = (
    ('avx512f', 'GenuineIntel', 64),
    ('avx512f', 'AuthenticAMD:26', 64),
    ('avx512f', '', 32),
    ('fma', '', 32),
    ('avx', '', 16),
    ('asimd', '', 32),
    ('sse2', '', 8),
)
PEAK_CACHE = 'peak_flops.json'  # in storage.cache_root(): the best rate measured per machine


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none), with 'mhz'
    the highest clock of any core and of cpufreq's cpuinfo_max_freq (which counts boost)."""
    try:
        with open('/proc/cpuinfo') as f:
            text = f.read()
    except OSError:
        return {}
    info: dict[str, str] = {}
    mhz = []
    for line in text.splitlines():
        key, _, value = line.partition(':')
        key, value = key.strip().lower(), value.strip()
        if key == 'cpu mhz':
            mhz.append(float(value))
        else:
            info.setdefault(key, value)
    try:
        with open('/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq') as f:
            mhz.append(int(f.read()) / 1000)
    except (OSError, ValueError):
        pass
    if mhz:
        info['mhz'] = str(max(mhz))
    return info


def cpu_table_peak(info: dict[str, str], cores: int) -> tuple[float, str] | None:
    """(float32 peak FLOP/s, how it was computed) from the ISA: cores × FLOPs per cycle ×
    clock; None when the clock or the ISA is unknown."""
    flags = set((info.get('flags') or info.get('features') or '').split())
    if 'mhz' not in info or not flags:
        return None
    vendor = info.get('vendor_id', '')
    vendor_family = f'{vendor}:{info.get("cpu family", "")}'
    for flag, who, per_cycle in CPU_FLOPS_PER_CYCLE:
        if flag in flags and who in ('', vendor, vendor_family):
            ghz = float(info['mhz']) / 1000
            return (cores * per_cycle * ghz * 1e9,
                    f'{cores} cores x {per_cycle} float32 FLOP/cycle ({flag}) x {ghz:.2f} GHz')
    return None


def _best_measured(key: str, rate: float) -> float:
    """The fastest rate measured for `key` (this machine) in any process so far, `rate`
    included; kept in the local cache so that a start-up on a busy machine is not the peak."""
    import json
    import os

    from pixelgen import storage
    path = os.path.join(storage.cache_root(), PEAK_CACHE)
    try:
        with open(path) as f:
            table = json.load(f)
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    best = max(rate, float(table.get(key, 0.0)))
    if best > table.get(key, 0.0):
        try:
            storage.write_text(path, json.dumps({**table, key: best}, indent=2, sort_keys=True))
        except OSError:  # a read-only home: this process's measurement is still used
            pass
    return best


@functools.cache
def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from).

    Accelerators: the bf16 dense peak from a table, by `jax.devices()[0].device_kind`.
    CPU: the larger of the float32 peak its ISA allows (`cpu_table_peak`: cores × FLOPs per
    cycle × the highest clock the kernel reports) and the fastest float32 matmul rate ever
    measured on this machine (this process measures once; the best is kept in the local
    cache, `PEAK_CACHE`). A step cannot beat the hardware, and the clock a VM reports can be
    below its boost, which the measured rate then covers: so MFU on a CPU reads at most 100%
    and is never clamped. (An accelerator not in the table: the measured rate alone.)
    """
    device = jax.devices()[0]
    kind = device.device_kind
    found = table_peak_flops(kind) if device.platform != 'cpu' else None
    if found is not None:
        return found[0], f'table: {found[1]} bf16 dense peak ({kind!r})'
    size = 1024  # as fast per FLOP as 2048 on CPU, at an eighth of the start-up time
    measured = measure_matmul_flops(size)
    if device.platform != 'cpu':
        return measured, (f'measured: jitted float32 {size}x{size} matmul on '
                          f'{device.platform} ({kind}), fastest of 15 runs; {kind!r} is not '
                          'in the peak table')
    import os
    info = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    key = f'{info.get("model name", kind)}|{cores} cores|{jax.local_device_count()} devices'
    best = _best_measured(key, measured)
    table = cpu_table_peak(info, cores)
    if table is not None and jax.local_device_count() > 1:  # simulated devices share the cores
        table = (table[0] / jax.local_device_count(),
                 f'{table[1]} / {jax.local_device_count()} devices')
    measured_note = (f'fastest float32 {size}x{size} matmul measured on this machine '
                     f'{best / 1e12:.3f} TFLOP/s (this process {measured / 1e12:.3f})')
    if table is None or best >= table[0]:
        return best, f'measured: {measured_note}'
    return table[0], f'ISA table: {table[1]}; above the {measured_note}'
