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
from hypothesis import settings
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


# ---------------------------------------------------------------------------
# Shared helpers and further models for the per-module tests.
# ---------------------------------------------------------------------------

# Property tests draw the same examples on every run (no hidden randomness, no .hypothesis/ database).
settings.register_profile("onnxrepair", derandomize=True, database=None, deadline=None)
settings.load_profile("onnxrepair")


def check_full(model: onnx.ModelProto) -> None:
    """Every model a test produces must pass the full ONNX check (shape inference included)."""
    onnx.checker.check_model(model, full_check=True)


def run_model(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run `model` on `x` in a plain CPU ONNX Runtime session (independent of onnxrepair.runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, {session.get_inputs()[0].name: x})


def check_kept_rows(
    float_model: onnx.ModelProto, quant: onnx.ModelProto, pairs: list, x: np.ndarray, pre_tolerance: float
) -> None:
    """Segments: each layer's rows read from the tensors kept at its cut are the rows read from the model
    input (QUANT's pre-activation within `pre_tolerance` of its largest value), and the segments chained to
    the end give QUANT's own output."""
    import functools

    from onnxrepair.activity import kept_activity, read_layer_activity
    from onnxrepair.graph import layer_parameters
    from onnxrepair.segments import Segments

    plan = Segments.plan(quant, [pair.quant_layer for pair in pairs], len(x))
    assert plan is not None
    kept = plan.start(quant, x, 8, None)
    for position, pair in enumerate(pairs):
        layer = pair.quant_layer
        direct = read_layer_activity(float_model, quant, pair, x, 8, positions_per_image=3, seed=1, scores=False)
        w, b = layer_parameters(quant, layer)
        read = functools.partial(plan.inputs[position].read, kept)
        from_kept = kept_activity(layer, read, len(x), direct.float_pre, w, b, 8, positions_per_image=3, seed=1)
        np.testing.assert_allclose(from_kept.quant_inputs, direct.quant_inputs, atol=1e-6)
        largest = np.max(np.abs(direct.quant_pre))
        assert np.max(np.abs(from_kept.quant_pre - direct.quant_pre)) <= pre_tolerance * largest
        if position + 1 < len(plan.cuts):
            kept, _ = plan.advance(quant, kept, plan.cuts[position], plan.cuts[position + 1], 8, None)
    final, _ = plan.advance(quant, kept, plan.cuts[-1], None, 8, None)
    output = quant.graph.output[0].name
    np.testing.assert_allclose(final[output], run_model(quant, x)[0], rtol=1e-5, atol=1e-5)


def tap(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names` (written here, not with onnxrepair.graph)."""
    import copy

    tapped = copy.deepcopy(model)
    for name in names:
        tapped.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return tapped


def build_matmul_add(w: np.ndarray, b: np.ndarray, name: str = "dense") -> onnx.ModelProto:
    """A one-layer dense model written the skl2onnx way, W stored [in, out]:

    x [N,in] -> MatMul(x, W[in,out]) -> mm -> Add(mm, b[out]) -> y [N,out]
    """
    n_in, n_out = w.shape
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name=f"{name}/MatMul"),
        helper.make_node("Add", ["mm", "b"], ["y"], name=f"{name}/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    check_full(model)
    return model


class _NamedReader(CalibrationDataReader):
    """Calibration batches of one image each, for a model whose input is called `name`."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self._batches = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@dataclass(frozen=True)
class QuantVariant:
    """A float model and one QDQ twin of it, with what the twin is supposed to be."""

    float_path: Path
    quant_path: Path
    dtype_name: str  # "int4" or "int8"
    per_channel: bool
    calibration: np.ndarray  # inputs the models take


@pytest.fixture(scope="session")
def quant_variants(digits: DigitsExample, tmp_path_factory: pytest.TempPathFactory) -> dict[str, QuantVariant]:
    """The digits MLP as int4 per-tensor (the fixture's), int8 per-tensor and int8 per-channel QDQ,
    and a MatMul+Add layer as int8 per-channel QDQ (channel axis 1)."""
    root = tmp_path_factory.mktemp("variants")
    calibration = digits.x[:50]
    variants = {"digits-int4": QuantVariant(digits.float_path, digits.quant_path, "int4", False, digits.x)}
    for key, per_channel in (("digits-int8", False), ("digits-int8-per-channel", True)):
        path = root / f"{key}.onnx"
        quantize(
            digits.float_path,
            path,
            calibration,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            per_channel=per_channel,
        )
        variants[key] = QuantVariant(digits.float_path, path, "int8", per_channel, digits.x)
    rng = np.random.default_rng(0)
    mm_float = root / "matmul.onnx"
    onnx.save(build_matmul_add(rng.normal(size=(6, 4)), rng.normal(size=4)), mm_float)
    mm_x = rng.normal(size=(40, 6)).astype(np.float32)
    mm_quant = root / "matmul-int8-per-channel.onnx"
    quantize_static(
        str(mm_float),
        str(mm_quant),
        _NamedReader("x", mm_x[:20]),
        quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    variants["matmul-int8-per-channel"] = QuantVariant(mm_float, mm_quant, "int8", True, mm_x)
    return variants


@pytest.fixture
def float_model(digits: DigitsExample) -> onnx.ModelProto:
    """A fresh copy of the digits float model (tests may modify it)."""
    return onnx.load(str(digits.float_path))


@pytest.fixture
def quant_model(digits: DigitsExample) -> onnx.ModelProto:
    """A fresh copy of the digits 4-bit QDQ model (tests may modify it)."""
    return onnx.load(str(digits.quant_path))


def fix_first_hidden_layer(digits: DigitsExample, **options: object) -> bytes:
    """The first hidden layer on every digit (1,797 x 64 rows, enough for the solves to fan out), as model bytes."""
    import onnxrepair

    result = onnxrepair.fix(
        digits.float_path,
        digits.quant_path,
        digits.x,
        labels=digits.y,
        val=digits.x[:300],
        val_labels=digits.y[:300],
        layers="/fc1/Gemm",
        encoding="soft",
        neurons=8,
        **options,
    )
    assert result.model is not None
    return result.model.SerializeToString()


class SlowClock:
    """Stands in for a module's `time`: every perf_counter() reading is 20 s after the last, so a time limit
    is spent after a set number of readings, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 20.0
        return self.now
