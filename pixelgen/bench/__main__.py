"""python -m pixelgen.bench: see pixelgen/bench/__init__.py."""

from pixelgen import cli
from pixelgen.bench import main

if __name__ == '__main__':
    cli.run(main)
