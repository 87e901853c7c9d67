"""The real client end to end: `shapes` images served over HTTP on 127.0.0.1, fetched by
img2dataset itself (from PyPI, in a virtualenv of its own: its pins are not the project's)
into webdataset and parquet shards, read by pixelgen with exact skip counts, and a tiny CLIP
trained from both formats, one of them stopped and resumed exactly; a tiny dVAE encodes both
formats through `dvae encode` and a tiny DALL·E trains on the codes.

The virtualenv is made once per checkout in pytest's cache (.pytest_cache/d/img2dataset-venv)
from the package index pip is configured with; $PIXELGEN_IMG2DATASET names an installed
`img2dataset` executable instead.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image
from test_streaming import add_member, clip_config

from pixelgen.data import streaming
from pixelgen.data.builders import shapes

pytestmark = pytest.mark.slow

IMAGES = 252       # served images, then 8 URLs that answer 404
PER_SHARD = 40     # img2dataset --number_sample_per_shard: 7 shards, the 404s in the last
MISSING = 8


@pytest.fixture(scope='module')
def img2dataset(request) -> str:
    """The img2dataset executable (its own virtualenv, made once)."""
    given = os.environ.get('PIXELGEN_IMG2DATASET')
    if given:
        return given
    venv = request.config.cache.mkdir('img2dataset-venv')
    exe = os.path.join(venv, 'bin', 'img2dataset')
    if not os.path.exists(exe):
        subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
        result = subprocess.run([os.path.join(venv, 'bin', 'pip'), 'install', '-q',
                                 'img2dataset'], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f'img2dataset cannot be installed here: {result.stderr[-500:]}')
    return exe


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """(URL list csv, captions by URL): IMAGES shapes images as JPEG files behind
    `python -m http.server` on 127.0.0.1, then MISSING URLs that do not exist."""
    root = tmp_path_factory.mktemp('site')
    rows = []
    for i in range(IMAGES):
        example = shapes.make_example('train', i)
        Image.fromarray(example['image']).save(root / f'{i}.jpg', quality=95)
        rows.append((f'{i}.jpg', example['caption']))
    rows += [(f'missing{i}.jpg', f'a missing picture {i}') for i in range(MISSING)]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind',
                               '127.0.0.1', '--directory', str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    urls = root / 'urls.csv'
    with open(urls, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['url', 'caption'])
        writer.writerows((f'http://127.0.0.1:{port}/{name}', caption) for name, caption in rows)
    yield str(urls)
    server.terminate()
    server.wait()


def fetch(img2dataset: str, urls: str, output_format: str, folder: str) -> str:
    """Runs img2dataset as a user would; returns pixelgen's dataset string."""
    subprocess.run([img2dataset, f'--url_list={urls}', '--input_format=csv',
                    '--url_col=url', '--caption_col=caption', f'--output_format={output_format}',
                    f'--output_folder={folder}', f'--number_sample_per_shard={PER_SHARD}',
                    '--processes_count=1', '--thread_count=8', '--image_size=32',
                    '--resize_mode=center_crop', '--timeout=5', '--retries=0',
                    '--enable_wandb=False'], check=True, capture_output=True,
                   env={**os.environ, 'NO_ALBUMENTATIONS_UPDATE': '1'})
    ext = 'tar' if output_format == 'webdataset' else 'parquet'
    return f'{output_format}:{folder}/*.{ext}'


@pytest.fixture(scope='module')
def webdataset_shards(img2dataset, served, tmp_path_factory) -> tuple[str, str]:
    folder = str(tmp_path_factory.mktemp('wds'))
    return fetch(img2dataset, served, 'webdataset', folder), folder


@pytest.fixture(scope='module')
def parquet_shards(img2dataset, served, tmp_path_factory) -> tuple[str, str]:
    folder = str(tmp_path_factory.mktemp('parquet'))
    return fetch(img2dataset, served, 'parquet', folder), folder


def one_epoch_counts(dataset: str, seed: int) -> dict:
    """{'used', 'skipped'} after one epoch of one slot over every shard of `dataset`."""
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    for _, state in streaming.slot_examples(source.kind, source.shards, source.filters, seed,
                                            0, 1, streaming.new_slot_state()):
        if state['epoch'] == 1:
            return {'used': state['used'] - 1, 'skipped': state['skipped']}
    raise AssertionError('unreachable')


def seed_not_starting_with(last: int, shards: int) -> int:
    """A seed whose second epoch starts elsewhere than shard `last` (where the bad records
    are), so the counts at its first example are those of the first epoch alone."""
    return next(s for s in range(100) if streaming.epoch_shards(shards, s, 1, 0, 1)[0] != last)


