"""Helpers shared by the issue-3 test files (encodings, bias rewrite, search, arrays).

Independent of onnxrepair where a test checks onnxrepair: exact ONNX Runtime
runs, hand-built image sets and tiny models are written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import _NamedReader
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from onnxrepair.cli import main
from onnxrepair.data import ImageSet


def run_exact(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Run `model` with every graph optimisation off (exact QDQ arithmetic), also returning tensors `names`."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    present = {o.name for o in tapped.graph.output}
    for name in names:
        if name not in present:
            tapped.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(tapped.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(names, {session.get_inputs()[0].name: x})
    return {name: np.asarray(v).reshape(len(x), -1) for name, v in zip(names, values, strict=True)}


def top1(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Top-1 classes of `model` under default session options (what a user deploys)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
    return np.argmax(scores, axis=1)


def image_set(x: np.ndarray, y: np.ndarray | None, tag: str = "a") -> ImageSet:
    """An ImageSet from arrays, as load_array_file would build it."""
    classes = int(y.max()) + 1 if y is not None else 0
    return ImageSet(
        x=x.astype(np.float32),
        labels=None if y is None else y.astype(np.int64),
        class_names=tuple(str(i) for i in range(classes)),
        paths=tuple(f"{tag}[{i}]" for i in range(len(x))),
    )


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def quantize_matmul_add(
    root: Path, w: np.ndarray, b: np.ndarray, x: np.ndarray, activation_type: QuantType, stem: str
) -> tuple[Path, Path]:
    """A MatMul + Add layer (conftest.build_matmul_add) and its QDQ twin; ORT quantizes the Add's
    bias with the activation type (uint8 for QUInt8, int8 for QInt8)."""
    from conftest import build_matmul_add

    float_path, quant_path = root / f"{stem}.onnx", root / f"{stem}-qdq.onnx"
    onnx.save(build_matmul_add(w, b), float_path)
    quantize_static(
        str(float_path),
        str(quant_path),
        _NamedReader("x", x.astype(np.float32)),
        quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt8,
        activation_type=activation_type,
    )
    return float_path, quant_path


def gemm_head_without_bias(w: np.ndarray) -> onnx.ModelProto:
    """x [N, in] -> Gemm(x, W, transB=1) with no bias -> logits [N, out]: a torch Linear(bias=False) head."""
    n_out, n_in = w.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["logits"], name="/head/Gemm", transB=1)],
        "head_without_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass(frozen=True)
class CliRun:
    code: int
    report: dict
    out: str
    err: str


def run_fix(capsys: pytest.CaptureFixture[str], *args: object, report: Path | None = None) -> CliRun:
    """`onnxrepair fix ARGS [--report REPORT]`, capturing what it prints and reading the report."""
    argv = ["fix", *(str(a) for a in args)]
    if report is not None:
        argv += ["--report", str(report)]
    code = main(argv)
    captured = capsys.readouterr()
    data = json.loads(report.read_text()) if report is not None and report.exists() else {}
    return CliRun(code, data, captured.out, captured.err)


def one_line(err: str) -> bool:
    """True when stderr holds exactly one line, an error message, and no traceback."""
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
