"""Issue 13: --executor ray gives the model --jobs 1 and --jobs N give, survives a dying worker, and names
the channel whose worker keeps dying. On a local Ray instance (2 CPUs) started and stopped here."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import ray
from conftest import DigitsExample, fix_first_hidden_layer, run_model

import onnxrepair
from onnxrepair.cli import main
from onnxrepair.config import SolveConfig
from onnxrepair.errors import MissingExtraError, WorkerDiedError
from onnxrepair.methods import _map_solves
from onnxrepair.progress import NoProgress
from onnxrepair.ray_executor import RayExecutor
from onnxrepair.runtime import stream_feeds


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_writes_the_model_jobs_1_and_jobs_2_write(
    local_ray: None, digits: DigitsExample, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = fix_first_hidden_layer(digits, jobs=1)
    mapped, streamed = [], []
    monkeypatch.setattr(RayExecutor, "map", _spy(RayExecutor.map, mapped))
    monkeypatch.setattr(RayExecutor, "stream", _spy(RayExecutor.stream, streamed))
    assert fix_first_hidden_layer(digits, executor="ray") == serial
    assert mapped and streamed  # the solves and the inference really went through Ray
    assert fix_first_hidden_layer(digits, jobs=2) == serial


def _spy(method: object, calls: list[int]) -> object:
    def spied(self: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return method(self, *args, **kwargs)  # type: ignore[operator]

    return spied


def test_whole_network_repair_on_ray_is_byte_identical(
    local_ray: None, digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(digits.float_path), str(digits.quant_path), str(digits.images), "--val", str(digits.validation)]
    outputs = {}
    for name, extra in (("serial", ["--jobs", "1"]), ("ray", ["--executor", "ray"])):
        outputs[name] = tmp_path / f"{name}.onnx"
        code = main(["fix", *args, "--layers", "all", "-q", "--force", "-o", str(outputs[name]), *extra])
        assert code in (0, 1)
    capsys.readouterr()
    if outputs["serial"].exists():
        assert outputs["ray"].read_bytes() == outputs["serial"].read_bytes()
    else:  # the guard kept QUANT in both
        assert not outputs["ray"].exists()


def test_stream_gives_the_batches_a_local_run_gives(local_ray: None, digits: DigitsExample) -> None:
    model = onnx.load(str(digits.quant_path))
    feeds = {"input": digits.x[:70]}
    local = list(stream_feeds(model, "QUANT", feeds, ["logits"], 16))
    remote = list(RayExecutor().stream(model, "QUANT", feeds, ["logits"], 16))
    assert [start for start, _ in remote] == [0, 16, 32, 48, 64]
    for (_, here), (_, there) in zip(local, remote, strict=True):
        assert np.array_equal(here["logits"], there["logits"])
    np.testing.assert_array_equal(np.concatenate([v["logits"] for _, v in remote]), run_model(model, digits.x[:70])[0])


def test_map_keeps_the_order_of_the_items(local_ray: None) -> None:
    executor = RayExecutor()
    assert list(executor.map(lambda k: k * k, list(range(37)))) == [k * k for k in range(37)]
    assert list(executor.map(lambda k: k, [])) == []


def test_a_worker_that_dies_once_is_retried(local_ray: None, tmp_path: Path) -> None:
    marker = str(tmp_path / "died")

    def dies_once(k: int) -> int:
        if k == 3 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process, not an exception: what the OOM killer does
        return k * k

    assert list(RayExecutor(retries=2).map(dies_once, list(range(8)))) == [k * k for k in range(8)]
    assert os.path.exists(marker)


def test_a_worker_that_keeps_dying_is_named(local_ray: None) -> None:
    def always_dies_on_5(k: int) -> int:
        if k == 5:
            os._exit(1)
        return k

    with pytest.raises(WorkerDiedError) as caught:
        list(RayExecutor(retries=1).map(always_dies_on_5, list(range(8))))
    assert caught.value.index == 5


def test_the_solves_name_the_layer_and_channel_whose_worker_died() -> None:
    class Problem:
        def __init__(self, neuron: int) -> None:
            self.neuron = neuron
            self.inputs = np.zeros((1000, 1000))

    class Dying:
        jobs = 2

        def map(self, fn: object, items: list[Problem]) -> Iterator[object]:
            raise WorkerDiedError("a Ray worker died on every try (WorkerCrashedError)", 2)
            yield

    problems = [Problem(j) for j in (7, 11, 13, 17, 19)]
    with pytest.raises(WorkerDiedError, match=r"channel 13 of layer '/conv1/Conv'"):
        _map_solves(problems, SolveConfig(), NoProgress(), None, Dying(), "/conv1/Conv")


def test_executor_ray_without_ray_is_one_sentence(
    digits: DigitsExample, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    args = [str(digits.float_path), str(digits.quant_path), str(digits.images), "-o", str(tmp_path / "r.onnx")]
    assert main(["fix", *args, "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'onnxrepair[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "r.onnx").exists()
    with pytest.raises(MissingExtraError):
        onnxrepair.fix(digits.float_path, digits.quant_path, digits.images, executor="ray")


def test_a_ray_address_needs_the_ray_executor(
    digits: DigitsExample, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [str(digits.float_path), str(digits.quant_path), str(digits.images), "-o", str(tmp_path / "r.onnx")]
    assert main(["fix", *args, "--ray-address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err
