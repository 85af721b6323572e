"""rewrite.py: deltas -> integer weights, per-tensor and per-channel, int4 and int8, clamped."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import QuantVariant, check_full, run_model, tap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import Layer, QuantizedTensor, find_layers, initializers, layer_grid, pair_layer
from onnxrepair.rewrite import apply_deltas

# variant -> the float-model name of the layer to patch (None: the last one)
CASES = {
    "digits-int4": "/fc1/Gemm",
    "digits-int8": "/fc1/Gemm",
    "digits-int8-per-channel": "/fc1/Gemm",
    "matmul-int8-per-channel": None,
}


def load_case(variant: QuantVariant, layer_name: str | None) -> tuple[onnx.ModelProto, Layer]:
    float_model = onnx.load(str(variant.float_path))
    quant_model = onnx.load(str(variant.quant_path))
    return quant_model, pair_layer(float_model, quant_model, layer_name).quant_layer


def weights(model: onnx.ModelProto, layer: Layer) -> tuple[np.ndarray, np.ndarray, onnx.TensorProto]:
    """(integer weights as int64 in [out, in] layout, scale per neuron [out], the initializer)."""
    assert isinstance(layer.weight, QuantizedTensor)
    inits = initializers(model)
    tensor = inits[layer.weight.quantized]
    q = numpy_helper.to_array(tensor).astype(np.int64)
    scale = numpy_helper.to_array(inits[layer.weight.scale]).astype(np.float64).reshape(-1)
    scale = np.broadcast_to(scale, (layer.n_out,)) if scale.size == 1 else scale
    return (q.T if layer.weight_transposed else q), scale, tensor


def integer_range(tensor: onnx.TensorProto) -> tuple[int, int]:
    info = ml_dtypes.iinfo(numpy_helper.to_array(tensor).dtype)
    return int(info.min), int(info.max)


def node_output(model: onnx.ModelProto, node_name: str) -> str:
    (node,) = [n for n in model.graph.node if n.name == node_name]
    return node.output[0]


def test_variants_are_what_they_claim(quant_variants: dict[str, QuantVariant]) -> None:
    # Guards the fixtures: a test of "per-channel int8" must really see per-channel int8 weights.
    for key, layer_name in CASES.items():
        variant = quant_variants[key]
        model, layer = load_case(variant, layer_name)
        q, scale, tensor = weights(model, layer)
        expected_type = onnx.TensorProto.INT4 if variant.dtype_name == "int4" else onnx.TensorProto.INT8
        assert tensor.data_type == expected_type, key
        n_scales = int(np.prod(initializers(model)[layer.weight.scale].dims))
        assert (n_scales == layer.n_out) if variant.per_channel else (n_scales == 1), key
        assert q.shape == (layer.n_out, layer.n_in)
    _, matmul = load_case(quant_variants["matmul-int8-per-channel"], None)
    assert matmul.op == "MatMul+Add" and matmul.weight_transposed and matmul.weight.axis == 1
    _, gemm = load_case(quant_variants["digits-int8-per-channel"], "/fc1/Gemm")
    assert gemm.op == "Gemm" and not gemm.weight_transposed and gemm.weight.axis == 0


@pytest.mark.parametrize("key", list(CASES))
def test_whole_step_deltas_change_only_the_selected_neurons(quant_variants: dict[str, QuantVariant], key: str) -> None:
    variant = quant_variants[key]
    model, layer = load_case(variant, CASES[key])
    original_bytes = model.SerializeToString()
    q, scale, tensor = weights(model, layer)
    lo, hi = integer_range(tensor)
    rng = np.random.default_rng(0)
    selected = [1, 3]
    steps = {n: rng.integers(-3, 4, size=layer.n_in) for n in selected}
    steps[1][0] = 2  # at least one entry changes
    # A delta of k whole quantization steps of that neuron's scale must become exactly +k in the integers.
    deltas = {n: steps[n] * scale[n] for n in selected}

    repaired, stats = apply_deltas(model, layer, deltas)

    assert model.SerializeToString() == original_bytes, "the input model was modified"
    check_full(repaired)
    q_new, _, new_tensor = weights(repaired, layer)
    assert new_tensor.data_type == tensor.data_type and list(new_tensor.dims) == list(tensor.dims)
    expected = q.copy()
    for n in selected:
        expected[n] = np.clip(q[n] + steps[n], lo, hi)
    np.testing.assert_array_equal(q_new, expected)
    unselected = [n for n in range(layer.n_out) if n not in selected]
    np.testing.assert_array_equal(q_new[unselected], q[unselected])
    assert lo <= q_new.min() and q_new.max() <= hi
    for n in selected:
        assert stats.changed[n] == int(np.count_nonzero(expected[n] != q[n]))
        assert stats.clamped[n] == int(np.count_nonzero(expected[n] != q[n] + steps[n]))
        assert stats.largest_step[n] == pytest.approx(np.max(np.abs(steps[n])))
    assert set(stats.changed) == set(selected)

    # Nothing else changed: every other initializer, every node, inputs and outputs.
    before, after = initializers(model), initializers(repaired)
    assert before.keys() == after.keys()
    for name in before:
        if name != layer.weight.quantized:
            assert before[name] == after[name], name
    assert list(model.graph.node) == list(repaired.graph.node)
    assert list(model.graph.output) == list(repaired.graph.output)

    # ONNX Runtime runs it, and the layer's linear part moved by x @ (change in dequantized W).
    linear = node_output(model, layer.name)  # Gemm output, or the MatMul before its Add
    x = variant.calibration[:64]
    before_in, before_lin = run_model(tap(model, [layer.input_tensor, linear]), x, [layer.input_tensor, linear])
    (after_lin,) = run_model(tap(repaired, [linear]), x, [linear])
    change = (q_new - q).astype(np.float64) * scale[:, None]  # [out, in], dequantized
    np.testing.assert_allclose(after_lin - before_lin, before_in.reshape(len(x), -1) @ change.T, atol=1e-4)
    assert np.max(np.abs(after_lin[:, selected] - before_lin[:, selected])) > 1e-3
    np.testing.assert_array_equal(after_lin[:, unselected], before_lin[:, unselected])
    (scores,) = run_model(repaired, x)
    assert scores.shape[0] == len(x) and np.all(np.isfinite(scores))


@pytest.mark.parametrize("key", ["digits-int4", "digits-int8", "digits-int8-per-channel", "matmul-int8-per-channel"])
def test_huge_deltas_are_clamped_not_wrapped(quant_variants: dict[str, QuantVariant], key: str) -> None:
    """Clamped to the type's range and the quantizer's own; never wrapped."""
    model, layer = load_case(quant_variants[key], None)
    q, scale, tensor = weights(model, layer)
    lo, hi = integer_range(tensor)
    if quant_variants[key].dtype_name == "int4":
        assert (lo, hi) == (-8, 7)
    else:
        assert (lo, hi) == (-128, 127)
    # the weights stay in the range the quantizer used: zero point (0 here) +- the tensor's largest |q|,
    # within the type (ONNX Runtime's symmetric int8 uses [-127, 127], never -128)
    reach = int(np.max(np.abs(q)))
    lo, hi = max(lo, -reach), min(hi, reach)
    up = np.full(layer.n_in, 1e6)
    repaired, stats = apply_deltas(model, layer, {0: up, 2: -up})
    check_full(repaired)
    q_new, _, _ = weights(repaired, layer)
    # Wrapping (+256, or +16 for int4) would leave small or negative values here.
    np.testing.assert_array_equal(q_new[0], hi)
    np.testing.assert_array_equal(q_new[2], lo)
    np.testing.assert_array_equal(q_new[1], q[1])
    assert stats.clamped == {0: layer.n_in, 2: layer.n_in}
    assert stats.changed[0] == int(np.count_nonzero(q[0] != hi))
    assert stats.changed[2] == int(np.count_nonzero(q[2] != lo))
    assert run_model(repaired, quant_variants[key].calibration[:8])[0].shape[0] == 8


def test_sub_step_deltas_round_away(quant_variants: dict[str, QuantVariant]) -> None:
    # 0.4 of a step rounds back to the same integer: nothing changes, and the stats say why.
    model, layer = load_case(quant_variants["digits-int8"], None)
    q, scale, _ = weights(model, layer)
    repaired, stats = apply_deltas(model, layer, {4: np.full(layer.n_in, 0.4 * scale[4])})
    np.testing.assert_array_equal(weights(repaired, layer)[0], q)
    assert stats.changed == {4: 0} and stats.clamped == {4: 0}
    assert stats.largest_step[4] == pytest.approx(0.4)


def test_no_deltas_change_nothing(quant_model: onnx.ModelProto) -> None:
    layer = find_layers(quant_model)[-1]
    repaired, stats = apply_deltas(quant_model, layer, {})
    assert repaired is not quant_model
    assert repaired.SerializeToString() == quant_model.SerializeToString()
    assert stats.changed == {} and stats.clamped == {}


def test_zero_delta_changes_nothing(quant_model: onnx.ModelProto) -> None:
    layer = find_layers(quant_model)[-1]
    repaired, stats = apply_deltas(quant_model, layer, {n: np.zeros(layer.n_in) for n in range(layer.n_out)})
    assert initializers(repaired) == initializers(quant_model)
    assert all(v == 0 for v in stats.changed.values())


def test_float_weights_are_refused(float_model: onnx.ModelProto) -> None:
    layer = find_layers(float_model)[-1]
    with pytest.raises(UnsupportedModelError, match="not quantized"):
        apply_deltas(float_model, layer, {0: np.ones(layer.n_in)})


def test_shared_weight_initializer_is_refused(quant_model: onnx.ModelProto) -> None:
    layer = find_layers(quant_model)[-1]
    assert isinstance(layer.weight, QuantizedTensor)
    extra = helper.make_node(
        "DequantizeLinear",
        [layer.weight.quantized, layer.weight.scale, layer.weight.zero_point],
        ["shared_copy"],
        name="another_user",
        domain="com.microsoft",
    )
    quant_model.graph.node.append(extra)
    with pytest.raises(UnsupportedModelError, match=layer.weight.quantized):
        apply_deltas(quant_model, layer, {0: np.ones(layer.n_in)})


def test_unnamed_dequantize_node_is_rewritten(quant_model: onnx.ModelProto) -> None:
    for node in quant_model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == "fc2.weight_quantized":
            node.name = ""
    check_full(quant_model)
    layer = find_layers(quant_model)[-1]
    q, scale, _ = weights(quant_model, layer)
    repaired, stats = apply_deltas(quant_model, layer, {0: np.full(layer.n_in, -scale[0])})
    lo, _ = integer_range(initializers(quant_model)["fc2.weight_quantized"])
    np.testing.assert_array_equal(weights(repaired, layer)[0][0], np.maximum(q[0] - 1, lo))


@pytest.fixture(scope="module")
def property_cases(quant_variants: dict[str, QuantVariant]) -> list[tuple[onnx.ModelProto, Layer]]:
    return [
        load_case(quant_variants["digits-int8-per-channel"], "/fc2/Gemm"),
        load_case(quant_variants["matmul-int8-per-channel"], None),
        load_case(quant_variants["digits-int4"], "/fc2/Gemm"),
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rewrite_property(property_cases: list[tuple[onnx.ModelProto, Layer]], data: st.DataObject) -> None:
    model, layer = property_cases[data.draw(st.integers(0, len(property_cases) - 1), label="case")]
    before = model.SerializeToString()
    q, scale, tensor = weights(model, layer)
    lo, hi = integer_range(tensor)
    reach = int(np.max(np.abs(q)))  # zero point 0 here: the quantizer's own symmetric range
    lo, hi = max(lo, -reach), min(hi, reach)
    selected = data.draw(st.sets(st.integers(0, layer.n_out - 1), max_size=layer.n_out), label="neurons")
    deltas, steps = {}, {}
    for n in sorted(selected):
        # k whole steps plus a fraction that rounding must drop: the integer result is q + k, clamped.
        k = np.array(data.draw(st.lists(st.integers(-300, 300), min_size=layer.n_in, max_size=layer.n_in)))
        frac = np.array(
            data.draw(st.lists(st.floats(-0.4, 0.4), min_size=layer.n_in, max_size=layer.n_in)), dtype=np.float64
        )
        steps[n] = k
        deltas[n] = (k + frac) * scale[n]
    repaired, stats = apply_deltas(model, layer, deltas)
    assert model.SerializeToString() == before
    q_new, _, _ = weights(repaired, layer)
    assert lo <= q_new.min() and q_new.max() <= hi
    for n in range(layer.n_out):
        if n in selected:
            wanted = q[n] + steps[n]
            np.testing.assert_array_equal(q_new[n], np.clip(wanted, lo, hi))
            assert stats.changed[n] == int(np.count_nonzero(q_new[n] != q[n]))
            assert stats.clamped[n] == int(np.count_nonzero((wanted < lo) | (wanted > hi)))
        else:
            np.testing.assert_array_equal(q_new[n], q[n])
            assert n not in stats.changed


def test_repaired_model_object_is_independent(quant_model: onnx.ModelProto) -> None:
    # Changing the result afterwards must not reach back into the input (a deep copy, not a view).
    layer = find_layers(quant_model)[-1]
    repaired, _ = apply_deltas(quant_model, layer, {})
    before = quant_model.SerializeToString()
    repaired.graph.node[0].name = "changed"
    del repaired.graph.initializer[:]
    assert quant_model.SerializeToString() == before
    assert copy.deepcopy(quant_model).SerializeToString() == before


def test_weights_stay_in_the_narrower_range_the_quantizer_used(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """reduce_range keeps int8 weights 7-bit (no saturation on CPUs without VNNI): a repair keeps them so."""
    from conftest import quantize
    from onnxruntime.quantization import QuantType

    path = tmp_path / "reduced.onnx"
    quantize(digits.float_path, path, digits.x[:50], weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    model = onnx.load(str(path))
    layer = find_layers(model)[-1]
    q, _, _ = weights(model, layer)
    reach = int(np.max(np.abs(q)))
    assert reach <= 64  # 7 bits
    up = np.full(layer.n_in, 1e6)
    repaired, stats = apply_deltas(model, layer, {0: up, 1: -up})
    q_new, _, _ = weights(repaired, layer)
    assert np.max(np.abs(q_new)) == reach
    np.testing.assert_array_equal(q_new[0], reach)
    np.testing.assert_array_equal(q_new[1], -reach)
    grid = layer_grid(model, layer)  # what the solvers may ask for: the same bounds
    np.testing.assert_array_equal(grid.weight_high[0] + q[0], reach)
    np.testing.assert_array_equal(grid.weight_low[1] + q[1], -reach)
