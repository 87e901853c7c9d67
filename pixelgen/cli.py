"""What every `python -m pixelgen.<job>` entry point shares: errors a user can act on. (Host
memory reuse is set by `import pixelgen`, before JAX starts: `pixelgen.cpu.allocator`.)"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pixelgen.checkpoint import (
    CheckpointMismatchError,
    CheckpointSaveError,
    CorruptCheckpointError,
    WorkdirError,
)
from pixelgen.config import ConfigError, UserError  # noqa: F401  (jobs raise cli.ConfigError)
from pixelgen.data.pipeline import DataError
from pixelgen.trainer import NonFiniteLossError

# Problems with the user's input: print the message (it says what to do), no traceback.
# UserError is the type for them (ConfigError and the converters' errors are UserErrors); the
# others here are the data and checkpoint errors that name a file and the fix.
USER_ERRORS = (UserError, DataError, CheckpointMismatchError, CorruptCheckpointError,
               CheckpointSaveError, WorkdirError, NonFiniteLossError, FileNotFoundError)


def run(main: Callable[[list[str]], int | None]) -> None:
    """Runs an entry point's `main(argv)`: a user error is one `error: ...` line and exit code
    2; Ctrl-C is exit code 130; anything else keeps its traceback."""
    try:
        code = main(sys.argv[1:])
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted; rerun the same command to resume from the last checkpoint.',
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
