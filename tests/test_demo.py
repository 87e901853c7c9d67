"""`python -m pixelgen.demo` in a real headless browser (Debian's chromium, driven by Selenium):
its images equal what `python -m pixelgen.sample` writes for the same arguments and seed, and
bad input is answered in the page."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import REPO, TINY
from flax import nnx
from PIL import Image

from pixelgen import demo as demo_lib
from pixelgen import sample
from pixelgen.config import ConfigError, parse_config_args

pytestmark = pytest.mark.slow

CAPTIONS = [f'a {size} {colour} {shape}' for size in ('small', 'large')
            for colour in ('red', 'green', 'blue', 'white')
            for shape in ('star', 'circle', 'square', 'triangle')]


def _config(name: str, *overrides: str):
    return parse_config_args(['--config', os.path.join(REPO, 'configs', name), *overrides])[0]


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny dVAE, DALL·E, CLIP and Image GPT workdirs with their tokenizers and
    palette: what the demo loads, without the minutes of training that add nothing here."""
    from pixelgen import tasks
    from pixelgen.convert import save_workdir
    from pixelgen.data.palette import save_palette
    from pixelgen.data.text import TextTokenizer
    root = tmp_path_factory.mktemp('demo')
    dirs = {name: str(root / name) for name in ('dvae', 'dalle', 'clip', 'igpt')}
    configs = {
        'dvae': _config('dvae_shapes.py:tiny', '--config.model.codebook_size=16'),
        'dalle': _config('dalle_shapes.py:tiny', f'--config.dvae_workdir={dirs["dvae"]}'),
        'clip': _config('clip_shapes.py:tiny'),
        'igpt': parse_config_args(['--config', TINY])[0],
    }
    for name, config in configs.items():
        save_workdir(config, tasks.module(config).build_model(config, nnx.Rngs(0)), dirs[name])
    TextTokenizer.train(CAPTIONS, vocab_size=configs['dalle'].model.text_vocab_size).save(
        os.path.join(dirs['dalle'], 'tokenizer.json'))
    TextTokenizer.train(CAPTIONS, vocab_size=configs['clip'].model.vocab_size).save(
        os.path.join(dirs['clip'], 'tokenizer.json'))
    k = configs['igpt'].data.palette_size
    save_palette(np.random.default_rng(0).uniform(-1, 1, (k, 3)).astype(np.float32),
                 dirs['igpt'])
    return dirs


@pytest.fixture(scope='module')
def server(workdirs):
    """The demo of all three models on a free local port: its base URL."""
    app = demo_lib.Demo(dalle=workdirs['dalle'], clip=workdirs['clip'], igpt=workdirs['igpt'],
                        max_num=6)
    httpd = demo_lib.make_server(app, '127.0.0.1', 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope='module')
def picture(tmp_path_factory) -> str:
    """A 20x30 picture: red on top, blue below (the demo resizes it to the model's 8x8)."""
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:10, :, 0], pixels[10:, :, 2] = 255, 255
    path = str(tmp_path_factory.mktemp('pictures') / 'My Picture.png')
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope='module')
def browser():
    """Headless chromium under Selenium; skipped, naming what is missing, without them."""
    missing = [tool for tool in ('chromium', 'chromedriver') if shutil.which(tool) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append('selenium (pip install selenium, in the [test] extra)')
    if missing:
        pytest.skip(f'the browser test needs {", ".join(missing)}; scripts/test.sh installs '
                    'Debian\'s chromium and chromium-driver when run as root')
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which('chromium')
    for flag in ('--headless=new', '--disable-dev-shm-usage', '--window-size=1100,1300',
                 '--disable-gpu'):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument('--no-sandbox')  # chromium's sandbox refuses to run as root
    driver = webdriver.Chrome(options=options, service=Service(shutil.which('chromedriver')))
    yield driver
    driver.quit()


def decode(url: str) -> np.ndarray:
    assert url.startswith('data:image/png;base64,'), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(',', 1)[1]))))


def written(folder: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))]


