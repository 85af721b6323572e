"""Fan-out of independent work, behind one small interface: solves and inference batches.

Neuron problems share nothing while they are solved, so they can run in
separate processes. Everything that fans out goes through `Executor.map`
(solves) and `Executor.stream` (a model over batches of inputs), so another
engine plugs in by writing one class, without touching the solver code:
`ray_executor.RayExecutor` is one. Results come back in the order of the
items and every engine cuts the same batches, so a parallel run returns
exactly what a serial one does.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

from onnxrepair.errors import ResourceError

if TYPE_CHECKING:
    import onnx
    from numpy.typing import NDArray

Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    """Maps a picklable function over items, and runs models over batches; results in order."""

    jobs: int

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]: ...

    def stream(
        self,
        model: onnx.ModelProto,
        role: str,
        feeds: Mapping[str, NDArray],
        outputs: Sequence[str],
        batch_size: int,
        providers: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, dict[str, NDArray]]]:
        """`runtime.stream_feeds`, wherever this executor runs things: (first row, outputs) per batch, in order."""
        ...


class SerialExecutor:
    """Everything in this process, one item after another."""

    jobs = 1

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
        return map(fn, items)

    def stream(
        self,
        model: onnx.ModelProto,
        role: str,
        feeds: Mapping[str, NDArray],
        outputs: Sequence[str],
        batch_size: int,
        providers: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, dict[str, NDArray]]]:
        from onnxrepair.runtime import stream_feeds  # runtime imports this module

        return stream_feeds(model, role, feeds, outputs, batch_size, providers)


class ProcessExecutor(SerialExecutor):
    """A pool of `jobs` worker processes for solves, started on first use and kept until `close`.

    Workers are spawned, not forked: the parent holds ONNX Runtime and solver
    threads, which a fork would copy in an undefined state. Items travel in a
    few chunks per worker, so data shared by all items (the layer inputs) is
    pickled once per chunk, not once per item. Models run here (`stream`):
    ONNX Runtime already uses every core of this machine.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
        if len(items) < 2:
            return map(fn, items)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_end_with_parent,
                initargs=(os.getpid(),),
            )
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


def _end_with_parent(parent: int) -> None:
    """Worker initializer: a worker ends when the process that started it does.

    A run killed outright (SIGKILL: a timeout, the OOM killer) cannot shut its pool down, and its
    workers went on with their chunks of solves (two of them, for over half an hour, after a bench
    killed a `fix --encoding reconstruct-lp` run). Linux sends a worker SIGKILL when its parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere nothing is set.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no C library to call: as before
        return
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def make_executor(kind: str = "local", jobs: int = 1, address: str | None = None) -> Executor:
    """The executor of a run: `local` (this process, or a pool of `jobs` processes) or `ray`.

    `ray` joins `address` or starts a local instance with `jobs` CPUs (ray_executor.RayExecutor).
    Close it with `close_executor`.

    Raises:
        MissingExtraError: ray asked for and not installed.
        ResourceError: the Ray cluster cannot be reached.
    """
    if kind == "ray":
        from onnxrepair.ray_executor import RayExecutor  # Ray is an optional extra

        return RayExecutor(address, jobs if address is None else None)
    if kind != "local":
        raise ValueError(f"executor must be 'local' or 'ray', got {kind!r}")
    return ProcessExecutor(jobs) if jobs > 1 else SerialExecutor()


def close_executor(executor: Executor) -> None:
    """Stop what `make_executor` started (worker processes, a local Ray instance)."""
    close = getattr(executor, "close", None)
    if close is not None:
        close()


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
