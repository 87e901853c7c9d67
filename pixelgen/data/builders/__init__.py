"""Datasets built locally: tfds builders that need no network and no TensorFlow.

`ensure_built(name, data_dir)` prepares one (ArrayRecord files) on first use and returns its
builder; read it with `builder.as_data_source(split)`. `name` is an embedded dataset
(`shapes`, `fashion_mnist`), `image_folder:<path>`, a user's own images (image_folder.py), or
`prepared:webdataset:<pattern>` / `prepared:parquet:<pattern>`, image-text shards converted
once (prepared_shards.py). `python -m pixelgen.prepare` builds any of them ahead of time in N
processes.
`data_dir` may be a URL (gs://...): the dataset is then built in this machine's cache (the
ArrayRecord writer writes local files only) and copied there.
"""

from __future__ import annotations

import time

import jax
import tensorflow_datasets as tfds

from pixelgen import storage
from pixelgen.data.builders import image_folder
from pixelgen.data.builders.fashion_mnist import FashionMnist
from pixelgen.data.builders.image_folder import IMAGE_FOLDER_PREFIX
from pixelgen.data.builders.prepared_shards import PREPARED_PREFIX, PreparedShards
from pixelgen.data.builders.shapes import COLORS, SHAPES, SIZES, Shapes

__all__ = ['COLORS', 'EMBEDDED', 'IMAGE_FOLDER_PREFIX', 'PREPARED_PREFIX', 'SHAPES', 'SIZES',
           'FashionMnist', 'Shapes', 'builds_locally', 'ensure_built']

EMBEDDED: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    'shapes': Shapes,
    'fashion_mnist': FashionMnist,
}


def builds_locally(name: str) -> bool:
    """Whether `ensure_built` knows `name` (else it is a tfds catalog name)."""
    return name in EMBEDDED or name.startswith((IMAGE_FOLDER_PREFIX, PREPARED_PREFIX))


def make_builder(name: str, data_dir: str, num_workers: int = 0) -> tfds.core.DatasetBuilder:
    """The builder of `name` in `data_dir`, prepared or not; a local folder or shards are
    decoded by `num_workers` processes when it builds (0: this one)."""
    if name.startswith(IMAGE_FOLDER_PREFIX):
        return image_folder.ImageFolder(folder=image_folder.folder_of(name),
                                        num_workers=num_workers, data_dir=data_dir,
                                        file_format='array_record')
    if name.startswith(PREPARED_PREFIX):
        return PreparedShards(dataset=name, num_workers=num_workers, data_dir=data_dir,
                              file_format='array_record')
    if name in EMBEDDED:
        return EMBEDDED[name](data_dir=data_dir, file_format='array_record')
    raise ValueError(f'unknown embedded dataset {name!r}; choose from {sorted(EMBEDDED)}, '
                     f"'{IMAGE_FOLDER_PREFIX}/path/to/images' or "
                     f"'{PREPARED_PREFIX}webdataset:/path/to/shards/*.tar'")


# tfds takes a folder with these for a prepared dataset: they are copied up last.
INFO_FILES = ('dataset_info.json', 'features.json')


def ensure_built(name: str, data_dir: str, num_workers: int = 0) -> tfds.core.DatasetBuilder:
    """Builds an embedded dataset into data_dir on first use (printing progress: what is being
    built, where, and how long it took); returns the builder. Later calls find it prepared and
    return at once.

    Concurrent builders (e.g. several hosts sharing data_dir) are tolerable: tfds writes into a
    temporary directory and renames it into place when complete, so readers never see a partial
    dataset; the loser of the race just wastes its work.
    """
    builder = make_builder(name, data_dir, num_workers)
    if builder.is_prepared():
        return builder
    if storage.is_remote(data_dir):
        local = ensure_built(name, storage.cache_dir('data', data_dir), num_workers)
        if jax.process_index() == 0:
            print(f'Copying {name!r} to {builder.data_dir} ...', flush=True)
            storage.upload_tree(str(local.data_dir), str(builder.data_dir), last=INFO_FILES)
        return local
    print(f'Building dataset {name!r} into {builder.data_dir} ...', flush=True)
    start = time.perf_counter()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    sizes = ', '.join(f'{s}: {info.num_examples}' for s, info in builder.info.splits.items())
    print(f'Built {name!r} ({sizes}) in {time.perf_counter() - start:.1f} s.', flush=True)
    return builder
