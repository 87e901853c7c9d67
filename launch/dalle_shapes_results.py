"""The evaluation stage of launch/dalle_shapes.sh: WORKDIR/results.json from the trained
dVAE, CLIP and DALL·E in WORKDIR.

    python launch/dalle_shapes_results.py WORKDIR [--seed 0] [--guidance_scales 2 3] [--tiny]
    python launch/dalle_shapes_results.py WORKDIR --write_only   # results.json from saved parts

Every number is a fraction in [0, 1], read by the attribute classifier of
`python -m pixelgen.evaluate --eval attribute_accuracy` and named as that evaluator names it
(color_accuracy, shape_accuracy, both_accuracy):

  heldout.random          DALL·E samples for the held-out one-object captions (every size of
                          every held-out colour/shape pair, `samples` each), no reranking
  heldout.reranked        the best `top` of the same samples by CLIP
  heldout.guidance.<s>    samples drawn with classifier-free guidance scale s, no reranking
  heldout.reranked_guidance.<s>  the best `top` of those guided samples by CLIP
  test.random/reranked    the same for the one-object captions of the test split
  two_objects             two-object test captions (48 of them, 8 samples each, no reranking):
                          objects_found, color, shape (per object, at its place), relation
                          (the colours in the relation's order) and all (both objects right);
                          `real` and `dvae` hold the classifier on real two-object test
                          images and on the dVAE's reconstructions of their codes
  by_size.<part>.<size>   dvae, heldout.random and heldout.reranked over the captions of
                          one object size (small, large)
  clip_zeroshot           CLIP zero-shot on the real test images of the held-out pairs:
                          color/shape_accuracy by prompt-ensembled classes, and
                          caption_color/shape_accuracy by the best one-object caption
  dvae                    the dVAE's reconstructions of the real test images of those pairs
  classifier_real         the classifier on real test images (it must stay >= 0.99)
  minutes                 the pipeline's time: the sum of WORKDIR/stages/*.seconds
  targets, meets_targets  the targets of the project's results and whether each is met

It also draws WORKDIR/heldout_samples.png: for every held-out caption (one row each), the
first `top` of its samples side by side with the best `top` of the same samples by CLIP, and
with the first `top` drawn at each guidance scale.

Each evaluation is saved in WORKDIR/results/<name>.json as soon as it is done, and skipped
when rerun, so a killed evaluation resumes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ATTRIBUTES = ('color_accuracy', 'shape_accuracy', 'both_accuracy')
TWO_KEYS = ('objects_found', 'color_accuracy', 'shape_accuracy', 'relation_accuracy',
            'all_accuracy')
CAPTION_KEYS = ('caption_color_accuracy', 'caption_shape_accuracy')  # CLIP's caption reading
TARGETS = {  # minimum fractions, on the held-out pairs
    'dvae': {'color_accuracy': 0.95, 'shape_accuracy': 0.90, 'both_accuracy': 0.88},
    'clip_zeroshot': {'color_accuracy': 0.95, 'shape_accuracy': 0.90},
    'heldout.random': {'color_accuracy': 0.85, 'shape_accuracy': 0.60, 'both_accuracy': 0.50},
    'heldout.reranked': {'color_accuracy': 0.95, 'shape_accuracy': 0.85,
                         'both_accuracy': 0.80},
    'classifier_real': {'color_accuracy': 0.99, 'shape_accuracy': 0.99},
}


def _pick(metrics: dict, prefix: str = '', keys=ATTRIBUTES) -> dict:
    return {k: metrics[prefix + k] for k in keys if prefix + k in metrics}


def evaluations(workdir: str, seed: int, scales: list[str], tiny: bool) -> dict:
    """{name: (workdir to load, evaluator, options)} of every evaluation of the pipeline."""
    samples, top = ('2', '1') if tiny else ('16', '4')
    dalle = {'samples': samples, 'seed': str(seed), 'classifier_images': '300' if tiny else '3000'}
    clip = os.path.join(workdir, 'clip')
    runs = {
        'dvae': ('dvae', 'reconstruction', {'captions': 'holdout'}),
        'clip_zeroshot': ('clip', 'zeroshot', {'captions': 'holdout'}),
        'heldout_random': ('dalle', 'attribute_accuracy', {**dalle, 'captions': 'holdout'}),
        'heldout_reranked': ('dalle', 'attribute_accuracy',
                             {**dalle, 'captions': 'holdout', 'clip_workdir': clip, 'top': top}),
        'test_random': ('dalle', 'attribute_accuracy', {**dalle, 'captions': 'test'}),
        'test_reranked': ('dalle', 'attribute_accuracy',
                          {**dalle, 'captions': 'test', 'clip_workdir': clip, 'top': top}),
        'two_objects': ('dalle', 'attribute_accuracy',
                        {**dalle, 'captions': 'two', 'samples': '2' if tiny else '8',
                         'num_captions': '4' if tiny else '48'}),
    }
    for scale in scales:
        runs[f'guidance_{scale}'] = ('dalle', 'attribute_accuracy',
                                     {**dalle, 'captions': 'holdout', 'guidance_scale': scale})
        runs[f'reranked_guidance_{scale}'] = (
            'dalle', 'attribute_accuracy', {**dalle, 'captions': 'holdout', 'guidance_scale': scale,
                                            'clip_workdir': clip, 'top': top})
    return runs


def run_evaluations(workdir: str, seed: int, scales: list[str], tiny: bool) -> None:
    import pixelgen
    from pixelgen import evaluators
    from pixelgen.evaluators import EvalContext

    out = os.path.join(workdir, 'results')
    os.makedirs(out, exist_ok=True)
    loaded = {}
    for name, (model, evaluator, options) in evaluations(workdir, seed, scales, tiny).items():
        path = os.path.join(out, f'{name}.json')
        if os.path.exists(path):
            print(f'[results] {name}: done before, kept', flush=True)
            continue
        if model not in loaded:
            loaded[model] = pixelgen.load(os.path.join(workdir, model))
        config = loaded[model].config
        fn = evaluators.get(config.task, [evaluator])[evaluator]
        pictures = os.path.join(out, name)
        os.makedirs(pictures, exist_ok=True)
        start = time.perf_counter()
        metrics = fn(EvalContext(loaded=loaded[model], out_dir=pictures, options=options))
        seconds = time.perf_counter() - start
        record = {'metrics': {k: float(v) for k, v in metrics.items()}, 'options': options,
                  'seconds': seconds}
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(tmp, path)  # whole or not at all
        shown = _pick(record['metrics']) or _pick(record['metrics'], 'two_', TWO_KEYS)
        print(f'[results] {name} ({seconds:.0f} s): '
              + ', '.join(f'{k} {v:.3f}' for k, v in shown.items()), flush=True)


def _saved_tiles(workdir: str, name: str) -> tuple[list[str], np.ndarray] | None:
    """The captions and the pictures (uint8 [captions, n, h, w, 3]) that results/<name> drew."""
    from pixelgen import images

    base = os.path.join(workdir, 'results', name, 'attributes_holdout')
    if not (os.path.exists(base + '.png') and os.path.exists(base + '.txt')):
        return None
    with open(base + '.txt') as f:
        captions = f.read().split('\n')[:-1]
    grid = images.read_rgb(base + '.png')
    tile = (grid.shape[0] - 2) // len(captions) - 2
    tiles = images.split_grid(grid, rows=len(captions), cols=(grid.shape[1] - 2) // (tile + 2))
    return captions, tiles


def samples_figure(workdir: str) -> str | None:
    """WORKDIR/heldout_samples.png (see the module docstring), or None before the held-out
    evaluations are saved."""
    from pixelgen import images

    random, reranked = (_saved_tiles(workdir, n) for n in ('heldout_random', 'heldout_reranked'))
    if random is None or reranked is None:
        return None
    captions, best = reranked
    top, samples = best.shape[1], random[1].shape[1]
    panels = [(f'first {top} of {samples}', random[1][:, :top]),
              (f'best {top} of {samples} by CLIP', best)]
    scales = sorted((n[len('guidance_'):] for n in os.listdir(os.path.join(workdir, 'results'))
                     if n.startswith('guidance_') and not n.endswith('.json')), key=float)
    for scale in scales:
        guided = _saved_tiles(workdir, f'guidance_{scale}')
        if guided is not None:
            panels.append((f'guidance {scale}: first {top}', guided[1][:, :top]))
    path = os.path.join(workdir, 'heldout_samples.png')
    images.save_png(images.labelled_panels(panels, captions), path)
    return path


def write_results(workdir: str) -> dict:
    """WORKDIR/results.json from the saved evaluations and stage times."""
    from pixelgen.data.builders.shapes import SIZES
    parts = {}
    for path in glob.glob(os.path.join(workdir, 'results', '*.json')):
        with open(path) as f:
            parts[os.path.basename(path)[:-len('.json')]] = json.load(f)['metrics']
    missing = [n for n in ('dvae', 'clip_zeroshot', 'heldout_random', 'heldout_reranked',
                           'test_random', 'test_reranked') if n not in parts]
    if missing:
        raise SystemExit(f'error: {workdir}/results lacks {", ".join(missing)}; run '
                         f'launch/dalle_shapes.sh {workdir} to finish the evaluation.')
    seconds = 0.0
    for path in glob.glob(os.path.join(workdir, 'stages', '*.seconds')):
        with open(path) as f:
            seconds += float(f.read())
    results = {
        'heldout': {'random': _pick(parts['heldout_random']),
                    'reranked': _pick(parts['heldout_reranked']),
                    'guidance': {n[len('guidance_'):]: _pick(m) for n, m in parts.items()
                                 if n.startswith('guidance_')},
                    'reranked_guidance': {n[len('reranked_guidance_'):]: _pick(m)
                                          for n, m in parts.items()
                                          if n.startswith('reranked_guidance_')}},
        'test': {'random': _pick(parts['test_random']),
                 'reranked': _pick(parts['test_reranked'])},
        'clip_zeroshot': _pick(parts['clip_zeroshot'], keys=ATTRIBUTES[:2] + CAPTION_KEYS),
        'dvae': _pick(parts['dvae']),
        'classifier_real': _pick(parts['heldout_random'], 'real_images_'),
        **({'two_objects': {
            where: {key: parts['two_objects'][f'{prefix}two_{key}'] for key in TWO_KEYS}
            for where, prefix in (('random', ''), ('real', 'real_images_'),
                                  ('dvae', 'reconstructions_'))}}
           if 'two_objects' in parts else {}),
        'by_size': {where: {size: _pick(parts[name], f'{size}_') for size in SIZES}
                    for where, name in (('dvae', 'dvae'), ('heldout.random', 'heldout_random'),
                                        ('heldout.reranked', 'heldout_reranked'))},
        'minutes': seconds / 60,
        'targets': TARGETS,
    }
    results['meets_targets'] = {
        f'{where}.{key}': _lookup(results, where)[key] >= target
        for where, wanted in TARGETS.items() for key, target in wanted.items()}
    path = os.path.join(workdir, 'results.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)
    samples_figure(workdir)
    return results


def _lookup(results: dict, dotted: str) -> dict:
    for part in dotted.split('.'):
        results = results[part]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('workdir')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--guidance_scales', nargs='*', default=['2', '3'])
    parser.add_argument('--tiny', action='store_true', help='a few samples (smoke tests)')
    parser.add_argument('--write_only', action='store_true',
                        help='only write results.json from the saved evaluations')
    args = parser.parse_args()
    if not args.write_only:
        run_evaluations(args.workdir, args.seed, args.guidance_scales, args.tiny)
        return
    results = write_results(args.workdir)
    met = results['meets_targets']
    print(f'[results] {os.path.join(args.workdir, "results.json")}: {results["minutes"]:.1f} '
          f'minutes; targets met: {sum(met.values())} of {len(met)}'
          + ''.join(f'\n  not met: {k}' for k, ok in met.items() if not ok), flush=True)


if __name__ == '__main__':
    main()
