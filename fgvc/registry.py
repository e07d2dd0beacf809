"""One tiny registry type: components are registered under explicit names and built by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from fgvc.errors import FGVCError


class UnknownName(FGVCError, KeyError):
    """A name nothing was registered under; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class Registry:
    """Maps explicit names to builders (classes or functions); duplicates and unknown names are errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._builders[name]!r})")
            self._builders[name] = builder
            return builder

        return add

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            close = difflib.get_close_matches(name, self._builders, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownName(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.list())})")
        return self._builders[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def list(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
