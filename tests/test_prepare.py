"""Preparing local datasets at scale: `python -m pixelgen.prepare` builds a folder or
img2dataset shards into array_record in N processes, keeps JPEG bytes as they are, and a
killed build resumes after the units it finished."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_streaming import corrupt_records, pairs, write_shards

from pixelgen.data import builders, pipeline
from pixelgen.data.builders import image_folder, work_units
from pixelgen.data.builders.image_folder import ImageFolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(value: int, mode: str = 'RGB', exif=None) -> bytes:
    pixels = np.full((16, 12, 3), value, np.uint8)
    pixels[:3, :3] = (value * 7) % 256
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format='JPEG', quality=90, **({'exif': exif} if exif else {}))
    return out.getvalue()


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((10, 14, 3), value, np.uint8)).save(out, format='PNG')
    return out.getvalue()


def make_folder(root, jpegs: int) -> dict[str, bytes]:
    """`jpegs` plain RGB JPEGs, and one each of: a PNG, a grayscale JPEG, an EXIF-rotated
    JPEG and a corrupt file. Returns {name: bytes} of the plain JPEGs."""
    os.makedirs(root, exist_ok=True)
    plain = {f'img_{i:03d}.jpg': _jpeg(3 * i) for i in range(jpegs)}
    rotated = Image.Exif()
    rotated[image_folder.ORIENTATION_TAG] = 6
    files = {**plain, 'flat.png': _png(40), 'gray.jpg': _jpeg(90, 'L'),
             'rotated.jpg': _jpeg(120, exif=rotated.tobytes()), 'broken.jpg': b'\xff\xd8 no'}
    for name, data in files.items():
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
    return plain


def _stored(builder) -> dict[str, dict[str, bytes]]:
    """{split: {file name or key: the image bytes as stored}}, read without decoding."""
    from tensorflow_datasets import decode
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split, decoders={'image': decode.SkipDecoding()})
        name = 'file_name' if 'file_name' in builder.info.features else 'key'
        out[split] = {source[i][name].decode(): source[i]['image'] for i in range(len(source))}
    return out


def test_a_folder_built_by_two_workers_equals_the_one_process_build_and_keeps_jpegs(tmp_path):
    folder = tmp_path / 'photos'
    plain = make_folder(folder, jpegs=image_folder.FILES_PER_UNIT + 6)  # two units of work
    dataset = f'image_folder:{folder}'
    run = subprocess.run([sys.executable, '-m', 'pixelgen.prepare', '--dataset', dataset,
                          '--data_dir', str(tmp_path / 'by_workers'), '--num_workers', '2'],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"--config.data.dataset='{dataset}'" in run.stdout
    by_workers = builders.ensure_built(dataset, str(tmp_path / 'by_workers'))  # built: reused
    in_process = builders.ensure_built(dataset, str(tmp_path / 'in_process'))
    stored = _stored(by_workers)
    assert stored == _stored(in_process)
    every = {**stored['train'], **stored['test']}
    assert set(every) == set(plain) | {'flat.png', 'gray.jpg', 'rotated.jpg'}
    for name, data in plain.items():
        assert every[name] == data, name  # the file's own bytes: no second JPEG encoding
    for name in ('flat.png', 'gray.jpg', 'rotated.jpg'):
        assert every[name].startswith(b'\x89PNG'), name  # converted pixels, stored losslessly
    counts = by_workers.info.metadata['summary']['counts']
    assert counts['kept_jpeg_bytes'] == len(plain)
    assert counts['skipped_corrupt'] == 1 and counts['converted_from_L'] == 1
    source = pipeline.open_source(dataset, 'train', str(tmp_path / 'by_workers'))
    assert source[0]['image'].shape[2] == 3
    assert not os.path.exists(tmp_path / 'by_workers' / '.pixelgen-work' / 'image_folder' /
                              by_workers.builder_config.name / 'process_0')


def test_a_killed_folder_build_resumes_after_the_units_it_finished(tmp_path, monkeypatch,
                                                                  capsys):
    folder = tmp_path / 'photos'
    make_folder(folder, jpegs=8)  # 12 files: 3 units of 4
    monkeypatch.setattr(image_folder, 'FILES_PER_UNIT', 4)
    convert = image_folder.convert_files
    calls = []

    def killed_at_the_third_unit(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is killed while converting unit 3
        return convert(*args)
    monkeypatch.setattr(image_folder, 'convert_files', killed_at_the_third_unit)
    dataset, data_dir = f'image_folder:{folder}', str(tmp_path / 'tfds')
    with pytest.raises(KeyboardInterrupt):
        builders.ensure_built(dataset, data_dir)
    first_two = calls[:2]
    calls.clear()
    monkeypatch.setattr(image_folder, 'convert_files',
                        lambda *args: calls.append(args[1]) or convert(*args))
    builder = builders.ensure_built(dataset, data_dir)
    assert len(calls) == 1 and calls[0] not in first_two  # only the unfinished unit
    assert 'resuming; 2 of 3 units were converted before' in capsys.readouterr().out
    assert sum(s.num_examples for s in builder.info.splits.values()) == 11
    fresh = builders.ensure_built(dataset, str(tmp_path / 'fresh'))
    assert _stored(builder) == _stored(fresh)


def test_a_changed_plan_discards_the_saved_units(tmp_path):
    work = str(tmp_path / 'work')
    units = [(1,), (2,)]
    work_units.run_units(work, units, _square, num_workers=0, plan='a', what='t')
    os.remove(os.path.join(work, '000001.pkl'))
    work_units.run_units(work, [(3,), (4,)], _square, num_workers=0, plan='b', what='t')
    assert [work_units.unit_result(work, i) for i in range(2)] == [[9], [16]]


def _square(x: int) -> list[int]:
    return [x * x]


@pytest.mark.parametrize('kind', ['webdataset', 'parquet'])
def test_shards_prepared_by_two_workers_keep_their_bytes_and_count_skips(tmp_path, kind):
    records = pairs(30)
    bad = [r for r, _ in corrupt_records()]
    # 5 shards of 8: the last (the test split) holds 6 good records and 2 bad ones.
    pattern = write_shards(tmp_path / 'shards', records[:24] + bad[:8] + records[24:30]
                           + bad[8:], per_shard=8, kind=kind)
    dataset = f'prepared:{pattern}'
    data_dir = str(tmp_path / 'tfds')
    builder = builders.ensure_built(dataset, data_dir, num_workers=2)
    stored = _stored(builder)
    jpgs = {r['key']: r['jpg'] for r in records}
    assert set(stored['test']) == {f'{i:09d}' for i in range(24, 30)} | {'c9'}
    kept = {**stored['train'], **stored['test']}
    for key, data in jpgs.items():
        assert kept[key] == data, key
    counts = builder.info.metadata['summary']['counts']
    # Dropped: undecodable (c1, c2), an unsuccessful status (c5), no image (c6). Kept: records
    # that only training's filters would drop (no caption, aspect, size, long caption).
    assert counts.get('skipped_undecodable') == 2 and counts.get('skipped_no_image') == 1
    assert counts['written_train'] + counts['written_test'] == 30 + 5
    assert counts['kept_jpeg_bytes'] == 30 + 5
    assert counts.get('skipped_status') == 1
    source = pipeline.open_source(dataset, 'train', data_dir)
    example = source[0]
    assert example['image'].shape == (24, 24, 3) and example['caption'].startswith(b'a ')
    assert builders.ensure_built(dataset, data_dir).data_dir == builder.data_dir  # reused


def test_prepare_refuses_what_it_cannot_build(tmp_path):
    run = subprocess.run([sys.executable, '-m', 'pixelgen.prepare', '--dataset',
                          'webdataset:/nowhere/*.tar'], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "'prepared:webdataset:<pattern>'" in run.stderr
    run = subprocess.run([sys.executable, '-m', 'pixelgen.prepare', '--dataset',
                          'prepared:webdataset:/nowhere/*.tar'], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and 'matches no file' in run.stderr


def test_image_folder_version_names_the_jpeg_change():
    assert str(ImageFolder.VERSION) in ImageFolder.RELEASE_NOTES


@pytest.mark.slow
def test_tiny_clip_trains_from_prepared_parquet(tmp_path):
    from test_streaming import clip_config

    from pixelgen import trainer
    pattern = write_shards(tmp_path / 'p', pairs(64), per_shard=8, kind='parquet')
    dataset = f'prepared:{pattern}'
    builders.ensure_built(dataset, str(tmp_path / 'tfds'), num_workers=2)
    config = clip_config(dataset, f'--config.data.data_dir={tmp_path / "tfds"}')
    result = trainer.train(config, str(tmp_path / 'run'))
    assert np.isfinite(result['train/loss']) and np.isfinite(result['test/loss'])
