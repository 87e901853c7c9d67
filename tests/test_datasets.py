"""The paper's datasets through their real tfds builders, prepared offline on fake images.

Each catalog builder (cifar10, cifar100, stl10, imagenet2012) keeps its own features and split
names; only its download is replaced by a few locally made examples. The configs' split
strings must then hold out the paper's validation share (10% / 4% of train) and test on the
official split.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pixelgen.config import load_config_file
from pixelgen.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dataset -> (fake examples per official split, classes, train/validation/test sizes)
CASES = {
    'cifar10': ({'train': 20, 'test': 3}, 10, (18, 2, 3)),
    'cifar100': ({'train': 20, 'test': 3}, 100, (18, 2, 3)),
    'stl10': ({'train': 10, 'test': 2, 'unlabelled': 1}, 10, (9, 1, 2)),
    'imagenet2012': ({'train': 25, 'validation': 4, 'test': 1}, 1000, (24, 1, 4)),
}


def _png(shape, rng) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format='PNG')
    return buffer.getvalue()


def _fake_example(features: tfds.features.FeaturesDict, i: int, rng) -> dict:
    """An example of the builder's own feature spec: random images, cycling labels."""
    example = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            shape = tuple(s or 40 + 8 * (i % 2) for s in feature.shape)  # unknown sides vary
            example[key] = _png(shape, rng)
        elif isinstance(feature, tfds.features.ClassLabel):
            example[key] = i % feature.num_classes
        else:
            example[key] = f'fake_{i}.png'
    return example


def prepare_fake(name: str, sizes: dict[str, int], data_dir: str) -> None:
    """Prepares the real `name` builder (array_record) from `sizes` fake examples per split."""

    class Fake(tfds.builder_cls(name), skip_registration=True):
        def _split_generators(self, dl_manager):
            return {split: self._examples(split, n) for split, n in sizes.items()}

        def _examples(self, split, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                yield f'{split}{i}', _fake_example(self.info.features, i, rng)

    Fake.name = name
    Fake(data_dir=data_dir, file_format='array_record').download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp('catalog'))
    for name, (sizes, _, _) in CASES.items():
        prepare_fake(name, sizes, data_dir)
    return data_dir


@pytest.mark.parametrize('name', sorted(CASES))
def test_config_splits_hold_out_the_papers_validation(prepared, name):
    _, classes, (train, validation, test) = CASES[name]
    config = load_config_file(f'{REPO}/configs/igpt.py:s,dataset={name}')
    d = config.data
    assert d.dataset == name and d.palette_size == 512
    share = '96%' if name == 'imagenet2012' else '90%'
    assert (d.train_split, d.eval_split) == (f'train[:{share}]', f'train[{share}:]')
    assert d.test_split == ('validation' if name == 'imagenet2012' else 'test')
    sources = {split: pipeline.open_source(name, split, prepared)
               for split in (d.train_split, d.eval_split, d.test_split)}
    assert [len(sources[s]) for s in (d.train_split, d.eval_split, d.test_split)] == [
        train, validation, test]
    assert pipeline.num_classes(sources[d.train_split]) == classes


@pytest.mark.parametrize('name,res', [('stl10', 32), ('imagenet2012', 48), ('cifar100', 64)])
def test_images_become_square_rgb_at_the_paper_resolutions(prepared, name, res):
    config = load_config_file(f'{REPO}/configs/igpt.py:s,dataset={name},res={res}')
    assert config.data.image_size == res
    source = pipeline.open_source(name, config.data.test_split, prepared)
    example = pipeline.image_example(res)(source[0])
    assert example['image'].shape == (res, res, 3) and example['image'].dtype == np.uint8
    assert 0 <= example['label'] < CASES[name][1]


def test_paper_config_rejects_other_datasets_and_resolutions():
    with pytest.raises(ValueError, match='dataset=mnist'):
        load_config_file(f'{REPO}/configs/igpt.py:s,dataset=mnist')
    with pytest.raises(ValueError, match='res=40'):
        load_config_file(f'{REPO}/configs/igpt.py:s,res=40')


def test_dataset_without_class_labels_is_refused_for_classification(prepared):
    source = pipeline.open_source('cifar100', 'test', prepared)
    with pytest.raises(pipeline.DataError, match="no class-label feature 'id'"):
        pipeline.num_classes(source, feature='id')
