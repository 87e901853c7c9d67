"""Autoregressive sampling from Image GPT with a KV cache.

The paper samples with temperature 1 and no top-k / nucleus truncation; those are the defaults.
Image completion: pass the first p tokens (e.g. the top half of an image) as `prompt`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen import core_split, cpu_decode
from pixelgen.models.igpt import ImageGPT
from pixelgen.nn import packed_matmul


def sample(model: ImageGPT, rng: jax.Array, *, batch_size: int, prompt: jax.Array | None = None,
           temperature: float = 1.0, top_k: int | None = None,
           num_tokens: int | None = None) -> jax.Array:
    """Returns tokens [batch_size, num_tokens or model.seq_len] int32.

    `num_tokens` < seq_len generates only the first num_tokens positions (the KV cache is
    sized to them, so each step attends over num_tokens keys, not seq_len).

    With prompt [batch_size, p] the first p tokens are copied from the prompt (image completion:
    give the top half, sample the rest) and the rest are sampled. Compiled `jax.lax.fori_loop`s
    over positions with the KV cache, no full recompute per token: up to MAX_PHASES of them,
    each with a cache as long as its last position, so early steps read a short cache (at
    1024 tokens, 1.24x faster on a 2-core CPU, benchmarks/sample_phases.py; each phase adds
    about 1 s of compile). Position i draws with `jax.random.fold_in(rng, i)`, so the samples
    after a prompt depend only on `rng`, the model and the prompt, however the work is split:
    on a 2-core CPU each core's one-thread client holds half the heads and MLP units
    (`pixelgen.core_split`), on other multi-core CPUs each decodes a share of the rows
    (`pixelgen.cpu_decode`). Repeated calls with the same shapes and settings reuse the
    compiled functions (one per decode device).
    """
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be >= 1.')
    if not temperature > 0:
        raise ValueError(f'temperature={temperature} must be > 0; use top_k=1 for greedy.')
    if top_k is not None and not 1 <= top_k <= model.vocab_size:
        raise ValueError(
            f'top_k={top_k} must be None or in [1, vocab_size={model.vocab_size}].')
    num_tokens = model.seq_len if num_tokens is None else num_tokens
    if not 1 <= num_tokens <= model.seq_len:
        raise ValueError(f'num_tokens={num_tokens} must be in [1, seq_len={model.seq_len}].')
    if prompt is None:
        prompt = jnp.zeros((batch_size, 0), jnp.int32)
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[0] != batch_size or prompt.shape[1] > num_tokens:
        raise ValueError(
            f'prompt must be [batch_size={batch_size}, p] with p <= {num_tokens} tokens; '
            f'got shape {prompt.shape}.')
    graphdef, state = nnx.split(model)
    run = functools.partial(_sample_jit, graphdef, batch_size=batch_size,
                            temperature=float(temperature), top_k=top_k,
                            phase_ends=_phase_ends(num_tokens))
    # On a 2-core CPU the weights are split between the cores (pixelgen.core_split); on other
    # CPUs the rows are decoded on one-thread clients, one per core (pixelgen.cpu_decode).
    if core_split.applies(state):
        return core_split.map_halves(run, state, [rng], [prompt], batch_size)
    return cpu_decode.map_rows(run, state, [rng], [prompt], batch_size, pack=True)


@functools.partial(jax.jit, static_argnames=('graphdef', 'batch_size', 'temperature', 'top_k',
                                             'phase_ends', 'row_count', 'party', 'packed'))
def _sample_jit(graphdef: nnx.GraphDef, state: nnx.State, rng: jax.Array, prompt: jax.Array, *,
                batch_size: int, temperature: float, top_k: int | None,
                phase_ends: tuple[int, ...], row_start: jax.Array, row_count: int,
                party: int | None = None, packed: bool = False) -> jax.Array:
    """Pure sampler of the batch's rows [row_start, row_start + row_count) (prompt holds only
    those rows); jit caches one executable per (graphdef, shapes, static settings, device).
    With `party` (0 or 1), `state` is that party's half of the weights
    (`core_split.map_halves`), summed with the other half after each attention and MLP.
    With `packed` (on the one-thread core clients), the matmuls stream packed weights
    (`pixelgen.nn.packed_matmul`)."""
    model: ImageGPT = nnx.merge(graphdef, state)
    with core_split.as_party(model, party), packed_matmul.packing(model if packed else None):
        return _decode(model, rng, prompt, batch_size, temperature, top_k, phase_ends,
                       row_start, row_count)


def _decode(model: ImageGPT, rng, prompt, batch_size, temperature, top_k, phase_ends,
            row_start, row_count) -> jax.Array:
    prompt_len = prompt.shape[1]
    tokens = jnp.zeros((row_count, phase_ends[-1]), jnp.int32)
    tokens = jax.lax.dynamic_update_slice(tokens, prompt, (0, 0))

    def step(position, carry, noise):
        tokens, cache = carry
        prev = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(position - 1, 0), axis=1,
                                            keepdims=False)  # [rows]
        logits, cache = model.decode_step(prev, position, cache)  # [rows, vocab]
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [rows, 1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        drawn = jnp.argmax(logits + noise(position), axis=-1)  # jax.random.categorical's draw
        forced = jax.lax.dynamic_index_in_dim(tokens, position, axis=1, keepdims=False)
        token = jnp.where(position < prompt_len, forced, drawn.astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, position))
        return tokens, cache

    # In phases, each with a cache only as long as its positions need: the cache is a large
    # part of each step's memory traffic, and the step is bound by memory traffic.
    start, cache = 0, None
    for end in phase_ends:
        cache = (model.init_cache(row_count, end) if cache is None
                 else _grow(cache, end))
        noise = cpu_decode.gumbel_rows(rng, start, end, batch_size, row_start, row_count,
                                         model.vocab_size)
        tokens, cache = jax.lax.fori_loop(start, end, functools.partial(step, noise=noise),
                                          (tokens, cache))
        start = end
    return tokens


# Phases of at least MIN_PHASE positions, at most MAX_PHASES of them (each is one more loop
# body to compile): at 256 tokens, 4 phases read 62% of the cache a single loop reads.
MIN_PHASE, MAX_PHASES = 64, 4


def _phase_ends(num_tokens: int) -> tuple[int, ...]:
    """The end position of each decoding phase; the last is num_tokens."""
    phases = max(1, min(MAX_PHASES, num_tokens // MIN_PHASE))
    size = -(-num_tokens // phases)
    return tuple(min(num_tokens, size * (i + 1)) for i in range(phases))


def _grow(cache, length: int):
    """The KV cache's keys and values ([..., positions, head_dim]) zero-padded to `length`
    positions; what else the cache holds (fused kernels) unchanged."""
    def grow(path, c):
        if getattr(path[-1], 'key', None) not in ('k', 'v'):
            return c
        return jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, length - c.shape[-2]), (0, 0)])
    return jax.tree_util.tree_map_with_path(grow, cache)
