"""Tests of the embedded tfds builders (tiny builds in tmp dirs; no TensorFlow, no network)."""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pixelgen.data.builders import EMBEDDED, FashionMnist, Shapes, ensure_built
from pixelgen.data.builders import fashion_mnist as fm
from pixelgen.data.builders import shapes as sh

TINY = 12  # examples per split in the tiny shapes builds
FASHION_LABELS = {'train': [0, 1, 7, 9, 3], 'test': [8, 5, 2]}


def _config(**kwargs) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(try_download_gcs=False, **kwargs)


@pytest.fixture(scope='module')
def shapes_builds(tmp_path_factory) -> tuple[Shapes, Shapes]:
    """Two tiny `shapes` builds in separate data dirs, shrunk by the two supported routes:
    tfds's max_examples_per_split, and overriding Shapes.NUM_EXAMPLES."""
    capped = Shapes(data_dir=tmp_path_factory.mktemp('capped'), file_format='array_record')
    capped.download_and_prepare(download_config=_config(max_examples_per_split=TINY))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Shapes, 'NUM_EXAMPLES', {'train': TINY, 'test': TINY})
        small = Shapes(data_dir=tmp_path_factory.mktemp('small'), file_format='array_record')
        small.download_and_prepare(download_config=_config())
    return capped, small


def test_shapes_builds_are_identical(shapes_builds):
    # Compared per record, PNG bytes included: the files' bytes differ between processes
    # because protobuf (upb) serializes tf.Example's feature map in a per-process order.
    raw = {'image': tfds.decode.SkipDecoding()}
    capped, small = shapes_builds
    for split in ('train', 'test'):
        a, b = (builder.as_data_source(split, decoders=raw) for builder in (capped, small))
        assert len(a) == len(b) == TINY
        for i in range(TINY):
            assert isinstance(a[i]['image'], bytes)
            assert a[i] == b[i]


def test_shapes_records_are_make_example_in_order(shapes_builds):
    source = shapes_builds[0].as_data_source('train')
    for i in range(TINY):
        record, expected = source[i], sh.make_example('train', i)
        assert record['image'].shape == (64, 64, 3) and record['image'].dtype == np.uint8
        np.testing.assert_array_equal(record['image'], expected['image'])  # PNG is lossless
        assert isinstance(record['caption'], bytes)  # tfds Text reads back as bytes
        assert record['caption'].decode() == expected['caption']
        for key in ('label', 'shape', 'color', 'size', 'num_objects'):
            assert int(record[key]) == expected[key], key


def test_shapes_feature_spec(shapes_builds):
    info = shapes_builds[0].info
    features = info.features
    assert features['label'].names == list(sh.SHAPES) == features['shape'].names
    assert features['color'].names == list(sh.COLORS)
    assert features['size'].names == list(sh.SIZES)
    assert features['image'].shape == (64, 64, 3)
    assert info.supervised_keys == ('image', 'label')
    assert sh.Shapes.NUM_EXAMPLES == {'train': 10_000, 'test': 1_000}


def test_shapes_captions_describe_labels():
    phrase = r'a (small|large) (\w+) (\w+)'
    pattern = re.compile(rf'{phrase}(?: ({"|".join(sh.RELATIONS)}) {phrase})?')
    counts = {1: 0, 2: 0}
    for i in range(200):
        ex = sh.make_example('train', i)
        m = pattern.fullmatch(ex['caption'])
        assert m, ex['caption']
        assert m.group(1) == sh.SIZES[ex['size']]
        assert m.group(2) == sh.COLORS[ex['color']]
        assert m.group(3) == sh.SHAPES[ex['shape']] == sh.SHAPES[ex['label']]
        assert (m.group(4) is not None) == (ex['num_objects'] == 2)
        if m.group(4):
            assert m.group(6) in sh.COLORS and m.group(7) in sh.SHAPES
        counts[ex['num_objects']] += 1
    assert 0.15 < counts[2] / 200 < 0.45, counts


