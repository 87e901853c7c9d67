"""Autoregressive decoding with a KV cache, for Image GPT (`sample`) and DALL·E (`generate`).

One loop serves both (`_decode`): position after position, the model's `decode_step` reads the
previous token and the cache, the logits are filtered (temperature, top-k, top-p), a token is
drawn, and positions inside the prompt keep the prompt's token. The papers sample at
temperature 1 without top-k or top-p truncation; those are the defaults.

Position i draws with `jax.random.fold_in(rng, i)` (`gumbel_rows`), so the samples after a
prompt depend only on `rng`, the model and the prompt, however the work is split. On a
multi-core CPU host the jitted loop runs on `pixelgen.cpu`'s one-thread decode clients (the
rows split between the cores, or on 2 cores the weights), with the step operations that
backend supplies (`pixelgen.cpu.backend.decode_ops`); elsewhere it runs where the parameters are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pixelgen.cpu.backend import decode_on_cpu_clients, decode_ops
from pixelgen.models.dalle import DallE
from pixelgen.models.igpt import ImageGPT

# The noise of a loop's positions is drawn before the loop where it takes at most this many
# bytes: one vectorised draw instead of a threefry loop per token (about 10% of a small model's
# decoding step on the CPU); larger, it is drawn token by token.
MAX_NOISE_BYTES = 32 * 2 ** 20


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """logits [b, v] -> logits / temperature with all but the top-k and/or the smallest
    nucleus of mass >= top_p set to -inf (the most likely token is always kept)."""
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [b, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _check_filters(temperature: float, top_k: int | None, top_p: float | None,
                   vocab_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f'temperature={temperature} must be > 0; use top_k=1 for greedy.')
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f'top_k={top_k} must be None or in [1, vocab_size={vocab_size}].')
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f'top_p={top_p} must be None or in (0, 1].')


def sample(model: ImageGPT, rng: jax.Array, *, batch_size: int, prompt: jax.Array | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           num_tokens: int | None = None, rows: tuple[int, int] | None = None) -> jax.Array:
    """Image GPT's tokens [batch_size, num_tokens or model.seq_len] int32.

    With `rows` (start, end), only those rows of the batch are drawn ([end - start, ...];
    `prompt` holds only them), exactly as the whole batch draws them: how a multi-host job
    splits one batch between its processes (`parallel.host_range`).

    `num_tokens` < seq_len generates only the first num_tokens positions (the KV cache is
    sized to them, so each step attends over num_tokens keys, not seq_len).

    With prompt [batch_size, p] the first p tokens are copied from the prompt (image completion:
    give the top half, sample the rest) and the rest are sampled. Compiled `jax.lax.fori_loop`s
    over positions with the KV cache, no full recompute per token: up to MAX_PHASES of them,
    each with a cache as long as its last position, so early steps read a short cache (the
    gain and the compile time each phase adds: benchmarks/sample_phases.py). Repeated calls
    with the same shapes and settings reuse the compiled functions (one per decode device).
    """
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be >= 1.')
    _check_filters(temperature, top_k, top_p, model.vocab_size)
    num_tokens = model.seq_len if num_tokens is None else num_tokens
    if not 1 <= num_tokens <= model.seq_len:
        raise ValueError(f'num_tokens={num_tokens} must be in [1, seq_len={model.seq_len}].')
    first, end = _check_rows(rows, batch_size)
    if prompt is None:
        prompt = jnp.zeros((end - first, 0), jnp.int32)
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[0] != end - first or prompt.shape[1] > num_tokens:
        raise ValueError(
            f'prompt must be [rows={end - first}, p] with p <= {num_tokens} tokens; '
            f'got shape {prompt.shape}.')
    if end == first:
        return jnp.zeros((0, num_tokens), jnp.int32)
    graphdef, state = nnx.split(model)
    run = functools.partial(_sample_jit, graphdef, batch_size=batch_size,
                            temperature=float(temperature), top_k=top_k, top_p=top_p,
                            phase_ends=_phase_ends(num_tokens))
    return decode_on_cpu_clients(_offset_rows(run, first), state, [rng], [prompt], end - first)


def compiled_sampler(model: ImageGPT, *, batch_size: int, num_tokens: int | None = None):
    """The sampling loop compiled for a whole batch without a prompt on the default device,
    as `sample` runs each decode client's share of it: for XLA's memory and cost analysis."""
    num_tokens = model.seq_len if num_tokens is None else num_tokens
    graphdef, state = nnx.split(model)
    return _sample_jit.lower(
        graphdef, state, jax.random.key(0), jnp.zeros((batch_size, 0), jnp.int32),
        batch_size=batch_size, temperature=1.0, top_k=None, top_p=None,
        phase_ends=_phase_ends(num_tokens), row_start=jnp.int32(0),
        row_count=batch_size).compile()


def _check_rows(rows: tuple[int, int] | None, batch_size: int) -> tuple[int, int]:
    first, end = (0, batch_size) if rows is None else rows
    if not 0 <= first <= end <= batch_size:
        raise ValueError(f'rows={rows} must be (start, end) with 0 <= start <= end <= '
                         f'batch_size={batch_size}.')
    return first, end


def _offset_rows(run, first: int):
    """`run` for rows counted from row `first` of the batch (its noise is theirs)."""
    if not first:
        return run

    def shifted(*args, row_start, **kwargs):
        return run(*args, row_start=row_start + first, **kwargs)
    return shifted


@functools.partial(jax.jit, static_argnames=('graphdef', 'batch_size', 'temperature', 'top_k',
                                             'top_p', 'phase_ends', 'row_count', 'party',
                                             'packed'))
def _sample_jit(graphdef: nnx.GraphDef, state: nnx.State, rng: jax.Array, prompt: jax.Array, *,
                batch_size: int, temperature: float, top_k: int | None, top_p: float | None,
                phase_ends: tuple[int, ...], row_start: jax.Array, row_count: int,
                party: int | None = None, packed: bool = False) -> jax.Array:
    """Pure sampler of the batch's rows [row_start, row_start + row_count) (prompt holds only
    those rows); jit caches one executable per (graphdef, shapes, static settings, device).
    `party` and `packed`: see `pixelgen.cpu.backend.decode_ops`."""
    model: ImageGPT = nnx.merge(graphdef, state)
    ops = decode_ops(model, party, packed)
    tokens = jnp.zeros((row_count, phase_ends[-1]), jnp.int32)
    tokens = jax.lax.dynamic_update_slice(tokens, prompt, (0, 0))
    return _decode(model, ops, tokens, rng, shift=0, forced_until=prompt.shape[1],
                   phase_ends=phase_ends,
                   init_cache=lambda length: model.init_cache(row_count, length, ops),
                   filters=dict(temperature=temperature, top_k=top_k, top_p=top_p),
                   batch_size=batch_size, row_start=row_start, vocab=model.vocab_size)


def generate(model: DallE, rng: jax.Array, text: jax.Array, *,
             image_prompt: jax.Array | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             rows: tuple[int, int] | None = None, batch_size: int | None = None,
             guidance_scale: float = 1.0) -> jax.Array:
    """DALL·E's image codes for captions: text [b, T] token ids -> codes int32 [b, N].

    guidance_scale s != 1 is classifier-free guidance: each row is decoded twice in the same
    loop, with its caption and with the empty one (every text position its pad; a model
    trained with loss.caption_dropout > 0 knows it), each with its own KV cache, and the code
    is drawn from logits u + s (c - u) of the unconditional u and conditional c. s = 1 is
    plain conditional sampling (one pass); s = 0 ignores the caption.

    With `rows` (start, end) of a batch of `batch_size`, text (and image_prompt) hold only
    those rows, and they are drawn exactly as the whole batch draws them (see `sample`).

    With image_prompt [b, P] the first P codes (e.g. the top rows of an image) are kept and
    the rest completed (the paper's image-to-image translation). One `lax.fori_loop` over
    the T + N - 1 positions with the KV cache; every step reads only the keys each layer's
    sparse mask allows.
    """
    text = jnp.asarray(text, jnp.int32)
    if text.ndim != 2 or text.shape[1] != model.text_len:
        raise ValueError(f'text must be [batch, text_len={model.text_len}]; got {text.shape}.')
    batch = text.shape[0]
    first, end = _check_rows(rows, batch if batch_size is None else batch_size)
    if end - first != batch:
        raise ValueError(f'text has {batch} rows but rows={rows} names {end - first}.')
    if image_prompt is None:
        image_prompt = jnp.zeros((batch, 0), jnp.int32)
    image_prompt = jnp.asarray(image_prompt, jnp.int32)
    if (image_prompt.ndim != 2 or image_prompt.shape[0] != batch
            or image_prompt.shape[1] > model.num_image_tokens):
        raise ValueError(f'image_prompt must be [batch={batch}, P] with P <= '
                         f'{model.num_image_tokens}; got {image_prompt.shape}.')
    _check_filters(temperature, top_k, top_p, model.image_vocab_size)
    if not guidance_scale >= 0:
        raise ValueError(f'guidance_scale={guidance_scale} must be >= 0 (1 = no guidance).')
    if batch == 0:
        return jnp.zeros((0, model.num_image_tokens), jnp.int32)
    graphdef, state = nnx.split(model)
    run = functools.partial(_generate_jit, graphdef,
                            batch_size=batch if batch_size is None else batch_size,
                            temperature=float(temperature), top_k=top_k, top_p=top_p,
                            guidance=None if guidance_scale == 1 else float(guidance_scale))
    return decode_on_cpu_clients(_offset_rows(run, first), state, [rng], [text, image_prompt],
                                 batch)


@functools.partial(jax.jit, static_argnames=('graphdef', 'batch_size', 'temperature', 'top_k',
                                             'top_p', 'guidance', 'row_count', 'party',
                                             'packed'))
def _generate_jit(graphdef, state, rng, text, image_prompt, *, batch_size, temperature, top_k,
                  top_p, row_start, row_count, guidance=None, party=None, packed=False):
    """The codes of the batch's rows [row_start, row_start + row_count) (text and image_prompt
    hold only those). With `guidance`, the sequences of the empty caption follow them in the
    same arrays (rows row_count..2 row_count). `party` and `packed`: see
    `pixelgen.cpu.backend.decode_ops`."""
    model: DallE = nnx.merge(graphdef, state)
    ops = decode_ops(model, party, packed)
    t, n = model.text_len, model.num_image_tokens
    if guidance is not None:  # the empty caption: every text position its pad (PAD_ID = 0)
        text = jnp.concatenate([text, jnp.zeros_like(text)])
        image_prompt = jnp.concatenate([image_prompt, image_prompt])
    sequence = jnp.zeros((text.shape[0], t + n), jnp.int32)
    sequence = jax.lax.dynamic_update_slice(sequence, text, (0, 0))
    sequence = jax.lax.dynamic_update_slice(sequence, image_prompt, (0, t))
    # Position i reads token i and predicts token i + 1 (the first image code at i = T - 1).
    sequence = _decode(model, ops, sequence, rng, shift=1,
                       forced_until=t + image_prompt.shape[1], phase_ends=(t + n - 1,),
                       init_cache=lambda _: model.init_cache(sequence.shape[0], ops),
                       filters=dict(temperature=temperature, top_k=top_k, top_p=top_p),
                       batch_size=batch_size, row_start=row_start,
                       vocab=model.image_vocab_size, guidance=guidance)
    return sequence[:row_count, t:]


def _decode(model, ops, sequence: jax.Array, rng: jax.Array, *, shift: int, forced_until: int,
            phase_ends: tuple[int, ...], init_cache, filters: dict, batch_size: int,
            row_start: jax.Array, vocab: int, guidance: float | None = None) -> jax.Array:
    """The decoding loop of both models: for each position i in [0, phase_ends[-1]),
    `model.decode_step(sequence[:, max(i + shift - 1, 0)], i, cache, ops)` gives the logits of
    sequence[:, i + shift], which keeps its value below `forced_until` (the prompt) and is
    drawn elsewhere. sequence [rows, length] int32 -> the same, filled.

    In phases, each with a cache only as long as its positions need (`init_cache(length)`,
    then zero-padded): the cache is a large part of each step's memory traffic, and the step
    is bound by memory traffic.

    With `guidance` s, sequence holds 2r rows, the conditional ones then their unconditional
    twins: a code is drawn from u + s (c - u) for each pair and written into both."""
    row_count = sequence.shape[0] // (1 if guidance is None else 2)

    def step(position, carry, noise):
        sequence, cache = carry
        target = position + shift
        token = jax.lax.dynamic_index_in_dim(sequence, jnp.maximum(target - 1, 0), axis=1,
                                             keepdims=False)  # [rows]
        logits, cache = model.decode_step(token, position, cache, ops)  # [rows, vocab]
        if guidance is not None:
            conditional, unconditional = logits[:row_count], logits[row_count:]
            logits = unconditional + guidance * (conditional - unconditional)
        logits = filter_logits(logits, **filters)
        drawn = jnp.argmax(logits + noise(position), axis=-1)  # jax.random.categorical's draw
        if guidance is not None:
            drawn = jnp.concatenate([drawn, drawn])
        kept = jax.lax.dynamic_index_in_dim(sequence, target, axis=1, keepdims=False)
        token = jnp.where(target < forced_until, kept, drawn.astype(jnp.int32))
        return jax.lax.dynamic_update_slice(sequence, token[:, None], (0, target)), cache

    start, cache = 0, None
    for end in phase_ends:
        cache = init_cache(end) if cache is None else _grow(cache, end)
        noise = gumbel_rows(rng, start, end, batch_size, row_start, row_count, vocab)
        sequence, cache = jax.lax.fori_loop(start, end, functools.partial(step, noise=noise),
                                            (sequence, cache))
        start = end
    return sequence


def gumbel_rows(rng: jax.Array, start: int, end: int, batch_size: int, row_start: jax.Array,
                row_count: int, vocab: int):
    """For a decoding loop over positions [start, end): position -> the Gumbel noise
    [row_count, vocab] that `jax.random.categorical(fold_in(rng, position), logits)` adds to
    rows [row_start, row_start + row_count) of logits [batch_size, vocab] (it draws
    argmax(logits + noise)). So a batch decoded in row ranges draws exactly what it draws
    whole."""
    def at(position):
        noise = jax.random.gumbel(jax.random.fold_in(rng, position), (batch_size, vocab))
        return jax.lax.dynamic_slice_in_dim(noise, row_start, row_count, axis=0)
    if (end - start) * batch_size * vocab * 4 > MAX_NOISE_BYTES:
        return at
    drawn = jax.vmap(at)(jnp.arange(start, end))  # [end - start, rows, vocab]
    return lambda position: jax.lax.dynamic_index_in_dim(drawn, position - start, axis=0,
                                                         keepdims=False)


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
