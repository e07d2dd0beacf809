"""One error path: every mistake a user can make is an FGVCError, and every CLI prints it as one line.

A bad key, a missing folder, a corrupt file, weights that cannot be fetched offline: each raises a subclass of
FGVCError whose message names what is wrong and where. The CLIs wrap their `main` in `command`, which prints
`error: <message>` on stderr and exits 2 -- no traceback. A traceback from a CLI therefore means a bug in fgvc.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar


class FGVCError(Exception):
    """A user's mistake or a problem with their files or environment; the message says what and where."""


class OptionError(FGVCError, ValueError):
    """A library object got an option value it cannot use.

    `option` is the keyword argument's name, which is also the last part of its config key, so the build layer can
    name the full key (`qualified(lambda o: "model." + o)` -> "model.head_dim: ..."). Other options the problem
    refers to are written in backticks (`pretrained_file`) and are named the same way."""

    def __init__(self, option: str, problem: str) -> None:
        self.option, self.problem = option, problem
        super().__init__(self.qualified(str))

    def qualified(self, key: Callable[[str], str], flags: dict[str, str] | None = None) -> str:
        """The message with every option named by its `key`, and that key's command-line flag where it has one."""
        def name(option: str) -> str:
            full = key(option)
            return f"{full} ({flags[full]})" if flags and full in flags else full

        return f"{name(self.option)}: " + re.sub(r"`(\w+)`", lambda match: name(match.group(1)), self.problem)


class OutputExists(FGVCError, FileExistsError):
    """A folder fgvc would create is already there; nothing is overwritten."""


Main = TypeVar("Main", bound=Callable[..., int])


def command(main: Main) -> Main:
    """Wrap a CLI's main(argv) -> exit status: an FGVCError becomes one `error: ...` line on stderr and status 2,
    and so does a file the user named that cannot be written or read (a missing folder, no permission, a full
    disk): an OSError with a file name."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except FGVCError as error:
            message = str(error)
        except OSError as error:
            if error.filename is None:
                raise
            message = f"{error.filename}: {error.strerror or error}"
        print(f"error: {message}", file=sys.stderr)
        return 2

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def quiet_weights_only_load() -> Iterator[None]:
    """torch.load(weights_only=True) of a bare pickle warns about its protocol before refusing it; the refusal is
    the user's one line (load_failure), the warning only noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def load_failure(error: BaseException) -> str:
    """Why a weights file could not be read, in one line. torch's refusal to unpickle anything but tensors is said
    as such: its own text suggests weights_only=False, which would run whatever code the file carries."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "it holds objects other than tensors, which fgvc never unpickles (that could run code)"
    return text.splitlines()[0][:300] if text.strip() else type(error).__name__