def run_in_page(driver, section: str, button: str, fields: dict[str, str]) -> str:
    """Fills the fields, presses the button and waits for the section's results: 'done' or
    'error'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    for field, value in fields.items():
        element = driver.find_element(By.ID, field)
        if element.get_attribute('type') != 'file':
            element.clear()
        element.send_keys(value)
    results = driver.find_element(By.ID, f'{section}-results')
    driver.execute_script('arguments[0].dataset.state = ""', results)  # not the last answer's
    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, 60).until(
        lambda _: results.get_attribute('data-state') in ('done', 'error'))
    return results.get_attribute('data-state')


def images_in(driver, container: str) -> list[np.ndarray]:
    from selenium.webdriver.common.by import By
    return [decode(img.get_attribute('src'))
            for img in driver.find_elements(By.CSS_SELECTOR, f'#{container} img.tile')]


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id).text


def test_the_page_draws_what_pixelgen_sample_draws_at_the_same_seed(
        browser, server, workdirs, picture, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server)
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script('return document.body.dataset.ready') == 'true')
    # Text to image, reranked by CLIP: the best 2 of 3, best first, as sample --out_dir.
    state = run_in_page(browser, 'dalle', 'generate',
                        {'prompt': 'a large red star', 'num': '3', 'top': '2', 'seed': '5'})
    assert state == 'done', text_of(browser, 'dalle-error')
    shown = images_in(browser, 'dalle-results')
    browser.save_screenshot(str(tmp_path / 'dalle.png'))
    each = str(tmp_path / 'dalle_each')
    assert sample.main(['--workdir', workdirs['dalle'], '--prompt', 'a large red star',
                        '--num', '3', '--top', '2', '--clip_workdir', workdirs['clip'],
                        '--seed', '5', '--out', str(tmp_path / 'grid.png'),
                        '--out_dir', each]) == 0
    expected = written(each)
    assert len(shown) == len(expected) == 2
    for got, want in zip(shown, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert text_of(browser, 'dalle-warning') == ''
    # Another seed draws other images.
    assert run_in_page(browser, 'dalle', 'generate', {'seed': '6'}) == 'done'
    assert any((a != b).any() for a, b in zip(images_in(browser, 'dalle-results'), shown,
                                              strict=True))
    # An over-long caption is cut, and the page says so; an empty one is refused.
    long = 'a large red star to the left of a small blue circle above a white square'
    assert run_in_page(browser, 'dalle', 'generate', {'prompt': long}) == 'done'
    assert 'longer than the model\'s 8 tokens; it was cut to "' in text_of(browser,
                                                                            'dalle-warning')
    assert len(images_in(browser, 'dalle-results')) == 2
    assert run_in_page(browser, 'dalle', 'generate', {'prompt': '   '}) == 'error'
    assert 'The caption is empty' in text_of(browser, 'dalle-error')
    assert images_in(browser, 'dalle-results') == []
    browser.save_screenshot(str(tmp_path / 'dalle_empty_caption.png'))

    # Image GPT completes an uploaded picture, as sample --prime_image does.
    state = run_in_page(browser, 'igpt', 'complete',
                        {'picture': picture, 'rows': '3', 'igpt-num': '2', 'igpt-seed': '7'})
    assert state == 'done', text_of(browser, 'igpt-error')
    shown = images_in(browser, 'igpt-results')
    browser.save_screenshot(str(tmp_path / 'igpt.png'))
    each = str(tmp_path / 'igpt_each')
    assert sample.main(['--workdir', workdirs['igpt'], '--prime_image', picture,
                        '--prime_rows', '3', '--num', '2', '--seed', '7',
                        '--out', str(tmp_path / 'igpt_grid.png'), '--out_dir', each]) == 0
    expected = written(each)
    assert len(shown) == len(expected) == 2
    for got, want in zip(shown, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    resized, given = images_in(browser, 'igpt-given')
    assert resized.shape == given.shape == (8, 8, 3)
    for completion in shown:  # each completion keeps the given (quantised) rows
        np.testing.assert_array_equal(completion[:3], given[:3])
    # A file that is no picture is refused in the page, naming it.
    notes = tmp_path / 'notes.txt'
    notes.write_text('hello')
    assert run_in_page(browser, 'igpt', 'complete', {'picture': str(notes)}) == 'error'
    assert 'notes.txt: not a readable picture' in text_of(browser, 'igpt-error')
    browser.save_screenshot(str(tmp_path / 'igpt_not_a_picture.png'))
    for name in ('dalle.png', 'dalle_empty_caption.png', 'igpt.png', 'igpt_not_a_picture.png'):
        assert os.path.getsize(tmp_path / name) > 1000, name


def post(server: str, path: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(server + path, data=json.dumps(body).encode(),
                                     headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_endpoints_refuse_bad_values_naming_them(server):
    status, answer = post(server, '/api/dalle', {'prompt': 'a red star', 'num': 7})
    assert status == 400 and answer['error'] == (
        'The number of images must be in [1, 6], got 7.')
    status, answer = post(server, '/api/dalle', {'prompt': 'a red star', 'num': 2, 'top': 3})
    assert status == 400 and 'Keep the best must be in [1, 2], got 3' in answer['error']
    status, answer = post(server, '/api/dalle', {'prompt': 'a red star', 'seed': 'x'})
    assert status == 400 and "The seed must be a whole number, got 'x'" in answer['error']
    status, answer = post(server, '/api/igpt', {'image': 'data:image/png;base64,iVBO',
                                                'name': 'a.png', 'rows': 8})
    assert status == 400 and 'The given rows must be in [1, 7], got 8' in answer['error']
    status, answer = post(server, '/api/igpt', {'image': '!!', 'name': 'a.png'})
    assert status == 400 and 'a.png: the upload is not base64 data' in answer['error']
    status, answer = post(server, '/api/dalle', ['not', 'an', 'object'])
    assert status == 400 and 'JSON object' in answer['error']
    with urllib.request.urlopen(server + '/api/info', timeout=10) as response:
        info = json.loads(response.read())
    assert info['dalle'] == {'step': 0, 'text_len': 8, 'rerank': True}
    assert info['igpt'] == {'step': 0, 'image_size': 8, 'rows': 4}


def test_the_command_line_needs_a_model_and_the_right_kinds(workdirs):
    with pytest.raises(ConfigError, match='Nothing to demo: pass --dalle W'):
        demo_lib.main([])
    with pytest.raises(ConfigError, match='--clip reranks DALL·E images: pass --dalle W'):
        demo_lib.main(['--igpt', workdirs['igpt'], '--clip', workdirs['clip']])
    with pytest.raises(ConfigError, match=f"--dalle {workdirs['igpt']} holds a 'igpt' model"):
        demo_lib.main(['--dalle', workdirs['igpt']])
