"""Streamed webdataset / parquet shards in img2dataset's layout: patterns, disjoint and
reshuffled shards per host and worker, exact resume, skip counts, filters, evaluation and a
tiny CLIP trained from both formats."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelgen.config import parse_config_args
from pixelgen.data import pipeline, streaming
from pixelgen.data.decode import DataError, Filters, decode_pair

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220),
           'yellow': (230, 220, 30)}


def jpeg(rgb, size=(24, 24), seed=0) -> bytes:
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = rgb
    pixels[:4, :4] = np.random.default_rng(seed).integers(0, 255, (4, 4, 3))  # unique per key
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='JPEG', quality=95)
    return out.getvalue()


def pairs(n: int) -> list[dict]:
    """n img2dataset-like records {key, jpg, txt, json}; record i has colour i % 4."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        key = f'{i:09d}'
        meta = {'key': key, 'status': 'success', 'caption': f'a {name} square',
                'width': 24, 'height': 24, 'url': f'http://x/{i}.jpg'}
        out.append({'key': key, 'jpg': jpeg(COLOURS[name], seed=i), 'txt': f'a {name} square',
                    'json': json.dumps(meta)})
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, records: list[dict]) -> None:
    with tarfile.open(path, 'w') as tar:
        for r in records:
            for ext in ('jpg', 'txt', 'json'):
                if r.get(ext) is not None:
                    value = r[ext]
                    add_member(tar, f'{r["key"]}.{ext}',
                               value if isinstance(value, bytes) else value.encode())


def write_parquet(path: str, records: list[dict]) -> None:
    table = pa.table({
        'key': [r['key'] for r in records],
        'jpg': pa.array([r.get('jpg') for r in records], pa.binary()),
        'txt': [r.get('txt') for r in records],
        'status': [json.loads(r['json'])['status'] if r.get('json') else None
                   for r in records]})
    pq.write_table(table, path, row_group_size=4)


def write_shards(folder, records: list[dict], per_shard: int, kind: str) -> str:
    """img2dataset's file names (00000.tar / 00000.parquet); returns the dataset string."""
    os.makedirs(folder, exist_ok=True)
    ext = 'tar' if kind == 'webdataset' else 'parquet'
    write = write_tar if kind == 'webdataset' else write_parquet
    shards = [records[i:i + per_shard] for i in range(0, len(records), per_shard)]
    for i, shard in enumerate(shards):
        write(os.path.join(folder, f'{i:05d}.{ext}'), shard)
    return f'{kind}:{folder}/{{00000..{len(shards) - 1:05d}}}.{ext}'


def keys_of(batch) -> list[str]:
    return [str(k) for k in batch['key']]


def keep(example):
    return {'image': example['image'], 'caption': example['caption'], 'key': example['key']}


def iterator(source, batch=4, seed=0, host=0, hosts=1, workers=0):
    return streaming.StreamIterator(source, local_batch=batch, seed=seed, host=host,
                                    hosts=hosts, prepare=keep, num_workers=workers)


def test_patterns_expand_ranges_alternatives_and_globs(tmp_path):
    assert streaming.expand_braces('s/{008..011}.tar') == [
        's/008.tar', 's/009.tar', 's/010.tar', 's/011.tar']
    assert streaming.expand_braces('{a,b}/{1..2}') == ['a/1', 'a/2', 'b/1', 'b/2']
    for name in ('00000.tar', '00001.tar', '00002.tar', 'x.parquet'):
        (tmp_path / name).write_bytes(b'')
    assert [os.path.basename(p) for p in streaming.list_shards(f'{tmp_path}/*.tar')] == [
        '00000.tar', '00001.tar', '00002.tar']
    with pytest.raises(DataError, match='matches no file'):
        streaming.list_shards(f'{tmp_path}/*.zip')
    with pytest.raises(DataError, match=r'1 of the 4 shards .* e.g. .*00003.tar'):
        streaming.list_shards(f'{tmp_path}/{{00000..00003}}.tar')
    assert streaming.is_streaming('webdataset:/a/*.tar') and not streaming.is_streaming('shapes')


def test_slots_read_disjoint_shards_that_cover_each_epoch_and_reshuffle():
    epochs = []
    for epoch in range(3):
        slots = [streaming.epoch_shards(13, seed=5, epoch=epoch, slot=g, slots=4)
                 for g in range(4)]
        flat = [i for s in slots for i in s]
        assert sorted(flat) == list(range(13))  # disjoint, and together every shard once
        epochs.append(slots)
    assert epochs[0] != epochs[1] != epochs[2]
    assert streaming.epoch_shards(13, 5, 1, 0, 4) == epochs[1][0]  # from the seed alone


