"""Tiny models built in fixtures: a scikit-learn digits MLP written as ONNX, and its QDQ twin.

    input [N,1,8,8] -> Flatten -> Gemm /fc1 (64->24) -> Relu -> Gemm /fc2 (24->10) -> logits

The QDQ twin comes from onnxruntime.quantization.quantize_static with 4-bit
per-tensor weights, harsh enough that some digits flip and there is something
to repair. Images are the 8x8 digits written as greyscale PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from PIL import Image


@dataclass(frozen=True)
class DigitsExample:
    float_path: Path
    quant_path: Path
    images: Path  # 8 per class... one folder per class
    validation: Path
    x: np.ndarray  # all images as model inputs [N,1,8,8]
    y: np.ndarray


def build_mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """The float model: weights in torch layout [out, in], Gemm with transB=1."""
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="/Flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["h"], name="/fc1/Gemm", transB=1),
        helper.make_node("Relu", ["h"], ["h_relu"], name="/relu/Relu"),
        helper.make_node("Gemm", ["h_relu", "fc2.weight", "fc2.bias"], ["logits"], name="/fc2/Gemm", transB=1),
    ]
    inits = [
        numpy_helper.from_array(w1.astype(np.float32), "fc1.weight"),
        numpy_helper.from_array(b1.astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(w2.astype(np.float32), "fc2.weight"),
        numpy_helper.from_array(b2.astype(np.float32), "fc2.bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self._batches = iter([{"input": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(float_path: Path, quant_path: Path, calibration: np.ndarray, **options: object) -> None:
    quantize_static(
        str(float_path),
        str(quant_path),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        **options,  # type: ignore[arg-type]
    )


def write_pngs(folder: Path, x: np.ndarray, y: np.ndarray, prefix: str = "") -> None:
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        target = folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.round(image.reshape(8, 8) * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(target / f"{prefix}{i:04d}.png")


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsExample:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    # The PNGs hold 8-bit pixels; train on the same quantised values the loader gives back.
    x = (np.round(data.data / 16.0 * 255) / 255).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, rest = order[:900], order[900:]
    mlp = MLPClassifier(hidden_layer_sizes=(24,), max_iter=400, random_state=0).fit(x[train], y[train])
    model = build_mlp(mlp.coefs_[0].T, mlp.intercepts_[0], mlp.coefs_[1].T, mlp.intercepts_[1])
    float_path, quant_path = root / "float.onnx", root / "quant.onnx"
    onnx.save(model, float_path)
    x_img = x.reshape(-1, 1, 8, 8)
    quantize(float_path, quant_path, x_img[train[:50]], weight_type=QuantType.QInt4, activation_type=QuantType.QUInt8)
    images, validation = root / "images", root / "val"
    write_pngs(images, x_img[rest[:600]], y[rest[:600]])
    write_pngs(validation, x_img[rest[600:]], y[rest[600:]])
    return DigitsExample(float_path, quant_path, images, validation, x_img, y)
