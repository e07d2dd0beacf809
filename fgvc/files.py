"""Files that are either whole or absent: written to a temporary file in the same folder (a rename across
filesystems would be a copy), fsynced, renamed over the target, and the folder fsynced. A run killed at any moment
leaves the previous version or the new one, never a truncated file that a later read would take for a short one."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from fgvc.errors import FGVCError


class WriteError(FGVCError, OSError):
    """A file that could not be written; the message names it (and says when the disk is full)."""


def write_atomically(path: str | os.PathLike, data: bytes | bytearray | memoryview | str) -> None:
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteError(f"could not write {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise WriteError(f"disk full while writing {path}") from error
        raise WriteError(f"could not write {path}: {error.strerror or error}") from error
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
