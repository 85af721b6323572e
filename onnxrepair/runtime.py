"""ONNX Runtime sessions and batched inference.

Sessions are built from in-memory models (tapped copies never touch the disk).
The CUDA execution provider is used when the installed onnxruntime offers it
(onnxruntime-gpu on a machine with a GPU), the CPU provider otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from onnxrepair.errors import DataError, UnsupportedModelError
from onnxrepair.graph import with_outputs
from onnxrepair.parallel import Executor, available_cores


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    return select_providers("auto")


def select_providers(choice: str, available: Sequence[str] | None = None) -> list[str]:
    """The execution providers for `--provider` auto, cpu or cuda, given what onnxruntime offers.

    `available` defaults to what the installed onnxruntime reports.

    Raises:
        DataError: cuda asked for where this onnxruntime has no CUDA provider.
    """
    cuda = "CUDAExecutionProvider"
    available = ort.get_available_providers() if available is None else available
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda" and cuda not in available:
        raise DataError(
            "--provider cuda: this onnxruntime has no CUDAExecutionProvider (it offers "
            f"{', '.join(available) or 'none'}); install onnxruntime-gpu on a machine with an NVIDIA GPU, "
            "or use --provider cpu"
        )
    if choice not in ("auto", "cuda"):
        raise DataError(f"--provider must be auto, cpu or cuda, got {choice!r}")
    return [cuda, "CPUExecutionProvider"] if cuda in available else ["CPUExecutionProvider"]


def make_session(
    model: onnx.ModelProto, role: str, providers: Sequence[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An inference session with default options: what a user deploys.

    The class scores (`output_name`) are always among its outputs. `threads`: ONNX Runtime's intra-op
    threads (default: the cores this process may use; a worker that shares the machine with others asks
    for fewer).

    Raises:
        UnsupportedModelError: ONNX Runtime refuses the model.
    """
    try:
        scores: str | None = output_name(model)
    except UnsupportedModelError:
        scores = None  # reported where the scores are asked for
    if scores is not None and scores not in {o.name for o in model.graph.output}:  # a ZipMap's input
        model = with_outputs(model, [scores])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings are not the user's business here
    # the cores this process may use (ORT counts the machine's, which oversubscribes a container or taskset)
    options.intra_op_num_threads = threads or available_cores()
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=list(providers or default_providers())
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"ONNX Runtime cannot load the {role} model: {message}") from exc


def stream_batched(
    session: ort.InferenceSession, x: NDArray[np.float32], output_names: Sequence[str], batch_size: int
) -> Iterator[tuple[int, dict[str, NDArray[np.float32]]]]:
    """Run `x` through the session in batches; yield (first index, the named outputs as ONNX Runtime gives them).

    Raises:
        UnsupportedModelError: ONNX Runtime fails on the data (e.g. a shape mismatch).
    """
    yield from _stream_session(session, "", {session.get_inputs()[0].name: x}, output_names, batch_size)


def stream_feeds(
    model: onnx.ModelProto,
    role: str,
    feeds: Mapping[str, NDArray],
    outputs: Sequence[str],
    batch_size: int,
    providers: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, NDArray]]]:
    """Run `model` over `feeds` (one array per graph input, one row per example) in batches, here.

    Yields (first row, the named outputs of those rows). The executors' `stream` runs the same batches
    elsewhere (parallel.py); every engine cuts the same batches, so every engine gives the same values.

    Raises:
        UnsupportedModelError: ONNX Runtime refuses the model or fails on the data.
    """
    session = make_session(model, role, providers)
    yield from _stream_session(session, role, feeds, outputs, batch_size)


def stream_on(
    executor: Executor | None,
    model: onnx.ModelProto,
    role: str,
    feeds: Mapping[str, NDArray],
    outputs: Sequence[str],
    batch_size: int,
    providers: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, NDArray]]]:
    """`stream_feeds` through `executor` (here when None): where the repair's inference runs."""
    if executor is None:
        return stream_feeds(model, role, feeds, outputs, batch_size, providers)
    return executor.stream(model, role, feeds, outputs, batch_size, providers)


def run_feeds(
    session: ort.InferenceSession, role: str, feed: Mapping[str, NDArray], outputs: Sequence[str]
) -> dict[str, NDArray]:
    """One batch through an open session: the named outputs as arrays."""
    if not outputs:
        return {}
    try:
        results = session.run(list(outputs), {name: np.ascontiguousarray(value) for name, value in feed.items()})
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeError types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        model = f"the {role} model" if role else "the model"
        raise UnsupportedModelError(f"ONNX Runtime failed to run {model}: {message}") from exc
    return {name: np.asarray(value) for name, value in zip(outputs, results, strict=True)}


def batch_starts(feeds: Mapping[str, NDArray], batch_size: int) -> range:
    """The first row of every batch: the cut every engine makes."""
    return range(0, len(next(iter(feeds.values()))), batch_size)


def _stream_session(
    session: ort.InferenceSession, role: str, feeds: Mapping[str, NDArray], outputs: Sequence[str], batch_size: int
) -> Iterator[tuple[int, dict[str, NDArray]]]:
    for start in batch_starts(feeds, batch_size):
        feed = {name: value[start : start + batch_size] for name, value in feeds.items()}
        yield start, run_feeds(session, role, feed, outputs)


def run_batched(
    session: ort.InferenceSession,
    x: NDArray[np.float32],
    output_names: Sequence[str],
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> dict[str, NDArray[np.float32]]:
    """Run `x` through the session in batches and concatenate each named output, one row per input."""
    parts: dict[str, list[NDArray[np.float32]]] = {name: [] for name in output_names}
    for start, values in stream_batched(session, x, output_names, batch_size):
        n = min(batch_size, len(x) - start)
        for name, value in values.items():
            parts[name].append(value.reshape(n, -1))
        if advance is not None:
            advance(n)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def default_batch_size(input_shape: Sequence[int | None], budget_bytes: int = 32 * 2**20) -> int:
    """Inputs per inference run: up to 256, fewer for large inputs.

    ONNX Runtime's intermediate tensors grow with the batch, many times the
    input itself on a convolutional network: a batch of 256 ImageNet crops
    (154 MB of input) took 3.8 GB on EfficientNet-Lite0. Capping each batch at
    `budget_bytes` of float32 input bounds the memory by the batch, not the set.
    """
    values = 1
    for dim in input_shape[1:]:
        values *= dim if dim else 1
    return int(max(1, min(256, budget_bytes // (4 * values))))


def output_name(model: onnx.ModelProto) -> str:
    """The tensor that holds the class scores: the first float output.

    Classifiers from skl2onnx list an int64 `label` output before the float
    `probabilities`; torch exports have the logits first. A skl2onnx model
    converted with its ZipMap gives the probabilities as a sequence of maps:
    then the scores are the ZipMap's input, which is not a graph output
    (`make_session` adds it as one).

    Raises:
        UnsupportedModelError: the model has no float output.
    """
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    for output in model.graph.output:
        if output.type.tensor_type.elem_type in floats:
            return output.name
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "ZipMap" and node.output[0] in outputs:
            return node.input[0]
    names = [o.name for o in model.graph.output]
    raise UnsupportedModelError(f"the model has no float output holding class scores (outputs: {names})")
