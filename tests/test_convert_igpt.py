"""Importing released iGPT weights: the HF port (parity with `transformers`) and OpenAI's TF
checkpoint layout (read without TensorFlow, from a bundle written here by the published format).
"""

import importlib.util
import json
import os
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from tensorboardX.record_writer import masked_crc32c

import pixelgen
from pixelgen import sampling
from pixelgen.convert import _tf_bundle, hf_imagegpt, openai_igpt
from pixelgen.convert.__main__ import main as convert_main
from pixelgen.convert._igpt_common import ConversionError

pytestmark = [pytest.mark.parity]
torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch: .[test]')
transformers = pytest.importorskip('transformers', reason='the parity tests need .[test]')
ImageGPTConfig = transformers.ImageGPTConfig
ImageGPTForCausalImageModeling = transformers.ImageGPTForCausalImageModeling

COLOURS, SIDE, WIDTH, LAYERS, HEADS = 16, 4, 32, 2, 4
TOL = 1e-4


# A tiny HF model, saved as `save_pretrained` does --------------------------------------------
@pytest.fixture(scope='module')
def hf_model():
    """Random, with every weight large enough that a wrong layout changes the logits."""
    torch.manual_seed(0)
    config = ImageGPTConfig(vocab_size=COLOURS + 1, n_positions=SIDE * SIDE, n_embd=WIDTH,
                            n_layer=LAYERS, n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
    model = ImageGPTForCausalImageModeling(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                continue  # Conv1D biases stay zero, as in the released weights
            elif 'ln' in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope='module')
def clusters():
    return np.random.default_rng(0).uniform(-1, 1, (COLOURS, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def hf_dir(hf_model, clusters, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('hf'))
    hf_model.save_pretrained(path)
    with open(os.path.join(path, 'preprocessor_config.json'), 'w') as f:
        json.dump({'image_processor_type': 'ImageGPTImageProcessor',
                   'clusters': clusters.tolist()}, f)
    return path


@pytest.fixture(scope='module')
def tokens():
    return np.random.default_rng(1).integers(0, COLOURS, (3, SIDE * SIDE)).astype(np.int32)


@pytest.fixture(scope='module')
def hf_logits(hf_model, tokens):
    """HF feeds [sos, x_0 .. x_{n-2}] (sos = token COLOURS) and predicts x_0 .. x_{n-1}."""
    sos = np.full((len(tokens), 1), COLOURS)
    inputs = torch.from_numpy(np.concatenate([sos, tokens[:, :-1]], axis=1))
    with torch.no_grad():
        return hf_model(inputs).logits.numpy()  # [batch, n, COLOURS]


def convert(source, src, workdir, capsys):
    assert convert_main(['--from', source, '--src', src, '--workdir', workdir]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope='module')
def hf_loaded(hf_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('hf_workdir'))
    assert convert_main(['--from', 'hf-imagegpt', '--src', hf_dir, '--workdir', workdir]) == 0
    return pixelgen.load(workdir)


@pytest.mark.slow
def test_hf_conversion_gives_the_same_logits(hf_loaded, tokens, hf_logits, clusters):
    logits = np.asarray(hf_loaded.model(tokens))
    assert logits.shape == hf_logits.shape
    assert np.abs(hf_logits).max() > 1.0  # not trivially small
    np.testing.assert_allclose(logits, hf_logits, atol=TOL, rtol=0)
    np.testing.assert_array_equal(hf_loaded.palette, clusters)
    c = hf_loaded.config
    assert (c.task, c.data.image_size, c.data.palette_size) == ('igpt', SIDE, COLOURS)
    assert (c.model.num_layers, c.model.width, c.model.num_heads) == (LAYERS, WIDTH, HEADS)


@pytest.mark.slow
def test_converted_model_samples(hf_loaded):
    out = np.asarray(sampling.sample(hf_loaded.model, jax.random.key(0), batch_size=2))
    assert out.shape == (2, SIDE * SIDE)
    assert out.min() >= 0 and out.max() < COLOURS


def test_pytorch_bin_with_old_buffers_converts_like_safetensors(hf_model, hf_dir, tmp_path):
    """Older hub checkpoints are pytorch_model.bin files that also hold each layer's causal
    mask buffer (attn.bias, not a Conv1D bias) and attn.masked_bias."""
    state = dict(hf_model.state_dict())
    n = SIDE * SIDE
    for i in range(LAYERS):
        state[f'transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(n, n, dtype=torch.bool))[
            None, None]
        state[f'transformer.h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    torch.save(state, tmp_path / 'pytorch_model.bin')
    with open(os.path.join(hf_dir, 'config.json')) as f:
        hf_config = json.load(f)
    from_bin = hf_imagegpt.to_pixelgen(hf_imagegpt.load_tensors(str(tmp_path)), hf_config)
    from_safetensors = hf_imagegpt.to_pixelgen(hf_imagegpt.load_tensors(hf_dir), hf_config)
    assert from_bin.keys() == from_safetensors.keys()
    for path, value in from_safetensors.items():
        np.testing.assert_array_equal(from_bin[path], value)


def _edited(tensors, name, value):
    out = dict(tensors)
    if value is None:
        del out[name]
    else:
        out[name] = value
    return out


@pytest.mark.parametrize('edit, message', [
    (lambda t: _edited(t, 'transformer.h.1.mlp.c_fc.bias', np.full(4 * WIDTH, 0.1, np.float32)),
     'non-zero'),
    (lambda t: _edited(t, 'transformer.h.0.ln_2.weight', None), 'missing'),
    (lambda t: _edited(t, 'score.weight', np.zeros((10, WIDTH), np.float32)), 'Unexpected'),
    (lambda t: _edited(t, 'lm_head.weight', np.zeros((COLOURS + 1, WIDTH), np.float32)),
     'shape'),
])
def test_hf_bad_tensors_are_refused(hf_dir, edit, message):
    with open(os.path.join(hf_dir, 'config.json')) as f:
        hf_config = json.load(f)
    tensors = edit(load_file(os.path.join(hf_dir, 'model.safetensors')))
    with pytest.raises(ConversionError, match=message):
        hf_imagegpt.to_pixelgen(tensors, hf_config)


def test_hf_unsupported_settings_and_missing_clusters_are_refused(hf_dir, tmp_path):
    for name in ('config.json', 'model.safetensors'):
        shutil.copy(os.path.join(hf_dir, name), tmp_path / name)
    with pytest.raises(ConversionError, match='preprocessor_config.json is missing'):
        hf_imagegpt.convert(str(tmp_path), str(tmp_path / 'out'))
    with open(os.path.join(hf_dir, 'config.json')) as f:
        hf_config = json.load(f)
    with pytest.raises(ConversionError, match='activation_function'):
        hf_imagegpt._check_settings({**hf_config, 'activation_function': 'gelu'})


# OpenAI's TF checkpoint layout ---------------------------------------------------------------
# A minimal tensor-bundle writer that follows the published format (TF's tensor_bundle.proto and
# LevelDB's table format), kept independent of the reader under test.
TF_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
             np.dtype(np.int64): 9, np.dtype(np.bool_): 10, np.dtype(ml_dtypes.bfloat16): 14,
             np.dtype(np.float16): 19}
TABLE_MAGIC = 0xDB4775248B80FB57


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, value) -> bytes:
    if isinstance(value, bytes):  # length-delimited
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _entry_proto(array: np.ndarray, shard: int, offset: int) -> bytes:
    dims = b''.join(_field(2, _field(1, size)) for size in array.shape)
    crc = _varint(6 << 3 | 5) + struct.pack('<I', masked_crc32c(array.tobytes()))
    return (_field(1, TF_DTYPES[array.dtype]) + _field(2, dims)
            + (_field(3, shard) if shard else b'') + (_field(4, offset) if offset else b'')
            + _field(5, array.nbytes) + crc)


def _block(items, restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b''
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f'<{len(restarts) + 1}I', *restarts, len(restarts))


def write_table(path: str, items, block_size: int = 200) -> None:
    """An uncompressed SSTable of sorted (key, value) pairs, small blocks to get several."""
    data, index, pending = bytearray(), [], []

    def emit(block: bytes) -> bytes:
        handle = _varint(len(data)) + _varint(len(block))
        data.extend(block + b'\x00' + struct.pack('<I', masked_crc32c(block + b'\x00')))
        return handle

    for key, value in items:
        pending.append((key, value))
        if sum(len(k) + len(v) for k, v in pending) >= block_size:
            index.append((key, emit(_block(pending, 16))))
            pending = []
    if pending:
        index.append((pending[-1][0], emit(_block(pending, 16))))
    metaindex = emit(_block([], 16))
    index_handle = emit(_block(index, 1))
    footer = (metaindex + index_handle).ljust(40, b'\x00') + struct.pack('<Q', TABLE_MAGIC)
    with open(path, 'wb') as f:
        f.write(bytes(data) + footer)


def write_bundle(prefix: str, tensors: dict[str, np.ndarray], num_shards: int = 2) -> None:
    shards = [bytearray() for _ in range(num_shards)]
    items = []
    for i, name in enumerate(sorted(tensors)):
        array = np.array(tensors[name], order='C')  # keeps 0-d shapes
        shard = i % num_shards
        items.append((name.encode(), _entry_proto(array, shard, len(shards[shard]))))
        shards[shard] += array.tobytes()
    header = _field(1, num_shards) + _field(3, _field(1, 1))  # num_shards, version.producer
    write_table(prefix + '.index', [(b'', header)] + sorted(items))
    for i, data in enumerate(shards):
        with open(f'{prefix}.data-{i:05d}-of-{num_shards:05d}', 'wb') as f:
            f.write(bytes(data))


def openai_variables(hf_model) -> dict[str, np.ndarray]:
    """The HF model's weights in openai/image-gpt's layout: the inverse of HF's
    convert_imagegpt_original_tf2_to_pytorch.py, plus the optimizer state of a training run."""
    hf = {k.removeprefix('transformer.'): v.numpy() for k, v in hf_model.state_dict().items()}
    d, e = WIDTH, WIDTH // HEADS
    out = {'model/wte': hf['wte.weight'][:COLOURS], 'model/sos': hf['wte.weight'][COLOURS],
           'model/wpe': hf['wpe.weight'], 'model/wtet': hf['lm_head.weight'],
           'model/ln_f/g': hf['ln_f.weight'], 'global_step': np.array(1000, np.int64)}
    for i in range(LAYERS):
        h, p = f'h.{i}.', f'model/h{i}/'
        qkv = hf[h + 'attn.c_attn.weight']
        for j, name in enumerate(('q_proj', 'k_proj', 'v_proj')):
            out[p + 'attn/' + name] = qkv[:, j * d:(j + 1) * d].T.reshape(HEADS, e, d)
        out[p + 'attn/c_proj'] = hf[h + 'attn.c_proj.weight'].reshape(HEADS, e, d)
        out[p + 'ln_1/g'], out[p + 'ln_2/g'] = hf[h + 'ln_1.weight'], hf[h + 'ln_2.weight']
        out[p + 'mlp/c_fc/w'] = hf[h + 'mlp.c_fc.weight']
        out[p + 'mlp/c_proj/w'] = hf[h + 'mlp.c_proj.weight'][None]  # GPT-2's leading [1]
    for name in list(out):
        if name.startswith('model/'):
            out[name + '/Adam'] = np.zeros_like(out[name])
    return out


@pytest.fixture(scope='module')
def openai_dir(hf_model, clusters, tmp_path_factory):
    path = tmp_path_factory.mktemp('openai')
    write_bundle(str(path / 'model.ckpt-1000'), openai_variables(hf_model))
    np.save(path / 'kmeans_centers.npy', clusters)
    return str(path)


def test_openai_conversion_gives_the_same_logits(openai_dir, tokens, hf_logits, clusters,
                                                  tmp_path, capsys):
    out = convert('openai-igpt', openai_dir, str(tmp_path), capsys)
    assert 'skipped' in out
    loaded = pixelgen.load(str(tmp_path))
    np.testing.assert_allclose(np.asarray(loaded.model(tokens)), hf_logits, atol=TOL, rtol=0)
    np.testing.assert_array_equal(loaded.palette, clusters)


def openai_reference(v: dict[str, np.ndarray], tokens: np.ndarray,
                     keep: np.ndarray | None = None) -> np.ndarray:
    """openai/image-gpt src/model.py in numpy: AR logits, or with `keep` [b, n] BERT logits."""
    def norm(x, g):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-5) * g

    heads, width = v['model/h0/attn/q_proj'].shape[0], v['model/wte'].shape[1]
    layers = len({name.split('/')[1] for name in v if name.startswith('model/h')})
    h = v['model/wte'][tokens]
    if keep is None:
        sos = np.broadcast_to(v['model/sos'], (len(tokens), 1, width))
        h = np.concatenate([sos, h[:, :-1]], axis=1)
    else:
        h = h * keep[..., None]
    n = tokens.shape[1]
    h = h + v['model/wpe'][:n]
    allowed = np.tril(np.ones((n, n))) if keep is None else np.ones((n, n))
    for i in range(layers):
        p = f'model/h{i}/'
        x = norm(h, v[p + 'ln_1/g'])
        q, k, val = (np.einsum('bsf,hef->bhse', x, v[p + f'attn/{c}_proj']) for c in 'qkv')
        w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
        w = w * allowed - 1e10 * (1 - allowed)
        w = np.exp(w - w.max(-1, keepdims=True))
        a = (w / w.sum(-1, keepdims=True)) @ val
        h = h + np.einsum('bhse,hef->bsf', a, v[p + 'attn/c_proj'])
        m = norm(h, v[p + 'ln_2/g']) @ v[p + 'mlp/c_fc/w']
        h = h + (m / (1 + np.exp(-1.702 * m))) @ v[p + 'mlp/c_proj/w'].reshape(-1, width)
    return norm(h, v['model/ln_f/g']) @ v['model/wtet'].T


def test_openai_bert_checkpoint_converts_with_a_zero_mask_token(hf_model, clusters, tokens,
                                                                 hf_logits, tmp_path, capsys):
    variables = openai_variables(hf_model)
    as_float64 = {k: v.astype(np.float64) for k, v in variables.items()}
    # The numpy reference reproduces HF on the AR checkpoint, so it is trusted for BERT.
    np.testing.assert_allclose(openai_reference(as_float64, tokens), hf_logits, atol=TOL)
    for name in ('model/sos', 'model/sos/Adam'):  # BERT runs have no sos
        del variables[name], as_float64[name]
    src = tmp_path / 'src'
    src.mkdir()
    write_bundle(str(src / 'model.ckpt-7'), variables)
    np.save(src / 'kmeans_centers.npy', clusters)
    assert '(bert)' in convert('openai-igpt', str(src), str(tmp_path / 'out'), capsys)
    loaded = pixelgen.load(str(tmp_path / 'out'))
    keep = np.random.default_rng(3).uniform(size=tokens.shape) > 0.15
    masked = np.where(keep, tokens, COLOURS)  # COLOURS is pixelgen's mask token id
    np.testing.assert_allclose(np.asarray(loaded.model(masked)),
                               openai_reference(as_float64, tokens, keep), atol=TOL, rtol=0)


def test_bundle_reader_round_trips_dtypes_and_detects_corruption(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {'a/float16': rng.normal(size=(3, 5)).astype(np.float16),
               'a/int64': np.array(-7, np.int64),
               'b/bfloat16': rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
               'b/bool': np.array([True, False, True]),
               'c/' + 'long_name' * 20: rng.normal(size=(2, 2, 2)).astype(np.float64)}
    prefix = str(tmp_path / 'model.ckpt-1')
    write_bundle(prefix, tensors, num_shards=3)
    bundle = _tf_bundle.Bundle(prefix)
    assert set(bundle.entries) == set(tensors)
    for name, value in tensors.items():
        read = bundle.read(name)
        assert read.dtype == value.dtype and read.shape == value.shape
        np.testing.assert_array_equal(read, value)
    with open(prefix + '.index', 'r+b') as f:
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(_tf_bundle.BundleError, match='checksum'):
        _tf_bundle.Bundle(prefix)


def with_nan(array: np.ndarray) -> np.ndarray:
    """A copy of `array` (which may share memory with a fixture's model) with one NaN."""
    array = np.array(array, copy=True)
    array.flat[3] = np.nan
    return array


@pytest.mark.parametrize('change, message', [
    (lambda v: v.pop('model/h1/ln_2/g'), 'missing'),
    (lambda v: v.update({'model/extra': np.zeros(3, np.float32)}), 'no place'),
    (lambda v: v.update({'model/wtet': np.zeros((COLOURS, WIDTH + 1), np.float32)}), 'shape'),
    (lambda v: v.update({'model/h0/mlp/c_fc/w': with_nan(v['model/h0/mlp/c_fc/w'])}),
     r"tensor 'model/h0/mlp/c_fc/w' holds 1 NaN"),
])
def test_openai_bad_checkpoints_are_refused(hf_model, tmp_path, change, message):
    variables = openai_variables(hf_model)
    change(variables)
    prefix = str(tmp_path / 'model.ckpt-5')
    write_bundle(prefix, variables)
    with pytest.raises(ConversionError, match=message):
        openai_igpt.to_pixelgen(_tf_bundle.Bundle(prefix))


# A checkpoint written by TensorFlow itself (see tests/data/openai_igpt_tiny/make_checkpoint.py).
TF_WRITTEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'openai_igpt_tiny')


@pytest.mark.slow
def test_tensorflow_written_checkpoint_reads_and_converts(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        'make_checkpoint', os.path.join(TF_WRITTEN, 'make_checkpoint.py'))
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)  # its weights() formula; TensorFlow is not imported
    weights = fixture.weights()
    bundle = _tf_bundle.Bundle(os.path.join(TF_WRITTEN, 'model.ckpt-1000'))
    assert bundle.header['num_shards'] == 4
    assert {'global_step', 'beta1_power', 'model/wte/Adam_1'} <= set(bundle.entries)
    for name, value in weights.items():
        np.testing.assert_array_equal(bundle.read(name), value)
    dtypes = _tf_bundle.Bundle(os.path.join(TF_WRITTEN, 'dtypes', 'model.ckpt-1'))
    for name, value in fixture.DTYPE_VALUES.items():
        read = dtypes.read(name)
        assert read.dtype == value.dtype
        np.testing.assert_array_equal(read, value)
    out = convert('openai-igpt', TF_WRITTEN, str(tmp_path), capsys)
    assert f'({2 * len(weights) + 3} training-state tensors skipped)' in out
    loaded = pixelgen.load(str(tmp_path))
    tokens = np.random.default_rng(4).integers(0, fixture.COLOURS, (2, fixture.SIDE ** 2))
    reference = openai_reference({k: v.astype(np.float64) for k, v in weights.items()}, tokens)
    np.testing.assert_allclose(np.asarray(loaded.model(tokens.astype(np.int32))), reference,
                               atol=TOL, rtol=0)
    np.testing.assert_array_equal(loaded.palette,
                                  np.load(os.path.join(TF_WRITTEN, 'kmeans_centers.npy')))


def test_a_workdir_with_checkpoints_is_refused_before_anything_is_read(tmp_path):
    from pixelgen.config import ConfigError
    from pixelgen.convert.__main__ import main
    (tmp_path / 'run' / 'checkpoints' / '3').mkdir(parents=True)
    with pytest.raises(ConfigError, match=r'already holds checkpoints \[3\]; convert into a new'):
        main(['--from', 'hf-imagegpt', '--src', str(tmp_path / 'no_such_src'),
              '--workdir', str(tmp_path / 'run')])
