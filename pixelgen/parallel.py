"""Devices: the mesh, and how batches and state are placed on it.

The mesh has the axes ('data', 'fsdp', 'tensor'); `config.mesh` gives their sizes and -1
fills the rest. Batches are split over 'data' and 'fsdp'; parameters are replicated for now.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 in `sizes` so that the axis sizes multiply to `num_devices`."""
    unknown = [a for a in AXES if sizes.get(a, 1) == -1]
    if len(unknown) > 1:
        raise ValueError(f'config.mesh has -1 for {unknown}; at most one axis may be -1.')
    known = math.prod(sizes.get(a, 1) for a in AXES if a not in unknown)
    if unknown:
        if num_devices % known:
            raise ValueError(f'config.mesh {dict(sizes)} cannot fill {num_devices} devices: '
                             f'{num_devices} is not a multiple of {known}.')
        sizes = {**sizes, unknown[0]: num_devices // known}
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != num_devices:
        named = dict(zip(AXES, shape, strict=True))
        raise ValueError(f'config.mesh {named} needs {math.prod(shape)} devices but '
                         f'{num_devices} are available. Set one axis to -1.')
    return shape


def make_mesh(sizes: dict[str, int]) -> Mesh:
    devices = jax.devices()
    shape = mesh_shape(dict(sizes), len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_parallelism(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from every host's local rows (split on the leading axis)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local_batch.items()}
