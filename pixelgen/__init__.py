"""pixelgen: Image GPT, DALL-E and CLIP in JAX / Flax NNX, from one CPU to a pod.

    import pixelgen
    loaded = pixelgen.load('runs/igpt_shapes')   # .model, .config, .palette, .step
"""

from pixelgen.cpu import allocator as _allocator

__version__ = '0.1.0'

# Before JAX creates its CPU client: XLA:CPU then reuses freed host memory instead of faulting
# in fresh pages at every step (pixelgen.cpu.allocator; PIXELGEN_MALLOC=default opts out).
_allocator.configure()


def load(workdir: str, step: int | None = None, *, mesh: dict[str, int] | None = None):
    """The model of a training workdir at its latest (or the given) checkpoint: its
    parameters only, sharded over `mesh` (e.g. {'data': 1, 'fsdp': -1}; default: the run's
    config.mesh fitted to the devices here). See pixelgen.pretrained.load."""
    from pixelgen.pretrained import load as _load  # keep `import pixelgen` light
    return _load(workdir, step, mesh=mesh)
