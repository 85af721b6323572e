"""--jobs: neurons solved in worker processes give exactly what one process gives (issue 4, item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample
from helpers_issue3 import image_set, run_fix

from onnxrepair import methods, runtime
from onnxrepair.activity import read_layer_activity
from onnxrepair.config import Encoding, Metric, SolveConfig
from onnxrepair.errors import DataError, ResourceError
from onnxrepair.graph import pair_layer
from onnxrepair.methods import Method, repair_layer
from onnxrepair.parallel import ProcessExecutor, SerialExecutor, available_cores
from onnxrepair.runtime import default_batch_size, select_providers


def square_after_pause(value: int) -> int:
    import time

    time.sleep(0.01 * (value % 3))  # finish out of order
    return value * value


def test_process_executor_keeps_the_item_order() -> None:
    items = list(range(23))
    with ProcessExecutor(2) as executor:
        assert list(executor.map(square_after_pause, items)) == [v * v for v in items]
        assert list(executor.map(square_after_pause, [5])) == [25]  # one item: no pool needed
    assert list(SerialExecutor().map(square_after_pause, items)) == [v * v for v in items]


def exit_on_two(value: int) -> int:
    if value == 2:
        os._exit(3)  # what the kernel's OOM killer does to a worker, as far as the pool can tell
    return value


def test_a_dead_worker_is_one_clear_error() -> None:
    with ProcessExecutor(2) as executor:
        with pytest.raises(ResourceError, match="--jobs 1"):
            list(executor.map(exit_on_two, list(range(8))))
        assert list(executor.map(square_after_pause, [1, 2, 3])) == [1, 4, 9]  # a fresh pool afterwards


def test_available_cores_is_positive() -> None:
    assert 1 <= available_cores()


@pytest.mark.parametrize("encoding", [Encoding.SOFT, Encoding.INTEGER])
def test_parallel_solves_equal_serial_solves(
    digits: DigitsExample, monkeypatch: pytest.MonkeyPatch, encoding: Encoding
) -> None:
    monkeypatch.setattr(methods, "_FAN_OUT_MIN_INPUTS", 0)  # these small problems would stay serial otherwise
    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    images = image_set(digits.x[:200], digits.y[:200])
    pair = pair_layer(float_model, quant_model, "/fc1/Gemm")
    activity = read_layer_activity(float_model, quant_model, pair, images.x, 256)
    method = Method(encoding, Metric.EUCLID, 8)
    config = SolveConfig(time_limit=60.0)
    serial_model, serial = repair_layer(quant_model, pair, activity, method, config, executor=SerialExecutor())
    with ProcessExecutor(2) as executor:
        parallel_model, parallel = repair_layer(quant_model, pair, activity, method, config, executor=executor)
        assert executor._pool is not None  # it really fanned out
    assert parallel.selected == serial.selected
    for mine, theirs in zip(parallel.solutions, serial.solutions, strict=True):
        assert mine.neuron == theirs.neuron and mine.status is theirs.status
        assert mine.objective == theirs.objective
        np.testing.assert_array_equal(mine.weight_delta, theirs.weight_delta)
        assert mine.bias_delta == theirs.bias_delta
    assert parallel_model.SerializeToString() == serial_model.SerializeToString()


def test_cli_jobs_and_report_timing_keys(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    reports = {}
    for jobs in ("1", "2"):
        output = tmp_path / f"jobs{jobs}.onnx"
        args = [digits.float_path, digits.quant_path, digits.images, "-o", output, "--layer", "/fc1/Gemm"]
        run = run_fix(capsys, *args, "--neurons", "6", "--jobs", jobs, "-q", report=tmp_path / f"jobs{jobs}.json")
        assert run.code == 0, run.err
        reports[jobs] = run.report
    one, two = reports["1"], reports["2"]
    assert one["neurons"] == two["neurons"] and one["repaired_agreement"] == two["repaired_agreement"]
    assert (tmp_path / "jobs1.onnx").read_bytes() == (tmp_path / "jobs2.onnx").read_bytes()
    seconds = [n["solve_seconds"] for n in one["layers"][0]["per_neuron"]]
    assert one["solve_seconds_median"] == pytest.approx(float(np.median(seconds)))
    assert one["solve_seconds_max"] == pytest.approx(max(seconds))
    assert one["solve_seconds_median"] <= one["solve_seconds_p90"] <= one["solve_seconds_max"]
    assert one["inference_seconds"] > 0
    assert one["peak_memory_mb"] > 10  # this test process alone holds onnxruntime and numpy
    json.dumps(one)  # plain JSON


@pytest.mark.parametrize("bad", [["--jobs", "0"], ["--jobs", "x"]])
def test_cli_jobs_is_checked(digits: DigitsExample, bad: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        run_fix(capsys, digits.float_path, digits.quant_path, digits.images, *bad)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((None, 1, 28, 28), 256), ((None, 3, 224, 224), 55), ((None, 224, 224, 3), 55), ((None, 3, 4096, 4096), 1)],
)
def test_default_batch_size_bounds_the_input_per_batch(shape: tuple[int | None, ...], expected: int) -> None:
    assert default_batch_size(shape) == expected
    values = int(np.prod([d for d in shape[1:] if d]))
    assert expected == 1 or expected * 4 * values <= 32 * 2**20


# ---------------------------------------------------------------------------
# --provider: the selection logic, without a GPU
# ---------------------------------------------------------------------------

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.mark.parametrize(
    ("choice", "available", "expected"),
    [
        ("auto", [CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(choice: str, available: list[str], expected: list[str]) -> None:
    assert select_providers(choice, available) == expected


def test_cuda_without_a_cuda_build_is_one_clear_error() -> None:
    with pytest.raises(DataError, match="onnxruntime-gpu"):
        select_providers("cuda", [CPU])


def test_cli_provider_reaches_every_session(
    digits: DigitsExample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ONNX Runtime session of a run gets the chosen providers (CUDA faked as available)."""
    real_session = runtime.ort.InferenceSession
    asked: list[list[str]] = []

    def spy(model: bytes, sess_options=None, providers=None):  # type: ignore[no-untyped-def]
        asked.append(list(providers))
        return real_session(model, sess_options=sess_options, providers=[CPU])  # this machine has no GPU

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    for choice, expected in (("cpu", [CPU]), ("auto", [CUDA, CPU])):
        asked.clear()
        args = [digits.float_path, digits.quant_path, digits.images, "-o", tmp_path / f"{choice}.onnx", "-q"]
        report = tmp_path / f"{choice}.json"
        run = run_fix(capsys, *args, "--provider", choice, "--search", "--budget", "5", report=report)
        assert run.code in (0, 1), run.err
        assert run.report["providers"] == expected
        assert len(asked) >= 6 and all(p == expected for p in asked), asked


