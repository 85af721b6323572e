"""Issue 12, item 3: the Python API (onnxrepair.fix / quantize / inspect / evaluate), the CLI a thin layer over it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample

import onnxrepair
from onnxrepair.cli import main
from onnxrepair.errors import ModelLoadError, ModelPairingError, OnnxRepairError, OutputError


def test_the_api_is_exported() -> None:
    for name in ("fix", "quantize", "inspect", "evaluate", "RepairResult", "OnnxRepairError"):
        assert name in onnxrepair.__all__ and hasattr(onnxrepair, name)


@pytest.mark.parametrize("options", [["--encoding", "soft", "--neurons", "3"], ["--layers", "all"]])
def test_the_api_and_the_cli_write_the_same_model(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    out = tmp_path / "cli.onnx"
    args = [str(digits.float_path), str(digits.quant_path), str(digits.images), "--val", str(digits.validation)]
    code = main(["fix", *args, *options, "-o", str(out), "-q", "--report", str(tmp_path / "cli.json")])
    capsys.readouterr()
    keywords = {"encoding": "soft", "neurons": 3} if "--encoding" in options else {"layers": "all"}
    result = onnxrepair.fix(digits.float_path, digits.quant_path, digits.images, val=digits.validation, **keywords)
    assert isinstance(result, onnxrepair.RepairResult)
    if code == 1:  # the guard kept QUANT: both say so
        assert result.model is None
        return
    assert code == 0 and result.model is not None
    saved = result.save(tmp_path / "api.onnx")
    assert saved.read_bytes() == out.read_bytes()
    cli_report = json.loads((tmp_path / "cli.json").read_text())
    for key in ("repaired_agreement", "repaired_accuracy", "quant_agreement", "neurons", "encoding", "layer"):
        assert result.report[key] == cli_report[key]


def test_models_in_memory_and_images_as_arrays(digits: DigitsExample) -> None:
    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    x, y = digits.x[:300], digits.y[:300]
    result = onnxrepair.fix(
        float_model, quant_model, x, labels=y, val=digits.x[300:500], val_labels=digits.y[300:500], encoding="logit"
    )
    assert result.model is not None
    assert result.report["validation_size"] == 200 and result.report["repair_size"] == 300
    assert result.report["repaired_accuracy"] is not None  # the labels were used
    assert result.report["inputs"]["float_model"] == "FLOAT (in memory)"
    score = onnxrepair.evaluate(result.model, digits.x[300:500], against=float_model, labels=digits.y[300:500])
    assert score.size == 200
    assert score.accuracy == pytest.approx(result.report["repaired_accuracy"])
    assert score.agreement == pytest.approx(result.report["repaired_agreement"])
    assert float_model == onnx.load(str(digits.float_path))  # inputs are not changed


def test_inspect_and_quantize(digits: DigitsExample, tmp_path: Path) -> None:
    quantized = onnxrepair.quantize(digits.float_path, digits.images, weights="int4")
    assert quantized.holdout.agreement is not None and 0 < quantized.holdout.agreement <= 1
    path = tmp_path / "q.onnx"
    onnx.save(quantized.model, str(path))
    found = onnxrepair.inspect(digits.float_path, path, digits.images)
    assert [layer.name for layer in found.layers] == ["/fc1/Gemm", "/fc2/Gemm"]
    assert found.images > 0


def test_errors_are_onnxrepair_errors_not_exits(digits: DigitsExample, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        onnxrepair.fix(tmp_path / "missing.onnx", digits.quant_path, digits.images)
    with pytest.raises(ModelPairingError, match="no layer named 'nope'"):
        onnxrepair.fix(digits.float_path, digits.quant_path, digits.images, layers="nope")
    with pytest.raises(OnnxRepairError, match="model takes"):
        onnxrepair.fix(digits.float_path, digits.quant_path, np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(OnnxRepairError, match="one integer per image"):
        onnxrepair.evaluate(digits.quant_path, digits.x[:10], labels=np.zeros(3, np.int64))


def test_save_refuses_what_it_should(digits: DigitsExample, tmp_path: Path) -> None:
    result = onnxrepair.fix(digits.float_path, digits.quant_path, digits.images, encoding="soft", neurons=2)
    assert result.model is not None
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        result.save(taken)
    assert taken.read_bytes() == b"keep me"
    result.save(taken, force=True)
    assert onnx.load(str(taken)).graph.node
