"""`fashion_mnist` built offline from the IDX files of the Debian package dataset-fashion-mnist.

tfds's catalog builder of the same name downloads from the internet; this one reads local
files and mirrors its features, plus a `caption` made from the label.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from pixelgen.data.builders.shapes import png_bytes

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'  # where the Debian package puts the files
ENV_VAR = 'PIXELGEN_FASHION_MNIST_DIR'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# Class names exactly as in tfds's catalog fashion_mnist.
LABELS = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
# What a caption calls each class (CLIP-style "a photo of ..." prompts).
CAPTION_NAMES = (
    't-shirt or top', 'pair of trousers', 'pullover', 'dress', 'coat',
    'sandal', 'shirt', 'sneaker', 'bag', 'ankle boot',
)


def caption_for(label: int) -> str:
    """Caption of class `label`, e.g. 'a photo of a sneaker', 'a photo of an ankle boot'."""
    name = CAPTION_NAMES[int(label)]
    article = 'an' if name[0] in 'aeiou' else 'a'
    return f'a photo of {article} {name}'


def resolve_source_dir(source_dir: str | os.PathLike | None = None) -> Path:
    """The IDX directory: `source_dir` if given, else $PIXELGEN_FASHION_MNIST_DIR, else Debian's."""
    return Path(source_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Array stored in a gzipped IDX file: uint8 of the shape its header gives, e.g. (N, 28, 28)."""
    with gzip.open(path) as f:
        b = f.read()
    ndim = b[3]  # header: 2 zero bytes, dtype code (0x08 = uint8), ndim; then ndim big-endian u4
    shape = np.frombuffer(b, '>u4', ndim, 4)
    return np.frombuffer(b, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(
    split: str, source_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of `split`; FileNotFoundError if absent."""
    directory = resolve_source_dir(source_dir)
    paths = [directory / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files not found: {", ".join(missing)}. The Debian package '
            'dataset-fashion-mnist is missing: run `sudo apt-get install dataset-fashion-mnist` '
            f'(or set {ENV_VAR} to a directory holding {", ".join(sum(FILES.values(), ()))}).'
        )
    images, labels = (read_idx(p) for p in paths)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(
            f'bad IDX shapes in {directory}: images {images.shape}, labels {labels.shape}'
        )
    return images, labels


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fashion-MNIST (60000 train / 10000 test 28x28 grayscale), read from local IDX files.

    Records keep the files' order (`disable_shuffling`): record i of a split is image i.
    """

    name = 'fashion_mnist'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release: local IDX files, label captions.'}

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs: Any):
        """`source_dir` overrides where the IDX .gz files are read (see `resolve_source_dir`)."""
        self._source_dir = source_dir
        super().__init__(**kwargs)
        # tfds re-creates pickled builders from _original_state; keep the override there too.
        self._original_state['source_dir'] = source_dir

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(28, 28, 1), encoding_format='png'),
                'label': tfds.features.ClassLabel(names=LABELS),
                'caption': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://github.com/zalandoresearch/fashion-mnist',
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the files are local
        # Load eagerly so missing files fail here, with the install hint, not inside the writer.
        return {
            split: self._generate_examples(split, *load_split(split, self._source_dir))
            for split in FILES
        }

    def _generate_examples(self, split: str, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield f'{split}_{i:06d}', {
                'image': png_bytes(image),
                'label': int(label),
                'caption': caption_for(label),
            }
