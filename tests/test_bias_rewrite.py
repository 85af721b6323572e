"""rewrite.apply_deltas with bias deltas: int32 Gemm biases, and int8/uint8 MatMul+Add biases that
have to be re-encoded when a corrected value does not fit (issue 3, item 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import QuantVariant, _NamedReader, check_full, run_model
from helpers_issue3 import gemm_head_without_bias, initializer_arrays, quantize_matmul_add, run_exact
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import QuantizedTensor, layer_parameters, pair_layer
from onnxrepair.rewrite import apply_deltas


def bias_of(model: onnx.ModelProto, layer_name: str | None) -> tuple[QuantizedTensor, object]:
    float_model = model  # pairing a QDQ model with itself finds its own layer
    layer = pair_layer(float_model, model, layer_name).quant_layer
    assert isinstance(layer.bias, QuantizedTensor)
    return layer.bias, layer


# ---------------------------------------------------------------------------
# int32 bias of a Gemm (scale = scale_x * scale_w)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["digits-int4", "digits-int8-per-channel"])
def test_int32_bias_moves_only_the_selected_entries(quant_variants: dict[str, QuantVariant], key: str) -> None:
    quant = onnx.load(str(quant_variants[key].quant_path))
    bias, layer = bias_of(quant, "/fc2/Gemm")
    before = initializer_arrays(quant)
    q = before[bias.quantized]
    assert q.dtype == np.int32
    scale = np.broadcast_to(before[bias.scale].astype(np.float64).reshape(-1), q.shape)

    moves = {3: 7.3 * scale[3], 5: -2.6 * scale[5], 8: 0.4 * scale[8]}  # 0.4 of a step rounds away
    repaired, stats = apply_deltas(quant, layer, {}, moves)  # type: ignore[arg-type]
    after = initializer_arrays(repaired)

    expected = q.astype(np.int64).copy()
    expected[3] += 7
    expected[5] -= 3
    np.testing.assert_array_equal(after[bias.quantized], expected)
    assert after[bias.quantized].dtype == np.int32
    assert stats.bias_changed == [3, 5]
    assert not stats.bias_reencoded
    # nothing else moved: same initializers, same values, same nodes
    assert after.keys() == before.keys()
    assert [k for k in before if not np.array_equal(before[k], after[k])] == [bias.quantized]
    assert list(repaired.graph.node) == list(quant.graph.node)
    check_full(repaired)
    (scores,) = run_model(repaired, quant_variants[key].calibration[:8])
    assert scores.shape == (8, 10)


def test_int32_bias_and_weights_together(quant_variants: dict[str, QuantVariant]) -> None:
    quant = onnx.load(str(quant_variants["digits-int8"].quant_path))
    bias, layer = bias_of(quant, "/fc2/Gemm")
    w, b = layer_parameters(quant, layer)  # type: ignore[arg-type]
    scale_b = float(initializer_arrays(quant)[bias.scale].reshape(-1)[0])
    delta = np.zeros(w.shape[1])
    repaired, stats = apply_deltas(quant, layer, {2: delta}, {2: 12 * scale_b})  # type: ignore[arg-type]
    w_new, b_new = layer_parameters(repaired, layer)  # type: ignore[arg-type]
    np.testing.assert_array_equal(w_new, w)
    assert b_new[2] == pytest.approx(b[2] + 12 * scale_b, rel=1e-9)
    np.testing.assert_array_equal(np.delete(b_new, 2), np.delete(b, 2))
    assert stats.bias_changed == [2] and stats.changed == {2: 0}


def test_bias_delta_on_a_layer_without_bias_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    float_path, quant_path = tmp_path / "head.onnx", tmp_path / "head-qdq.onnx"
    onnx.save(gemm_head_without_bias(rng.normal(size=(3, 4))), float_path)
    x = rng.uniform(0, 1, size=(20, 4)).astype(np.float32)
    quantize_static(str(float_path), str(quant_path), _NamedReader("x", x), quant_format=QuantFormat.QDQ)
    quant = onnx.load(str(quant_path))
    layer = pair_layer(quant, quant, None).quant_layer
    assert layer.bias is None
    with pytest.raises(UnsupportedModelError, match="no bias"):
        apply_deltas(quant, layer, {}, {0: 1.0})
    unchanged, stats = apply_deltas(quant, layer, {}, {0: 0.0})  # a zero move is no move
    assert stats.bias_changed == [] and unchanged.graph.initializer == quant.graph.initializer


# ---------------------------------------------------------------------------
# int8 / uint8 bias of MatMul + Add (skl2onnx graphs)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matmul_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[onnx.ModelProto, np.ndarray]]:
    """MatMul+Add QDQ twins whose Add bias ORT stores with the activation type: uint8 and int8."""
    root = tmp_path_factory.mktemp("matmul-bias")
    rng = np.random.default_rng(5)
    w, b = rng.normal(size=(6, 4)), rng.normal(size=4)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    models = {}
    for name, activation in (("uint8", QuantType.QUInt8), ("int8", QuantType.QInt8)):
        _, quant_path = quantize_matmul_add(root, w, b, x[:20], activation, f"dense-{name}")
        models[name] = (onnx.load(str(quant_path)), x)
    return models


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_ort_stores_the_add_bias_with_the_activation_type(
    matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]], dtype: str
) -> None:
    quant, _ = matmul_models[dtype]
    bias, layer = bias_of(quant, None)
    assert layer.op == "MatMul+Add"  # type: ignore[attr-defined]
    values = initializer_arrays(quant)
    assert values[bias.quantized].dtype == np.dtype(dtype)
    assert values[bias.scale].size == 1  # per-tensor: the case that is re-encoded


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_small_bias_move_fits_and_is_not_reencoded(
    matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]], dtype: str
) -> None:
    quant, _ = matmul_models[dtype]
    bias, layer = bias_of(quant, None)
    values = initializer_arrays(quant)
    q = values[bias.quantized].astype(np.int64)
    info = np.iinfo(np.dtype(dtype))
    j = int(np.argmin(np.abs(q - (int(info.min) + int(info.max)) / 2)))  # the entry furthest from both ends
    scale = float(values[bias.scale])
    repaired, stats = apply_deltas(quant, layer, {}, {j: 2 * scale})  # type: ignore[arg-type]
    after = initializer_arrays(repaired)
    expected = q.copy()
    expected[j] += 2
    np.testing.assert_array_equal(after[bias.quantized], expected)
    assert not stats.bias_reencoded and stats.bias_changed == [j]
    assert after.keys() == values.keys()


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_bias_move_is_reencoded(
    matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]], dtype: str, sign: float, tmp_path: Path
) -> None:
    quant, x = matmul_models[dtype]
    original = onnx.ModelProto()
    original.CopyFrom(quant)
    bias, layer = bias_of(quant, None)
    values = initializer_arrays(quant)
    _, b = layer_parameters(quant, layer)  # type: ignore[arg-type]
    span = float(b.max() - b.min())
    move = sign * 5 * span  # far outside what the stored scale and zero point can express
    wanted = b.copy()
    wanted[0] += move
    q_wanted = b[0] / float(values[bias.scale]) + move / float(values[bias.scale])
    assert not np.iinfo(np.dtype(dtype)).min <= q_wanted <= np.iinfo(np.dtype(dtype)).max

    repaired, stats = apply_deltas(quant, layer, {}, {0: move})  # type: ignore[arg-type]
    assert stats.bias_reencoded
    assert stats.bias_changed == [0]
    assert quant == original  # the input model is not touched

    after = initializer_arrays(repaired)
    dq = next(n for n in repaired.graph.node if n.name == bias.dequantize_node)
    new_scale_name, new_zero_name = dq.input[1], dq.input[2]
    # new scale and zero point, under names the model did not have
    assert new_scale_name not in values and new_zero_name not in values
    new_scale = float(after[new_scale_name])
    assert new_scale > float(values[bias.scale])
    assert after[new_zero_name].dtype == np.dtype(dtype)
    assert after[bias.quantized].dtype == np.dtype(dtype)
    # the original scale and zero point are gone: only the bias read them, and ONNX Runtime would warn of each
    # unused initializer on every load
    assert bias.scale not in after and bias.zero_point not in after
    # every bias value is what was wanted, within one new step (read through the rewritten DQ node)
    _, b_new = layer_parameters(repaired, pair_layer(repaired, repaired, None).quant_layer)
    np.testing.assert_allclose(b_new, wanted, rtol=0, atol=new_scale)
    # the weights did not move
    assert [k for k in values if k in after and not np.array_equal(values[k], after[k])] == [bias.quantized]

    check_full(repaired)
    onnx.save(repaired, tmp_path / "repaired.onnx")  # and it round-trips through a file
    reloaded = onnx.load(str(tmp_path / "repaired.onnx"))
    add_output = layer.output_tensor  # type: ignore[attr-defined]
    got = run_exact(reloaded, x, [add_output])[add_output]
    ref = run_exact(original, x, [add_output])[add_output]
    # the Add's output moved by the wanted amount on neuron 0 and by at most one new step elsewhere
    np.testing.assert_allclose(got[:, 0] - ref[:, 0], move, atol=new_scale + 1e-5)
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], atol=new_scale + 1e-5)
    (scores,) = run_model(reloaded, x)  # default session options too
    assert scores.shape == (len(x), 4) and np.all(np.isfinite(scores))


def test_reencoding_twice_gives_fresh_names(matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]]) -> None:
    quant, x = matmul_models["uint8"]
    bias, layer = bias_of(quant, None)
    _, b = layer_parameters(quant, layer)  # type: ignore[arg-type]
    span = float(b.max() - b.min())
    once, first = apply_deltas(quant, layer, {}, {0: 5 * span})  # type: ignore[arg-type]
    layer_once = pair_layer(once, once, None).quant_layer
    twice, second = apply_deltas(once, layer_once, {}, {1: -50 * span})
    assert first.bias_reencoded and second.bias_reencoded
    names = [t.name for t in twice.graph.initializer]
    assert len(names) == len(set(names))
    check_full(twice)
    _, b_twice = layer_parameters(twice, pair_layer(twice, twice, None).quant_layer)
    assert b_twice[1] == pytest.approx(b[1] - 50 * span, abs=float(b_twice.max() - b_twice.min()) / 100)
    (scores,) = run_model(twice, x)
    assert np.all(np.isfinite(scores))


def test_reencoded_names_avoid_every_tensor_name(matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]]) -> None:
    """The new scale/zero-point names must not clash with any tensor of the graph, initializer or not."""
    quant, x = matmul_models["int8"]
    renamed = onnx.ModelProto()
    renamed.CopyFrom(quant)
    bias, _ = bias_of(renamed, None)
    clash = f"{bias.quantized}_repaired_scale"
    add = next(n for n in renamed.graph.node if n.op_type == "Add")
    old = add.output[0]
    add.output[0] = clash  # a node output that happens to carry the name the rewrite would pick
    for node in renamed.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = clash
    check_full(renamed)
    _, layer = bias_of(renamed, None)
    _, b = layer_parameters(renamed, layer)  # type: ignore[arg-type]
    repaired, stats = apply_deltas(renamed, layer, {}, {0: 5 * float(b.max() - b.min())})  # type: ignore[arg-type]
    assert stats.bias_reencoded
    dq = next(n for n in repaired.graph.node if n.name == bias.dequantize_node)
    existing = {t.name for t in renamed.graph.initializer} | {
        name for n in renamed.graph.node for name in (*n.input, *n.output)
    }
    assert dq.input[1] not in existing and dq.input[2] not in existing and dq.input[1] != dq.input[2]
    check_full(repaired)
    (scores,) = run_model(repaired, x)
    assert np.all(np.isfinite(scores))


def _matmul_add_with_float_bias(folder: Path, bias: np.ndarray, shared: bool = False) -> tuple[Path, Path, Path]:
    """x [N,8] -> MatMul -> Add(bias) -> y [N,4], dynamically quantized (the bias stays a float initializer)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])]
    if shared:  # a second node reads the same bias
        nodes.append(helper.make_node("Add", ["x", "b"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 8]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        outputs,
        [weight, numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    float_path, quant_path, data = folder / "f.onnx", folder / "q.onnx", folder / "x.npz"
    onnx.save(model, float_path)
    quantize_dynamic(str(float_path), str(quant_path))
    np.savez(data, x=rng.normal(size=(200, 8)).astype(np.float32))
    return float_path, quant_path, data


def test_a_scalar_float_bias_is_widened_to_one_value_per_neuron(tmp_path: Path) -> None:
    from onnxrepair.cli import main

    float_path, quant_path, data = _matmul_add_with_float_bias(tmp_path, np.array([0.1]))
    out = tmp_path / "r.onnx"
    assert main(["fix", str(float_path), str(quant_path), str(data), "-o", str(out), "-q"]
                + ["--encoding", "bias-correction"]) == 0  # fmt: skip
    repaired, quant = onnx.load(str(out)), onnx.load(str(quant_path))
    new_bias = initializer_arrays(repaired)["b"]
    assert new_bias.shape == (4,) and new_bias.dtype == np.float32
    x = np.load(data)["x"][:50]
    (before,), (after,) = run_model(quant, x), run_model(repaired, x)
    np.testing.assert_allclose(after - before, np.broadcast_to(new_bias - 0.1, after.shape), atol=1e-5)


def test_a_float_bias_read_by_another_node_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxrepair.cli import main

    float_path, quant_path, data = _matmul_add_with_float_bias(tmp_path, np.full(4, 0.2))
    assert main(["fix", str(float_path), str(quant_path), str(data), "-o", str(tmp_path / "a.onnx"), "-q"]) == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    float_path, quant_path, data = _matmul_add_with_float_bias(shared, np.full(1, 0.2), shared=True)
    out = shared / "r.onnx"
    code = main(["fix", str(float_path), str(quant_path), str(data), "-o", str(out), "--encoding", "bias-correction"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "'b'" in err and "used by" in err and not out.exists()


def test_a_reencoded_bias_leaves_no_initializer_behind(
    matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]], capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 14: ONNX Runtime warned 'Removing initializer ... It is not used by any node' on every load."""
    import onnxruntime as ort

    quant, x = matmul_models["uint8"]
    bias, layer = bias_of(quant, None)
    _, b = layer_parameters(quant, layer)  # type: ignore[arg-type]
    repaired, stats = apply_deltas(quant, layer, {}, {0: 5 * float(b.max() - b.min())})  # type: ignore[arg-type]
    assert stats.bias_reencoded
    read = {name for node in repaired.graph.node for name in node.input}
    assert {t.name for t in repaired.graph.initializer} <= read
    options = ort.SessionOptions()
    options.log_severity_level = 1  # info and up: the warning would be printed
    capfd.readouterr()
    session = ort.InferenceSession(repaired.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x[:2]})
    err = capfd.readouterr().err
    assert "Removing initializer" not in err


def test_an_old_scale_another_node_reads_is_kept(matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]]) -> None:
    quant, _ = matmul_models["uint8"]
    shared = onnx.ModelProto()
    shared.CopyFrom(quant)
    bias, layer = bias_of(shared, None)
    # a node of its own reads the bias scale too
    shared.graph.node.append(onnx.helper.make_node("Identity", [bias.scale], ["scale_copy"], name="reader"))
    _, b = layer_parameters(shared, layer)  # type: ignore[arg-type]
    repaired, stats = apply_deltas(shared, layer, {}, {0: 5 * float(b.max() - b.min())})  # type: ignore[arg-type]
    assert stats.bias_reencoded
    assert bias.scale in {t.name for t in repaired.graph.initializer}
    assert bias.zero_point not in {t.name for t in repaired.graph.initializer}


def test_bias_correction_that_reencodes_reports_its_sqnr(
    matmul_models: dict[str, tuple[onnx.ModelProto, np.ndarray]],
) -> None:
    """The layer is read again from the repaired model: its bias has a new scale under a new name."""
    import dataclasses

    from onnxrepair.activity import read_layer_activity
    from onnxrepair.config import Encoding, SolveConfig
    from onnxrepair.methods import Method, repair_layer

    quant, x = matmul_models["uint8"]
    pair = pair_layer(quant, quant, None)
    activity = read_layer_activity(quant, quant, pair, x, 16)
    _, b = layer_parameters(quant, pair.quant_layer)
    shifted = dataclasses.replace(activity, float_pre=activity.float_pre + np.float32(5 * (b.max() - b.min())))
    method = Method(Encoding.BIAS_CORRECTION)
    repaired, outcome = repair_layer(quant, pair, shifted, method, SolveConfig(encoding=Encoding.BIAS_CORRECTION))
    assert outcome.rewrite.bias_reencoded
    assert outcome.sqnr_before is not None and outcome.sqnr_after is not None
    assert outcome.sqnr_after > outcome.sqnr_before + 10  # the shift is what bias correction removes
