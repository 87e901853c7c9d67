"""Every path on gs://: the jobs against a GCS emulator that this module starts.

The jobs run as subprocesses (`python -m pixelgen.<job>`), because the clients read the
emulator's address from the environment when they start: gcsfs (etils.epath's gs:// layer)
reads $STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays) $TENSORSTORE_GCS_HTTP_URL. Each
job runs in an empty folder, which must stay empty: a gs:// path taken for a local one
would leave a `gs:` folder there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, TINY, tiny_config

pytest.importorskip('gcp_storage_emulator')
gcsfs = pytest.importorskip('gcsfs')

pytestmark = pytest.mark.slow

BUCKET = 'bkt'
RUN = f'gs://{BUCKET}/run'


def _send_generations() -> None:
    """Makes the emulator's media downloads carry the object's generation headers, as GCS's
    do: tensorstore (OCDBT, Orbax's array format) reads a manifest's generation from them
    and refuses a response without ("Malformed StorageGeneration")."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, 'sends_generation', False):
        return

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value < 300:
            obj = storage.get_file_obj(request.params['bucket_name'],
                                       request.params['object_id'])
            response['x-goog-generation'] = obj['generation']
            response['x-goog-metageneration'] = obj['metageneration']

    download_with_generation.sends_generation = True
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is download:
                handlers[method] = download_with_generation
    objects.download = download_with_generation  # what objects.get(alt=media) calls


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    """(endpoint URL, environment for the jobs), with the emulator serving bucket `bkt`."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    _send_generations()
    server = create_server('localhost', port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # Clients that close a connection early make the emulator print a traceback: quiet.
    server._api._httpd.handle_error = lambda request, address: None
    url = f'http://localhost:{port}'
    env = {**os.environ, 'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
           'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy',
           # gcsfs's probe of a bucket's layout asks a control API the emulator lacks.
           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
           'PIXELGEN_CACHE_DIR': str(tmp_path_factory.mktemp('cache'))}
    yield url, env
    server.stop()


@pytest.fixture(scope='module')
def bucket(emulator):
    """A gcsfs client of the emulator, for this process (the jobs find it by environment)."""
    # gcsfs.core's client: the default one asks the emulator for a control API it lacks.
    return gcsfs.core.GCSFileSystem(endpoint_url=emulator[0], token='anon',
                                    use_listings_cache=False, skip_instance_cache=True)


def objects(fs, prefix: str) -> list[str]:
    """The object names under gs://bkt/<prefix>/, relative to it."""
    root = f'{BUCKET}/{prefix}'
    return sorted(name[len(root) + 1:] for name in fs.find(root))


@pytest.fixture(scope='module')
def cwd(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cwd'))


def no_local_gs_folder(cwd: str) -> None:
    for folder in (cwd, REPO):
        assert not os.path.exists(os.path.join(folder, 'gs:')), f'a gs: folder in {folder}'
    assert os.listdir(cwd) == []


def job(emulator, cwd, *args: str, code: str | None = None, timeout: float = 600) -> str:
    """Runs `python -m pixelgen.<args>` (or `python -c code`) against the emulator; returns
    its output, fails with it."""
    command = ['-c', textwrap.dedent(code)] if code else ['-m', *args]
    result = subprocess.run([sys.executable, *command], cwd=cwd, env=emulator[1],
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    no_local_gs_folder(cwd)
    return output


@pytest.fixture(scope='module')
def local_run(data_dir, tmp_path_factory):
    """The uninterrupted tiny run (12 steps, checkpoints at 6 and 12) in a local workdir."""
    from pixelgen.trainer import train
    workdir = str(tmp_path_factory.mktemp('local') / 'run')
    train(tiny_config(data_dir), workdir)
    return workdir


@pytest.fixture(scope='module')
def gcs_run(emulator, bucket, cwd, tiny_config_args, local_run):
    """The tiny main job into gs://bkt/run, SIGKILLed once checkpoint 6 is committed, then
    run again with the same command to the end. Returns the rerun's output."""
    command = [sys.executable, '-m', 'pixelgen.train', *tiny_config_args, '--workdir', RUN]
    proc = subprocess.Popen(command, cwd=cwd, env=emulator[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not bucket.exists(f'{BUCKET}/run/checkpoints/6/commit_success.txt'):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, 'no checkpoint appeared'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not bucket.exists(f'{BUCKET}/run/checkpoints/12/commit_success.txt'), \
        'the run ended before it was killed'
    no_local_gs_folder(cwd)
    return job(emulator, cwd, 'pixelgen.train', *tiny_config_args, '--workdir', RUN)


def test_train_writes_everything_into_the_bucket(gcs_run, bucket):
    assert f'resumed from {RUN}/checkpoints/6' in gcs_run
    assert 'TensorBoard events are written to' in gcs_run  # the one line on the local copy
    names = objects(bucket, 'run')
    for name in ('config.json', 'palette.npy', 'metrics.jsonl',
                 'samples/completions_0000012.png', 'checkpoints/6/commit_success.txt',
                 'checkpoints/12/commit_success.txt', 'checkpoints/12/state/manifest.ocdbt'):
        assert name in names, (name, names)
    assert any(n.startswith('tensorboard/train/events.out.tfevents') for n in names), names
    assert not any(n.startswith('.pixelgen_probe') for n in names)
    metrics = bucket.cat(f'{BUCKET}/run/metrics.jsonl').decode().splitlines()
    assert '"step": 12' in metrics[-1] and 'test/bits_per_dim' in metrics[-1]


def test_sigkill_then_rerun_ends_like_an_uninterrupted_local_run(gcs_run, emulator, cwd,
                                                                   local_run):
    """Also `pixelgen.load` of a gs:// workdir."""
    out = job(emulator, cwd, code=f'''
        import jax, numpy as np, pixelgen
        remote, local = pixelgen.load({RUN!r}), pixelgen.load({local_run!r})
        assert remote.step == local.step == 12, (remote.step, local.step)
        np.testing.assert_array_equal(remote.palette, local.palette)
        for a, b in zip(jax.tree.leaves(remote.model), jax.tree.leaves(local.model), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
        print('same parameters')
    ''')
    assert 'same parameters' in out


def test_sample_writes_pngs_into_the_bucket(gcs_run, emulator, cwd, bucket):
    job(emulator, cwd, 'pixelgen.sample', '--workdir', RUN, '--num', '2')
    assert {'samples/unconditional_0000012.png', 'samples/sample_completions_0000012.png'} <= \
        set(objects(bucket, 'run'))
    png = bucket.cat(f'{BUCKET}/run/samples/unconditional_0000012.png')
    assert png.startswith(b'\x89PNG')


def test_evaluate_watch_writes_reports_into_the_bucket(gcs_run, emulator, cwd, bucket):
    out = job(emulator, cwd, 'pixelgen.evaluate', '--workdir', RUN, '--eval', 'loss,samples',
              '--num_examples', '4', '--watch', '--watch_timeout', '60', '--poll_seconds', '0.1')
    assert 'final step 12 evaluated; done.' in out
    names = objects(bucket, 'run/eval')
    for name in ('6/report.json', '12/report.json', '12/completions.png', 'metrics.jsonl'):
        assert name in names, (name, names)
    assert any(n.startswith('tensorboard/eval_job/events') for n in names), names
    # A restarted watcher finds both reports done and exits at once.
    out = job(emulator, cwd, 'pixelgen.evaluate', '--workdir', RUN, '--eval', 'loss',
              '--watch', '--watch_timeout', '60', '--poll_seconds', '0.1')
    assert '[evaluate] gs://' not in out and 'final step 12 evaluated; done.' in out


def test_data_dir_on_gcs_is_copied_once_per_machine(emulator, cwd, bucket, data_dir):
    bucket.put(os.path.join(data_dir, 'shapes'), f'{BUCKET}/tfds/', recursive=True)
    assert 'shapes/1.0.0/dataset_info.json' in objects(bucket, 'tfds')
    out = job(emulator, cwd, 'pixelgen.train', '--config', TINY,
              f'--config.data.data_dir=gs://{BUCKET}/tfds', '--config.total_steps=3',
              '--config.checkpoint_every_steps=3', '--config.sample_every_steps=0',
              '--config.eval_every_steps=0', '--workdir', f'gs://{BUCKET}/from_gcs')
    copies = [line for line in out.splitlines() if line.startswith('[storage] copying')]
    assert len(copies) == 1 and "dataset 'shapes'" in copies[0], out
    assert 'reusing' not in out
    assert 'checkpoints/3/commit_success.txt' in objects(bucket, 'from_gcs')
    cache = emulator[1]['PIXELGEN_CACHE_DIR']
    (digest,) = os.listdir(os.path.join(cache, 'data'))
    assert sorted(os.listdir(os.path.join(cache, 'data', digest, 'shapes'))) == ['1.0.0']
    # A later run reuses the copy.
    out = job(emulator, cwd, code=f'''
        from pixelgen.data import pipeline
        print(len(pipeline.open_source('shapes', 'test', 'gs://{BUCKET}/tfds')))
    ''')
    assert '[storage] reusing the local copy' in out and '[storage] copying' not in out
    assert out.splitlines()[-1] == '1000'


def test_codes_dataset_on_gcs(emulator, cwd, bucket):
    """`dvae encode --out gs://...` writes through write_codes; DALL·E reads open_codes."""
    out = job(emulator, cwd, code=f'''
        import numpy as np
        from pixelgen.data import codes
        out = 'gs://{BUCKET}/codes'
        rows = [{{'codes': np.full((4, 4), i, np.uint16), 'caption': f'c{{i}}', 'label': i}}
                for i in range(5)]
        assert codes.write_codes(out, 'test', rows, grid_size=4, codebook_size=8) == 5
        info = codes.codes_info(out)
        assert info['splits'] == {{'test': 5}}, info
        source = codes.open_codes(out, 'test')
        assert len(source) == 5 and source[3]['caption'] == 'c3', source[3]
        assert (source[3]['codes'] == 3).all()
        print('codes ok')
    ''')
    assert 'codes ok' in out
    assert {'dataset_info.json', 'features.json', 'codes-test.array_record-00000-of-00001'} <= \
        set(objects(bucket, 'codes'))


def test_convert_from_and_into_the_bucket(emulator, cwd, bucket):
    src = os.path.join(REPO, 'tests', 'data', 'openai_igpt_tiny')
    bucket.put(src, f'{BUCKET}/release', recursive=True)
    out = job(emulator, cwd, 'pixelgen.convert', '--from', 'openai-igpt', '--src',
              f'gs://{BUCKET}/release', '--workdir', f'gs://{BUCKET}/converted')
    assert f'[storage] copying --src gs://{BUCKET}/release' in out
    assert {'config.json', 'palette.npy', 'checkpoints/0/commit_success.txt'} <= \
        set(objects(bucket, 'converted'))
    out = job(emulator, cwd, code=f'''
        import numpy as np, pixelgen
        loaded = pixelgen.load('gs://{BUCKET}/converted')
        np.testing.assert_array_equal(loaded.palette, np.load({src!r} + '/kmeans_centers.npy'))
        print('step', loaded.step)
    ''')
    assert 'step 0' in out


def test_unwritable_bucket_is_a_clear_error(emulator, cwd, tiny_config_args):
    result = subprocess.run(
        [sys.executable, '-m', 'pixelgen.train', *tiny_config_args, '--workdir',
         'gs://no-such-bucket/run'], cwd=cwd, env=emulator[1], capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'The workdir gs://no-such-bucket/run is not writable' in result.stderr
    assert 'Check that the bucket exists' in result.stderr
    no_local_gs_folder(cwd)


def test_local_paths_stay_local(tmp_path):
    from pixelgen import storage
    path = str(tmp_path / 'a' / 'b.txt')
    assert storage.write_text(path, 'x') == path and open(path).read() == 'x'
    assert storage.listdir(str(tmp_path / 'a')) == ['b.txt']  # no temporary file left
    assert storage.join('gs://b/run', 'checkpoints') == 'gs://b/run/checkpoints'
    assert storage.absolute('gs://b/run') == 'gs://b/run'
    assert storage.absolute('run') == os.path.join(os.getcwd(), 'run')
    assert storage.is_remote('gs://b') and not storage.is_remote('/tmp/gs:/b')


def test_a_process_sees_what_another_wrote_since(emulator, cwd):
    """No listing cache: `evaluate --watch` must see the checkpoints that training adds."""
    out = job(emulator, cwd, code=f'''
        import subprocess, sys
        from pixelgen import storage
        folder = 'gs://{BUCKET}/seen'
        storage.write_text(folder + '/1/a', 'x')
        assert storage.listdir(folder) == ['1'], storage.listdir(folder)
        subprocess.run([sys.executable, '-c', "from pixelgen import storage; "
                        "storage.write_text('gs://{BUCKET}/seen/2/a', 'y')"], check=True)
        assert storage.listdir(folder) == ['1', '2'], storage.listdir(folder)
        print('seen')
    ''')
    assert 'seen' in out


def test_image_folder_on_gcs_is_refused_with_the_fix():
    from pixelgen.data.builders import image_folder
    from pixelgen.data.pipeline import DataError
    with pytest.raises(DataError, match=r'reads a local folder.*gcloud storage cp -r gs://b/x'):
        image_folder.folder_of('image_folder:gs://b/x')


def test_failed_save_cleanup_and_move_aside_on_gcs(emulator, cwd, bucket):
    """What a failed save leaves (a step folder without Orbax's commit file) is removed, a
    committed one is kept; a damaged checkpoint is moved aside (copied, then deleted)."""
    job(emulator, cwd, code=f'''
        from pixelgen import checkpoint, storage
        directory = 'gs://{BUCKET}/saves/checkpoints'
        storage.write_text(directory + '/6/commit_success.txt', 'done')
        storage.write_text(directory + '/6/state/a', 'x')
        storage.write_text(directory + '/12/state/a', 'half')
        checkpoint._remove_unfinished(directory, 6)
        checkpoint._remove_unfinished(directory, 12)
        assert storage.listdir(directory) == ['6'], storage.listdir(directory)
        storage.move(directory + '/6', 'gs://{BUCKET}/saves/checkpoints_corrupt/6-1')
    ''')
    assert objects(bucket, 'saves') == ['checkpoints_corrupt/6-1/commit_success.txt',
                                        'checkpoints_corrupt/6-1/state/a']
