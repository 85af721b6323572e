"""Ray as an executor: the solves and the inference batches of a run, on a Ray instance or cluster.

Ray is an optional extra (`pip install 'onnxrepair[ray]'`), imported only
when this executor is made. It keeps the contract of `parallel.Executor`:
results in the order of the items, the same batches as a local run, so the
written model is byte-identical to `--jobs 1`. What differs is where things
run: items travel in chunks as Ray tasks (retried when their worker dies),
models go once into the object store and every worker builds its own
session from them, and the driver keeps a bounded number of tasks in flight
so its memory is bounded by that number, not by the repair set.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.errors import MissingExtraError, OnnxRepairError, ResourceError, WorkerDiedError

Item = TypeVar("Item")
Result = TypeVar("Result")

INSTALL_HINT = "pip install 'onnxrepair[ray]'"
# a task whose worker process dies (killed, out of memory) runs again this many times before the run fails
DEFAULT_RETRIES = 3
# Sessions a worker process keeps: the model of the current layer and the other model read with it. The
# session is what makes a batch cheap (building one takes longer than running a batch through it).
_SESSIONS_PER_WORKER = 2


def require_ray() -> Any:
    """The ray module, or the install hint when it is missing."""
    try:
        import ray
    except ImportError as error:
        raise MissingExtraError(f"--executor ray needs Ray, which is not installed; run {INSTALL_HINT}") from error
    return ray


class RayExecutor:
    """An `Executor` on Ray: joins `address` ("auto", "ray://host:port"), or starts a local instance.

    A local instance gets `jobs` CPUs (default: the machine's) and is shut down by `close`; an instance
    that was already running (started by the caller, or a cluster joined by address) is left running.
    `jobs` is then the CPUs the cluster offers, which sizes the chunks.
    """

    def __init__(self, address: str | None = None, jobs: int | None = None, retries: int = DEFAULT_RETRIES) -> None:
        ray = require_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            # workers' own output stays in Ray's log folder: their errors reach the driver as exceptions
            options: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
                "log_to_driver": False,
            }
            if address is None:
                options["num_cpus"] = jobs
            else:
                options["address"] = address
            # many small BLAS solves per worker: one thread each is far faster than a shared pool
            options["runtime_env"] = {"env_vars": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}}
            # a local instance of our own is private to this run: Ray's note on its access token is noise here
            token_note = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = token_note.level
            if address is None:
                token_note.setLevel(logging.ERROR)
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ResourceError(f"cannot start or reach {where}: {first}") from error
            finally:
                token_note.setLevel(level)
            self._started = True
        self.jobs = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._in_flight = 2 * self.jobs  # enough to keep every CPU busy while results travel back
        self._run_chunk = ray.remote(num_cpus=1, max_retries=retries)(_run_chunk)
        self._run_one = ray.remote(num_cpus=1, max_retries=0)(_run_chunk)
        self._run_batch = ray.remote(num_cpus=1, max_retries=retries)(_run_batch)

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
        """`fn` over `items` in chunks (a few per CPU), in order.

        Raises:
            WorkerDiedError: an item's worker died on every try (the item is found by running the chunk's
                items once each); an OnnxRepairError raised by `fn` comes through as it is.
        """
        if not items:
            return iter(())
        size = max(1, math.ceil(len(items) / (4 * self.jobs)))
        chunks = [list(items[start : start + size]) for start in range(0, len(items), size)]
        fn_ref = self._ray.put(fn)
        results = self._ordered([lambda c=chunk: self._run_chunk.remote(fn_ref, c) for chunk in chunks])
        return self._flatten(results, chunks, fn_ref, size)

    def _flatten(
        self, results: Iterator[list[Result]], chunks: list[list[Item]], fn_ref: Any, size: int
    ) -> Iterator[Result]:
        for number, chunk in enumerate(chunks):
            try:
                values = next(results)
            except _Died:
                raise self._culprit(fn_ref, chunk, number * size) from None
            yield from values

    def _culprit(self, fn_ref: Any, chunk: list[Item], first: int) -> WorkerDiedError:
        """Which item of a chunk kills its worker: each runs once on its own, in order."""
        for offset, item in enumerate(chunk):
            try:
                self._get(self._run_one.remote(fn_ref, [item]))
            except _Died as died:
                return WorkerDiedError(f"a Ray worker died on every try ({died})", first + offset)
        return WorkerDiedError("a Ray worker died on every try of a chunk, though each of its items ran alone", first)

    def stream(
        self,
        model: onnx.ModelProto,
        role: str,
        feeds: Mapping[str, NDArray],
        outputs: Sequence[str],
        batch_size: int,
        providers: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, dict[str, NDArray]]]:
        """Batches as Ray tasks; the model is put into the object store once and every worker keeps a session."""
        from onnxrepair.runtime import batch_starts

        starts = list(batch_starts(feeds, batch_size))
        # in a list, so that Ray passes the reference and the worker fetches the model only when it has no session
        model_box = [self._ray.put(model.SerializeToString())]
        names, providers_list = list(outputs), list(providers) if providers else None

        def submit(start: int) -> Any:
            feed = {name: np.ascontiguousarray(value[start : start + batch_size]) for name, value in feeds.items()}
            return self._run_batch.remote(model_box, role, feed, names, providers_list)

        try:
            # Large outputs are read-only views of Ray's object store, not copies: every reader copies what it
            # keeps out of a batch (rows, kept tensors) and writes into none of them
            yield from zip(starts, self._ordered([lambda s=s: submit(s) for s in starts]), strict=True)
        except _Died as died:
            raise ResourceError(f"a Ray worker running the {role} model died on every try ({died})") from None

    def _ordered(self, submits: Sequence[Callable[[], Any]]) -> Iterator[Any]:
        """Submit tasks at most `_in_flight` ahead of the one being read, and read them in order."""
        pending: collections.deque[Any] = collections.deque()
        submitted = 0
        try:
            for _ in submits:
                while submitted < len(submits) and len(pending) < self._in_flight:
                    pending.append(submits[submitted]())
                    submitted += 1
                yield self._get(pending.popleft())
        finally:
            for ref in pending:  # the caller stopped early (an error): do not leave work running
                self._ray.cancel(ref, force=False)

    def _get(self, ref: Any) -> Any:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as error:  # the function raised: the user's error as it is
            cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
            if isinstance(cause, OnnxRepairError):
                raise cause from None
            raise
        except (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError, exceptions.NodeDiedError) as error:
            raise _Died(type(error).__name__) from error

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class _Died(Exception):
    """A task's worker process died on every try (Ray's WorkerCrashedError and kin)."""


def _run_chunk(fn: Callable[[Item], Result], chunk: list[Item]) -> list[Result]:
    return [fn(item) for item in chunk]


# worker side: the sessions of this worker process, by the object id of their model (oldest first)
_sessions: collections.OrderedDict[str, Any] = collections.OrderedDict()


def _run_batch(
    model_box: list[Any], role: str, feed: dict[str, NDArray], outputs: list[str], providers: list[str] | None
) -> dict[str, NDArray]:
    import ray

    from onnxrepair.runtime import make_session, run_feeds

    key = model_box[0].hex()
    if key not in _sessions:
        while len(_sessions) >= _SESSIONS_PER_WORKER:
            _sessions.popitem(last=False)
        model = onnx.load_from_string(ray.get(model_box[0]))
        _sessions[key] = make_session(model, role, providers, threads=1)
    return run_feeds(_sessions[key], role, feed, outputs)
