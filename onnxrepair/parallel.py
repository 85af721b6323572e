"""Fan-out of independent solves, behind one small interface: map a pure function over items.

Neuron problems share nothing while they are solved, so they can run in
separate processes. Everything that fans out goes through `Executor.map`, so
another engine (a Ray or Dask pool on a cluster) can be plugged in by writing
one class, without touching the solver code. Results come back in the order
of the items, so a parallel run returns exactly what a serial one does.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Protocol, TypeVar

from onnxrepair.errors import ResourceError

Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    """Maps a picklable function over items, yielding results in item order."""

    jobs: int

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]: ...


class SerialExecutor:
    """Everything in this process, one item after another."""

    jobs = 1

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
        return map(fn, items)


class ProcessExecutor:
    """A pool of `jobs` worker processes, started on first use and kept until `close`.

    Workers are spawned, not forked: the parent holds ONNX Runtime and solver
    threads, which a fork would copy in an undefined state. Items travel in a
    few chunks per worker, so data shared by all items (the layer inputs) is
    pickled once per chunk, not once per item.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
        if len(items) < 2:
            return map(fn, items)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        chunk = max(1, math.ceil(len(items) / (4 * self.jobs)))
        return self._results(self._pool.map(fn, items, chunksize=chunk))

    def _results(self, results: Iterator[Result]) -> Iterator[Result]:
        try:
            yield from results
        except BrokenProcessPool as exc:  # a worker was killed, most often for memory
            self._pool = None  # a broken pool cannot run anything more
            raise ResourceError(
                f"a solver worker process died (out of memory?); run again with fewer than {self.jobs} jobs, "
                "e.g. --jobs 1"
            ) from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
