"""The one training loop that every task shares.

    state = {step, params, opt_state, rng}    (a pytree; checkpointed whole)
    train_step = jax.jit(loss -> grads -> optax update, donate the old state)

A task object supplies the model, the data, the loss and the pictures (see tasks/). The loop
resumes from `<workdir>/checkpoints` when it holds a checkpoint, logs to the console,
`metrics.jsonl` and TensorBoard, writes PNG grids, and saves on SIGTERM (preemption).
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelgen import checkpoint, flops, lease, parallel, pretrained, tasks
from pixelgen.config import ConfigDict, ConfigError, format_config, save_config
from pixelgen.cpu import backend
from pixelgen.metric_writer import MetricWriter, Progress
from pixelgen.nn.transformer import LAYERS_AXIS

State = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; nothing after the last good checkpoint is saved."""


def validate_loop_config(config: ConfigDict) -> None:
    """The loop's own settings; each task checks its model and data (its validate_config)."""
    problems = [f'{key}={config[key]} must be at least 1' for key in (
        'batch_size', 'grad_accum_steps', 'concurrent_microbatches', 'log_every_steps',
        'checkpoint_every_steps', 'keep_checkpoints') if config[key] < 1]
    problems += [f'{key}={config[key]} must be 0 (off) or positive'
                 for key in ('eval_every_steps', 'sample_every_steps') if config[key] < 0]
    problems += optimizer_problems(config.optimizer, config.total_steps)
    tasks.raise_problems(problems)


# flax's names for norms' gains and layers' biases (attention's q/k/v biases are [heads, dim]).
GAINS_AND_BIASES = ('scale', 'bias')


def weight_decay_mask(params) -> Any:
    """Which parameters AdamW's weight decay applies to (an optax mask over `params`): the
    weights with at least two axes of their own (kernels, embedding tables) except gains and
    biases (as nanoGPT and open_clip; the CLIP paper: "all weights except gains or biases"). So
    norms' scales, biases, scalars (CLIP's logit scale) and vectors (iGPT's sos, CLIP's class
    embedding) do not decay; embeddings, position embeddings included, do. A leading 'layers'
    axis (scan_layers stacks every block parameter on it) is not a parameter's own, so both
    layer layouts decay the same parameters."""
    layers = LAYERS_AXIS[nnx.PARTITION_NAME]

    def decays(path, spec, x) -> bool:
        name = next((k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), '')
        own_axes = x.ndim - (1 if tuple(spec)[:1] == (layers,) else 0)
        return own_axes >= 2 and name not in GAINS_AND_BIASES

    specs = nnx.get_partition_spec(params)  # logical axis names; P() where there are none
    return jax.tree_util.tree_map_with_path(
        decays, specs, params, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def optimizer_problems(opt: ConfigDict, total_steps: int) -> list[str]:
    """What is wrong with the schedule's settings (checked before a run writes anything)."""
    if total_steps < 1:
        return [f'total_steps={total_steps} must be at least 1']
    problems = []
    if not 0 <= opt.warmup_steps < total_steps:
        problems.append(f'optimizer.warmup_steps={opt.warmup_steps} must be in '
                        f'[0, total_steps={total_steps})')
    if not opt.learning_rate > 0:  # a negative rate would climb the loss
        problems.append(f'optimizer.learning_rate={opt.learning_rate} must be > 0')
    return problems


def make_optimizer(opt: ConfigDict, total_steps: int):
    """AdamW (β2 = 0.95 as in iGPT), linear warm-up, cosine decay, global-norm clipping;
    weight decay on kernels and embeddings only (see `weight_decay_mask`).

    With `opt.skip_nonfinite_updates = K > 0`, a step whose gradients hold NaN or Inf leaves
    the parameters unchanged (optax.apply_if_finite); the trainer stops after K in a row.
    """
    problems = optimizer_problems(opt, total_steps)
    if problems:
        raise ConfigError(f'config.{problems[0]}.')
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=total_steps, end_value=opt.learning_rate * opt.min_learning_rate_ratio)
    decay = optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask)
    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        # optax.adamw(..., mask=weight_decay_mask) spelled out, its masked decay made stateless:
        # the optimizer state keeps adamw's unmasked structure, so checkpoints written before
        # the mask still restore.
        optax.chain(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
                    optax.stateless(lambda updates, params: decay.update(
                        updates, decay.init(params), params)[0]),
                    optax.scale_by_learning_rate(schedule)))
    if opt.skip_nonfinite_updates:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=opt.skip_nonfinite_updates)
    return tx, schedule


