"""Where a decoding step combines partial results, when its weights are split between devices.

A block's attention output and MLP output are sums over heads and hidden units. When each of
two devices holds half of them (`pixelgen.core_split`), each computes half of each sum, and
`combined` adds the two halves; everywhere else it is the identity. The combining function is
set for the tracing of one jitted function (`combining`), never globally: a function traced
without it compiles without it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

_combine: contextvars.ContextVar[Callable[[jax.Array], jax.Array] | None] = (
    contextvars.ContextVar('pixelgen_combine', default=None))


def combined(x: jax.Array) -> jax.Array:
    """x summed with the other devices' halves, while tracing under `combining`; else x."""
    combine = _combine.get()
    return x if combine is None else combine(x)


@contextlib.contextmanager
def combining(combine: Callable[[jax.Array], jax.Array]) -> Iterator[None]:
    token = _combine.set(combine)
    try:
        yield
    finally:
        _combine.reset(token)
