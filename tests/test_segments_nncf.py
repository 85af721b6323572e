"""Whole-network repair reads NNCF's models from kept tensors, not from the model input at every layer.

Two things in NNCF's EfficientNet-Lite0 made `Segments.plan` give up, so every layer was read from
the model input (3-9x the inference): the bounds of every Clip are the outputs of one shared Constant
node, which crossed every cut, and the input of a depthwise convolution is quantized per channel.
The model here has both, built by hand in that form (NNCF itself is not needed).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import check_kept_rows, run_model
from onnx import TensorProto, helper, numpy_helper

from onnxrepair.config import ALL_NEURONS, Encoding, RepairConfig, SolveConfig
from onnxrepair.data import ImageSet
from onnxrepair.graph import find_layers, pair_layer
from onnxrepair.repair import repair
from onnxrepair.segments import Segments

CHANNELS = 4


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w1": rng.normal(0, 0.5, (CHANNELS, 1, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, CHANNELS).astype(np.float32),
        "w2": rng.normal(0, 0.5, (CHANNELS, 1, 3, 3)).astype(np.float32),  # depthwise
        "b2": rng.normal(0, 0.1, CHANNELS).astype(np.float32),
        "w3": rng.normal(0, 0.3, (10, CHANNELS * 4 * 4)).astype(np.float32),
        "b3": rng.normal(0, 0.1, 10).astype(np.float32),
    }


def _graph(weights: dict[str, np.ndarray], quantized: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """Conv -> Clip -> depthwise Conv -> Clip -> Flatten -> Gemm; with `quantized`, in NNCF's QDQ form:
    int8 per-channel weights, float biases, the Clip bounds from shared Constant nodes, the depthwise
    input quantized per channel."""
    nodes, inits = [], []
    constants = [
        helper.make_node("Constant", [], ["clip_low"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Constant", [], ["clip_high"], value=numpy_helper.from_array(np.array(6, np.float32))),
    ]
    nodes.extend(constants)

    def activation(tensor: str, scale: np.ndarray, zero: np.ndarray, axis: int = 1) -> str:
        if quantized is None:
            return tensor
        inits.append(numpy_helper.from_array(scale, f"{tensor}_scale"))
        inits.append(numpy_helper.from_array(zero, f"{tensor}_zero"))
        args = [f"{tensor}_scale", f"{tensor}_zero"]
        nodes.append(helper.make_node("QuantizeLinear", [tensor, *args], [f"{tensor}_q"], axis=axis))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", *args], [f"{tensor}_dq"], axis=axis))
        return f"{tensor}_dq"

    def weight(name: str) -> str:
        if quantized is None:
            inits.append(numpy_helper.from_array(weights[name], name))
            return name
        inits.append(numpy_helper.from_array(quantized[name], f"{name}_q"))
        inits.append(numpy_helper.from_array(quantized[f"{name}_scale"], f"{name}_scale"))
        inits.append(numpy_helper.from_array(np.zeros(len(quantized[f"{name}_scale"]), np.int8), f"{name}_zero"))
        axis = 0 if weights[name].ndim == 4 else -2
        args = [f"{name}_q", f"{name}_scale", f"{name}_zero"]
        nodes.append(helper.make_node("DequantizeLinear", args, [f"{name}_dq"], axis=axis))
        return f"{name}_dq"

    for name in ("b1", "b2", "b3"):
        inits.append(numpy_helper.from_array(weights[name], name))
    x = activation("x", np.array(1 / 255, np.float32), np.array(0, np.uint8))
    nodes.append(helper.make_node("Conv", [x, weight("w1"), "b1"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Clip", ["c1", "clip_low", "clip_high"], ["r1"], name="/r1/Clip"))
    per_channel = np.linspace(3.0, 6.0, CHANNELS).astype(np.float32) / 255  # one scale per channel
    r1 = activation("r1", per_channel, np.zeros(CHANNELS, np.uint8))
    conv2 = helper.make_node(
        "Conv", [r1, weight("w2"), "b2"], ["c2"], name="/dw/Conv", pads=[1, 1, 1, 1], strides=[2, 2], group=CHANNELS
    )
    nodes.append(conv2)
    nodes.append(helper.make_node("Clip", ["c2", "clip_low", "clip_high"], ["r2"], name="/r2/Clip"))
    r2 = activation("r2", np.array(6 / 255, np.float32), np.array(0, np.uint8))
    nodes.append(helper.make_node("Flatten", [r2], ["flat"], name="/flat/Flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", weight("w3"), "b3"], ["logits"], name="/fc/Gemm", transB=1))
    graph = helper.make_graph(
        nodes,
        "nncf_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def _quantize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Symmetric per-channel 4-bit steps in int8 storage: coarse enough that there is something to repair."""
    out = {}
    for name in ("w1", "w2", "w3"):
        w = weights[name]
        flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale = (np.maximum(flat, 1e-6) / 7).astype(np.float32)
        view = scale.reshape((-1,) + (1,) * (w.ndim - 1))
        out[name] = np.clip(np.round(w / view), -7, 7).astype(np.int8)
        out[f"{name}_scale"] = scale
    return out


