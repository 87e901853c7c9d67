"""Linear probes (iGPT paper §2.4, §4.1): how linearly separable are each layer's features?

For every layer l the feature of an image is the sequence average of the normalised input of
block l (`pixelgen.tasks.igpt.probe_features`). All layers come from one pass over the data.
One L2-regularised multinomial logistic regression per layer (L-BFGS, as the paper's CIFAR
probes) is fitted on train features; its regularisation strength is picked on a slice of the
train set held out for that purpose, and the best layer is the one with the best accuracy on
that slice (so the test split never chooses anything). The same code on raw pixels gives the
baseline a representation has to beat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pixelgen import images

DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # inverse L2 strengths tried (on standardised inputs)
VALIDATION_FRACTION = 0.1                # of the train features, for choosing C and the layer


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One classifier: accuracies on the fit, validation and test sets, and its C."""
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    inverse_l2: float


def collect(batches: Iterable[dict], features_fn: Callable[[dict], jax.Array]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Runs `features_fn(batch) -> [num_layers, batch, width]` over the batches (each with
    'label' [batch] and 'mask' [batch], 0 on padding rows) and keeps the real rows:
    (features float32 [num_layers, n, width], labels int [n])."""
    features, labels = [], []
    for batch in batches:
        rows = np.asarray(batch['mask']) > 0
        features.append(np.asarray(jax.device_get(features_fn(batch)))[:, rows])
        labels.append(np.asarray(batch['label'])[rows])
    if not features:
        raise ValueError('collect: no batches, so there is nothing to probe.')
    return np.concatenate(features, axis=1), np.concatenate(labels)


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, validation) of n train examples; validation is VALIDATION_FRACTION."""
    order = np.random.default_rng(seed).permutation(n)
    num_val = max(1, int(round(n * VALIDATION_FRACTION)))
    if n - num_val < 2:
        raise ValueError(f'{n} train examples are too few for a probe: it needs at least 3.')
    return order[num_val:], order[:num_val]


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
              test_y: np.ndarray, *, c_grid: Sequence[float] = DEFAULT_C_GRID,
              seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """Logistic regression on features [n, d] (standardised with the fit set's statistics):
    every C of `c_grid` is fitted on the fit part of train, the one best on the held-out part
    is kept, and its accuracies are reported."""
    if len(np.unique(train_y)) < 2:
        raise ValueError('fit_probe: the train labels have a single class; a probe needs two '
                         'or more (is the dataset labelled?).')
    fit, val = _split(len(train_y), seed)
    scaler = StandardScaler().fit(train_x[fit])
    fit_x, val_x, test_x = (scaler.transform(x) for x in (train_x[fit], train_x[val], test_x))
    best = None
    # These matrices are small: threaded BLAS only adds contention (15x slower on a busy CPU).
    with threadpool_limits(limits=1, user_api='blas'):
        for c in c_grid:
            clf = LogisticRegression(C=c, max_iter=max_iter, tol=1e-4).fit(fit_x, train_y[fit])
            val_accuracy = clf.score(val_x, train_y[val])
            if best is None or val_accuracy > best[0]:
                best = (val_accuracy, c, clf)
    val_accuracy, c, clf = best
    return ProbeResult(train_accuracy=float(clf.score(fit_x, train_y[fit])),
                       val_accuracy=float(val_accuracy),
                       test_accuracy=float(clf.score(test_x, test_y)), inverse_l2=float(c))


def probe_layers(train_features: np.ndarray, train_y: np.ndarray, test_features: np.ndarray,
                 test_y: np.ndarray, **kwargs) -> list[ProbeResult]:
    """One `fit_probe` per layer of features [num_layers, n, width]."""
    return [fit_probe(tr, train_y, te, test_y, **kwargs)
            for tr, te in zip(train_features, test_features, strict=True)]


def best_layer(results: Sequence[ProbeResult]) -> int:
    """The layer whose probe has the best validation accuracy (the earliest on ties)."""
    return int(np.argmax([r.val_accuracy for r in results]))


def accuracy_plot(results: Sequence[ProbeResult], path: str, *, baseline: float | None = None,
                  title: str = 'Linear probe accuracy by layer') -> str:
    """The paper's figure as a PNG: train and test accuracy against layer, the best layer
    marked, and (dashed) the raw-pixel baseline's test accuracy."""
    best = best_layer(results)
    return _line_plot(
        path, title=title, x_name='layer', x_ticks=list(range(len(results))),
        series=[('train', [r.train_accuracy for r in results], (31, 119, 180)),
                ('test', [r.test_accuracy for r in results], (214, 39, 40))],
        marked=(best, results[best].test_accuracy, f'best layer {best}'), baseline=baseline)


def curve_plot(steps: Sequence[int], accuracies: Sequence[float], path: str, *,
               baseline: float | None = None,
               title: str = 'Best layer\'s linear probe against training steps') -> str:
    """The best layer's test accuracy at each checkpoint as a PNG, with (dashed) the raw-pixel
    baseline's: where generative pretraining overtakes pixels, if it does."""
    return _line_plot(path, title=title, x_name='training step', x_ticks=list(steps),
                      series=[('best layer, test', list(accuracies), (214, 39, 40))],
                      baseline=baseline)


def _line_plot(path: str, *, title: str, x_name: str, x_ticks: list, series: list,
               marked: tuple | None = None, baseline: float | None = None) -> str:
    """Accuracy series [(name, values, colour)] against evenly spaced x ticks, a circled
    point `marked` (index, value, legend) and a dashed `baseline`; written as a PNG."""
    width, height, left, right, top, bottom = 640, 400, 64, 150, 40, 48
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    font, small = images.font(14), images.font(12)
    values = [v for _, vs, _ in series for v in vs]
    low = min(values + ([baseline] if baseline is not None else []))
    low = max(0.0, np.floor(low * 10 - 0.5) / 10)
    x1, y1 = width - right, height - bottom
    last = max(len(x_ticks) - 1, 1)

    def xy(index: float, accuracy: float) -> tuple[float, float]:
        return (left + (x1 - left) * index / last,
                y1 - (y1 - top) * (accuracy - low) / max(1.0 - low, 1e-6))

    draw.text((left, 10), title, fill='black', font=font)
    for tick in np.arange(low, 1.0 + 1e-9, 0.1):
        _, y = xy(0, tick)
        draw.line([(left, y), (x1, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f'{tick:.0%}', fill='black', font=small)
    for index, tick in enumerate(x_ticks):
        x, _ = xy(index, low)
        label = str(tick)
        draw.text((x - 3 * len(label), y1 + 6), label, fill='black', font=small)
    draw.text(((left + x1) / 2 - 4 * len(x_name), y1 + 24), x_name, fill='black', font=font)
    draw.rectangle([left, top, x1, y1], outline='black')
    if baseline is not None:
        _, y = xy(0, baseline)
        for x in range(left, x1, 12):
            draw.line([(x, y), (min(x + 6, x1), y)], fill=(120, 120, 120), width=2)
    for _, vs, colour in series:
        points = [xy(i, v) for i, v in enumerate(vs)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend = [(name, colour, False) for name, _, colour in series]
    if marked is not None:
        x, y = xy(marked[0], marked[1])
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline='black', width=2)
        legend.append((marked[2], 'black', False))
    if baseline is not None:
        legend.append(('raw pixels', (120, 120, 120), True))
    for i, (name, colour, dashed) in enumerate(legend):
        lx, ly = x1 + 14, top + 8 + 22 * i
        draw.line([(lx, ly + 7), (lx + (8 if dashed else 20), ly + 7)], fill=colour, width=2)
        draw.text((lx + 26, ly), name, fill='black', font=small)
    return images.save_png(np.asarray(canvas), path)
