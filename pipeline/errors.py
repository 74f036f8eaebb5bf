"""Errors a user can fix, and how a stage reports them: one line on stderr, exit code 1."""

from __future__ import annotations

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """An error the user can fix (a param, an input file); shown as one line, no traceback."""


class ParamsError(PipelineError, ValueError):
    """A params.yaml value that is missing, of the wrong type or out of range."""


class DataError(PipelineError):
    """An input file that is missing, corrupt or not what was expected."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError ends it with a clear message and exit code 1, Ctrl-C with 130."""
    try:
        main()
    except PipelineError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)  # the shell's code for SIGINT
