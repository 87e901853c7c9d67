"""python -m pixelgen.train --config configs/<name>.py[:variant] --workdir W [--config.k=v ...]

Trains the config's task in W. If W already holds a checkpoint, training resumes from it
(params, optimizer, step, RNG and data position) and ends where an uninterrupted run would.
SIGTERM saves the current step and exits 0; Ctrl-C (SIGINT) saves it and exits 130. One
trainer at a time per workdir (W/trainer.lock).
"""

from __future__ import annotations

from pixelgen import cli, parallel
from pixelgen.config import parse_job_args


def add_arguments(parser) -> None:
    parser.add_argument('--workdir', required=True,
                        help='checkpoints, logs, samples and the resolved config go here '
                             '(a local path or gs://...)')
    parser.add_argument('--restore_step', type=int, default=None,
                        help='resume from this checkpoint step instead of the newest readable; '
                             'later checkpoints are moved to W/checkpoints_after_rewind/')
    parser.add_argument('--overwrite_later', action='store_true',
                        help='with --restore_step: delete the later checkpoints instead')
    parser.add_argument('--lock_stale_minutes', type=float, default=10.0,
                        help='take over the workdir lock (W/trainer.lock) of another trainer '
                             'whose heartbeat is older than this (default 10)')
    parallel.add_distributed_arguments(parser)


def main(argv: list[str]) -> int:
    parsed = parse_job_args(argv, 'python -m pixelgen.train', __doc__, add_arguments)
    if parsed is None:  # help was printed
        return 0
    config, args = parsed
    if args.overwrite_later and args.restore_step is None:
        raise cli.ConfigError('--overwrite_later deletes the checkpoints after --restore_step '
                              'N; pass --restore_step too')
    from pixelgen.trainer import train
    parallel.initialize_from_args(args)
    train(config, args.workdir, restore_step=args.restore_step,
          overwrite_later=args.overwrite_later, lock_stale_minutes=args.lock_stale_minutes)
    return 0


if __name__ == '__main__':
    cli.run(main)
