"""a^T · b over shared leading rows, as a product XLA:CPU hands to its fast matmul library.

Weight and key/value gradients contract the row (token) axis of two [.., rows, features]
operands. Written as `a.T @ b`, XLA folds the transpose into the dot, whose left operand is
then contracted on its major axis; XLA:CPU runs that form in Eigen, at a fraction of the rate
of the YNNPACK matmuls it uses for the canonical [M, K] × [K, N] form
(docs/cpu-performance.md, "Where the time goes"). Here the transpose is materialised and
fenced with `jax.lax.optimization_barrier`, which XLA may not fold through, so the product
stays canonical. Costs one copy of `a` (pass the smaller operand as `a`) and, when asked
for, of the result.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def rows_t_times(a: jax.Array, b: jax.Array, *, batch: str = '') -> jax.Array:
    """a^T · b: a [*batch, rows, p], b [*batch, rows, q] -> [*batch, p, q] in float32.

    `batch` names the leading axes einsum-style ('bhg'), all shared by a and b. Lowered for
    the CPU, the canonical product of the explicit transpose of a and b (see the module
    docstring); for any other platform, the plain contraction.
    """
    spec = f'{batch}rp,{batch}rq->{batch}pq'

    def plain(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(a, b, cpu=functools.partial(_canonical_rows_t_times, batch),
                                      default=plain)


CPU_LAYOUT_BARRIER = 'cpu_layout_barrier'  # the name scope of XLA:CPU's layout fences


def _canonical_rows_t_times(batch: str, a: jax.Array, b: jax.Array) -> jax.Array:
    with jax.named_scope(CPU_LAYOUT_BARRIER):
        a_t = jax.lax.optimization_barrier(a.swapaxes(-1, -2))
    product = jnp.einsum(f'{batch}pr,{batch}rq->{batch}pq', a_t, b,
                         preferred_element_type=jnp.float32)
    with jax.named_scope(CPU_LAYOUT_BARRIER):
        return jax.lax.optimization_barrier(product)


def linear_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`nnx.Linear(dot_general=linear_dot_general)`: x [..., in] · kernel [in, out], whose
    kernel gradient is `rows_t_times` (autodiff's x^T · dy is the slow Eigen form). Any
    other contraction, or an explicit out_sharding, goes to `jax.lax.dot_general` unchanged."""
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = dimension_numbers
    if (tuple(contract_lhs) != (lhs.ndim - 1,) or tuple(contract_rhs) != (0,) or batch_lhs
            or batch_rhs or rhs.ndim != 2 or out_sharding is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
    return _projection(lhs, rhs, 1, precision, preferred_element_type)


def projection_einsum(spec: str, x: jax.Array, kernel: jax.Array, precision=None,
                      preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`nnx.Einsum(einsum_op=projection_einsum)`: a projection whose kernel's leading axes
    contract x's trailing ones ('bld,dhk->blhk', 'blhk,hkd->bld') as one flat matmul whose
    kernel gradient is `rows_t_times`, as `linear_dot_general`'s (autodiff of the einsum
    transposes its [rows, features] output gradient instead, in the fusion that assembles
    it, at several times the cost of a plain copy). Any other einsum, or an explicit
    out_sharding, goes to `jnp.einsum` unchanged."""
    inputs, out_axes = spec.replace(' ', '').split('->')
    x_axes, k_axes = inputs.split(',')
    shared = len(x_axes) - len(x_axes.rstrip(k_axes))  # x's trailing axes found in kernel
    batch, contracted = x_axes[:len(x_axes) - shared], x_axes[len(x_axes) - shared:]
    if (out_sharding is not None or not shared or not k_axes.startswith(contracted)
            or out_axes != batch + k_axes[shared:] or set(batch) & set(k_axes)):
        return jnp.einsum(spec, x, kernel, precision=precision,
                          preferred_element_type=preferred_element_type,
                          out_sharding=out_sharding)
    return _projection(x, kernel, shared, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _projection(x: jax.Array, kernel: jax.Array, shared: int, precision, out_dtype):
    """x [*rows, *contracted] · kernel [*contracted, *features] -> [*rows, *features], the
    `shared` contracted axes flattened into one matmul; its kernel gradient is `rows_t_times`
    over the rows (autodiff's x^T · dy is the slow Eigen form, or a transposing fusion)."""
    rows, features = x.shape[:x.ndim - shared], kernel.shape[shared:]
    flat = jnp.einsum('...i,io->...o', x.reshape(*rows, -1),
                      kernel.reshape(-1, math.prod(features)), precision=precision,
                      preferred_element_type=out_dtype)
    return flat.reshape(*rows, *features)


def _projection_fwd(x, kernel, shared, precision, out_dtype):
    # The residuals are x and kernel as given, as autodiff of the einsum keeps them.
    return _projection(x, kernel, shared, precision, out_dtype), (x, kernel)


def _projection_bwd(shared, precision, out_dtype, residuals, dy):
    del out_dtype
    x, kernel = residuals
    contracted = math.prod(kernel.shape[:shared])
    dy = dy.reshape(-1, math.prod(kernel.shape[shared:]))
    dx = jnp.einsum('ro,io->ri', dy, kernel.reshape(contracted, -1), precision=precision,
                    preferred_element_type=jnp.float32)
    d_kernel = rows_t_times(x.reshape(-1, contracted), dy)
    return dx.reshape(x.shape).astype(x.dtype), d_kernel.reshape(kernel.shape).astype(kernel.dtype)


_projection.defvjp(_projection_fwd, _projection_bwd)
