"""`onnxrepair quantize FLOAT CALIB_IMAGES -o QUANT` (issue 5, item 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample, check_full
from helpers_issue3 import one_line, top1

from onnxrepair.cli import main
from onnxrepair.data import load_image_folder, preprocessing_for_input, stratified_split
from onnxrepair.graph import input_spec, pair_layer


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["quantize", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return code, " ".join(captured.out.split()), captured.err


@pytest.mark.parametrize(
    ("options", "weight_types"), [([], {"INT8"}), (["--per-channel", "--weights", "int4"], {"INT4"})]
)
def test_quantize_writes_a_repairable_qdq_model_and_measures_it(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], weight_types: set
) -> None:
    output = tmp_path / "quant.onnx"
    code, out, err = run(capsys, digits.float_path, digits.images, "-o", output, *options, "--calibration-size", "64")
    assert code == 0, err
    model = onnx.load(str(output))
    check_full(model)
    ops = [n.op_type for n in model.graph.node]
    assert "DequantizeLinear" in ops and "Relu" in ops  # QDQ, and the Relu kept
    pair = pair_layer(onnx.load(str(digits.float_path)), model, "/fc1/Gemm")
    quantized = pair.quant_layer.weight.quantized  # type: ignore[union-attr]
    weight = next(i for i in model.graph.initializer if i.name == quantized)
    assert onnx.TensorProto.DataType.Name(weight.data_type) in weight_types

    # the agreement printed is the one on the held-out images, recomputed here
    float_model = onnx.load(str(digits.float_path))
    spec = input_spec(float_model)
    images = load_image_folder(digits.images, preprocessing_for_input(spec.name, spec.shape))
    _, holdout = stratified_split(images.strata, 0.2, 0)
    x = images.x[holdout]
    agreement = np.mean(top1(model, x) == top1(float_model, x))
    assert f"on {len(holdout)} held-out images it agrees with FLOAT on {100 * agreement:.2f} %" in out
    assert "64 calibration images" in out


def test_quantize_bad_inputs(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep")
    code, _, err = run(capsys, digits.float_path, digits.images, "-o", existing)
    assert code == 2 and one_line(err) and existing.read_bytes() == b"keep"
    code, _, err = run(capsys, tmp_path / "missing.onnx", digits.images, "-o", tmp_path / "q.onnx")
    assert code == 2 and one_line(err) and "missing.onnx" in err
    code, _, err = run(capsys, digits.float_path, tmp_path / "no_images", "-o", tmp_path / "q.onnx")
    assert code == 2 and one_line(err) and not (tmp_path / "q.onnx").exists()


def test_same_seed_same_bytes_other_seed_other_split(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, out, _ = run(capsys, digits.float_path, digits.images, "-o", tmp_path / f"{name}.onnx", "--seed", seed)
        assert code == 0
        outputs[name] = ((tmp_path / f"{name}.onnx").read_bytes(), out.split("calibration images);")[1])
    assert outputs["a"] == outputs["b"]  # the model and the printed agreement
    assert outputs["a"][0] != outputs["c"][0]  # another seed calibrates on other images
