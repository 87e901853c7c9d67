"""python -m pixelgen.evaluate --workdir W [--eval a,b] [--step N | --watch] [--num_examples K]
       [--option key=value ...] [--mesh data=1,fsdp=-1]

Evaluates a saved checkpoint of W as a job of its own, beside or after training. It reads the
checkpoint's parameters with `pixelgen.load` (sharded over --mesh, by default the run's
config.mesh fitted to the devices here; no optimizer state is read) and never writes the
checkpoints or the training state. The
evaluators are those of the workdir's task (pixelgen/evaluators/<task>.py). The run's config
declares which to run and their options (`config.evals`: {evaluator: {option: value}}), so
`python -m pixelgen.evaluate --workdir W` reproduces an evaluation from W/config.json alone;
--eval picks among the task's evaluators instead, and --option overrides an option of every
evaluator it runs. Each evaluation
writes W/eval/<step>/report.json (metrics, seconds and settings of every evaluator), the
evaluators' PNGs in that folder, and TensorBoard scalars `eval_job/<evaluator>/<metric>` in
W/eval/tensorboard (so `tensorboard --logdir W` shows them beside training).

With the distributed flags of `pixelgen.train` (e.g. launch/local_multiprocess.sh --module
pixelgen.evaluate, or --distributed on a pod) every process loads the model onto its own
devices and evaluates its own contiguous share of each split; the evaluators sum or gather
the shares (a split that does not divide evenly is padded and masked), so the metrics are
those of one process, and process 0 writes the report, the PNGs and TensorBoard.

--watch polls W for new checkpoints and evaluates each once; a step whose report.json already
holds every requested evaluator is skipped, so a restarted watcher carries on where it was.
It exits after evaluating step config.total_steps, or when no new checkpoint has appeared for
--watch_timeout seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax

from pixelgen import checkpoint, cli, parallel, pretrained, storage
from pixelgen import evaluators as evaluators_lib
from pixelgen.config import load_saved_config
from pixelgen.data.pipeline import DataError

REPORT = 'report.json'


def eval_dir(workdir: str, step: int) -> str:
    return storage.join(workdir, 'eval', str(step))


def read_report(workdir: str, step: int) -> dict:
    """W/eval/<step>/report.json, or {} when that step has not been evaluated."""
    path = storage.join(eval_dir(workdir, step), REPORT)
    if not storage.is_file(path):
        return {}
    return json.loads(storage.read_text(path))


def _write_json(obj: dict, path: str) -> None:
    # Whole or not at all: a watcher killed mid-write leaves the old report.
    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of W's finished checkpoints (without creating anything in W)."""
    if not storage.is_dir(checkpoint.checkpoint_dir(workdir)):
        return []
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def format_metrics(metrics: dict[str, float]) -> list[str]:
    """Console lines: plain `name value` lines, then a table of the `row/column` metrics
    (e.g. the probe's layer_03/test_accuracy)."""
    lines = [f'  {k} {v:.6g}' for k, v in metrics.items() if '/' not in k]
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if '/' in key:
            row, column = key.split('/', 1)
            table.setdefault(row, {})[column] = value
    if table:
        columns = list(dict.fromkeys(c for row in table.values() for c in row))
        width = max(len(r) for r in table) + 2
        lines.append('  ' + ' ' * width + ''.join(f'{c:>16}' for c in columns))
        for row, values in table.items():
            lines.append(f'  {row:<{width}}' + ''.join(
                f'{values[c]:>16.4f}' if c in values else ' ' * 16 for c in columns))
    return lines


def declared_options(config, name: str) -> dict[str, str]:
    """The options that `config.evals` gives evaluator `name`, as --option strings ({} for an
    evaluator it does not declare)."""
    if name not in config.evals:
        return {}
    return {k: str(v) for k, v in config.evals[name].items()}


