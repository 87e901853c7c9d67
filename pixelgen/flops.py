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


@functools.cache
def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from).

    Accelerators: the bf16 dense peak from a table, by `jax.devices()[0].device_kind`. CPU (or
    an accelerator not in the table): a float32 matmul rate measured in this process, once.
    """
    device = jax.devices()[0]
    kind = device.device_kind
    found = table_peak_flops(kind) if device.platform != 'cpu' else None
    if found is not None:
        return found[0], f'table: {found[1]} bf16 dense peak ({kind!r})'
    size = 1024  # as fast per FLOP as 2048 on CPU, at an eighth of the start-up time
    peak = measure_matmul_flops(size)
    note = '' if device.platform == 'cpu' else f'; {kind!r} is not in the peak table'
    return peak, (f'measured: jitted float32 {size}x{size} matmul on {device.platform} '
                  f'({kind}), fastest of 15 runs{note}')
