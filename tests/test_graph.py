"""graph.py: loading, dense-layer discovery, pairing float and QDQ layers, and tapping outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample, QuantVariant, build_matmul_add, check_full, run_model
from onnx import TensorProto, helper, numpy_helper

from onnxrepair.errors import ModelLoadError, ModelPairingError, UnsupportedModelError
from onnxrepair.graph import (
    FloatTensor,
    QuantizedTensor,
    check_models_match,
    describe_parameter,
    find_layers,
    initializers,
    input_spec,
    layer_parameters,
    load_model,
    pair_layer,
    with_outputs,
)


def test_find_dense_layers_in_float_model(float_model: onnx.ModelProto) -> None:
    layers = find_layers(float_model)
    assert [layer.name for layer in layers] == ["/fc1/Gemm", "/fc2/Gemm"]
    fc1, fc2 = layers
    assert (fc1.op, fc1.n_in, fc1.n_out) == ("Gemm", 64, 24)
    assert (fc2.op, fc2.n_in, fc2.n_out) == ("Gemm", 24, 10)
    assert (fc1.input_tensor, fc1.output_tensor) == ("flat", "h")
    assert (fc2.input_tensor, fc2.output_tensor) == ("h_relu", "logits")
    assert fc1.weight == FloatTensor("fc1.weight") and fc1.bias == FloatTensor("fc1.bias")
    assert not fc1.weight_transposed and not fc1.quantized


def test_find_dense_layers_in_quant_model(quant_model: onnx.ModelProto) -> None:
    layers = find_layers(quant_model)
    assert [layer.name for layer in layers] == ["/fc1/Gemm", "/fc2/Gemm"]
    assert [(layer.n_in, layer.n_out) for layer in layers] == [(64, 24), (24, 10)]
    for layer in layers:
        assert layer.quantized
        assert isinstance(layer.weight, QuantizedTensor) and isinstance(layer.bias, QuantizedTensor)
        inits = initializers(quant_model)
        assert layer.weight.quantized in inits and layer.weight.scale in inits
        assert inits[layer.weight.quantized].data_type == TensorProto.INT4
    assert describe_parameter(quant_model, layers[0].weight) == "int4 per-tensor"


def test_dense_parameters_of_quant_model_dequantize(quant_model: onnx.ModelProto) -> None:
    fc1 = find_layers(quant_model)[0]
    w, b = layer_parameters(quant_model, fc1)
    inits = {k: numpy_helper.to_array(v) for k, v in initializers(quant_model).items()}
    q = inits["fc1.weight_quantized"].astype(np.float64)
    expected_w = (q - inits["fc1.weight_zero_point"].astype(np.float64)) * float(inits["fc1.weight_scale"])
    np.testing.assert_allclose(w, expected_w, rtol=1e-12)
    bias_scale = float(inits["fc1.bias_quantized_scale"].reshape(-1)[0])
    np.testing.assert_allclose(b, inits["fc1.bias_quantized"].astype(np.float64) * bias_scale, rtol=1e-12)
    assert w.shape == (24, 64) and b.shape == (24,)


def test_dense_parameters_close_to_float(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    for f_layer, q_layer in zip(find_layers(float_model), find_layers(quant_model), strict=True):
        wf, bf = layer_parameters(float_model, f_layer)
        wq, _ = layer_parameters(quant_model, q_layer)
        step = np.max(np.abs(wf)) / 7  # 4-bit symmetric: at most half a step away, and the step is max|w|/7
        assert np.max(np.abs(wf - wq)) <= step / 2 + 1e-6
        np.testing.assert_array_equal(bf, numpy_helper.to_array(initializers(float_model)[f_layer.bias.initializer]))


def test_per_channel_axis(quant_variants: dict[str, QuantVariant]) -> None:
    model = onnx.load(str(quant_variants["digits-int8-per-channel"].quant_path))
    fc1 = find_layers(model)[0]
    assert fc1.weight.axis == 0
    assert describe_parameter(model, fc1.weight) == "int8 per-channel (axis 0)"
    w, _ = layer_parameters(model, fc1)
    inits = {k: numpy_helper.to_array(v).astype(np.float64) for k, v in initializers(model).items()}
    zero, scale = inits["fc1.weight_zero_point"][:, None], inits["fc1.weight_scale"][:, None]  # one per neuron
    expected = (inits["fc1.weight_quantized"] - zero) * scale
    np.testing.assert_allclose(w, expected, rtol=1e-12)


def matmul_add_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3)).astype(np.float32)  # [in, out]
    b = rng.normal(size=3).astype(np.float32)
    return build_matmul_add(w, b), w, b


def test_matmul_add_is_a_dense_layer() -> None:
    model, w, b = matmul_add_model()
    (layer,) = find_layers(model)
    assert layer.name == "dense/MatMul" and layer.op == "MatMul+Add"
    assert (layer.n_in, layer.n_out) == (5, 3)
    assert layer.weight_transposed
    assert (layer.input_tensor, layer.output_tensor) == ("x", "y")
    w_out_in, bias = layer_parameters(model, layer)
    assert w_out_in.shape == (3, 5)
    np.testing.assert_array_equal(w_out_in, w.T)
    np.testing.assert_array_equal(bias, b)
    # The layer as graph.py describes it computes what ONNX Runtime computes.
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    (y,) = run_model(model, x)
    np.testing.assert_allclose(x @ w_out_in.T + bias, y, rtol=1e-5, atol=1e-5)


def test_matmul_add_with_bias_first() -> None:
    model, _, b = matmul_add_model()
    add = model.graph.node[1]
    add.input[:] = ["b", "mm"]  # Add(b, MatMul(...)) is the same layer
    check_full(model)
    (layer,) = find_layers(model)
    np.testing.assert_array_equal(layer_parameters(model, layer)[1], b)


def test_matmul_without_add_is_a_layer_without_bias() -> None:
    model, _, _ = matmul_add_model()
    del model.graph.node[1]
    model.graph.output[0].name = "mm"
    check_full(model)
    (layer,) = find_layers(model)
    assert (layer.op, layer.output_tensor, layer.bias) == ("MatMul", "mm", None)
    w, b = layer_parameters(model, layer)
    assert w.shape == (layer.n_out, layer.n_in) and not b.any()


def test_matmul_add_quantized(quant_variants: dict[str, QuantVariant]) -> None:
    variant = quant_variants["matmul-int8-per-channel"]
    model = onnx.load(str(variant.quant_path))
    (layer,) = find_layers(model)
    assert layer.op == "MatMul+Add" and layer.quantized and layer.weight.axis == 1
    assert (layer.n_in, layer.n_out) == (6, 4)
    w, b = layer_parameters(model, layer)
    float_model = onnx.load(str(variant.float_path))
    wf, bf = layer_parameters(float_model, find_layers(float_model)[0])
    assert w.shape == wf.shape == (4, 6)
    # per output channel the int8 step is max|w_j| / 127: within half a step
    assert np.all(np.abs(w - wf) <= np.max(np.abs(wf), axis=1, keepdims=True) / 127 / 2 + 1e-6)
    np.testing.assert_allclose(b, bf, atol=np.max(np.abs(bf)) / 64)


def test_gemm_with_alpha_is_left_out(float_model: onnx.ModelProto) -> None:
    float_model.graph.node[1].attribute.append(helper.make_attribute("alpha", 2.0))
    assert [layer.name for layer in find_layers(float_model)] == ["/fc2/Gemm"]


def test_gemm_transb0_stores_in_out(float_model: onnx.ModelProto) -> None:
    # Rewrite fc2 as transB=0 with the weight stored [in, out]: the same layer, read transposed.
    inits = initializers(float_model)
    w = numpy_helper.to_array(inits["fc2.weight"])
    inits["fc2.weight"].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc2.weight"))
    node = float_model.graph.node[3]
    del node.attribute[:]
    check_full(float_model)
    fc2 = find_layers(float_model)[1]
    assert fc2.weight_transposed and (fc2.n_in, fc2.n_out) == (24, 10)
    np.testing.assert_array_equal(layer_parameters(float_model, fc2)[0], w)


def test_pair_layer_by_name_and_default(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    default = pair_layer(float_model, quant_model, None)
    assert default.float_layer.name == default.quant_layer.name == "/fc2/Gemm"
    assert default.paired_by == "name"
    first = pair_layer(float_model, quant_model, "/fc1/Gemm")
    assert first.float_layer.name == first.quant_layer.name == "/fc1/Gemm"
    assert first.float_layer.output_tensor == "h" and first.quant_layer.output_tensor == "h_relu"
    assert not first.float_layer.quantized and first.quant_layer.quantized


def test_pair_layer_falls_back_to_position(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    for node in quant_model.graph.node:
        if node.op_type == "Gemm":
            node.name = "renamed" + node.name
    for name, expected in (("/fc1/Gemm", "renamed/fc1/Gemm"), (None, "renamed/fc2/Gemm")):
        pair = pair_layer(float_model, quant_model, name)
        assert pair.paired_by == "position"
        assert pair.quant_layer.name == expected


def test_pair_layer_position_fallback_checks_shapes(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    # Renamed and in a different order: position would pair fc2 (24->10) with fc1 (64->24).
    gemms = [n for n in quant_model.graph.node if n.op_type == "Gemm"]
    for node in gemms:
        node.name = "renamed" + node.name
    nodes = list(quant_model.graph.node)
    i, j = nodes.index(gemms[0]), nodes.index(gemms[1])
    reordered = nodes[:i] + nodes[i + 1 : j + 1] + [gemms[0]] + nodes[j + 1 :]
    del quant_model.graph.node[:]
    quant_model.graph.node.extend(reordered)  # not topologically sorted any more, but readable
    with pytest.raises(ModelPairingError, match="64->24|24->10"):
        pair_layer(float_model, quant_model, "/fc2/Gemm")


def test_pair_layer_unknown_name(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    with pytest.raises(ModelPairingError, match="no_such_layer") as info:
        pair_layer(float_model, quant_model, "no_such_layer")
    assert "/fc1/Gemm" in str(info.value) and "/fc2/Gemm" in str(info.value)


def test_pair_layer_quant_layer_not_quantized(float_model: onnx.ModelProto) -> None:
    # The float model as its own "quantized" twin: paired by name, but there is nothing to rewrite.
    with pytest.raises(UnsupportedModelError, match="not quantized"):
        pair_layer(float_model, onnx.load_from_string(float_model.SerializeToString()), None)


def test_pair_layer_no_dense_layers() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "no_dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    check_full(model)
    with pytest.raises(UnsupportedModelError, match="no repairable layer"):
        pair_layer(model, model, None)


def test_with_outputs_adds_and_does_not_duplicate(quant_model: onnx.ModelProto) -> None:
    before = quant_model.SerializeToString()
    tapped = with_outputs(quant_model, ["h_relu", "logits", "h_relu", "input"])
    names = [o.name for o in tapped.graph.output]
    assert names == ["logits", "h_relu"]  # logits was an output already; the input is not added
    assert len(names) == len(set(names))
    assert quant_model.SerializeToString() == before  # a copy; the input model is untouched
    logits, pre = run_model(tapped, np.zeros((2, 1, 8, 8), np.float32))
    assert logits.shape == (2, 10) and pre.shape == (2, 24)


@pytest.mark.parametrize("which", ["float", "quant"])
def test_tapped_model_passes_the_checker(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto, which: str
) -> None:
    model = float_model if which == "float" else quant_model
    layer = find_layers(model)[0]
    tapped = with_outputs(model, [layer.input_tensor, layer.output_tensor])
    check_full(tapped)


def test_with_outputs_on_existing_output_is_a_plain_copy(float_model: onnx.ModelProto) -> None:
    tapped = with_outputs(float_model, ["logits"])
    assert tapped is not float_model
    assert tapped.SerializeToString() == float_model.SerializeToString()


def test_input_spec(float_model: onnx.ModelProto) -> None:
    spec = input_spec(float_model)
    assert spec.name == "input" and spec.shape == (None, 1, 8, 8)


def test_input_spec_ignores_initializers_listed_as_inputs(float_model: onnx.ModelProto) -> None:
    float_model.graph.input.append(helper.make_tensor_value_info("fc1.bias", TensorProto.FLOAT, [24]))
    assert input_spec(float_model).name == "input"


def test_input_spec_refuses_two_inputs(float_model: onnx.ModelProto) -> None:
    float_model.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1]))
    with pytest.raises(UnsupportedModelError, match="2 inputs"):
        input_spec(float_model)


def test_check_models_match(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    check_models_match(float_model, quant_model)
    with pytest.raises(ModelPairingError, match="DequantizeLinear"):
        check_models_match(float_model, float_model)
    other, _, _ = matmul_add_model()
    with pytest.raises(ModelPairingError, match="different inputs"):
        check_models_match(other, quant_model)


def test_load_model(digits: DigitsExample, tmp_path: Path) -> None:
    model = load_model(digits.float_path, "FLOAT")
    assert [n.name for n in model.graph.node][:2] == ["/Flatten", "/fc1/Gemm"]
    with pytest.raises(ModelLoadError, match="FLOAT model .*missing.onnx does not exist"):
        load_model(tmp_path / "missing.onnx", "FLOAT")
    with pytest.raises(ModelLoadError, match="is not a file"):
        load_model(tmp_path, "QUANT")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="QUANT model .*junk.onnx"):
        load_model(junk, "QUANT")
    half = tmp_path / "half.onnx"
    data = digits.quant_path.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="half.onnx"):
        load_model(half, "QUANT")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.onnx"):
        load_model(empty, "FLOAT")
