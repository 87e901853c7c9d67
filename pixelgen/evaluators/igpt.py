"""Image GPT evaluators: test loss, linear probes of every layer, completion samples.

    python -m pixelgen.evaluate --workdir runs/igpt_fmnist --eval loss,probe,samples
        [--num_examples K] [--option split=test] [--option data_dir=DIR] ...

loss     bits/dim on the test split (`data.test_split`, else `data.eval_split`; option
         split=NAME), through the task's eval_sums, so BERT models use the paper's 5-mask
         ensemble.
probe    a logistic-regression probe per layer (pixelgen/probe.py) trained on `train_split`
         features and tested on `test_split` (options of those names), the best layer, the
         same probe on raw pixels, and probe_accuracy.png. --num_examples caps each split.
samples  completions.png: originals, `samples_per_image` completions of their top half
         (BERT: fill-ins), quantised originals (options num_images, samples_per_image, seed).
Every evaluator accepts option batch_size (default config.batch_size).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pixelgen import images, parallel, probe, storage, tasks
from pixelgen.data import palette as palette_lib
from pixelgen.data import pipeline
from pixelgen.evaluators import EvalContext
from pixelgen.tasks import igpt as igpt_task
from pixelgen.trainer import make_eval_step


def _config(ctx: EvalContext):
    """The run's config, with option data_dir applied (e.g. data prepared elsewhere)."""
    config = ctx.loaded.config.copy_and_resolve_references()
    if 'data_dir' in ctx.options:
        config.data.data_dir = ctx.options['data_dir']
    return config


def _test_split(config) -> str:
    return config.data.test_split


def _batch_size(ctx: EvalContext, config) -> int:
    return int(ctx.options.get('batch_size', config.batch_size))


def _task(ctx: EvalContext, config) -> igpt_task.ImageGPTTask:
    # The workdir holds the palette, so building the task reads it and writes nothing.
    return tasks.make(config, ctx.loaded.workdir)


