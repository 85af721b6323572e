"""`onnxrepair eval MODEL IMAGES [--against FLOAT]` (issue 5, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample
from helpers_issue3 import one_line, top1

from onnxrepair.cli import main
from onnxrepair.data import load_image_folder, preprocessing_for_input
from onnxrepair.graph import input_spec


def run_eval(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["eval", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_scores_match_an_independent_count(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "scores.json"
    against = ("--against", digits.float_path)
    code, out, err = run_eval(capsys, digits.quant_path, digits.images, *against, "--report", report)
    assert code == 0, err
    scores = json.loads(report.read_text())

    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    spec = input_spec(float_model)
    images = load_image_folder(digits.images, preprocessing_for_input(spec.name, spec.shape))
    x = np.asarray(images.x)  # a folder's rows are read from disk
    quant_top1 = top1(quant_model, x)
    assert scores["size"] == len(images)
    assert scores["accuracy"] == pytest.approx(np.mean(quant_top1 == images.labels))
    assert scores["agreement"] == pytest.approx(np.mean(quant_top1 == top1(float_model, x)))
    assert scores["agreement"] < 1.0  # the quantized digits model really disagrees somewhere
    assert f"{100 * scores['accuracy']:.2f} %" in out


def test_eval_without_labels_or_reference(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.npy"
    np.save(path, digits.x[:50].astype(np.float32))
    report = tmp_path / "scores.json"
    code, out, err = run_eval(capsys, digits.float_path, path, "--report", report)
    assert code == 0, err
    scores = json.loads(report.read_text())
    assert scores["size"] == 50 and scores["accuracy"] is None and scores["agreement"] is None
    assert "no labels" in out


def test_eval_bad_inputs_exit_2_with_one_line(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_eval(capsys, tmp_path / "missing.onnx", digits.images)
    assert code == 2 and one_line(err) and "missing.onnx" in err
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((3, 1, 4, 4), np.float32))
    code, _, err = run_eval(capsys, digits.quant_path, other)
    assert code == 2 and one_line(err) and "shape" in err
    report = tmp_path / "exists.json"
    report.write_text("{}")
    code, _, err = run_eval(capsys, digits.quant_path, digits.images, "--report", report)
    assert code == 2 and one_line(err) and report.read_text() == "{}"