@pytest.fixture(scope="module")
def nncf_like() -> tuple[onnx.ModelProto, onnx.ModelProto, ImageSet, ImageSet]:
    rng = np.random.default_rng(0)
    weights = _weights(rng)
    float_model, quant = _graph(weights, None), _graph(weights, _quantize(weights))
    x = rng.uniform(0, 1, (240, 1, 8, 8)).astype(np.float32)
    labels = np.argmax(run_model(float_model, x)[0], axis=1)
    names = tuple(map(str, range(10)))

    def images(rows: slice) -> ImageSet:
        return ImageSet(x=x[rows], labels=labels[rows], class_names=names, paths=tuple(map(str, range(240)))[rows])

    return float_model, quant, images(slice(0, 160)), images(slice(160, 240))


def test_a_plan_is_made_and_its_rows_are_the_model_inputs(nncf_like) -> None:  # type: ignore[no-untyped-def]
    float_model, quant, repair_set, _ = nncf_like
    pairs = [pair_layer(float_model, quant, layer.name) for layer in find_layers(float_model)]
    x = repair_set.x[:30]
    plan = Segments.plan(quant, [pair.quant_layer for pair in pairs], len(x))
    assert plan is not None  # before: None (the Clip bounds crossed the cuts; a per-channel DequantizeLinear)
    assert not {"clip_low", "clip_high"} & {name for cut in plan.cuts for name in plan.crossing(quant, cut)}
    assert np.ndim(plan.inputs[1].scale) == 1  # the depthwise input, dequantized per channel
    check_kept_rows(float_model, quant, pairs, x, 1e-4)


def test_whole_network_repair_is_the_same_read_either_way(nncf_like, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import onnxrepair.repair as repair_module

    float_model, quant, repair_set, val_set = nncf_like
    config = RepairConfig(layers=("all",), neurons=ALL_NEURONS, solve=SolveConfig(encoding=Encoding.RECONSTRUCT))
    planned = []
    real_plan = repair_module.Segments.plan.__func__  # type: ignore[attr-defined]

    def recording(cls, *args):  # type: ignore[no-untyped-def]
        plan = real_plan(cls, *args)
        planned.append(plan is not None)
        return plan

    monkeypatch.setattr(repair_module.Segments, "plan", classmethod(recording))
    fast = repair(float_model, quant, repair_set, val_set, config)
    assert planned == [True]
    monkeypatch.setattr(repair_module.Segments, "plan", classmethod(lambda cls, *args: None))
    plain = repair(float_model, quant, repair_set, val_set, config)
    assert [s.kept for s in fast.guard] == [s.kept for s in plain.guard]
    assert any(s.kept for s in fast.guard)
    assert fast.evaluation.repaired_agreement == pytest.approx(plain.evaluation.repaired_agreement, abs=0.03)
