"""`python -m pixelgen.sample` on a tiny Image GPT: top-p, and completing the user's own
picture (--prime_image)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from pixelgen import sample
from pixelgen.config import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def workdir(data_dir, tmp_path_factory):
    from pixelgen.trainer import train
    workdir = str(tmp_path_factory.mktemp('sample') / 'run')
    train(tiny_config(data_dir), workdir)
    return workdir


@pytest.fixture(scope='module')
def picture(tmp_path_factory) -> str:
    """A 20x30 picture: red on top, blue below (resized to the model's 8x8)."""
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:10, :, 0], pixels[10:, :, 2] = 255, 255
    path = str(tmp_path_factory.mktemp('pictures') / 'My Picture.png')
    Image.fromarray(pixels).save(path)
    return path


def test_prime_image_completes_its_top_rows(workdir, picture, tmp_path):
    from pixelgen import pretrained
    from pixelgen.data import palette as palette_lib
    from pixelgen.data import pipeline
    out, each = str(tmp_path / 'grid.png'), str(tmp_path / 'each')
    assert sample.main(['--workdir', workdir, '--prime_image', picture, '--prime_rows', '3',
                        '--num', '4', '--top_p', '0.9', '--out', out, '--out_dir', each]) == 0
    names = sorted(os.listdir(each))
    assert names == [f'prime_my_picture_00{i}.png' for i in range(4)]
    loaded = pretrained.load(workdir)
    given = palette_lib.quantize(pipeline.to_rgb_square(np.asarray(Image.open(picture)), 8)[None],
                                 loaded.palette)[0, :3]  # the top 3 pixel rows, as tokens
    for name in names:
        completion = np.asarray(Image.open(os.path.join(each, name)))
        assert completion.shape == (8, 8, 3)
        np.testing.assert_array_equal(  # each completion keeps the given rows
            palette_lib.quantize(completion[None], loaded.palette)[0, :3], given)
    assert os.path.isfile(out)


def test_bad_priming_is_refused_with_the_fix(workdir, picture, tmp_path):
    with pytest.raises(ConfigError, match='--prime_rows 8 must be in'):
        sample.main(['--workdir', workdir, '--prime_image', picture, '--prime_rows', '8'])
    with pytest.raises(ConfigError, match='--prime_rows goes with --prime_image'):
        sample.main(['--workdir', workdir, '--prime_rows', '2'])
    not_a_picture = tmp_path / 'notes.png'
    not_a_picture.write_text('hello')
    with pytest.raises(ConfigError, match='not a readable picture'):
        sample.main(['--workdir', workdir, '--prime_image', str(not_a_picture)])
