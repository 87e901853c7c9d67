"""Model FLOPs, device peaks and `python -m pixelgen.bench` at tiny shapes (no speed checks)."""

import json
import os

import jax
import pytest
from flax import nnx

from pixelgen import bench, flops
from pixelgen.models.igpt import ImageGPT

TINY = dict(layers=1, width=32, heads=2, seq=16, vocab=16, batch=2)
TINY_OVERRIDES = {'igpt_train': TINY, 'igpt_sample': dict(TINY, new_tokens=8)}
FIELDS = ('name', 'shape', 'step_s', 'tokens_per_s', 'model_flops_per_step', 'achieved_tflops',
          'mfu', 'peak_source', 'compile_s', 'peak_memory_bytes', 'memory_source',
          'attention_impl', 'native_attention', 'jax_version', 'device')


@pytest.mark.slow
def test_matmul_params_equal_the_matmul_weights_of_a_real_image_gpt():
    model = ImageGPT(vocab_size=16, seq_len=8, num_layers=2, width=8, num_heads=2,
                     rngs=nnx.Rngs(0))
    counted = 0
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = '/'.join(str(p) for p in path)
        if param.ndim >= 2 and not name.startswith(('wte', 'wpe')):  # lookups are not matmuls
            counted += param.size
    assert counted == flops.igpt_matmul_params(num_layers=2, width=8, vocab_size=16)


def test_flops_formula_by_hand_on_a_tiny_shape():
    # L=2, w=8, T=4, V=16, B=3: matmul params 2·(4·64 + 8·64) + 8·16 = 1664 over 12 tokens;
    # causal attention 2·T·w = 64 per token per layer.
    matmul = 2 * 1664 * 12
    causal = 2 * 64 * 12
    args = dict(num_layers=2, width=8, seq_len=4, vocab_size=16, batch_size=3)
    assert flops.igpt_forward_flops(**args) == matmul + causal
    assert flops.igpt_forward_flops(**args, causal=False) == matmul + 2 * causal
    assert flops.igpt_flops_per_step(**args) == 3 * (matmul + causal)


