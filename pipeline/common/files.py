"""Atomic, durable output files: written under a temporary name, flushed to the disk, renamed into
place when complete, and the rename itself flushed: after a crash or a power loss the final name
holds the old file or the whole new one, never an empty or partial one.

A full disk or a folder that cannot be written is a PipelineError naming the file, and leaves
nothing behind: the previous file of that name, if any, is untouched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.common.errors import PipelineError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextmanager
def explained(path: Path) -> Iterator[None]:
    """Turn a full disk or an unwritable place, while writing `path`, into a one-line PipelineError."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            raise PipelineError(f"no space left on the device to write {path}; nothing of it was written") from e
        if e.errno in NOT_WRITABLE:
            raise PipelineError(f"cannot write {path}: {e.strerror}") from e
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    with explained(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file keeps the final name, inside a private folder: torch.save writes the
        # file's name into its zip archive, so a random temporary name made every .pt file differ.
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp = folder / path.name
    try:
        with explained(path):
            yield tmp
            os.chmod(tmp, 0o644)  # whatever the umask; outputs are ordinary files
            fsync(tmp)  # the data on the disk before the name points at it
            os.replace(tmp, path)
            fsync(path.parent)  # and the rename itself
    finally:
        tmp.unlink(missing_ok=True)
        folder.rmdir()


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    """torch.save `obj` to `path` atomically. Serialized in memory first: on a full disk torch.save
    fails with an unexplained RuntimeError ("unexpected pos"), a plain write with ENOSPC."""
    import torch  # only the stages that save tensors pay for its import

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def check_writable(*folders: Path) -> None:
    """Fail now, naming the folder, if files cannot be created in each of `folders`: before hours of
    work, not after. Root ignores permission bits, so this tries for real, in the folder or, if it
    does not exist yet, in the nearest folder above it, and leaves nothing behind."""
    for folder in folders:
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        with explained(folder):
            tempfile.TemporaryFile(dir=existing).close()
