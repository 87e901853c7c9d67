"""Compile time of the train step with the layers in a Python loop against `nnx.scan`-style
stacked layers (`model.scan_layers`), and XLA's memory analysis of each.

    python benchmarks/compile_time.py --config configs/igpt.py:s --config.batch_size=8 \
        --config.model.width=64 --config.model.num_heads=2 --config.data.image_size=16

Any config and overrides work (Image GPT tasks); `model.scan_layers` and, with `--remat`,
`model.remat` are set per case. Prints one JSON line per case: trace + lower seconds,
compile seconds, and the per-device memory analysis (pixelgen.memory.compiled_memory's
fields). Run it on an otherwise idle machine: compile time is CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pixelgen.config import parse_config_args
from pixelgen.memory import lower_train_step


def measure(config) -> dict[str, float]:
    start = time.perf_counter()
    lowered = lower_train_step(config)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    analysis = compiled.memory_analysis()
    return {'lower_s': round(traced - start, 2), 'compile_s': round(done - traced, 2),
            'temp_mib': analysis.temp_size_in_bytes / 2**20,
            'argument_mib': analysis.argument_size_in_bytes / 2**20}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--remat', default='', help='comma-separated model.remat values to '
                        'compare (default: the config\'s)')
    config, rest = parse_config_args(argv)
    args = parser.parse_args(rest)
    for remat in args.remat.split(',') if args.remat else [config.model.remat]:
        for scan_layers in (False, True):
            with config.unlocked():
                config.model.remat = remat
                config.model.scan_layers = scan_layers
            result = {'num_layers': config.model.num_layers, 'width': config.model.width,
                      'remat': remat, 'scan_layers': scan_layers, **measure(config)}
            print(json.dumps(result), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