@pytest.mark.parametrize('kind', ['webdataset', 'parquet'])
def test_two_hosts_see_disjoint_examples_every_epoch_and_never_run_dry(tmp_path, kind):
    records = pairs(40)
    dataset = write_shards(tmp_path / kind, records, per_shard=5, kind=kind)
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    seen = [[], []]
    for host in range(2):
        it = iterator(source, batch=5, host=host, hosts=2)
        for _ in range(8):  # two epochs of this host's 20 examples
            seen[host] += keys_of(next(it))
    first = [set(s[:20]) for s in seen]
    assert not first[0] & first[1] and len(first[0] | first[1]) == 40
    assert [set(s[20:]) for s in seen] != first or seen[0][:20] != seen[0][20:]
    images = next(iterator(source, batch=3))['image']
    assert images.dtype == np.uint8 and images.shape == (3, 24, 24, 3)


def test_fewer_shards_than_hosts_times_workers_is_a_clear_error(tmp_path):
    dataset = write_shards(tmp_path / 'w', pairs(12), per_shard=4, kind='webdataset')
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    with pytest.raises(DataError, match=r'3 train shards, fewer than the 2 host\(s\) x 2 '):
        iterator(source, hosts=2, workers=2)


@pytest.mark.parametrize('workers', [0, 2])
def test_resumed_iterator_yields_exactly_the_uninterrupted_stream(tmp_path, workers):
    dataset = write_shards(tmp_path / 'w', pairs(30), per_shard=4, kind='webdataset')
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    whole = iterator(source, batch=3, workers=workers)
    reference = [keys_of(next(whole)) for _ in range(16)]  # crosses epochs (30 per epoch)
    whole.close()
    first = iterator(source, batch=3, workers=workers)
    head = [keys_of(next(first)) for _ in range(7)]
    state = first.get_state()
    first.close()
    resumed = iterator(source, batch=3, workers=workers)
    resumed.set_state(state)
    resumed.start_prefetch()
    tail = [keys_of(next(resumed)) for _ in range(9)]
    resumed.close()
    assert head + tail == reference
    if workers:
        assert len(set(reference[0][0::2]) & set(reference[0][1::2])) == 0
        other = iterator(source, batch=3, workers=0)
        other.set_state(state)  # another worker count: the epoch restarts, with a warning
        assert keys_of(next(other)) == keys_of(next(iterator(source, batch=3)))


def corrupt_records() -> list[dict]:
    """One record of every kind that is skipped, with the reason it is counted under."""
    good = pairs(1)[0]
    bad = [
        ({**good, 'key': 'c1', 'jpg': b'not a jpeg'}, 'undecodable'),
        ({**good, 'key': 'c2', 'jpg': jpeg(COLOURS['red'])[:60]}, 'undecodable'),
        ({**good, 'key': 'c3', 'txt': None}, 'no_caption'),
        ({**good, 'key': 'c4', 'txt': '   '}, 'no_caption'),
        ({**good, 'key': 'c5', 'json': json.dumps({'status': 'failed_to_download'})}, 'status'),
        ({**good, 'key': 'c6', 'jpg': None}, 'no_image'),
        ({**good, 'key': 'c7', 'jpg': jpeg(COLOURS['red'], size=(60, 20))}, 'aspect_ratio'),
        ({**good, 'key': 'c8', 'jpg': jpeg(COLOURS['red'], size=(10, 10))}, 'min_side'),
        ({**good, 'key': 'c9', 'txt': 'a ' + 'very ' * 30 + 'long caption'}, 'caption_length'),
    ]
    return bad


def test_skipped_records_are_counted_by_reason_in_the_logged_state(tmp_path, capsys):
    bad = corrupt_records()
    records = pairs(8)
    records[2:2] = [r for r, _ in bad[:5]]
    records[10:10] = [r for r, _ in bad[5:]]
    dataset = write_shards(tmp_path / 'w', records, per_shard=17, kind='webdataset')
    filters = Filters(image_size=16, min_image_side=16, max_caption_length=60)
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset, filters=filters)
    it = iterator(source, batch=8)
    batch = next(it)
    assert sorted(keys_of(batch)) == [r['key'] for r in pairs(8)]
    assert batch['image'].shape == (8, 16, 16, 3)
    expected = {reason: 0 for reason in streaming.SKIP_REASONS}
    for _, reason in bad:
        expected[reason] += 1
    assert it.counts() == {'used': 8, 'skipped': expected}
    json.loads(it.get_state())
    log = capsys.readouterr().out
    assert ('8 examples used; skipped: no_image 1, undecodable 2, no_caption 2, status 1, '
            'caption_length 1, aspect_ratio 1, min_side 1') in log


