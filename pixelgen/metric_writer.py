"""Where training output goes: a console progress line, `metrics.jsonl` and TensorBoard.

Only process 0 writes (on a pod every host computes the same global metrics). The workdir may
be a URL (gs://...): tensorboardX appends to its event files, which an object store cannot
do, so there the events are written to a local staging folder (see `storage.cache_dir`)
and each flush copies them whole to `<workdir>/tensorboard/<name>`.
"""

from __future__ import annotations

import json
import math
import shutil
import time

import jax

from pixelgen import storage


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def drop_rows_after(path: str, step: int, *, test_again: bool = False) -> int:
    """Rewrites the metrics file `path` without the rows a run resumed from checkpoint `step`
    writes again: those past `step`, and with `test_again` (a finished run resumed: it
    evaluates again) the test rows at `step`. An unreadable row (cut by a kill) goes too.
    Returns how many rows were dropped."""
    if not storage.exists(path):
        return 0
    kept, dropped = [], 0
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
            keep = row['step'] < step or (row['step'] == step and not (test_again and any(
                k.startswith('test/') for k in row)))
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + '\n')
        else:
            dropped += 1
    if dropped:
        storage.write_text(path, ''.join(kept))  # whole or not at all
    return dropped


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/<name>`.

    `resume_step`: the checkpoint step a training run starts from (0 for a fresh start). The
    rows of earlier runs past it are dropped from metrics.jsonl (`drop_rows_after`), and the
    TensorBoard writer marks a purge at step `resume_step + 1`, so TensorBoard discards the
    earlier events from there on: no step is shown twice after a kill, a preemption or a
    rewind. None (evaluation jobs) leaves earlier rows alone. `test_again`: the run resumes
    at its last step and writes its test rows again.
    """

    def __init__(self, workdir: str, name: str = 'train', *, resume_step: int | None = None,
                 test_again: bool = False):
        self.active = jax.process_index() == 0
        self._jsonl = self._tb = None
        self._tb_remote = None  # where the local event files are copied to, for a URL workdir
        if self.active:
            from tensorboardX import SummaryWriter  # import here: only process 0 needs it
            path = storage.join(workdir, 'metrics.jsonl')
            if resume_step is not None:
                dropped = drop_rows_after(path, resume_step, test_again=test_again)
                if dropped:
                    print(f'[pixelgen] {path}: dropped {dropped} rows past step {resume_step}, '
                          'which this run writes again', flush=True)
            self._jsonl = storage.Appender(path)
            tb_dir = storage.join(workdir, 'tensorboard', name)
            if storage.is_remote(tb_dir):
                self._tb_remote, tb_dir = tb_dir, storage.cache_dir('tensorboard', tb_dir)
                # Earlier runs' files here were copied up at each of their flushes.
                shutil.rmtree(tb_dir, ignore_errors=True)
                print(f'[pixelgen] TensorBoard events are written to {tb_dir} and copied to '
                      f'{self._tb_remote} at every log step', flush=True)
            self._tb_local = tb_dir
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(tb_dir, purge_step=purge)

    def write(self, step: int, scalars: dict[str, float], prefix: str = '') -> None:
        if not self.active:
            return
        record = {'step': int(step)}
        for key, value in scalars.items():
            value = float(value)
            record[prefix + key] = value
            self._tb.add_scalar(prefix + key, value, int(step))
        self._jsonl.append(json.dumps(record) + '\n')
        self._flush_tb()

    def _flush_tb(self) -> None:
        self._tb.flush()
        self._copy_tb_up()

    def _copy_tb_up(self) -> None:
        if self._tb_remote is not None:  # this writer's event file, whole
            storage.upload_tree(self._tb_local, self._tb_remote)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
            self._copy_tb_up()


class Progress:
    """One console line per log step: loss, bits/dim, steps/s, tokens/s, TFLOP/s, MFU, ETA."""

    def __init__(self, total_steps: int, first_step: int, tokens_per_step: int,
                 flops_per_step: float, num_devices: int, peak_flops_per_device: float):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_device = flops_per_step / num_devices
        self.peak = peak_flops_per_device
        self._last_step, self._last_time = first_step, time.perf_counter()

    def rates(self, step: int) -> dict[str, float]:
        """steps/s, tokens/s, TFLOP/s per device and MFU since the previous call."""
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        flops_per_s = steps_per_s * self.flops_per_device
        return {'steps_per_s': steps_per_s, 'tokens_per_s': steps_per_s * self.tokens_per_step,
                'tflops_per_device': flops_per_s / 1e12, 'mfu': flops_per_s / self.peak}

    def line(self, step: int, scalars: dict[str, float]) -> str:
        eta = (self.total_steps - step) / max(scalars.get('steps_per_s', 0.0), 1e-9)
        parts = [f'step {step}/{self.total_steps}']
        for key, fmt in (('loss', '{:.4f}'), ('bits_per_dim', '{:.3f}'),
                         ('grad_norm', '{:.3f}'), ('learning_rate', '{:.2e}'),
                         ('steps_per_s', '{:.2f}'), ('tokens_per_s', '{:,.0f}'),
                         ('tflops_per_device', '{:.3f}'), ('mfu', '{:.1%}')):
            if key in scalars:
                label = key.replace('_per_s', '/s').replace('tflops_per_device', 'TFLOP/s/dev')
                parts.append(f'{label} {fmt.format(scalars[key])}')
        parts.append(f'ETA {_format_duration(eta)}')
        return ' | '.join(parts)
