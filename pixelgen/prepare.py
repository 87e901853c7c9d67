"""Build a local dataset into array_record ahead of training, decoding in N processes.

    python -m pixelgen.prepare --dataset 'image_folder:/data/my_images' --num_workers 8
    python -m pixelgen.prepare --dataset 'prepared:webdataset:/data/pairs/{00000..00127}.tar' \\
        --num_workers 16 --data_dir gs://bucket/tfds
    python -m pixelgen.prepare --dataset 'prepared:parquet:/data/pairs/*.parquet'

Training with the same `--config.data.dataset` (and `--config.data.data_dir`) then reads the
built dataset. Without this command the first training run builds it in its own process.

- `image_folder:<path>`: a folder of images (pixelgen/data/builders/image_folder.py).
- `prepared:webdataset:<pattern>`, `prepared:parquet:<pattern>`: img2dataset shards, local
  or gs:// (pixelgen/data/builders/prepared_shards.py), converted once so that training reads
  them by random access instead of streaming them.

Decoding, checking and converting run in --num_workers processes (default: one per core),
a unit of work (64 files, or one shard) at a time; an RGB JPEG keeps its own bytes, other
images are stored as PNG. Killed, the same command resumes: the units finished before are
not converted again. A folder or shard set that changed (names, sizes, modification times)
is a new dataset, built afresh. A dataset already built is reported and left as it is.
"""

from __future__ import annotations

import argparse
import os

from pixelgen import cli
from pixelgen.data import builders, pipeline


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.prepare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', required=True,
                        help="'image_folder:<path>', 'prepared:webdataset:<pattern>' or "
                             "'prepared:parquet:<pattern>' (or an embedded dataset)")
    parser.add_argument('--data_dir', default='',
                        help='where to build (default: $TFDS_DATA_DIR or ~/tensorflow_datasets), '
                             'as --config.data.data_dir')
    parser.add_argument('--num_workers', type=int, default=os.cpu_count() or 1,
                        help='decoding processes (default: one per core; 0: this process)')
    args = parser.parse_args(argv)
    if not builders.builds_locally(args.dataset):
        parser.error(f'--dataset {args.dataset!r} is not built locally: pass '
                     "'image_folder:<path>', 'prepared:webdataset:<pattern>', "
                     f"'prepared:parquet:<pattern>' or one of {sorted(builders.EMBEDDED)}.")
    if args.num_workers < 0:
        parser.error(f'--num_workers={args.num_workers} must be at least 0.')
    data_dir = pipeline.resolve_data_dir(args.data_dir)
    builder = builders.ensure_built(args.dataset, data_dir, num_workers=args.num_workers)
    sizes = ', '.join(f'{s}: {i.num_examples}' for s, i in builder.info.splits.items())
    print(f'{args.dataset} is built in {builder.data_dir} ({sizes}); train on it with '
          f"--config.data.dataset='{args.dataset}'"
          + (f" --config.data.data_dir='{args.data_dir}'" if args.data_dir else ''), flush=True)
    return 0


if __name__ == '__main__':
    cli.run(main)
