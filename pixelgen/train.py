"""python -m pixelgen.train --config configs/<name>.py[:variant] --workdir W [--config.k=v ...]

Trains the config's task in W. If W already holds a checkpoint, training resumes from it
(params, optimizer, step, RNG and data position) and ends where an uninterrupted run would.
SIGTERM saves the current step and exits 0; Ctrl-C (SIGINT) saves it and exits 130. One
trainer at a time per workdir (W/trainer.lock).
"""

from __future__ import annotations

import argparse

from pixelgen import cli
from pixelgen.config import format_config, parse_config_args


def main(argv: list[str]) -> int:
    if '--help_config' in argv:
        config, _ = parse_config_args([a for a in argv if a != '--help_config'])
        print(format_config(config))
        return 0
    parser = argparse.ArgumentParser(
        prog='python -m pixelgen.train', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='--config FILE[:variant] picks the config; --config.a.b=value overrides a field; '
               '--help_config lists every field.')
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
    group = parser.add_argument_group('multi-host (see launch/)')
    group.add_argument('--distributed', action='store_true',
                       help='call jax.distributed.initialize() with cluster auto-detection '
                            '(TPU pods, SLURM); implied by --coordinator_address')
    group.add_argument('--coordinator_address', default=None, help='HOST:PORT of process 0')
    group.add_argument('--num_processes', type=int, default=None)
    group.add_argument('--process_id', type=int, default=None)
    if any(a in ('-h', '--help') for a in argv):
        parser.print_help()
        return 0
    config, rest = parse_config_args(argv)
    args = parser.parse_args(rest)
    from pixelgen import parallel
    from pixelgen.trainer import train
    if args.distributed or args.coordinator_address:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    if args.overwrite_later and args.restore_step is None:
        parser.error('--overwrite_later deletes the checkpoints after --restore_step N; pass '
                     '--restore_step too')
    train(config, args.workdir, restore_step=args.restore_step,
          overwrite_later=args.overwrite_later, lock_stale_minutes=args.lock_stale_minutes)
    return 0


if __name__ == '__main__':
    cli.run(main)