def evaluator_names(config, eval_arg: str | None) -> list[str]:
    """The evaluators to run: those of --eval, else those that config.evals declares."""
    if eval_arg is None:
        names = list(config.evals)
        if not names:
            available = ','.join(sorted(evaluators_lib.evaluators(config.task)))
            raise cli.ConfigError(f'The config of task {config.task!r} declares no evaluator '
                                  '(config.evals is empty); pick some with --eval, e.g. '
                                  f'--eval {available}.')
        return names
    names = [n.strip() for n in eval_arg.split(',') if n.strip()]
    if not names:
        raise cli.ConfigError('--eval names no evaluator; pass e.g. --eval loss,probe, or no '
                              '--eval for those the config declares (config.evals).')
    return names


def evaluate_step(workdir: str, names: list[str], step: int | None = None, *,
                  num_examples: int | None = None, options: dict[str, str] | None = None,
                  writer=None, mesh: dict[str, int] | None = None) -> dict:
    """Runs the evaluators `names` on checkpoint `step` (None: the latest) of `workdir`,
    loaded onto `mesh` (see pixelgen.load), writes W/eval/<step>/report.json (merged with
    that step's earlier report) and returns the report."""
    import pixelgen

    options = dict(options or {})
    config = load_saved_config(workdir)
    chosen = evaluators_lib.get(config.task, names)
    loaded = pixelgen.load(workdir, step, mesh=mesh)
    out_dir = eval_dir(workdir, loaded.step)
    writes = jax.process_index() == 0
    if writes:
        storage.makedirs(out_dir)
    report = read_report(workdir, loaded.step) or {
        'workdir': storage.absolute(workdir), 'task': config.task, 'step': loaded.step,
        'evaluators': {}}
    print(f'[evaluate] {workdir} step {loaded.step}', flush=True)
    for name, fn in chosen.items():
        these = {**declared_options(config, name), **options}
        ctx = evaluators_lib.EvalContext(loaded=loaded, out_dir=out_dir,
                                         num_examples=num_examples, options=these)
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in fn(ctx).items()}
        seconds = time.perf_counter() - start
        report['evaluators'][name] = {'metrics': metrics, 'seconds': seconds,
                                      'num_examples': num_examples, 'options': these}
        if writes:
            report['files'] = [f for f in storage.listdir(out_dir) if f.endswith('.png')]
            _write_json(report, storage.join(out_dir, REPORT))  # each result once it exists
        if writer is not None and writes:
            writer.write(loaded.step, metrics, prefix=f'eval_job/{name}/')
        print('\n'.join([f'{name} ({seconds:.1f} s):', *format_metrics(metrics)]), flush=True)
    if writes:
        print(f'[evaluate] wrote {storage.join(out_dir, REPORT)}', flush=True)
    return report


def is_done(workdir: str, step: int, names: list[str]) -> bool:
    return set(names) <= set(read_report(workdir, step).get('evaluators', {}))


def _waited_over(since: float, timeout_s: float) -> bool:
    return time.monotonic() - since > timeout_s


def _pending(workdir: str, names: list[str]) -> tuple[list[int], list[int]]:
    """(W's checkpoint steps, those not yet evaluated with every one of `names`)."""
    steps = checkpoint_steps(workdir)
    return steps, [s for s in steps if not is_done(workdir, s, names)]


