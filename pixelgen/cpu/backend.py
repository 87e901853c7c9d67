"""How the code above `pixelgen.nn` and `pixelgen.models` applies the CPU backend (see
`pixelgen.cpu`): the native attention kernel given to a model's layers, and the decode
clients and step operations of the samplers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from pixelgen.config import ConfigError
from pixelgen.cpu import core_split, decode_clients, native, native_attention
from pixelgen.cpu.packed_matmul import PackedWeights
from pixelgen.nn.attention import MultiHeadAttention
from pixelgen.nn.decode_ops import PLAIN, DecodeOps


def configure(runtime) -> None:
    """Applies a config's `runtime` section (`native_attention`, `cpu_decode`) to this process;
    the environment overrides (pixelgen.cpu) win over it. Jobs call it before they build or
    trace a model."""
    if runtime.cpu_decode not in decode_clients.CHOICES:
        raise ConfigError(f'config.runtime.cpu_decode={runtime.cpu_decode!r}; expected one of '
                          f'{", ".join(decode_clients.CHOICES)}.')
    native_attention._enabled = bool(runtime.native_attention)
    decode_clients._setting = runtime.cpu_decode


def use_native_attention(model: nnx.Module) -> nnx.Module:
    """`model` with the native attention kernel as every attention layer's CPU path."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MultiHeadAttention):
            module.cpu_kernel = native_attention.KERNEL
    return model


def decode_on_cpu_clients(run: Callable[..., jax.Array], state: nnx.State, shared: Sequence[Any],
           per_row: Sequence[Any], batch_size: int) -> jax.Array:
    """`run(state, *shared, *per_row, row_start=0, row_count=batch_size)`: on 2 cores with the
    weights split between the cores' clients (`core_split.map_halves`, where it applies), else
    on the core clients with the rows split (`decode_clients.map_rows`, which runs it where
    the parameters are when those do not apply). `run` takes `party` and `packed` too, to pass
    to `decode_ops`."""
    if core_split.applies(state):
        return core_split.map_halves(run, state, shared, per_row, batch_size)
    return decode_clients.map_rows(run, state, shared, per_row, batch_size, pack=True)


def decode_ops(model: nnx.Module, party: int | None, packed: bool) -> DecodeOps:
    """For tracing a sampler's loop: with `party` (0 or 1), `model` holds that party's half
    of the weights and sums each block's outputs with the other's (`core_split.as_party`);
    with `packed`, its matmuls stream weights packed here, once (`packed_matmul`). PLAIN
    where neither applies."""
    combine = core_split.as_party(model, party) if party is not None else None
    panel = native.panel() if packed else None
    if combine is None and panel is None:
        return PLAIN
    project = PackedWeights(model, panel).project if panel is not None else PLAIN.project
    return DecodeOps(project=project, combine=combine or PLAIN.combine,
                     fuse_qkv=panel is None)