def ema_decay(config) -> float:
    """The decay of the parameters' exponential moving average (`optimizer.ema_decay`; 0: none
    is kept)."""
    return float(config.optimizer.ema_decay)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
               ema: bool = False):
    """Splits the model into its static graph and a pytree of parameters. With `ema`, the
    state also holds `ema`, the moving average of the parameters (starting at them), which
    checkpoints carry and `pixelgen.load` restores in their place."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError(f'{type(model).__name__} holds non-parameter state, which the trainer '
                        'does not carry: keep models free of mutable variables.')
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(seed)}
    if ema:
        state['ema'] = jax.tree.map(jnp.copy, params)
    return graphdef, rest, state


def abstract_state(fresh_state) -> tuple[Any, Any, State]:
    """(graphdef, rest, abstract state) of `fresh_state()` without allocating anything."""
    box = {}

    def shapes():
        graphdef, rest, state = fresh_state()
        box['graphdef'] = graphdef
        return rest, state
    rest, state = jax.eval_shape(shapes)
    return box['graphdef'], rest, state


def init_params_from(state: State, config: ConfigDict) -> State:
    """`state` with the parameters of the checkpoint in `config.init_from` (step
    `config.init_from_step`, -1 = its latest) wherever this model has the same parameter; the
    others (a new classifier head) keep their fresh initialisation. The checkpoint's layer
    layout may differ from this model's (model.scan_layers; see `_relayout`), and a task's
    `adapt_pretrained(config, loaded, shapes)` may fit them to this model. Optimizer state
    and step stay fresh: a fine-tuning run starts at step 0. Only the checkpoint's parameters
    are read, straight into the shards of this run's mesh (`pretrained.load`)."""
    step = None if config.init_from_step < 0 else config.init_from_step
    sharding = jax.tree.leaves(state['params'])[0].sharding
    try:
        if isinstance(sharding, jax.sharding.NamedSharding):  # this run's mesh
            source = pretrained.load_onto(config.init_from, step, sharding.mesh)
        else:
            source = pretrained.load(config.init_from, step)
    except FileNotFoundError as e:
        raise ConfigError(f'config.init_from={config.init_from!r}: {e}') from e
    _, source_params, _ = nnx.split(source.model, nnx.Param, ...)
    wanted = [path for path, _ in jax.tree_util.tree_flatten_with_path(state['params'])[0]]
    loaded = _relayout(dict(jax.tree_util.tree_flatten_with_path(source_params)[0]), wanted)
    adapt = getattr(tasks.module(config), 'adapt_pretrained', None)
    if adapt is not None:  # the task fits pretrained parameters to this model (ViT: resolution)
        shapes = {path: x.shape for path, x in
                  jax.tree_util.tree_flatten_with_path(state['params'])[0]}
        loaded = adapt(config, loaded, shapes)
    fresh, mismatched = [], []

    def pick(path, x):
        if path not in loaded:
            fresh.append(jax.tree_util.keystr(path))
            return x
        y = loaded[path]
        if y.shape != x.shape:
            mismatched.append(f'{jax.tree_util.keystr(path)}: pretrained {y.shape}, '
                              f'this model {x.shape}')
            return x
        return jax.device_put(y.astype(x.dtype), x.sharding)

    params = jax.tree_util.tree_map_with_path(pick, state['params'])
    if mismatched:
        raise ConfigError(f'config.init_from={config.init_from!r}: parameter shapes differ:\n  '
                          + '\n  '.join(mismatched) + '\nSet config.model and config.data to '
                          f'the values in {config.init_from}/config.json.')
    if jax.process_index() == 0:
        print(f'[pixelgen] initialised from {config.init_from} step {source.step}; fresh: '
              f'{", ".join(fresh) or "nothing"}', flush=True)
    return {**state, 'params': params}


