"""Errors a user can fix, and how a stage reports them: one line on stderr, and the usual exit codes."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from pipeline.common.credentials import redact


class PipelineError(Exception):
    """An error the user can fix (a param, an input file); shown as one line, no traceback."""


class ParamsError(PipelineError, ValueError):
    """A params.yaml value that is missing, of the wrong type or out of range."""


class DataError(PipelineError):
    """An input file that is missing, corrupt or not what was expected."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a batch scheduler, a container stop): ends the stage as Ctrl-C does.

    A KeyboardInterrupt, so that every handler of Ctrl-C (the MLflow run marked KILLED, the
    checkpoint kept) handles it too.
    """


_held: list[int] | None = None  # inside `shielded()`: the signals that arrived meanwhile


def _terminate(signum: int, frame: FrameType | None) -> None:
    if _held is not None:
        _held.append(signum)
        return
    raise Terminated


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _held is not None:
        _held.append(signum)
        return
    raise KeyboardInterrupt


@contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGTERM and Ctrl-C while the block runs, and raise them when it ends.

    For writes to the tracking store: raised inside SQLAlchemy and sqlite3, the exception left the
    interrupted transaction holding SQLite's lock, so ending the run KILLED then waited for the lock,
    failed with "database is locked" and a traceback, and left the run RUNNING.
    """
    global _held
    if _held is not None:  # nested: the outer block raises
        yield
        return
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
        if held:
            raise Terminated if signal.SIGTERM in held else KeyboardInterrupt


def _redacting(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """A log record factory whose records hold no URI credentials (see pipeline.common.credentials)."""

    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = record.getMessage()
        if (redacted := redact(message)) != message:
            record.msg, record.args = redacted, None
        return record

    make.redacts = True  # type: ignore[attr-defined]
    return make


def one_line(text: str) -> str:
    """`text` on one line: a value from a file may hold newlines or control characters."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.strip())


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError ends it with one line and exit code 1, Ctrl-C with
    130 and SIGTERM with 143 (the shell's codes), after the stage's own cleanup. No line it logs
    or prints holds a URI's user or password."""
    if main.__module__ == "__main__":  # the stage's own process: its imports are done (pipeline/__init__.py)
        gc.enable()
        gc.freeze()
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C: the same, but shieldable
        signal.signal(signal.SIGINT, _interrupt)
    if not getattr(logging.getLogRecordFactory(), "redacts", False):
        logging.setLogRecordFactory(_redacting(logging.getLogRecordFactory()))
    try:
        main()
        if main.__module__ == "__main__":  # the stage's own process (`python -m pipeline.<stage>`)
            # Everything is written and closed: skip the interpreter's teardown of torch, MLflow
            # and SQLAlchemy, which took 0.7 s of every stage's wall time (bench/experiment_cost.py).
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except PipelineError as e:
        sys.exit(f"error: {one_line(redact(str(e)))}")
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        # A stage adds what it kept as a note (train: its checkpoint); the default says what it did not write.
        kept = "; ".join(getattr(e, "__notes__", [])) or "outputs of this stage were not written"
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: {kept}", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