def loss(ctx: EvalContext) -> dict[str, float]:
    """Loss (nats/token) and bits/dim on the test split."""
    config = _config(ctx)
    task = _task(ctx, config)
    graphdef, params, rest = nnx.split(ctx.loaded.model, nnx.Param, ...)
    eval_step = jax.jit(make_eval_step(task, graphdef, rest))
    sums: dict[str, float] = {}
    examples = 0
    for batch in task.eval_batches(_batch_size(ctx, config), ctx.num_examples,
                                   split=ctx.options.get('split', _test_split(config))):
        examples += int(batch['mask'].sum())
        for k, v in jax.device_get(eval_step(params, batch)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    sums['num_examples'] = float(examples)
    sums = parallel.sum_across_hosts(sums)  # each process summed its own share of the split
    examples = sums.pop('num_examples')
    return {**task.eval_summary(sums), 'num_examples': examples}


def _labelled_batches(ctx: EvalContext, config, split: str):
    """Batches of `split` with the raw image [b, side, side, 3] uint8, its palette tokens
    [b, side*side], label and mask."""
    d = config.data
    palette = ctx.loaded.palette
    if palette is None:
        raise FileNotFoundError(f'{ctx.loaded.workdir} has no palette.npy, so its images '
                                'cannot be turned into tokens.')

    def add_tokens(batch: dict) -> dict:
        tokens = palette_lib.quantize(batch['image'], palette).reshape(len(batch['image']), -1)
        return {**batch, 'tokens': tokens}

    source = pipeline.open_source(d.dataset, split, d.data_dir)
    pipeline.num_classes(source)  # a clear error if the dataset has no labels to probe
    return pipeline.eval_batches(source, batch_size=_batch_size(ctx, config),
                                 prepare=pipeline.image_example(d.image_size),
                                 batch_map=add_tokens, num_examples=ctx.num_examples)


def _layer_features(ctx: EvalContext, config):
    """A jitted `tokens [b, l] -> features [num_layers, b, width]` of the loaded model."""
    graphdef, state = nnx.split(ctx.loaded.model)
    objective = igpt_task.objective(config)
    rng = jax.random.PRNGKey(config.seed)  # BERT: each example's 5 masks depend on it only
    features = jax.jit(lambda state, tokens: igpt_task.probe_features(
        nnx.merge(graphdef, state), tokens, objective=objective, rng=rng))
    return lambda tokens: features(state, tokens)


def _features_and_pixels(ctx: EvalContext, config, split: str, layer_features):
    """(features [num_layers, n, width], raw pixels [n, side*side*3] in [0, 1], labels [n])
    of `split`, every layer from one forward pass per batch."""
    pixels = []

    def features_fn(batch: dict) -> jax.Array:
        rows = batch['mask'] > 0
        pixels.append(batch['image'][rows].reshape(int(rows.sum()), -1))
        return layer_features(batch['tokens'])

    feats, labels = probe.collect(_labelled_batches(ctx, config, split), features_fn)
    pixels = np.concatenate(pixels)
    if jax.process_count() > 1:  # every process probes the whole split: gather the shares
        n = parallel.sum_across_hosts({'n': float(len(labels))})['n']
        feats = parallel.gather_rows(feats.transpose(1, 0, 2), int(n)).transpose(1, 0, 2)
        labels, pixels = parallel.gather_rows(labels, int(n)), parallel.gather_rows(pixels, int(n))
    return feats, pixels.astype(np.float32) / 255.0, labels


def linear_probe(ctx: EvalContext) -> dict[str, float]:
    """Per-layer train/val/test accuracy, the best layer (by validation), the raw-pixel
    baseline, and probe_accuracy.png."""
    config = _config(ctx)
    train_split = ctx.options.get('train_split', config.data.train_split)
    test_split = ctx.options.get('test_split', _test_split(config))
    layer_features = _layer_features(ctx, config)
    train_x, train_pixels, train_y = _features_and_pixels(ctx, config, train_split,
                                                          layer_features)
    test_x, test_pixels, test_y = _features_and_pixels(ctx, config, test_split, layer_features)
    results = probe.probe_layers(train_x, train_y, test_x, test_y, seed=config.seed)
    pixels = probe.fit_probe(train_pixels, train_y, test_pixels, test_y, seed=config.seed)
    best = probe.best_layer(results)
    if jax.process_index() == 0:
        probe.accuracy_plot(results, storage.join(ctx.out_dir, 'probe_accuracy.png'),
                            baseline=pixels.test_accuracy,
                            title=f'Linear probe, step {ctx.loaded.step} '
                                  f'({config.data.dataset})')
    out = {}
    for layer, r in enumerate(results):
        out.update({f'layer_{layer:02d}/train_accuracy': r.train_accuracy,
                    f'layer_{layer:02d}/val_accuracy': r.val_accuracy,
                    f'layer_{layer:02d}/test_accuracy': r.test_accuracy})
    return {**out, 'best_layer': float(best),
            'best_layer_test_accuracy': results[best].test_accuracy,
            'pixels/train_accuracy': pixels.train_accuracy,
            'pixels/val_accuracy': pixels.val_accuracy,
            'pixels/test_accuracy': pixels.test_accuracy,
            'train_examples': float(len(train_y)), 'test_examples': float(len(test_y))}


def samples(ctx: EvalContext) -> dict[str, float]:
    """completions.png (see `ImageGPTTask.completions`)."""
    config = _config(ctx)
    task = _task(ctx, config)
    num_images = int(ctx.options.get('num_images', config.sampling.num_images))
    per_image = int(ctx.options.get('samples_per_image', config.sampling.samples_per_image))
    rng = jax.random.PRNGKey(int(ctx.options.get('seed', config.seed)))
    rows = task.completions(ctx.loaded.model, rng, num_images, per_image)  # on every process
    if jax.process_index() == 0:
        images.save_png(images.make_grid(rows), storage.join(ctx.out_dir, 'completions.png'))
    return {'num_images': float(num_images), 'samples_per_image': float(per_image)}


EVALUATORS = {'loss': loss, 'probe': linear_probe, 'samples': samples}
