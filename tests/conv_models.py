"""A small CNN over the 8x8 digits, built with onnx.helper (no torch), and its quantized twins.

    input [N,1,8,8]
      -> /c1/Conv   1->8, 3x3, pads 1                      -> Relu
      -> /dw/Conv   8->8, 3x3, group 8 (depthwise), stride 2, auto_pad SAME_UPPER -> Relu
      -> /g2/Conv   8->12, 3x3, group 2, dilation 2, pads 2 -> Relu
      -> /res/Add   (+ /sk/Conv 8->12, 1x1, stride 1 over the depthwise output: a residual)
      -> Flatten -> /fc/Gemm 192->10 -> logits

The convolutions have seeded random weights; the classifier is a ridge
regression on their features, so the model is a fair digit classifier (about
95 % on held-out digits) and quantizing it makes some digits flip.
Every geometry `fix` must handle is here: padding, a stride, auto_pad, a
depthwise and a grouped convolution, a dilation, and a residual Add.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

CONV_LAYERS = ["/c1/Conv", "/dw/Conv", "/g2/Conv", "/sk/Conv", "/fc/Gemm"]


def conv_features_model(rng: np.random.Generator) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32), name)

    def bias(name: str, n: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(size=n) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="/c1/Conv", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="/r1/Relu"),
        helper.make_node(
            "Conv", ["r1", "dw.w", "dw.b"], ["dw"], name="/dw/Conv", group=8, strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("Relu", ["dw"], ["r2"], name="/r2/Relu"),
        helper.make_node(
            "Conv", ["r2", "g2.w", "g2.b"], ["g2"], name="/g2/Conv", group=2, dilations=[2, 2], pads=[2] * 4
        ),
        helper.make_node("Relu", ["g2"], ["r3"], name="/r3/Relu"),
        helper.make_node("Conv", ["r2", "sk.w", "sk.b"], ["sk"], name="/sk/Conv"),
        helper.make_node("Add", ["r3", "sk"], ["res"], name="/res/Add"),
        helper.make_node("Flatten", ["res"], ["features"], name="/flat/Flatten"),
    ]
    inits = [
        weight("c1.w", (8, 1, 3, 3)),
        bias("c1.b", 8),
        weight("dw.w", (8, 1, 3, 3)),
        bias("dw.b", 8),
        weight("g2.w", (12, 4, 3, 3)),
        bias("g2.b", 12),
        weight("sk.w", (12, 8, 1, 1)),
        bias("sk.b", 12),
    ]
    return nodes, inits


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], output: str, width: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_cnn(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0) -> onnx.ModelProto:
    """The float CNN: random convolutions, a ridge-regression classifier on their features."""
    nodes, inits = conv_features_model(np.random.default_rng(seed))
    features_model = _model(nodes, inits, "features", 192)
    session = ort.InferenceSession(features_model.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(None, {"input": x_train})[0].astype(np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    design = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    onehot = np.eye(10)[y_train]
    coef = np.linalg.solve(design.T @ design + 10.0 * np.eye(design.shape[1]), design.T @ onehot)
    # fold the standardisation into the Gemm: logits = features @ W^T + b
    w = (coef[:-1] / std[:, None]).T
    b = coef[-1] - (mean / std) @ coef[:-1]
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="/fc/Gemm", transB=1))
    inits += [
        numpy_helper.from_array(w.astype(np.float32), "fc.w"),
        numpy_helper.from_array(b.astype(np.float32), "fc.b"),
    ]
    return _model(nodes, inits, "logits", 10)


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self._batches = iter([{"input": x[i : i + 8]} for i in range(0, len(x), 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


FLAVOURS = {
    "qdq_s8_tensor": {"weight_type": QuantType.QInt8, "per_channel": False},
    "qdq_s4_channel": {"weight_type": QuantType.QInt4, "per_channel": True},
    "qdq_u8_tensor_asym": {"weight_type": QuantType.QUInt8, "per_channel": False},
    "qop_s8_channel": {"weight_type": QuantType.QInt8, "per_channel": True, "quant_format": QuantFormat.QOperator},
}


def quantize_cnn(float_path: Path, quant_path: Path, calibration: np.ndarray, flavour: str) -> None:
    """QUANT in one of FLAVOURS (QDQ or QOperator from quantize_static), or "dynamic" (quantize_dynamic)."""
    if flavour == "dynamic":
        quantize_dynamic(str(float_path), str(quant_path), weight_type=QuantType.QInt8)
        return
    options = {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QUInt8, **FLAVOURS[flavour]}
    quantize_static(str(float_path), str(quant_path), _Reader(calibration), **options)  # type: ignore[arg-type]
