"""The CPU seam: nn/ and models/ never import pixelgen.cpu, and a step lowered for TPU or GPU
on this CPU host holds none of the CPU-only machinery (native custom calls, XLA:CPU layout
barriers), while the same step lowered for the CPU does. And no import inside a function
hides an import cycle."""

from __future__ import annotations

import ast
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelgen import trainer
from pixelgen.config import apply_override, load_config_file
from pixelgen.nn.masks import dalle_mask_spec
from pixelgen.nn.matmul import CPU_LAYOUT_BARRIER
from pixelgen.tasks import dalle as dalle_task
from pixelgen.tasks import igpt as igpt_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_TARGETS = re.compile(r'custom_call @(pixelgen_\w+)')


def _imports(path: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f'{node.module}.{a.name}' for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'import_module':
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return names


@pytest.mark.parametrize('package', ['nn', 'models'])
def test_nn_and_models_import_nothing_of_the_cpu_package(package):
    folder = os.path.join(REPO, 'pixelgen', package)
    for name in sorted(os.listdir(folder)):
        if name.endswith('.py'):
            found = {i for i in _imports(os.path.join(folder, name))
                     if i == 'pixelgen.cpu' or i.startswith('pixelgen.cpu.')}
            assert not found, f'pixelgen/{package}/{name} imports {sorted(found)}'


def _batch(name: str, config) -> dict:
    if name == 'igpt':
        return {'tokens': jnp.zeros((2, config.data.image_size ** 2), jnp.int32)}
    m = config.model
    return {'text': jnp.ones((2, m.text_len), jnp.int32),
            'image': jnp.zeros((2, m.grid_size ** 2), jnp.int32)}


def _train_step_text(name: str, overrides: dict, platform: str) -> str:
    """The train step of a tiny config (with the CPU kernels the tasks attach), lowered for
    `platform`: StableHLO text with locations, which carry name scopes."""
    task_module = {'igpt': igpt_task, 'dalle': dalle_task}[name]
    config = load_config_file(os.path.join(REPO, 'configs', f'{name}_shapes.py') + ':tiny')
    for key, value in overrides.items():
        apply_override(config, key, str(value))
    model = task_module.build_model(config, nnx.Rngs(0))
    tx = optax.adamw(1e-3)
    graphdef, rest, state = trainer.init_state(model, tx, 0)
    step = trainer.make_train_step(task_module.make_loss(config), graphdef, rest, tx,
                                   optax.constant_schedule(1e-3))
    batch = _batch(name, config)
    if platform == 'cpu':
        return jax.jit(step).lower(state, batch).as_text(debug_info=True)
    exported = jax.export.export(jax.jit(step), platforms=[platform])(state, batch)
    return exported.mlir_module()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['igpt', 'dalle'])
def test_a_train_step_lowered_for_tpu_or_cuda_holds_no_cpu_machinery(name):
    overrides = {'model.width': 64}  # head_dim 32: the native kernel's layers
    on_cpu = _train_step_text(name, overrides, 'cpu')
    assert CPU_TARGETS.search(on_cpu) and CPU_LAYOUT_BARRIER in on_cpu  # the test can fail
    for platform in ('tpu', 'cuda'):
        text = _train_step_text(name, overrides, platform)
        assert not CPU_TARGETS.findall(text), platform
        assert CPU_LAYOUT_BARRIER not in text, platform


def test_each_dalle_layer_kind_lowers_to_splash_kernels_for_tpu():
    text = _train_step_text('dalle', {'model.width': 64, 'model.attention': 'auto',
                                      'model.num_layers': 3,
                                      'model.layer_kinds': ('row', 'column', 'conv')}, 'tpu')
    # The kernels' code is shared (the masks are operands); each layer calls it with its own.
    assert set(re.findall(r'kernel_name = "([^"]*)"', text)) == {
        'splash_mha_fwd_residuals', 'splash_mha_dq_no_residuals', 'splash_mha_dkv_no_residuals'}
    assert len(re.findall(r'call @_splash_attention\w*\(', text)) >= 3
    assert not CPU_TARGETS.findall(text)


def test_auto_attention_resolves_per_lowering_platform():
    from pixelgen.nn.attention import MultiHeadAttention
    mask = dalle_mask_spec('row', 8, 4)
    layer = MultiHeadAttention(64, 2, mask=mask, num_layers=1, attention_impl='auto',
                               rngs=nnx.Rngs(0))
    assert [layer.implementation(p) for p in ('cpu', 'tpu', 'cuda')] == [
        'block_sparse', 'splash', 'block_sparse']  # cuDNN: causal and full masks only
    x = jnp.ones((1, 24, 64))
    tpu = jax.export.export(jax.jit(layer), platforms=['tpu'])(x).mlir_module()
    assert 'tpu_custom_call' in tpu
    np.testing.assert_allclose(layer(x), layer(x))  # and it runs here, on the CPU


def _pixelgen_imports(package_dir: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> pixelgen modules imported at module level, module -> those imported inside
    functions) for every module under `package_dir`."""
    modules, top, inner = {}, {}, {}
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(package_dir))[:-3]
                modules[rel.replace(os.sep, '.').removesuffix('.__init__')] = path
    for module, path in modules.items():
        top[module], inner[module] = set(), set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('pixelgen'):
                names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith('pixelgen')]
            else:
                continue
            found = {n for n in names if n in modules and n != module}
            (top if node.col_offset == 0 else inner)[module] |= found
    return top, inner


def test_no_import_inside_a_function_hides_an_import_cycle():
    """An import moved into a function to dodge a cycle hides a layering problem: the arrows
    must point one way (entry points -> trainer -> tasks -> models -> nn). The package's
    `pixelgen.load` stays lazy so that `import pixelgen` is cheap."""
    top, inner = _pixelgen_imports(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'pixelgen'))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo += top.get(module, ())
        return False
    cycles = sorted(f'{m} -> {n}' for m, names in inner.items() if m != 'pixelgen'
                    for n in names if reaches(n, m))
    assert not cycles, cycles


def test_config_runtime_sets_the_cpu_paths_and_the_environment_overrides_it(monkeypatch):
    from pixelgen.config import ConfigError
    from pixelgen.cpu import backend, decode_clients, native_attention
    monkeypatch.delenv(native_attention.ENV, raising=False)
    monkeypatch.delenv(decode_clients.ENV, raising=False)
    runtime = load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                            'igpt_shapes.py:tiny')).runtime
    try:
        assert (runtime.native_attention, runtime.cpu_decode) == (True, 'cores')
        with runtime.unlocked():
            runtime.native_attention, runtime.cpu_decode = False, 'rows'
        backend.configure(runtime)
        assert not native_attention.enabled() and decode_clients.mode() == 'rows'
        monkeypatch.setenv(native_attention.ENV, '1')
        monkeypatch.setenv(decode_clients.ENV, 'shared')
        assert native_attention.enabled() and decode_clients.mode() == 'shared'
        with runtime.unlocked():
            runtime.cpu_decode = 'threads'
        with pytest.raises(ConfigError, match="cpu_decode='threads'; expected one of cores"):
            backend.configure(runtime)
    finally:
        with runtime.unlocked():
            runtime.native_attention, runtime.cpu_decode = True, 'cores'
        backend.configure(runtime)