def test_cli_provider_cuda_without_gpu_exits_2(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    if CUDA in runtime.ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    output = tmp_path / "out.onnx"
    run = run_fix(capsys, digits.float_path, digits.quant_path, digits.images, "-o", output, "--provider", "cuda")
    assert run.code == 2
    assert "onnxruntime-gpu" in run.err and "Traceback" not in run.err
    assert not output.exists()


WORKERS_OF_A_KILLED_RUN = """
import sys, time
from onnxrepair.parallel import ProcessExecutor
executor = ProcessExecutor(2)
results = executor.map(time.sleep, [60.0, 60.0, 60.0, 60.0])
time.sleep(3.0)  # the workers have started and are asleep in their first item
print(" ".join(str(pid) for pid in executor._pool._processes), flush=True)
time.sleep(60.0)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper that a container may not have)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc (Linux)")
def test_workers_end_when_their_run_is_killed() -> None:
    """A run killed outright (SIGKILL: a timeout, the OOM killer) cannot shut its pool down; its two workers
    went on solving for over half an hour after the bench killed a `fix --encoding reconstruct-lp` run."""
    import signal
    import subprocess
    import sys
    import time

    run = subprocess.Popen([sys.executable, "-c", WORKERS_OF_A_KILLED_RUN], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        workers = [int(pid) for pid in run.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 10.0
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:  # never leave them behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left