@pytest.mark.parametrize('kind, peak', [
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5', 459e12),
    ('TPU v5p', 459e12), ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H200', 989e12)])
def test_peak_table_matches_device_kinds(kind, peak):
    assert flops.table_peak_flops(kind)[0] == peak


def test_peak_on_cpu_is_a_positive_measured_rate_or_the_isa_table():
    assert flops.table_peak_flops('cpu') is None
    peak, source = flops.peak_flops_per_device()
    assert peak > 0
    if jax.devices()[0].platform == 'cpu':
        assert source.startswith(('measured', 'ISA table'))


@pytest.mark.parametrize('info, per_cycle', [
    ({'flags': 'sse2 avx fma avx2 avx512f', 'vendor_id': 'AuthenticAMD', 'cpu family': '25'},
     32),  # Zen 4
    ({'flags': 'sse2 avx fma avx2 avx512f', 'vendor_id': 'AuthenticAMD', 'cpu family': '26'},
     64),  # Zen 5
    ({'flags': 'sse2 avx fma avx2 avx512f', 'vendor_id': 'GenuineIntel'}, 64),
    ({'flags': 'sse2 avx fma avx2', 'vendor_id': 'GenuineIntel'}, 32),
    ({'features': 'fp asimd', 'vendor_id': ''}, 32)])
def test_cpu_isa_peak_is_cores_times_flops_per_cycle_times_clock(info, per_cycle):
    peak, how = flops.cpu_table_peak({**info, 'mhz': '2500.0'}, cores=2)
    assert peak == pytest.approx(2 * per_cycle * 2.5e9)
    assert f'{per_cycle} float32 FLOP/cycle' in how
    assert flops.cpu_table_peak({'flags': 'avx2 fma'}, cores=2) is None  # no clock known


def test_cpu_peak_is_never_below_the_best_rate_this_machine_measured(tmp_path, monkeypatch):
    """A start-up on a busy machine measures a low matmul rate; the peak is still the best
    ever measured here (kept in the local cache) or the ISA's, whichever is larger, so a
    step cannot read above 100% MFU."""
    if jax.devices()[0].platform != 'cpu':
        pytest.skip('the CPU peak')
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv('PIXELGEN_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(flops, '_cpuinfo', lambda: {
        'model name': 'Test CPU', 'flags': 'avx fma', 'vendor_id': 'X', 'mhz': '1000'})
    monkeypatch.setattr(flops, 'measure_matmul_flops', lambda size: 1e9)  # busy start-up
    table = cores * 32 * 1e9 / jax.local_device_count()

    def peak():
        flops.peak_flops_per_device.cache_clear()
        try:
            return flops.peak_flops_per_device()
        finally:
            flops.peak_flops_per_device.cache_clear()
    rate, source = peak()
    assert rate == pytest.approx(table) and source.startswith('ISA table')
    key = f'Test CPU|{cores} cores|{jax.local_device_count()} devices'
    assert json.loads((tmp_path / flops.PEAK_CACHE).read_text()) == {key: 1e9}
    (tmp_path / flops.PEAK_CACHE).write_text(json.dumps({key: 10 * table}))  # an idle moment
    rate, source = peak()
    assert rate == 10 * table and source.startswith('measured')


@pytest.fixture(scope='module', params=['igpt_train', 'igpt_sample'])
def tiny_result(request):
    return bench.run_case(request.param, overrides=TINY_OVERRIDES[request.param], steps=3)


@pytest.mark.slow
def test_case_reports_every_field_with_sane_values(tiny_result):
    r = tiny_result
    assert set(FIELDS) <= set(r)
    json.dumps(r)  # serialisable
    assert {'layers', 'width', 'heads', 'seq', 'batch', 'dtype', 'vocab'} <= set(r['shape'])
    assert r['shape']['layers'] == 1 and r['shape']['width'] == 32
    assert r['step_s'] > 0 and r['compile_s'] > 0 and r['timed_steps'] == 3
    new_tokens = r['shape'].get('new_tokens', r['shape']['seq'])
    assert r['tokens_per_s'] == pytest.approx(2 * new_tokens / r['step_s'])
    assert r['achieved_tflops'] == pytest.approx(r['model_flops_per_step'] / r['step_s'] / 1e12)
    assert 0 < r['mfu'] < 10
    # MFU is against the best matmul rate seen, the start-up peak or one re-measured later
    assert r['peak_tflops'] >= flops.peak_flops_per_device()[0] / 1e12 * (1 - 1e-9)  # rounding
    assert r['mfu'] == pytest.approx(r['achieved_tflops'] / r['peak_tflops'])
    assert r['peak_memory_bytes'] > 0
    assert r['attention_impl'] in bench.ATTENTION_CHOICES
    assert r['device']['platform'] == jax.devices()[0].platform
    if r['name'] == 'igpt_train':  # 2 passes on a multi-core CPU, one elsewhere
        assert r['concurrent_microbatches'] == bench.default_concurrent_microbatches(
            'igpt_train', r['shape']['batch'])


@pytest.mark.slow
def test_sample_case_generates_new_tokens_of_a_longer_model(tiny_result):
    if tiny_result['name'] == 'igpt_sample':
        assert tiny_result['shape']['new_tokens'] == 8 and tiny_result['shape']['seq'] == 16
        assert tiny_result['model_flops_per_step'] == flops.igpt_forward_flops(1, 32, 8, 16, 2)


@pytest.mark.slow
def test_profile_writes_a_trace_and_lists_its_top_events(tmp_path):
    bench.run_case('igpt_sample', overrides=TINY_OVERRIDES['igpt_sample'], steps=3,
                   profile_dir=str(tmp_path))
    assert list(tmp_path.glob('**/perfetto_trace.json.gz'))
    assert bench.common.format_top_ops(str(tmp_path)).strip()


def test_unknown_case_names_the_valid_ones(capsys):
    with pytest.raises(ValueError, match='valid cases: igpt_train, igpt_sample, dalle'):
        bench.run_case('igpt_nope')
    with pytest.raises(SystemExit):
        bench.main(['igpt_nope'])
    assert 'igpt_train' in capsys.readouterr().err


def test_unknown_shape_override_is_refused():
    with pytest.raises(ValueError, match='depth'):
        bench.run_case('igpt_train', overrides=dict(depth=2))


def test_concurrent_passes_must_divide_the_batch():
    with pytest.raises(ValueError, match='batch=2 does not split into 3'):
        bench.run_case('igpt_train', overrides=TINY_OVERRIDES['igpt_train'], steps=3,
                       concurrent_microbatches=3)
    assert bench.default_concurrent_microbatches('igpt_train', 3) == 1  # odd batch: one pass
    assert bench.default_concurrent_microbatches('dalle_train', 4) == 1


@pytest.mark.slow
def test_json_flag_prints_one_line_per_case_and_nothing_else(monkeypatch, capsys):
    monkeypatch.setitem(bench.SHAPES, 'igpt_train', {**bench.igpt.IGPT_SHAPE, **TINY})
    bench.main(['igpt_train', '--json', '--steps', '3', '--attention', 'dense'])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result['name'] == 'igpt_train' and result['attention_impl'] == 'dense'


@pytest.mark.slow
def test_dalle_attention_reports_each_kind_against_dense():
    # head_dim 32 and 32 + 16² = 9 · 32 tokens: the sparse kinds run the native CPU kernel.
    r = bench.run_case('dalle_attention', overrides=dict(text=32, grid=16, width=64, heads=2),
                       steps=3)
    assert set(FIELDS) <= set(r) and r['shape']['seq'] == 32 + 16 * 16
    assert set(r['kinds']) == {'row', 'column', 'conv', 'dense'}
    for name, kind in r['kinds'].items():
        assert set(FIELDS) <= set(kind) and kind['step_s'] > 0
        assert kind['speedup_vs_dense'] == pytest.approx(
            r['kinds']['dense']['step_s'] / kind['step_s'])
        assert 0 < kind['density'] <= 1 and (name != 'dense' or kind['density'] == 1)
        assert kind['native_attention'] == (name != 'dense')
        assert kind['block_size'] == (32 if name != 'dense' else None)
    assert r['step_s'] == pytest.approx(sum(r['kinds'][k]['step_s']
                                            for k in ('row', 'column', 'conv')))
    json.dumps(r)


@pytest.mark.slow
def test_dalle_train_times_the_sparse_step_against_its_dense_twin():
    r = bench.run_case('dalle_train', overrides=dict(text=32, grid=16, width=64, heads=2,
                                                     layers=2), steps=3)
    assert set(FIELDS) <= set(r) and set(FIELDS) <= set(r['dense'])
    assert r['layer_kinds'] == ['row', 'conv']
    assert r['speedup_vs_dense'] == pytest.approx(r['dense']['step_s'] / r['step_s'])
    json.dumps(r)


def test_the_bench_package_uses_no_private_name_of_pixelgen():
    """The cases are written against pixelgen's public API, as a user's benchmark would be."""
    import ast
    import os
    folder = os.path.dirname(bench.__file__)
    private = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('pixelgen'):
                private += [f'{name}: {node.module}.{a.name}' for a in node.names
                            if a.name.startswith('_')]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith('_')
                  and not node.attr.startswith('__') and isinstance(node.value, ast.Name)
                  and node.value.id in {'sampling', 'trainer', 'flops', 'core_split',
                                        'decode_clients', 'native_attention', 'throughput'}):
                private.append(f'{name}: {node.value.id}.{node.attr}')
    assert not private, private
