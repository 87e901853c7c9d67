"""python -m pixelgen.dvae encode|decode: image datasets <-> grids of dVAE codes.

  python -m pixelgen.dvae encode --workdir W --dataset shapes --out DIR [--split train,test]
  python -m pixelgen.dvae decode --workdir W --codes DIR --out grid.png [--split test --num 16]
  (both take --mesh data=1,fsdp=-1: the mesh the parameters are loaded onto)

`encode` turns each split of a dataset (see pixelgen.data.pipeline.open_source) into a
codes dataset (pixelgen.data.codes: uint16 [grid, grid] codes with the caption and label of
every image), the input of the DALL·E transformer. Images are resized as in training (the
workdir's data.image_size). A streamed source ('webdataset:<pattern>', 'parquet:<pattern>')
encodes each usable pair of its training shards (split `train`) or held-out shards (any other
split) once, in shard order; the pairs its filters or decoding reject are skipped.

In a multi-host job (the distributed flags of `pixelgen.train`, e.g. through
launch/local_multiprocess.sh --module pixelgen.dvae) every process loads the dVAE onto its own
devices and encodes and writes its own share of each split: a contiguous range of a tfds
dataset's examples, or every hosts-th shard of a streamed source.

Killed, the same command resumes: each process keeps its complete chunks (`--chunk_size`
examples each) and encodes on from there; a split that --out already holds complete, encoded
by the same dVAE checkpoint, is skipped (`--overwrite` encodes it again).
`--exclude_phrases 'red star,green circle'` leaves the examples whose caption holds one of
them out of split `train` (case-insensitive) and records it, so that a DALL·E run holding
those phrases out (`data.holdout_phrases`) reads no caption to drop them. `decode` draws codes
back as images.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterable, Iterator

import grain
import jax
import numpy as np

from pixelgen import cli, images, parallel, pretrained, storage
from pixelgen.config import ConfigError
from pixelgen.data import codes as codes_lib
from pixelgen.data import pipeline, streaming


def compiled(model, method: str):
    """`model.<method>` jitted with the parameters as an argument (not baked-in constants).
    The parameters stay where they are (sharded as `pixelgen.load` put them, on this
    process's devices) and a batch whose rows divide by the mesh's batch axes is split over
    them."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    leaf = next(iter(jax.tree.leaves(state)), None)
    mesh = getattr(getattr(leaf, 'sharding', None), 'mesh', None)
    if mesh is not None and not set(parallel.BATCH_AXES) <= set(mesh.shape):
        mesh = None  # not a pixelgen mesh: leave the batch to jit
    fn = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))

    def run(x):
        if mesh is not None and len(x) % parallel.batch_parallelism(mesh) == 0:
            x = jax.device_put(x, parallel.batch_sharding(mesh))
        return fn(state, x)
    return run


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def encode_source(model, source, *, image_size: int, batch_size: int, start: int = 0,
                  end: int | None = None, label: str = '',
                  num_threads: int = 4) -> Iterator[dict]:
    """Yields {'codes': uint16 [g, g], 'caption', 'label', 'image': uint8} for source[start:end],
    encoded in batches of `batch_size` (the last one padded: one compile for all)."""
    end = len(source) if end is None else end
    prepare = pipeline.image_example(image_size)

    def example(features: dict) -> dict:
        out = prepare(features)
        out['caption'] = _text(features.get('caption', ''))
        return out

    ds = (grain.MapDataset.source(source)[start:end].map(example)
          .batch(batch_size, drop_remainder=False, batch_fn=lambda rows: rows))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    yield from _encode_batches(model, ds.to_iter_dataset(options), batch_size=batch_size,
                               total=end - start, label=label)


def encode_stream(model, features: Iterable[dict], *, image_size: int, batch_size: int,
                  label: str = '') -> Iterator[dict]:
    """`encode_source` for a stream of feature dicts (a streamed source's usable examples),
    read and decoded in order."""
    prepare = pipeline.image_example(image_size)

    def example(f: dict) -> dict:
        out = prepare(f)
        out['caption'] = _text(f.get('caption', ''))
        return out
    rows = map(example, features)
    batches = iter(lambda: list(itertools.islice(rows, batch_size)), [])
    yield from _encode_batches(model, batches, batch_size=batch_size, total=None, label=label)


