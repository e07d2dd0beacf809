"""Progress bars for people, plain lines for logs: a tqdm bar only where stderr is a terminal."""

from __future__ import annotations

import io
import os
import sys
from typing import TextIO

from tqdm import tqdm


def progress_bar(total: int, description: str, *, unit: str = "it", stream: TextIO | None = None,
                 initial: int = 0) -> tqdm | None:
    """A tqdm bar on `stream` (default: stderr, looked up now) when it is a terminal, else None: redirected
    output (CI, log files, nohup) gets the caller's own progress lines instead of carriage-return noise. A terminal
    that reports no width (a pseudo-terminal nobody sized) counts as none: tqdm would draw an empty bar there."""
    stream = stream or sys.stderr
    if not stream.isatty() or _columns(stream) == 0:
        return None
    return tqdm(total=total, desc=description, unit=unit, file=stream, initial=initial, dynamic_ncols=True)


def _columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor, or not a terminal after all
        return None
