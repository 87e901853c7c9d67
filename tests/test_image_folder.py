"""`image_folder:<path>`: a folder holding every kind of bad data builds, with exact counts."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pixelgen.data import pipeline
from pixelgen.data.builders import ensure_built
from pixelgen.data.builders.image_folder import ImageFolder, clean_caption

GOOD = 20  # good_00.png ... good_19.png: plain RGB, 16 wide and 12 high
LONG_CAPTION = ' '.join(['word'] * 400)  # 1999 characters


def _png(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, **kwargs).save(buf, format='PNG')
    return buf.getvalue()


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data)))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
            + chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))


def _color(i: int) -> np.ndarray:
    return np.array([10 * i, 255 - 10 * i, 7 * i], np.uint8)


def make_bad_folder(root) -> dict[str, int]:
    """Writes the bad-data folder; returns the counts its build summary must show."""
    files = {f'good_{i:02d}.png': _png(np.broadcast_to(_color(i), (12, 16, 3)).copy())
             for i in range(GOOD)}
    half_clear = np.zeros((12, 16, 4), np.uint8)
    half_clear[..., 0], half_clear[:, :8, 3] = 255, 255  # red, left half opaque
    files['rgba.png'] = _png(half_clear)
    files['palette.png'] = _encode(Image.new('RGB', (16, 12), (0, 0, 255)).quantize(4), 'PNG')
    files['cmyk.jpg'] = _encode(Image.new('CMYK', (16, 12), (0, 255, 0, 0)), 'JPEG')
    files['gray16.png'] = _png(np.full((12, 16), 65535 // 2, np.uint16))
    files['gray.png'] = _png(np.full((12, 16), 200, np.uint8))
    gradient = np.linspace(0, 255, 1024 * 2048 * 3).astype(np.uint8).reshape(2048, 1024, 3)
    files['huge.png'] = _png(gradient)  # 1024 wide, 2048 high -> 256 x 512
    files['corrupt.jpg'] = np.random.default_rng(0).bytes(3000)
    files['truncated.png'] = files['good_01.png'][:len(files['good_01.png']) // 2]
    photo = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    jpeg = _encode(Image.fromarray(photo), 'JPEG')
    files['truncated.jpg'] = jpeg[:len(jpeg) // 2]
    files['notes.txt'] = b'not an image'
    files['tiny.png'] = _png(np.zeros((1, 1, 3), np.uint8))
    files['bomb.png'] = _png_header(12_000, 10_000)  # above MAX_PIXELS, below PIL's own guard
    files['bomb_header.png'] = _png_header(100_000, 100_000)  # PIL's guard refuses to open it
    files['good_03.jpg'] = _encode(Image.new('RGB', (16, 12), (1, 2, 3)), 'JPEG')  # a 2nd good_03
    files['Good_04.png'] = files['good_04.png']  # same name but for case
    captions = [b'file_name,caption']
    captions += [f'good_{i:02d}.png,a colour numbered {i}'.encode() for i in range(15)]
    captions += [b'good_15.png,"   "',                          # empty
                 f'good_16.png,{LONG_CAPTION}'.encode(),        # over-long
                 'good_17.png,caf\u00e9 au lait'.encode('cp1252'),  # not UTF-8
                 b'good_00.png,a second caption',               # duplicate
                 b'missing.png,an image that is not there',     # caption without image
                 b'../outside/secret.png,escape',               # unsafe path
                 b'lonely',                                      # malformed row
                 b'rgba,"a red square\nhalf transparent"',       # by stem, quoted newline
                 b'notes.txt,a caption for a text file']         # names no image
    files['captions.csv'] = b'\n'.join(captions) + b'\n'
    for name, data in files.items():
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
    written = GOOD + 6  # 20 good, 5 converted, 1 resized; good_03.jpg, Good_04.png skipped
    return {
        'files_seen': len(files) - 1,  # all but captions.csv
        'converted_from_RGBA': 1, 'converted_from_P': 1, 'converted_from_CMYK': 1,
        'converted_from_I;16': 1, 'converted_from_L': 1, 'resized': 1,
        'skipped_corrupt': 3, 'skipped_not_an_image': 1, 'skipped_too_small': 1,
        'skipped_too_many_pixels': 2, 'skipped_duplicate_name': 2,
        'caption_empty': 1, 'caption_truncated': 1, 'caption_not_utf8': 1,
        'caption_duplicate': 1, 'caption_without_image': 2, 'caption_unsafe_path': 1,
        'caption_malformed_row': 1,
        # good_18, good_19 and the converted/resized ones but rgba have no caption row
        'image_without_caption': 2 + 5,
        'written': written,
    }


@pytest.fixture(scope='module')
def bad_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp('my_images')
    expected = make_bad_folder(folder)
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    builder = ensure_built(f'image_folder:{folder}', data_dir)
    return builder, expected, str(folder), data_dir


def _all(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_summary_counts_every_kind_of_bad_data(bad_build):
    builder, expected, _, _ = bad_build
    summary = builder.info.metadata['summary']
    counts = dict(summary['counts'])
    written = expected.pop('written')
    wanted_test = round(ImageFolder.TEST_FRACTION * (expected['files_seen'] - 1))  # - notes.txt
    assert counts.pop('written_test') == wanted_test
    assert counts.pop('written_train') == written - wanted_test
    assert counts == expected
    assert sorted(summary['examples']['skipped_too_many_pixels']) == ['bomb.png',
                                                                      'bomb_header.png']
    assert summary['examples']['caption_unsafe_path'] == ['captions.csv:22']


def test_summary_is_recorded_next_to_the_dataset(bad_build):
    builder, _, _, data_dir = bad_build
    with open(os.path.join(builder.data_dir, 'metadata.json')) as f:
        assert json.load(f)['summary'] == builder.info.metadata['summary']
    reopened = ensure_built(builder.info.metadata['summary']['folder'].join(
        ['image_folder:', '']), data_dir)
    assert reopened.info.metadata['summary'] == builder.info.metadata['summary']


def test_images_come_out_rgb_at_the_right_size_with_their_captions(bad_build):
    builder, _, _, _ = bad_build
    examples = {e['file_name'].decode(): e for split in ('train', 'test')
                for e in _all(builder, split)}
    assert 'good_04.png' in examples and 'Good_04.png' not in examples  # the captioned one
    assert 'good_03.png' in examples and 'good_03.jpg' not in examples
    for name, e in examples.items():
        assert e['image'].dtype == np.uint8 and e['image'].shape[2] == 3, name
        expected_shape = (512, 256, 3) if name == 'huge.png' else (12, 16, 3)
        assert e['image'].shape == expected_shape, name
    for i in range(GOOD):
        np.testing.assert_array_equal(examples[f'good_{i:02d}.png']['image'][0, 0], _color(i))
    assert examples['good_07.png']['caption'] == b'a colour numbered 7'
    assert examples['good_00.png']['caption'] == b'a colour numbered 0'  # the first row wins
    assert examples['good_15.png']['caption'] == b''
    assert examples['good_17.png']['caption'].decode() == 'caf\u00e9 au lait'
    long = examples['good_16.png']['caption'].decode()
    assert len(long) <= ImageFolder.MAX_CAPTION_CHARS and LONG_CAPTION.startswith(long)
    assert long.endswith('word')
    assert examples['rgba.png']['caption'] == b'a red square half transparent'
    np.testing.assert_array_equal(examples['rgba.png']['image'][0, 0], [255, 0, 0])
    np.testing.assert_array_equal(examples['rgba.png']['image'][0, -1], [255, 255, 255])
    np.testing.assert_array_equal(examples['cmyk.jpg']['image'][0, 0], [255, 0, 255])
    np.testing.assert_array_equal(examples['gray16.png']['image'][0, 0], [127, 127, 127])
    np.testing.assert_array_equal(examples['palette.png']['image'][0, 0], [0, 0, 255])


def test_pipeline_reads_the_folder_like_any_dataset(bad_build):
    builder, _, folder, data_dir = bad_build
    source = pipeline.open_source(f'image_folder:{folder}', 'train', data_dir)
    assert len(source) == builder.info.splits['train'].num_examples
    prepared = pipeline.image_example(8)(source[0])
    assert prepared['image'].shape == (8, 8, 3) and prepared['label'] == -1


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(pipeline.DataError, match='is not a directory'):
        pipeline.open_source(f'image_folder:{tmp_path}/nope', 'train', str(tmp_path))


def _write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def test_class_folders_become_labels_and_split_folders_splits(tmp_path):
    root = tmp_path / 'pets'
    image = _png(np.full((10, 10, 3), 9, np.uint8))
    for path in ('train/cat/001.png', 'train/cat/002.png', 'train/dog/001.png',
                 'train/dog/deeper/003.png', 'test/cat/004.png', 'test/dog/005.png',
                 'train/stray.png'):
        _write(str(root / path), image)
    _write(str(tmp_path / 'secret.png'), image)
    os.symlink(tmp_path / 'secret.png', root / 'train' / 'cat' / 'link.png')
    lines = [{'file_name': '001.png', 'caption': 'ambiguous'},
             {'file_name': 'train/cat/002.png', 'caption': 'a cat'},
             {'file_name': '003', 'text': 'a deep dog'},
             {'file_name': 'test/dog/005.png', 'caption': 7}]
    _write(str(root / 'captions.jsonl'),
           b'\n'.join(json.dumps(x).encode() for x in lines) + b'\n{broken\n')
    builder = ImageFolder(folder=str(root), data_dir=str(tmp_path / 'tfds'),
                          file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assert builder.info.features['label'].names == ['cat', 'dog']
    counts = builder.info.metadata['summary']['counts']
    assert counts['written_train'] == 4 and counts['written_test'] == 2
    assert counts['skipped_unfiled'] == 1 and counts['skipped_link_outside_folder'] == 1
    assert counts['caption_ambiguous_name'] == 1 and counts['caption_malformed_row'] == 2
    train = {e['file_name'].decode(): e for e in _all(builder, 'train')}
    assert {k: int(e['label']) for k, e in train.items()} == {
        'train/cat/001.png': 0, 'train/cat/002.png': 0, 'train/dog/001.png': 1,
        'train/dog/deeper/003.png': 1}
    assert train['train/cat/002.png']['caption'] == b'a cat'
    assert train['train/dog/deeper/003.png']['caption'] == b'a deep dog'


def test_a_folder_without_a_usable_image_says_so(tmp_path):
    (tmp_path / 'junk').mkdir()
    _write(str(tmp_path / 'junk' / 'a.png'), b'garbage')
    with pytest.raises(pipeline.DataError, match=r"no usable image(.|\n)*skipped_corrupt: 1"):
        ensure_built(f'image_folder:{tmp_path / "junk"}', str(tmp_path / 'tfds'))


@pytest.mark.parametrize('text, expected, cut', [
    ('  a\tcat\n on\x00a ', 'a cat on a', False),
    ('one two three', 'one two', True),
    ('onetwothree', 'onetwot', True)])
def test_clean_caption_collapses_whitespace_and_cuts_at_a_word(text, expected, cut):
    assert clean_caption(text, 10 if not cut else 7) == (expected, cut)


def test_headerless_csv_matches_by_bare_name_and_counts_ambiguity(tmp_path):
    from pixelgen.data.builders.image_folder import Report, match_captions
    path = tmp_path / 'captions.csv'
    path.write_bytes(b'cat/001.png,first cat\n002,"second, with a comma"\n001.png,which one?\n')
    report = Report()
    captions = match_captions(str(path), {'cat/001.png', 'dog/001.png', 'dog/002.jpg'},
                              report, 100)
    assert captions == {'cat/001.png': 'first cat', 'dog/002.jpg': 'second, with a comma'}
    assert report.counts == {'caption_ambiguous_name': 1}


def test_fifos_are_skipped_unopened_and_captions_of_skipped_images_counted(tmp_path):
    """A FIFO named like an image (`mkfifo imgs/pipe.png`) would block its reader forever:
    it is counted and never opened. A caption whose image was skipped is counted too."""
    import threading
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(2):
        _write(str(folder / f'good_{i}.png'), _png(np.broadcast_to(_color(i), (12, 16, 3)).copy()))
    _write(str(folder / 'broken.png'), b'garbage')
    os.mkfifo(folder / 'pipe.png')
    _write(str(folder / 'captions.csv'),
           b'file_name,caption\ngood_0.png,first\nbroken.png,a caption of a broken image\n')
    built = {}
    thread = threading.Thread(target=lambda: built.update(builder=ensure_built(
        f'image_folder:{folder}', str(tmp_path / 'tfds'))), daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():
        with open(folder / 'pipe.png', 'wb'):  # unblocks the reader stuck on the FIFO
            pass
        pytest.fail('the build opened the FIFO and blocked on it')
    counts = built['builder'].info.metadata['summary']['counts']
    assert counts['skipped_not_a_regular_file'] == 1
    assert counts['skipped_corrupt'] == 1
    assert counts['caption_of_skipped_image'] == 1
    assert counts['files_seen'] == 4  # the captions file is not counted
    assert counts['written_train'] + counts['written_test'] == 2


def test_a_changed_folder_is_built_again_and_an_unchanged_one_reused(tmp_path):
    root = tmp_path / 'grows'
    image = _png(np.full((10, 10, 3), 9, np.uint8))
    for i in range(4):
        _write(str(root / f'{i}.png'), image)
    data_dir = str(tmp_path / 'tfds')
    first = ensure_built(f'image_folder:{root}', data_dir)
    assert ensure_built(f'image_folder:{root}', data_dir).data_dir == first.data_dir
    _write(str(root / '4.png'), image)  # an image added later
    second = ensure_built(f'image_folder:{root}', data_dir)
    assert second.data_dir != first.data_dir
    sizes = {b.data_dir: sum(s.num_examples for s in b.info.splits.values())
             for b in (first, second)}
    assert sizes == {first.data_dir: 4, second.data_dir: 5}
    os.utime(root / '0.png', ns=(1, 1))  # same names and sizes, another modification time
    assert ensure_built(f'image_folder:{root}', data_dir).data_dir not in sizes