def test_a_shard_that_breaks_off_counts_one_corrupt_record_and_the_stream_goes_on(tmp_path):
    dataset = write_shards(tmp_path / 'w', pairs(12), per_shard=6, kind='webdataset')
    first = streaming.list_shards(dataset.split(':', 1)[1])[0]
    data = open(first, 'rb').read()
    open(first, 'wb').write(data[:len(data) // 2])  # cut inside a member
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    it = iterator(source, batch=8)
    keys = keys_of(next(it))
    assert len(set(keys)) == 8
    assert it.counts()['skipped']['corrupt'] == 1


def test_decode_keeps_the_papers_aspect_ratios_and_crops_to_a_square():
    filters = Filters(image_size=8)
    for size, kept in (((48, 24), True), ((24, 48), True), ((50, 24), False)):
        example, reason = decode_pair({'jpg': jpeg((10, 20, 30), size=size), 'txt': b'x'},
                                      filters)
        assert (example is not None) == kept, (size, reason)
        if kept:
            assert example['image'].shape == (8, 8, 3) and example['caption'] == 'x'
    assert decode_pair({'jpg': jpeg((1, 2, 3)), 'txt': b'\xff'}, filters) == (None, 'corrupt')


def test_eval_reads_held_out_shards_padded_to_whole_batches(tmp_path):
    dataset = write_shards(tmp_path / 'p', pairs(40), per_shard=4, kind='parquet')
    train = streaming.StreamingSource(dataset, 'train', eval_shard_fraction=0.2)
    held = streaming.StreamingSource(dataset, 'test', eval_shard_fraction=0.2)
    assert len(held.shards) == 2 and set(held.shards).isdisjoint(train.shards)
    assert len(held) == 8 and held[5]['key'] == '000000037'
    batches = list(streaming.eval_batches(held, batch_size=3, host=0, hosts=1, prepare=keep,
                                          batch_map=None, num_examples=None))
    assert [b['mask'].tolist() for b in batches] == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    per_host = [list(streaming.eval_batches(held, batch_size=2, host=h, hosts=2, prepare=keep,
                                            batch_map=None, num_examples=None))
                for h in range(2)]
    assert len(per_host[0]) == len(per_host[1]) == 2
    with pytest.raises(DataError, match='too few to hold out'):
        streaming.StreamingSource(write_shards(tmp_path / 'one', pairs(4), 4, 'parquet'),
                                  'train')


def clip_config(dataset: str, *overrides: str):
    config, rest = parse_config_args([
        '--config', os.path.join(os.path.dirname(__file__), '..', 'configs',
                                 'clip_shapes.py') + ':tiny',
        f'--config.data.dataset={dataset}', '--config.data.eval_shard_fraction=0.25',
        '--config.total_steps=6', '--config.checkpoint_every_steps=3',
        '--config.sample_every_steps=100', *overrides])
    assert not rest
    return config


@pytest.mark.slow
def test_tiny_clip_trains_from_webdataset_with_workers_and_resumes_exactly(tmp_path):
    from pixelgen import trainer
    dataset = write_shards(tmp_path / 'w', pairs(64), per_shard=8, kind='webdataset')
    config = clip_config(dataset, '--config.data.num_workers=2')
    whole = trainer.train(config, str(tmp_path / 'whole'))
    trainer.train(config, str(tmp_path / 'split'), stop_after=3)
    resumed = trainer.train(config, str(tmp_path / 'split'))
    assert np.isfinite(whole['train/loss']) and np.isfinite(whole['test/loss'])
    assert resumed['train/loss'] == whole['train/loss']
    assert resumed['test/loss'] == whole['test/loss']
    saved = tmp_path / 'split' / 'checkpoints' / '3' / 'data' / 'process_0-of-1.json'
    state = json.loads(saved.read_text())
    assert state['slots_per_host'] == 2 and sum(s['used'] for s in state['slots']) == 24


@pytest.mark.slow
def test_tiny_clip_trains_from_parquet(tmp_path):
    from pixelgen import trainer
    dataset = write_shards(tmp_path / 'p', pairs(64), per_shard=8, kind='parquet')
    result = trainer.train(clip_config(dataset), str(tmp_path / 'run'))
    assert np.isfinite(result['train/loss']) and np.isfinite(result['test/loss'])


def test_config_keys_reach_the_source(tmp_path):
    dataset = write_shards(tmp_path / 'w', pairs(16), per_shard=4, kind='webdataset')
    eval_set = write_shards(tmp_path / 'e', pairs(4), per_shard=4, kind='parquet')
    config = clip_config(dataset, f'--config.data.eval_dataset={eval_set}',
                         '--config.data.min_image_side=30', '--config.data.num_workers=1')
    train = pipeline.open_split(config.data, 'train')
    held = pipeline.open_split(config.data, 'eval')
    assert len(train.shards) == 4 and held.kind == 'parquet' and len(held.shards) == 1
    assert train.filters.min_image_side == 30 and train.filters.image_size == 16
    assert train.num_workers == 1
    with pytest.raises(DataError, match='without class labels'):
        pipeline.num_classes(train)


def test_input_pipeline_bench_reports_images_per_second_for_each_mode():
    from pixelgen import bench
    result = bench.run_case('input_pipeline', steps=3, overrides=dict(
        images=32, source_size=32, image_size=16, shard_size=8, batch=4, batches=3, rounds=1))
    assert set(result['images_per_s']) == {'in_process', 'workers_1', 'workers_2'}
    assert all(rate > 0 for rate in result['images_per_s'].values())
    assert result['speedup_2_workers'] == pytest.approx(
        result['images_per_s']['workers_2'] / result['images_per_s']['in_process'], abs=0.01)
    # decoding in workers leaves the training process little to do per image
    cpu = result['main_process_cpu_ms_per_image']
    assert set(cpu) == set(result['images_per_s'])


def test_random_access_in_name_order_is_safe_from_grain_threads(tmp_path):
    import grain
    records = pairs(24)
    records[5] = {**records[5], 'jpg': b'broken'}
    dataset = write_shards(tmp_path / 'w', records, per_shard=5, kind='webdataset')
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    assert len(source) == 24
    first = streaming.list_shards(dataset.split(':', 1)[1])[0]
    open(first[:-4] + '_stats.json', 'w').write(json.dumps({'successes': 7, 'failed': 2}))
    assert streaming.shard_size('webdataset', first) == 7  # img2dataset's count: no scan
    expected = [r['key'] for r in records]
    expected[5] = expected[6]  # a record that does not decode gives the next usable one
    ds = grain.MapDataset.source(source).map(lambda e: e['key'])
    keys = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)))
    assert keys == expected
    assert [source[i]['key'] for i in (20, 3, 4)] == [expected[20], expected[3], expected[4]]


