"""OpenAI's released dVAE (dall_e, torch) and pixelgen's agree after conversion."""

from __future__ import annotations

import numpy as np
import pytest

from pixelgen.config import ConfigError

pytestmark = [pytest.mark.parity]
torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch: .[test]')
dall_e = pytest.importorskip(
    'dall_e', reason="OpenAI's dVAE package: pip install --no-deps DALL-E==0.1")
Decoder, Encoder, map_pixels = dall_e.Decoder, dall_e.Encoder, dall_e.utils.map_pixels


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """Randomly initialised dall_e modules (small widths and codebook) and their state dicts."""
    torch.manual_seed(0)
    encoder = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = Decoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512)
    src = tmp_path_factory.mktemp('openai_dvae')
    torch.save(encoder.state_dict(), src / 'encoder.pt')
    torch.save(decoder.state_dict(), src / 'decoder.pt')
    return encoder, decoder, str(src)


@pytest.fixture(scope='module')
def converted(released, tmp_path_factory):
    import pixelgen
    from pixelgen.convert import __main__ as convert_cli
    workdir = str(tmp_path_factory.mktemp('converted'))
    assert convert_cli.main(['--from', 'openai-dvae', '--src', released[2],
                             '--workdir', workdir]) == 0
    return pixelgen.load(workdir)


@pytest.mark.slow
def test_converted_config_has_the_released_sizes(converted):
    m = converted.config.model
    assert (m.encoder_width, m.decoder_width, m.decoder_init_width, m.codebook_size,
            m.blocks_per_group, tuple(m.width_multipliers)) == (64, 64, 16, 512, 1, (1, 2, 4, 8))
    assert converted.config.task == 'dvae' and converted.config.data.image_size == 256


@pytest.mark.slow
def test_converted_encoder_logits_match_dall_e(released, converted):
    images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = released[0](map_pixels(torch.from_numpy(images).permute(0, 3, 1, 2)))
    got = np.asarray(converted.model.logits(images))
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(converted.model.encode(images)),
                                  expected.argmax(1).numpy())


@pytest.mark.slow
def test_converted_decoder_outputs_match_dall_e(released, converted):
    codes = np.random.default_rng(1).integers(0, 512, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(codes), 512).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = released[1](one_hot.float()).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(converted.model.decoder.from_codes(codes)), expected,
                               atol=1e-4)
    images = np.asarray(converted.model.decode(codes))
    reference = np.clip((1 / (1 + np.exp(-expected[..., :3])) - 0.1) / 0.8, 0, 1)
    np.testing.assert_allclose(images, reference, atol=1e-4)


@pytest.mark.slow
def test_a_pickled_module_is_refused_with_the_way_to_make_a_state_dict(released, tmp_path):
    from pixelgen.convert import openai_dvae
    torch.save(released[0], tmp_path / 'encoder.pt')  # a whole module, not a state dict
    with pytest.raises(ConfigError, match='state_dict'):
        openai_dvae.load_state_dict(str(tmp_path / 'encoder.pt'))
    (tmp_path / 'decoder.pkl').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='decoder.pkl is a pickled module'):
        openai_dvae.load_state_dict(str(tmp_path / 'decoder.pt'))


def test_a_missing_state_dict_names_the_pickled_module_beside_it(tmp_path):
    from pixelgen.convert import openai_dvae
    (tmp_path / 'encoder.pkl').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r'encoder\.pkl is a pickled module: save its '
                                                r'state_dict\(\)'):
        openai_dvae.load_state_dict(str(tmp_path / 'encoder.pt'))