def _relayout(loaded: dict, wanted_paths: list) -> dict:
    """`loaded` (flat path -> array) plus the transformer blocks' parameters in the other layer
    layout wherever `wanted_paths` asks for it, so released (looped) weights fine-tune a
    scanned model and back: looped `blocks/<i>/x` are stacked in layer order into scanned
    `blocks/x` [num_layers, ...]; a looped path `blocks/<i>/x` takes layer i of `blocks/x`."""
    blocks = jax.tree_util.DictKey('blocks')
    out = dict(loaded)
    for path in wanted_paths:
        if path in loaded or blocks not in path:
            continue
        after = path.index(blocks) + 1
        layer = path[after]
        if isinstance(layer, jax.tree_util.DictKey) and isinstance(layer.key, int):
            stacked = loaded.get(path[:after] + path[after + 1:])  # scanned -> looped
            if stacked is not None and stacked.shape[0] > layer.key:
                out[path] = stacked[layer.key]
            continue
        layers = []  # looped -> scanned
        while (looped := path[:after] + (jax.tree_util.DictKey(len(layers)),)
               + path[after:]) in loaded:
            layers.append(loaded[looped])
        if layers:
            out[path] = jnp.stack(layers)
    return out


def make_train_step(task, graphdef, rest, tx, schedule, grad_accum_steps: int = 1,
                    concurrent_microbatches: int = 1, ema_decay: float = 0.0):
    """One optimizer step; with `grad_accum_steps` > 1 the batch is cut into that many
    micro-batches, run one after the other, whose gradients and metrics are averaged (same
    result, less memory). `concurrent_microbatches` > 1 cuts each of those again into
    passes that share nothing but the parameters, so XLA may run them side by side: on a
    CPU it runs each op on one thread, and one pass alone leaves a core idle a third of the
    time (`benchmarks/README.md`). Same memory; the same result wherever the loss is a mean
    over rows (not where it couples them: CLIP contrasts within each pass)."""
    def grads_and_metrics(params, batch, rng, step):
        def loss_fn(params):  # `step` drives in-loss schedules (the dVAE's tau and beta)
            return task.loss(nnx.merge(graphdef, params, rest), batch, rng, step=step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, metrics

    def summed_passes(params, passes, rng, step):
        """The summed gradients and metrics of the concurrent passes [C, rows, ...]."""
        outs = [grads_and_metrics(params, jax.tree.map(lambda x, c=c: x[c], passes),
                                  rng if concurrent_microbatches == 1
                                  else jax.random.fold_in(rng, c), step)
                for c in range(concurrent_microbatches)]
        return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *outs)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        rng = jax.random.fold_in(state['rng'], state['step'])  # a fresh key per step, resumable
        micro_batches = grad_accum_steps * concurrent_microbatches
        if micro_batches == 1:
            grads, metrics = grads_and_metrics(state['params'], batch, rng, state['step'])
        else:
            # Micro-batch i takes rows i, i + A·C, i + 2·A·C, ...: every device keeps its
            # share. [A, C, rows, ...]: A sequential steps of C concurrent passes.
            micro = jax.tree.map(lambda x: jnp.moveaxis(
                x.reshape(x.shape[0] // micro_batches, grad_accum_steps,
                          concurrent_microbatches, *x.shape[1:]), 0, 2), batch)

            def accumulate(carry, inputs):
                i, passes = inputs
                out = summed_passes(state['params'], passes, jax.random.fold_in(rng, i),
                                    state['step'])
                return jax.tree.map(jnp.add, carry, out), None

            if grad_accum_steps == 1:
                total = summed_passes(state['params'], jax.tree.map(lambda x: x[0], micro),
                                      rng, state['step'])
            else:
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                    summed_passes, state['params'], jax.tree.map(lambda x: x[0], micro), rng,
                    state['step']))
                total, _ = jax.lax.scan(accumulate, zeros,
                                        (jnp.arange(grad_accum_steps), micro))
            grads, metrics = jax.tree.map(lambda x: x / micro_batches, total)
        updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        metrics = {**metrics, 'grad_norm': optax.tree.norm(grads),
                   'learning_rate': schedule(state['step']),
                   'params_finite': jnp.isfinite(optax.tree.norm(params)).astype(jnp.float32)}
        if isinstance(opt_state, optax.ApplyIfFiniteState):
            metrics['skipped_steps'] = opt_state.total_notfinite.astype(jnp.float32)
            metrics['nonfinite_streak'] = opt_state.notfinite_count.astype(jnp.float32)
        new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                     'rng': state['rng']}
        if 'ema' in state:  # ema <- decay * ema + (1 - decay) * params
            new_state['ema'] = optax.incremental_update(params, state['ema'], 1.0 - ema_decay)
        return new_state, metrics
    return train_step