@pytest.mark.slow
def test_shards_on_gcs_stream_like_local_ones(tmp_path):
    """Glob and range patterns on gs:// (a GCS emulator) give the stream of the same local
    shards. The reader runs as a job: gcsfs reads the emulator's address when it starts."""
    pytest.importorskip('gcp_storage_emulator')
    gcsfs = pytest.importorskip('gcsfs')
    import socket
    import subprocess
    import sys
    import textwrap

    from gcp_storage_emulator.server import create_server
    with socket.socket() as s:
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    server = create_server('localhost', port, in_memory=True, default_bucket='bkt')
    server.start()
    try:
        url = f'http://localhost:{port}'
        fs = gcsfs.core.GCSFileSystem(endpoint_url=url, token='anon', use_listings_cache=False,
                                      skip_instance_cache=True)
        records = pairs(24)
        local = {}
        for kind in ('webdataset', 'parquet'):
            local[kind] = write_shards(tmp_path / kind, records, per_shard=6, kind=kind)
            for path in sorted((tmp_path / kind).iterdir()):
                fs.put(str(path), f'bkt/{kind}/{path.name}')
        code = textwrap.dedent('''
            import json
            from pixelgen.data import streaming
            out = {}
            for dataset in ('webdataset:gs://bkt/webdataset/*.tar',
                            'parquet:gs://bkt/parquet/{00000..00003}.parquet'):
                source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
                it = streaming.StreamIterator(source, local_batch=5, seed=3, host=0, hosts=1,
                                              prepare=lambda e: {'key': e['key']})
                out[dataset.split(':')[0]] = [str(k) for _ in range(6) for k in next(it)['key']]
            print(json.dumps(out))
        ''')
        env = {**os.environ, 'STORAGE_EMULATOR_HOST': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
               'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
        result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                                text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        remote = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    for kind, dataset in local.items():
        source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
        it = streaming.StreamIterator(source, local_batch=5, seed=3, host=0, hosts=1,
                                      prepare=lambda e: {'key': e['key']})
        assert remote[kind] == [str(k) for _ in range(6) for k in next(it)['key']]


@pytest.mark.slow
@pytest.mark.parametrize('config_file', ['igpt_shapes.py', 'dvae_shapes.py'])
def test_igpt_and_dvae_train_from_streamed_shards(tmp_path, config_file):
    """iGPT fits its palette on the stream's images; both train and evaluate on held-out
    shards, keeping images without a caption."""
    from pixelgen import trainer
    records = pairs(48)
    for r in records[::3]:
        r['txt'] = None
    dataset = write_shards(tmp_path / 'w', records, per_shard=6, kind='webdataset')
    config, rest = parse_config_args([
        '--config', os.path.join(os.path.dirname(__file__), '..', 'configs',
                                 config_file) + ':tiny',
        f'--config.data.dataset={dataset}', '--config.data.eval_shard_fraction=0.25',
        '--config.total_steps=3', '--config.checkpoint_every_steps=3',
        '--config.optimizer.warmup_steps=1', '--config.sample_every_steps=100',
        '--config.eval_examples=8'])
    assert not rest
    result = trainer.train(config, str(tmp_path / 'run'))
    test_metric = 'test/psnr' if config.task == 'dvae' else 'test/loss'
    assert np.isfinite(result['train/loss']) and np.isfinite(result[test_metric])
    state = json.loads((tmp_path / 'run' / 'checkpoints' / '3' / 'data' /
                        'process_0-of-1.json').read_text())
    assert state['slots'][0]['skipped']['no_caption'] == 0


@pytest.mark.slow
def test_dvae_encode_reads_a_streamed_source_in_name_order(tmp_path):
    from flax import nnx

    from pixelgen import dvae
    from pixelgen.config import load_config_file
    from pixelgen.tasks import dvae as dvae_task
    records = pairs(20)
    records[3] = {**records[3], 'jpg': b'broken'}
    dataset = write_shards(tmp_path / 'w', records, per_shard=5, kind='webdataset')
    config = load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                           'dvae_shapes.py') + ':tiny')
    model = dvae_task.build_model(config, nnx.Rngs(0))
    source = pipeline.open_source(dataset, 'train')  # 3 training shards, 1 held out
    out = list(dvae.encode_source(model, source, image_size=config.data.image_size,
                                  batch_size=4))
    captions = [r['txt'] for r in records[:15]]
    captions[3] = captions[4]  # the broken record gives the next usable one
    assert [o['caption'] for o in out] == captions
    side = config.data.image_size // model.downsampling
    assert all(o['codes'].shape == (side, side) for o in out)


