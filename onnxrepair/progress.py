"""How long-running stages report progress without knowing who draws it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Progress(Protocol):
    """Where long-running steps report progress: `task` yields an `advance(n)` callable."""

    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


class NoProgress:
    """A Progress that shows nothing (library use, tests, --quiet)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None
