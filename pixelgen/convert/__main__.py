"""python -m pixelgen.convert --from FORMAT --src DIR --workdir OUT

Imports released weights into a pixelgen workdir; `pixelgen.load(OUT)`, the eval job and
fine-tuning then use it like any trained run. Formats (--from):
"""

from __future__ import annotations

import argparse

from pixelgen import cli, storage


def main(argv: list[str]) -> int:
    from pixelgen import convert

    formats = convert.converters()
    doc = __doc__ + ''.join(f'  {name:16s} {mod.DESCRIPTION}\n'
                            for name, mod in sorted(formats.items()))
    parser = argparse.ArgumentParser(prog='python -m pixelgen.convert', description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--from', dest='source', required=True, choices=sorted(formats))
    parser.add_argument('--src', required=True,
                        help='the released files (a folder, local or gs://...)')
    parser.add_argument('--workdir', required=True,
                        help='the new pixelgen workdir (a local path or gs://...)')
    args = parser.parse_args(argv)
    convert.refuse_used_workdir(args.workdir)
    # The readers of released formats (safetensors, TF bundles, torch) read local files.
    src = storage.local_folder(args.src, 'convert', what='--src')
    summary = convert.get(args.source).convert(src, args.workdir)
    print(f'[convert] {summary}')
    return 0


if __name__ == '__main__':
    cli.run(main)