def _encode_batches(model, batches: Iterable[list[dict]], *, batch_size: int,
                    total: int | None, label: str) -> Iterator[dict]:
    encode = compiled(model, 'encode')
    done, t0 = 0, time.perf_counter()
    for rows in batches:
        batch = np.stack([r['image'] for r in rows])
        if len(rows) < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - len(rows),) + batch.shape[1:],
                                                    batch.dtype)])
        codes = np.asarray(encode(batch.astype(np.float32) / 255.0))[:len(rows)]
        for row, grid in zip(rows, codes, strict=True):
            yield {'codes': grid.astype(np.uint16), 'caption': row['caption'],
                   'label': int(row['label']), 'image': row['image']}
        done += len(rows)
        if label and (done == total or done // batch_size % 20 == 0):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            of = f'/{total:,}' if total is not None else ''
            print(f'[encode] {label}: {done:,}{of} images ({rate:,.0f} images/s)', flush=True)


def encode(args) -> int:
    import pixelgen

    loaded = pixelgen.load(args.workdir, args.step, mesh=args.mesh)
    _require_dvae(loaded)
    model, config = loaded.model, loaded.config
    size = config.data.image_size
    grid = size // model.downsampling
    host, hosts = jax.process_index(), jax.process_count()
    excluded = [p.strip() for p in args.exclude_phrases.split(',') if p.strip()]
    for split in [s for s in args.split.split(',') if s]:
        source = pipeline.open_source(args.dataset, split, args.data_dir)
        label = f'{args.dataset}/{split}'
        metadata = {'dvae_workdir': storage.absolute(args.workdir), 'dvae_step': loaded.step,
                    'dataset': args.dataset, 'image_size': size}
        if split == 'train':  # the held-out pairs stay in the other splits, to evaluate on
            source = pipeline.without_phrases(source, excluded)
            metadata['train_excluded_phrases'] = excluded
        if isinstance(source, streaming.StreamingSource):
            # Each process reads its own shards, each usable example once; the count is
            # known only at the end.
            n = None
            limit = -(-args.num_examples // hosts) if args.num_examples else None
            rows = (host, len(source.shards))
            print(f'[encode] {label}: shards {host}::{hosts} of {len(source.shards)} on '
                  f'process {host} -> {grid}x{grid} codes of {model.codebook_size}', flush=True)

            def examples(done: int, source=source, limit=limit, label=label):
                usable = itertools.islice(source.usable_examples(host, hosts), done, limit)
                encoded = encode_stream(model, usable, image_size=size,
                                        batch_size=args.batch_size, label=label)
                return ({k: e[k] for k in ('codes', 'caption', 'label')} for e in encoded)
        else:
            n = min(len(source), args.num_examples) if args.num_examples else len(source)
            start, end = parallel.host_range(n)
            rows = (start, end)
            print(f'[encode] {label}: images {start:,}..{end:,} of {n:,} on process {host} -> '
                  f'{grid}x{grid} codes of {model.codebook_size}', flush=True)

            def examples(done: int, start=start, end=end, source=source, label=label):
                # Rows [start + done, end): those before were written by a killed run.
                encoded = encode_source(model, source, image_size=size,
                                        batch_size=args.batch_size, start=start + done,
                                        end=end, label=label)
                return ({k: e[k] for k in ('codes', 'caption', 'label')} for e in encoded)
        metadata['num_examples'] = args.num_examples
        if not args.overwrite and _already_encoded(args.out, split, n, metadata):
            print(f'[encode] {args.out} already holds {split!r}, encoded by this dVAE checkpoint '
                  'from the same examples; skipped (--overwrite encodes it again).', flush=True)
            continue
        count = codes_lib.write_codes(args.out, split, examples, grid_size=grid,
                                      codebook_size=model.codebook_size, metadata=metadata,
                                      rows=rows, chunk_size=args.chunk_size)
        print(f'[encode] wrote {count:,} examples of {split!r} to {args.out}', flush=True)
    return 0


def _already_encoded(out: str, split: str, n: int | None, metadata: dict) -> bool:
    """Whether `out` holds `split` complete, written with these settings (and `n` examples,
    where the count is known beforehand)."""
    try:
        info = codes_lib.codes_info(out)
    except codes_lib.CodesError:
        return False
    return split in info['splits'] and (n is None or info['splits'][split] == n) and all(
        info['metadata'].get(k) == v for k, v in metadata.items())


def decode(args) -> int:
    import pixelgen

    loaded = pixelgen.load(args.workdir, args.step, mesh=args.mesh)
    _require_dvae(loaded)
    model = loaded.model
    info = codes_lib.codes_info(args.codes)
    if info['codebook_size'] != model.codebook_size:
        raise ConfigError(f'{args.codes} holds codes of a {info["codebook_size"]}-entry codebook '
                          f'but {args.workdir} has {model.codebook_size}; decode with the dVAE '
                          'that encoded them.')
    source = codes_lib.open_codes(args.codes, args.split)
    rows = [source[i] for i in range(min(args.num, len(source)))]
    codes = np.stack([r['codes'] for r in rows]).astype(np.int32)
    pictures = np.round(np.asarray(compiled(model, 'decode')(codes)) * 255).astype(np.uint8)
    per_row = 8
    grid = images.make_grid([pictures[i:i + per_row] for i in range(0, len(pictures), per_row)])
    images.save_png(grid, args.out)
    for i, r in enumerate(rows):
        print(f'{i:3d}: {r["caption"]}')
    print(f'[decode] {len(rows)} images from {args.codes}/{args.split} -> {args.out}', flush=True)
    return 0


def _require_dvae(loaded) -> None:
    if loaded.config.task != 'dvae':
        raise ConfigError(f'{loaded.workdir} is a {loaded.config.task!r} run; pass the workdir '
                          'of a dVAE (config.task = dvae).')


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.dvae', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = parser.add_subparsers(dest='job', required=True)
    enc = jobs.add_parser('encode', help='a tfds image dataset -> a codes dataset')
    enc.add_argument('--workdir', required=True, help='the trained (or converted) dVAE')
    enc.add_argument('--dataset', required=True,
                     help="e.g. 'shapes', a prepared tfds name or 'webdataset:<pattern>'")
    enc.add_argument('--out', required=True, help='the codes dataset directory')
    enc.add_argument('--split', default='train,test', help='comma-separated splits')
    enc.add_argument('--data_dir', default='', help='tfds data dir ($TFDS_DATA_DIR if empty)')
    enc.add_argument('--batch_size', type=int, default=64, help='images per step, per host')
    enc.add_argument('--num_examples', type=int, default=0, help='the first N only (0: all)')
    enc.add_argument('--chunk_size', type=int, default=codes_lib.CHUNK_SIZE,
                     help='examples per chunk: a killed encoding resumes after the last '
                     'complete chunk of each process')
    enc.add_argument('--exclude_phrases', default='',
                     help='comma-separated phrases: split train drops the examples whose '
                     "caption holds one (a DALL·E run's data.holdout_phrases), so that its "
                     'start-up reads no caption to drop them')
    enc.add_argument('--overwrite', action='store_true',
                     help='encode a split again even if --out holds it complete')
    enc.add_argument('--step', type=int, default=None, help='checkpoint (default: latest)')
    pretrained.add_mesh_argument(enc)
    parallel.add_distributed_arguments(enc)
    dec = jobs.add_parser('decode', help='a codes dataset -> a PNG grid of images')
    dec.add_argument('--workdir', required=True, help='the dVAE that wrote the codes')
    dec.add_argument('--codes', required=True, help='a codes dataset directory')
    dec.add_argument('--out', required=True, help='the PNG to write')
    dec.add_argument('--split', default='test')
    dec.add_argument('--num', type=int, default=16, help='how many images (first N)')
    dec.add_argument('--step', type=int, default=None, help='checkpoint (default: latest)')
    pretrained.add_mesh_argument(dec)
    args = parser.parse_args(argv)
    if args.job == 'encode' and args.batch_size < 1:
        raise ConfigError(f'--batch_size={args.batch_size} must be at least 1.')
    if args.job == 'encode' and args.chunk_size < 1:
        raise ConfigError(f'--chunk_size={args.chunk_size} must be at least 1.')
    if args.job == 'encode':
        parallel.initialize_from_args(args)
    return encode(args) if args.job == 'encode' else decode(args)


if __name__ == '__main__':
    cli.run(main)