def test_augmentation_is_seeded_by_the_place_in_the_stream(tmp_path):
    dataset = write_shards(tmp_path / 'w', pairs(16), per_shard=4, kind='webdataset')
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    augment = pipeline.random_crop_flip(crop_padding=4, flip=True)

    def batches(state=None, n=3):
        it = streaming.StreamIterator(source, local_batch=4, seed=1, host=0, hosts=1,
                                      prepare=keep, augment=augment)
        if state is not None:
            it.set_state(state)
        return it, [next(it)['image'] for _ in range(n)]

    _, whole = batches(n=6)
    first, head = batches(n=3)
    _, tail = batches(first.get_state(), n=3)
    for a, b in zip(whole, head + tail, strict=True):
        np.testing.assert_array_equal(a, b)
    plain = next(iterator(source, seed=1))['image']
    assert not np.array_equal(whole[0], plain)  # the crops and flips did happen


def test_held_out_phrases_are_filtered_in_the_stream_and_counted(tmp_path):
    dataset = write_shards(tmp_path / 'w', pairs(24), per_shard=24, kind='webdataset')
    source = streaming.StreamingSource(dataset, 'train', eval_dataset=dataset)
    train = pipeline.without_phrases(source, ('Red Square',))  # records 0, 4, 8, ...: red
    it = iterator(train, batch=9)
    captions = set(next(it)['caption'].tolist())
    assert captions == {'a green square', 'a blue square', 'a yellow square'}
    assert it.counts()['skipped']['held_out'] == 3
    held = pipeline.with_phrases(source, ('red square',))
    assert {str(c) for c in next(iterator(held, batch=4))['caption']} == {'a red square'}
    assert pipeline.without_phrases(source, ()) is source and source.filters.exclude_phrases == ()