def make_eval_step(task, graphdef, rest):
    def eval_step(params, batch: dict) -> dict:
        return task.eval_sums(nnx.merge(graphdef, params, rest), batch)
    return eval_step


class _Stop:
    """SIGTERM (the preemption notice of TPU VMs and SLURM) and SIGINT (Ctrl-C) become a
    save-and-exit at a step boundary that every host agrees on.

    A signal only sets this host's request; `agreed()` is the request all hosts act on at a
    step. With several processes the hosts combine their requests with one small collective
    (a max over every device) that is read a step later, so the check never waits for the
    step in flight and every host reads the same value at the same step: all save the same
    step, however many of them (one, or all) received the signal. A second Ctrl-C stops at
    once (KeyboardInterrupt), without a save.
    """

    NONE, TERM, INT = 0, 1, 2  # a request; the larger wins when hosts differ
    NAMES = {TERM: 'SIGTERM', INT: 'SIGINT'}

    def __init__(self):
        self.local = self.NONE
        self._previous: dict[int, Any] = {}
        self._pending = None  # the collective of the previous step, not yet read
        self._combine = None

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.local == self.INT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.local = max(self.local, self.INT if signum == signal.SIGINT else self.TERM)
        if signum == signal.SIGINT:
            print('[pixelgen] SIGINT: saving at the next step, then exiting (Ctrl-C again to '
                  'stop at once, without a save).', flush=True)

    def agreed(self) -> int:
        """The request every host acts on at this step (call it once per step, on all)."""
        if jax.process_count() == 1:
            return self.local  # read once: a signal landing later is served a step later
        agreed = (self.NONE if self._pending is None
                  else int(self._pending.addressable_data(0)))
        self._pending = self._all_hosts_max(self.local)
        return agreed

    def _all_hosts_max(self, request: int) -> jax.Array:
        if self._combine is None:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ('hosts',))
            self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('hosts'))
            self._combine = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec()))
        local = np.full((jax.local_device_count(),), request, np.int32)
        return self._combine(jax.make_array_from_process_local_data(self._sharding, local))

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def evaluate(task, eval_step, params, mesh, per_host_batch: int,
             num_examples: int | None) -> dict[str, float]:
    sums: dict[str, float] = {}
    for batch in task.eval_batches(per_host_batch, num_examples):
        out = jax.device_get(eval_step(params, parallel.global_batch(batch, mesh)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return task.eval_summary(sums)


def train(config: ConfigDict, workdir: str, *, stop_after: int | None = None,
          restore_step: int | None = None, overwrite_later: bool = False,
          lock_stale_minutes: float = lease.STALE_MINUTES) -> dict:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint).

    Args:
      stop_after: end this run (with a checkpoint) once the step count reaches this, as a
        preemption would; the next run of the same command continues.
      restore_step: resume from this checkpoint instead of the newest readable one. Later
        checkpoints are moved to `<workdir>/checkpoints_after_rewind/`, or deleted with
        `overwrite_later`.
      lock_stale_minutes: a workdir lock whose heartbeat is older than this is taken over.
    Returns:
      the final metrics: the last training metrics and, if training finished, the test ones.
    Raises:
      KeyboardInterrupt: after SIGINT (Ctrl-C), once the current step is saved.
    """
    t_start = time.perf_counter()
    validate_loop_config(config)
    backend.configure(config.runtime)
    tasks.validate(config)  # every config check before anything is written
    lease.check_stale_minutes(lock_stale_minutes)
    checkpoint.probe_workdir(workdir)  # before anything (data, palette) is written there
    with lease.hold(workdir, lock_stale_minutes):  # one trainer per workdir
        return _train(config, workdir, t_start, stop_after, restore_step, overwrite_later)


def _train(config: ConfigDict, workdir: str, t_start: float, stop_after: int | None,
           restore_step: int | None, overwrite_later: bool) -> dict:
    """`train` once the workdir is checked and locked."""
    # Measured first, while no input-pipeline threads compete for the cores.
    peak, peak_source = flops.peak_flops_per_device()
    try:
        mesh = parallel.make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(f'{e} (config.mesh; {jax.device_count()} devices here)') from e
    hosts, dp = jax.process_count(), parallel.batch_parallelism(mesh)
    micro_batches = config.grad_accum_steps * config.concurrent_microbatches
    if config.batch_size % (dp * micro_batches) or config.batch_size % hosts:
        raise ConfigError(
            f'config.batch_size={config.batch_size} must divide by the data-parallel size {dp} '
            f'times grad_accum_steps={config.grad_accum_steps} times concurrent_microbatches='
            f'{config.concurrent_microbatches}, and by the number of hosts {hosts}. Change '
            '--config.batch_size, --config.mesh or those two.')
    per_host_batch = config.batch_size // hosts
    if jax.process_index() == 0:
        print(f'[pixelgen] workdir {workdir}\n[pixelgen] config:\n{format_config(config)}',
              flush=True)

    task = tasks.make(config, workdir)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)

    def fresh_state():
        return init_state(task.build_model(nnx.Rngs(config.seed)), tx, config.seed,
                          ema=ema_decay(config) > 0)

    # Parameters are created directly in their shards: no host ever holds the whole model.
    graphdef, rest, abstract = abstract_state(fresh_state)
    rules = tuple(config.sharding_rules)
    state_sharding = parallel.state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: fresh_state()[2], out_shardings=state_sharding)()
    num_params = sum(x.size for x in jax.tree.leaves(state['params']))
    if jax.process_index() == 0:
        print(f'[pixelgen] {type(task).__name__}: {num_params:,} parameters, mesh '
              f'{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} '
              f'devices; MFU is against {peak / 1e12:.3f} TFLOP/s per device ({peak_source})',
              flush=True)

    manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
    restored, data_iterator, latest = checkpoint.restore_latest_good(
        manager, checkpoint.abstract(state), lambda: task.train_iterator(config.batch_size),
        config, restore_step)
    if restored is not None:
        state = restored
        print(f'[pixelgen] resumed from {checkpoint.checkpoint_dir(workdir)}/{latest}',
              flush=True)
        checkpoint.set_aside_later(manager, latest, delete=overwrite_later)
    elif config.init_from:
        state = init_params_from(state, config)
    if jax.process_index() == 0:  # only now: a refused checkpoint leaves the workdir untouched
        save_config(config, workdir)

    train_step = jax.jit(make_train_step(task, graphdef, rest, tx, schedule,
                                         config.grad_accum_steps,
                                         config.concurrent_microbatches, ema_decay(config)),
                         in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                         out_shardings=(state_sharding, parallel.replicated(mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(task, graphdef, rest),
                        out_shardings=parallel.replicated(mesh))
    step = int(state['step'])
    writer = MetricWriter(workdir, resume_step=latest or 0,
                          test_again=step >= config.total_steps)
    end = min(config.total_steps, stop_after) if stop_after else config.total_steps
    progress = Progress(config.total_steps, step, config.batch_size * task.tokens_per_example,
                        task.model_flops_per_step(config.batch_size), jax.device_count(), peak)
    pending: list[dict] = []  # device metrics not yet fetched (fetching waits for the step)
    since_log: list[dict] = []  # fetched metrics since the last log line
    last_saved = latest
    result: dict[str, float] = {}

    def save(step: int) -> None:
        nonlocal last_saved
        if step != last_saved:
            checkpoint.save(manager, step, state, data_iterator, config)
            last_saved = step

    stop, preempted = _Stop(), _Stop.NONE
    flat = FlatLossWatch()
    with stop, parallel.activation_sharding(mesh, rules):
        while step < end:
            batch = parallel.global_batch(next(data_iterator), mesh)
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            step += 1
            due_to_log = step % config.log_every_steps == 0 or step == end
            preempted = stop.agreed()  # the same on every host
            due_to_save = (step % config.checkpoint_every_steps == 0 or step == end
                           or preempted)
            if due_to_log or due_to_save:
                since_log += jax.device_get(pending)
                pending.clear()
                _check_finite(since_log, step, last_saved, config.optimizer, manager)
            if due_to_log:
                means = {k: float(np.mean([float(m[k]) for m in since_log]))
                         for k in since_log[0] if k not in ('params_finite', 'nonfinite_streak')}
                if 'skipped_steps' in means:
                    means['skipped_steps'] = float(since_log[-1]['skipped_steps'])
                since_log = []
                means.update(progress.rates(step))
                writer.write(step, means, prefix='train/')
                result = {f'train/{k}': v for k, v in means.items()}
                if jax.process_index() == 0:
                    print(progress.line(step, means), flush=True)
                    if warning := flat.update(step, means):
                        print(warning, flush=True)
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < end:
                scores = evaluate(task, eval_step, state['params'], mesh, per_host_batch,
                                  config.eval_examples)
                writer.write(step, scores, prefix='eval/')
                if jax.process_index() == 0:
                    print(f'[eval] step {step}: ' + ', '.join(
                        f'{k} {v:.4f}' for k, v in scores.items()), flush=True)
            if config.sample_every_steps and step % config.sample_every_steps == 0:
                _write_samples(task, graphdef, rest, state, step)
            if due_to_save:
                save(step)  # _check_finite has just vouched for this state
            if preempted:
                where = '' if stop.local else ' (received by another host)'
                print(f'[pixelgen] {stop.NAMES[preempted]}{where}: saved step {step}; rerun '
                      'the same command to resume.', flush=True)
                break
        manager.wait_until_finished()  # a signal now cannot abandon the save in flight
    if preempted == stop.INT:
        writer.close()
        manager.close()
        raise KeyboardInterrupt

    if step >= config.total_steps:
        with parallel.activation_sharding(mesh, rules):
            scores = evaluate(task, eval_step, state['params'], mesh, per_host_batch, None)
        writer.write(step, scores, prefix='test/')
        result.update({f'test/{k}': v for k, v in scores.items()})
        if config.sample_every_steps and step % config.sample_every_steps:
            _write_samples(task, graphdef, rest, state, step)
        if jax.process_index() == 0:
            print(f'[pixelgen] done in {time.perf_counter() - t_start:.0f}s: test ' + ', '.join(
                f'{k} {v:.4f}' for k, v in scores.items()), flush=True)
    writer.close()
    manager.close()
    return result


class FlatLossWatch:
    """Warns, once, when nothing is learning: the logged loss has stayed at its first value
    (within 1%) for `logs` logged steps in a row while the gradient norm was exactly 0 (a loss
    that does not depend on the parameters, every example masked out, frozen weights)."""

    def __init__(self, logs: int = 20):
        self.logs, self.first, self.flat, self.warned = logs, None, 0, False

    def update(self, step: int, means: dict[str, float]) -> str | None:
        """Takes one logged step's means; returns the warning when it is due."""
        loss, grad_norm = means.get('loss'), means.get('grad_norm')
        if loss is None or grad_norm is None or self.warned:
            return None
        if self.first is None:
            self.first = loss
        still = grad_norm == 0 and abs(loss - self.first) <= 1e-6 + 0.01 * abs(self.first)
        self.flat = self.flat + 1 if still else 0
        if self.flat < self.logs:
            return None
        self.warned = True
        return (f'[pixelgen] WARNING: nothing is learning: at step {step} the loss has stayed at '
                f'{self.first:.4g} for {self.logs} logged steps with a gradient norm of 0. Check '
                'that the loss depends on the parameters and that the batches are not all '
                'masked out.')


def _check_finite(metrics: list[dict], step: int, last_saved: int | None, opt: ConfigDict,
                  manager) -> None:
    """Stops (before anything is saved) when training has gone non-finite for good."""
    last = metrics[-1]
    streak = int(last.get('nonfinite_streak', 0))
    if opt.skip_nonfinite_updates and streak:
        print(f'[pixelgen] WARNING: non-finite gradients at step {step}: update skipped '
              f'({streak} in a row, {int(last["skipped_steps"])} in all).', flush=True)
    broken = (not last['params_finite'] or streak >= max(opt.skip_nonfinite_updates, 1)
              or (not opt.skip_nonfinite_updates and not all(
                  math.isfinite(float(m['loss'])) for m in metrics)))
    if broken:
        manager.wait_until_finished()
        where = ('No checkpoint was saved yet, so a rerun starts from step 0.'
                 if last_saved is None else
                 f'Nothing after checkpoint {last_saved} was saved; a rerun resumes from it.')
        raise NonFiniteLossError(
            f'Training went non-finite at step {step} (loss {float(last["loss"])}). {where} '
            'Lower config.optimizer.learning_rate or raise config.optimizer.warmup_steps, '
            'then rerun the same command.')


def _write_samples(task, graphdef, rest, state: State, step: int) -> None:
    model = nnx.merge(graphdef, state['params'], rest)
    rng = jax.random.fold_in(jax.random.PRNGKey(task.config.seed + 1), step)
    path = task.write_samples(model, step, rng)  # every host samples; process 0 writes
    if jax.process_index() == 0:
        print(f'[samples] {path}', flush=True)
