"""pixelgen: Image GPT, DALL-E and CLIP in JAX / Flax NNX, from one CPU to a pod.

    import pixelgen
    loaded = pixelgen.load('runs/igpt_shapes')   # .model, .config, .palette, .step
"""

__version__ = '0.1.0'


def load(workdir: str, step: int | None = None):
    """The model of a training workdir at its latest (or the given) checkpoint."""
    from pixelgen.pretrained import load as _load  # keep `import pixelgen` light
    return _load(workdir, step)