def test_shapes_geometry():
    for split in ('train', 'test'):
        for i in range(300):
            scene = sh.sample_scene(split, i)
            for o in scene.objects:
                for c in (o.cx, o.cy):
                    assert sh.MARGIN <= c - o.radius and c + o.radius <= 64 - sh.MARGIN
            if len(scene.objects) == 2:
                a, b = scene.objects
                major, minor = sorted([abs(a.cx - b.cx), abs(a.cy - b.cy)], reverse=True)
                assert major >= a.radius + b.radius + sh.GAP  # boxes apart
                assert minor <= major / 2  # relation unambiguous


def test_shapes_pixels_match_scene():
    for i in range(20):
        scene, image = sh.sample_scene('test', i), sh.make_example('test', i)['image']
        for o in scene.objects:  # every shape covers its centre pixel with its exact colour
            assert tuple(image[int(o.cy), int(o.cx)]) == o.rgb
        assert tuple(image[0, 0]) == scene.background  # MARGIN keeps the corner clear


def test_palette_contrasts_with_backgrounds():
    for rgb in sh.PALETTE.values():
        for bg in sh.BACKGROUNDS:
            assert np.linalg.norm(np.subtract(rgb, bg)) >= 110


def test_ensure_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Shapes, 'NUM_EXAMPLES', {'train': 4, 'test': 2})
    builder = ensure_built('shapes', str(tmp_path))
    out = capsys.readouterr().out
    assert 'Building' in out and str(tmp_path) in out and 'Built' in out
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 4, 'test': 2}
    again = ensure_built('shapes', str(tmp_path))
    assert capsys.readouterr().out == ''  # found prepared: nothing rebuilt
    assert len(again.as_data_source('test')) == 2
    assert set(EMBEDDED) == {'shapes', 'fashion_mnist'}
    with pytest.raises(ValueError, match='unknown embedded dataset'):
        ensure_built('cifar10', str(tmp_path))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def fashion_src(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Tiny IDX files (5 train / 3 test images) named like the Debian package's."""
    src = tmp_path_factory.mktemp('fashion_src')
    rng = np.random.default_rng(0)
    images = {}
    for split, labels in FASHION_LABELS.items():
        images[split] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        image_file, label_file = fm.FILES[split]
        _write_idx(src / image_file, images[split])
        _write_idx(src / label_file, np.array(labels))
    return src, images


@pytest.fixture(scope='module')
def fashion_builder(fashion_src, tmp_path_factory) -> FashionMnist:
    builder = FashionMnist(
        data_dir=tmp_path_factory.mktemp('fashion'), source_dir=fashion_src[0],
        file_format='array_record',
    )
    builder.download_and_prepare(download_config=_config())
    return builder


def test_fashion_mnist_records(fashion_builder, fashion_src):
    images = fashion_src[1]
    for split, labels in FASHION_LABELS.items():
        source = fashion_builder.as_data_source(split)
        assert len(source) == len(labels)
        for i, label in enumerate(labels):
            ex = source[i]
            assert ex['image'].shape == (28, 28, 1) and ex['image'].dtype == np.uint8
            np.testing.assert_array_equal(ex['image'][..., 0], images[split][i])
            assert int(ex['label']) == label
            assert ex['caption'] == fm.caption_for(label).encode()
    assert fashion_builder.info.features['label'].names[7] == 'Sneaker'
    assert fm.caption_for(7) == 'a photo of a sneaker'
    assert fm.caption_for(9) == 'a photo of an ankle boot'


def test_fashion_source_dir_resolution(fashion_src, monkeypatch, tmp_path):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    assert fm.resolve_source_dir() == Path(fm.DEFAULT_DIR)
    monkeypatch.setenv(fm.ENV_VAR, str(fashion_src[0]))
    assert fm.resolve_source_dir() == fashion_src[0]
    assert fm.resolve_source_dir(tmp_path) == tmp_path  # explicit beats the env var
    builder = FashionMnist(data_dir=tmp_path, source_dir=fashion_src[0])
    assert pickle.loads(pickle.dumps(builder))._source_dir == fashion_src[0]


def test_fashion_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    builder = FashionMnist(
        data_dir=tmp_path / 'data', source_dir=tmp_path / 'absent', file_format='array_record'
    )
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        builder.download_and_prepare(download_config=_config())
    assert not builder.is_prepared()