def test_img2dataset_webdataset_shards_stream_with_exact_counts(webdataset_shards):
    dataset, folder = webdataset_shards
    shards = sorted(glob.glob(f'{folder}/*.tar'))
    assert len(shards) == -(-(IMAGES + MISSING) // PER_SHARD)  # failures take their place
    stats = [json.load(open(p)) for p in sorted(glob.glob(f'{folder}/*_stats.json'))]
    assert sum(s['successes'] for s in stats) == IMAGES
    with tarfile.open(shards[-1]) as tar:
        names = tar.getnames()
    assert {n.rsplit('.', 1)[1] for n in names} == {'jpg', 'txt', 'json'}
    # corrupt members appended to the last shard: 2 undecodable images, 1 without caption
    with tarfile.open(shards[-1], 'a') as tar:
        for key in ('bad0', 'bad1'):
            add_member(tar, f'{key}.jpg', b'\xff\xd8 not really a jpeg')
            add_member(tar, f'{key}.txt', b'a broken picture')
        add_member(tar, 'nocap.jpg', _tiny_jpeg())
    counts = one_epoch_counts(dataset, seed_not_starting_with(len(shards) - 1, len(shards)))
    assert counts['used'] == IMAGES
    assert {k: v for k, v in counts['skipped'].items() if v} == {'undecodable': 2,
                                                                  'no_caption': 1}


def _tiny_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(out, format='JPEG')
    return out.getvalue()


def test_img2dataset_parquet_counts_its_failed_downloads(parquet_shards):
    dataset, folder = parquet_shards
    shards = sorted(glob.glob(f'{folder}/*.parquet'))
    counts = one_epoch_counts(dataset, seed_not_starting_with(len(shards) - 1, len(shards)))
    assert counts['used'] == IMAGES
    assert {k: v for k, v in counts['skipped'].items() if v} == {'status': MISSING}


def test_tiny_clip_trains_from_both_formats_and_resumes_exactly(webdataset_shards,
                                                                parquet_shards, tmp_path):
    from pixelgen import trainer
    work = tmp_path
    (wds, _), (parquet, _) = webdataset_shards, parquet_shards
    config = clip_config(wds, '--config.data.num_workers=2')
    whole = trainer.train(config, str(work / 'whole'))
    trainer.train(config, str(work / 'split'), stop_after=3)
    resumed = trainer.train(config, str(work / 'split'))
    assert resumed['train/loss'] == whole['train/loss']
    assert resumed['test/loss'] == whole['test/loss']
    from_parquet = trainer.train(clip_config(parquet), str(work / 'parquet'))
    assert np.isfinite(from_parquet['train/loss']) and np.isfinite(from_parquet['test/loss'])


def test_tiny_dalle_trains_on_codes_encoded_from_both_formats(webdataset_shards,
                                                              parquet_shards, tmp_path):
    """A tiny dVAE trained on the webdataset shards encodes both formats (every usable pair
    once: the training shards and the held-out shard together hold all IMAGES), and a tiny
    DALL·E trains on each codes dataset."""
    from pixelgen import dvae, trainer
    from pixelgen.config import parse_config_args
    from pixelgen.data import codes as codes_lib

    def config(name, *overrides):
        parsed, rest = parse_config_args([
            '--config', os.path.join(os.path.dirname(__file__), '..', 'configs',
                                     f'{name}.py') + ':tiny', *overrides])
        assert not rest
        return parsed

    (wds, _), (parquet, _) = webdataset_shards, parquet_shards
    dvae_dir = str(tmp_path / 'dvae')
    trainer.train(config('dvae_shapes', f'--config.data.dataset={wds}'), dvae_dir)
    for name, dataset in (('wds', wds), ('parquet', parquet)):
        codes = str(tmp_path / f'codes_{name}')
        assert dvae.main(['encode', '--workdir', dvae_dir, '--dataset', dataset, '--out', codes,
                          '--batch_size', '16', '--chunk_size', '100']) == 0
        splits = codes_lib.codes_info(codes)['splits']
        # the held-out shard is the last: its PER_SHARD URLs end with the MISSING ones
        assert splits['train'] + splits['test'] == IMAGES and splits['test'] == IMAGES % PER_SHARD
        metrics = trainer.train(config('dalle_shapes', f'--config.data.codes_dir={codes}',
                                       '--config.model.grid_size=16',
                                       '--config.model.image_vocab_size=32'),
                                str(tmp_path / f'dalle_{name}'))
        assert np.isfinite(metrics['train/loss']) and np.isfinite(metrics['test/loss'])
