"""Input pipeline: image normalisation, seeded and resumable batches, eval padding, errors."""

from __future__ import annotations

import numpy as np
import pytest

from pixelgen.data import pipeline


@pytest.mark.parametrize('shape', [(10, 10), (10, 10, 1), (10, 10, 3), (10, 10, 4), (12, 20, 3)])
def test_any_image_becomes_square_rgb(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = pipeline.to_rgb_square(image, 6)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    if len(shape) == 2 or shape[-1] == 1:  # grayscale stays gray
        np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_growing_and_identity_sizes():
    image = np.full((4, 4, 3), 77, np.uint8)
    np.testing.assert_array_equal(pipeline.to_rgb_square(image, 4), image)
    assert pipeline.to_rgb_square(image, 9).shape == (9, 9, 3)


@pytest.fixture(scope='module')
def source(data_dir):
    return pipeline.open_source('shapes', 'test', data_dir)


def _iterator(source, seed=0):
    return pipeline.train_iterator(source, batch_size=4, seed=seed,
                                   prepare=pipeline.image_example(8), num_threads=1, prefetch=1)


@pytest.mark.slow
def test_train_batches_are_seeded(source):
    a, b, c = _iterator(source), _iterator(source), _iterator(source, seed=1)
    first_a, first_b, first_c = next(a), next(b), next(c)
    assert first_a['image'].shape == (4, 8, 8, 3) and first_a['label'].shape == (4,)
    np.testing.assert_array_equal(first_a['image'], first_b['image'])
    assert not np.array_equal(first_a['image'], first_c['image'])


@pytest.mark.slow
def test_iterator_state_resumes_the_same_batches(source):
    it = _iterator(source)
    next(it), next(it)
    state = it.get_state()
    expected = [next(it)['image'] for _ in range(2)]
    resumed = _iterator(source)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)['image'], want)


@pytest.mark.slow
def test_eval_batches_pad_the_last_batch_with_mask_zero(source):
    batches = list(pipeline.eval_batches(source, batch_size=4, num_examples=10,
                                         prepare=pipeline.image_example(8)))
    assert len(batches) == 3
    assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)
    np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0])
    assert sum(b['mask'].sum() for b in batches) == 10


def test_holdout_phrases_split_a_source_by_caption(source):
    """The held-out pairs: left out of training (dVAE, CLIP, DALL·E), kept for evaluation."""
    first = pipeline.Subset(source, np.arange(200))
    phrases = ('red star', 'blue circle')
    train = pipeline.without_phrases(first, phrases)
    held = pipeline.with_phrases(first, phrases)
    assert len(train) + len(held) == 200 and len(held) > 0
    assert not any(p in train[i]['caption'].decode().lower() for i in range(len(train))
                   for p in phrases)
    assert all(any(p in held[i]['caption'].decode().lower() for p in phrases)
               for i in range(len(held)))
    assert pipeline.without_phrases(first, ()) is first
    with pytest.raises(pipeline.DataError, match='No example'):
        pipeline.with_phrases(first, ('a striped unicorn',))


@pytest.mark.slow
def test_unknown_and_unprepared_datasets_say_what_to_do(tmp_path, data_dir):
    with pytest.raises(pipeline.DataError, match='nor a tfds catalog name'):
        pipeline.open_source('no_such_dataset_xyz', 'train', str(tmp_path))
    with pytest.raises(pipeline.DataError, match="array_record"):
        pipeline.open_source('cifar10', 'train', str(tmp_path))
    with pytest.raises(pipeline.DataError, match="no split 'validation'"):
        pipeline.open_source('shapes', 'validation', data_dir)


@pytest.mark.slow
def test_too_small_split_for_one_batch(source):
    with pytest.raises(pipeline.DataError, match='batch_size'):
        pipeline.train_iterator(source, batch_size=len(source) + 1, seed=0,
                                prepare=pipeline.image_example(8))


@pytest.mark.slow
def test_palette_pixels_are_seeded(source):
    a = pipeline.sample_pixels(source, image_size=8, num_images=5, pixels_per_image=4, seed=0)
    b = pipeline.sample_pixels(source, image_size=8, num_images=5, pixels_per_image=4, seed=0)
    assert a.shape == (20, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_a_prepared_tfds_catalog_dataset_goes_through_the_same_path(tmp_path):
    """cifar10's own tfds builder, fed local images instead of its download, array_record."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image
    from tensorflow_datasets.image_classification import cifar

    def png(a):
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format='PNG')
        return buffer.getvalue()

    class LocalCifar10(cifar.Cifar10, skip_registration=True):
        name = 'cifar10'

        def _split_generators(self, dl_manager):
            return {'train': self._examples(8), 'test': self._examples(3)}

        def _examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                yield i, {'id': f'x{i}', 'label': i % 10,
                          'image': png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))}

    LocalCifar10(data_dir=str(tmp_path), file_format='array_record').download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    source = pipeline.open_source('cifar10', 'train', str(tmp_path))
    assert len(source) == 8
    batch = next(pipeline.train_iterator(source, batch_size=4, seed=0,
                                         prepare=pipeline.image_example(16)))
    assert batch['image'].shape == (4, 16, 16, 3)
    assert set(batch['label'].tolist()) <= set(range(10))