def watch(workdir: str, names: list[str], *, timeout_s: float, poll_s: float,
          writer=None, **kwargs) -> list[int]:
    """Evaluates every not yet evaluated checkpoint of `workdir` as it appears, oldest first;
    returns the steps evaluated. Ends after the final step (config.total_steps), or after
    `timeout_s` seconds without a new checkpoint."""
    total_steps = load_saved_config(workdir).total_steps
    evaluated: list[int] = []
    damaged: set[int] = set()  # checkpoints that failed their checksums: skipped for good
    last_new = time.monotonic()
    while True:
        # Process 0 decides, so that every process of a multi-host job runs the same steps.
        steps, todo = parallel.from_process_0(lambda: _pending(workdir, names))
        for step in todo:
            if step in damaged:
                continue
            try:
                evaluate_step(workdir, names, step, writer=writer, **kwargs)
            except FileNotFoundError as e:  # training's keep policy deleted it meanwhile
                print(f'[evaluate] skipped step {step}: {e}', flush=True)
                continue
            except checkpoint.CorruptCheckpointError as e:  # every host sees the same sums
                print(f'[evaluate] WARNING: skipped damaged checkpoint {step}: {e}',
                      flush=True)
                damaged.add(step)
                continue
            evaluated.append(step)
        if set(todo) - damaged:
            last_new = time.monotonic()
        final_done = total_steps in steps and (total_steps in damaged or parallel.from_process_0(
            functools.partial(is_done, workdir, total_steps, names)))
        if final_done:
            print(f'[evaluate] final step {total_steps} evaluated; done.', flush=True)
            return evaluated
        if parallel.from_process_0(functools.partial(_waited_over, last_new, timeout_s)):
            print(f'[evaluate] no new checkpoint for {timeout_s:.0f} s; stopping.', flush=True)
            return evaluated
        time.sleep(poll_s)


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise argparse.ArgumentTypeError(
                f'--option {pair!r}: expected key=value, e.g. --option split=test')
        options[key] = value
    return options


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.evaluate', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True, help='a training (or converted) workdir')
    parser.add_argument('--eval', default=None,
                        help='comma-separated evaluators, e.g. loss,probe,samples (Image GPT); '
                        "default: those the run's config declares (config.evals)")
    parser.add_argument('--step', type=int, default=None,
                        help='checkpoint step to evaluate (default: the latest)')
    parser.add_argument('--num_examples', type=int, default=None,
                        help='cap on the examples of each evaluated split (default: all)')
    parser.add_argument('--option', action='append', default=[], metavar='KEY=VALUE',
                        help="evaluator option (see the task's pixelgen/evaluators module)")
    parser.add_argument('--watch', action='store_true',
                        help='evaluate each new checkpoint as training writes it')
    parser.add_argument('--watch_timeout', type=float, default=3600.0,
                        help='--watch: stop after this many seconds without a new checkpoint')
    parser.add_argument('--poll_seconds', type=float, default=30.0,
                        help='--watch: how often to look for new checkpoints')
    pretrained.add_mesh_argument(parser)
    parallel.add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    if args.watch and args.step is not None:
        parser.error('--watch evaluates every new checkpoint; it cannot take --step')
    if args.num_examples is not None and args.num_examples < 1:
        parser.error(f'--num_examples must be at least 1, got {args.num_examples}')
    try:
        options = parse_options(args.option)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    parallel.initialize_from_args(args)  # before anything starts JAX's backend
    if not storage.is_dir(args.workdir):
        raise FileNotFoundError(f'--workdir {args.workdir!r} does not exist; pass the workdir '
                                'of a training run (python -m pixelgen.train --workdir ...).')
    config = load_saved_config(args.workdir)
    names = evaluator_names(config, args.eval)
    evaluators_lib.get(config.task, names)  # unknown names fail before anything is loaded
    steps = [] if args.watch else checkpoint_steps(args.workdir)  # before W/eval is created
    if not args.watch and not steps:
        raise FileNotFoundError(f'{checkpoint.checkpoint_dir(args.workdir)} holds no '
                                'checkpoint yet; evaluate after training saved one, or pass '
                                '--watch to wait for it.')
    if args.step is not None and args.step not in steps:
        raise FileNotFoundError(f'No checkpoint for step {args.step} in {args.workdir}; '
                                f'available steps: {steps}. Pass one of them (or no --step for '
                                'the latest).')

    from pixelgen.metric_writer import MetricWriter
    writer = (MetricWriter(storage.join(args.workdir, 'eval'), name='eval_job')
              if jax.process_index() == 0 else None)
    try:
        kwargs = {'num_examples': args.num_examples, 'options': options, 'writer': writer,
                  'mesh': args.mesh}
        if args.watch:
            watch(args.workdir, names, timeout_s=args.watch_timeout, poll_s=args.poll_seconds,
                  **kwargs)
        else:
            evaluate_step(args.workdir, names, args.step, **kwargs)
    except DataError as e:  # this job takes the data dir as an option, not a config key
        raise DataError(str(e).replace('--config.data.data_dir=<that dir>',
                                       '--option data_dir=<that dir>')) from e
    finally:
        if writer is not None:
            writer.close()
    return 0


if __name__ == '__main__':
    cli.run(main)
