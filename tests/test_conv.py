"""Issue 11: convolutions are layers; rows are patches; whole-network repair in graph order, guarded.

The CNN (tests/conv_models.py) has every geometry in one small model: padding,
a stride, auto_pad, a depthwise and a grouped convolution, a dilation and a
residual Add; it is quantized to QDQ (int8 per tensor, int4 per channel,
asymmetric uint8), QOperator and dynamic form by ONNX Runtime here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_full, check_kept_rows, run_model, tap
from conv_models import CONV_LAYERS, FLAVOURS, build_cnn, quantize_cnn
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxrepair.activity import read_layer_activity
from onnxrepair.cli import main
from onnxrepair.config import ALL_NEURONS, Encoding, RepairConfig, SolveConfig
from onnxrepair.data import ImageSet
from onnxrepair.graph import QuantizedTensor, find_layers, initializers, layer_parameters, pair_layer
from onnxrepair.layers import ConvGeometry
from onnxrepair.methods import Method, repair_layer
from onnxrepair.repair import repair, resolve_layers
from onnxrepair.rewrite import apply_deltas
from onnxrepair.rows import grouped_linear, output_rows, patch_rows, sample_positions

ALL_FLAVOURS = [*FLAVOURS, "dynamic"]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The float CNN and every quantized twin, on disk; key "float" and one per flavour."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("cnn")
    data = load_digits()
    x = (np.round(data.data / 16.0 * 255) / 255).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(x))
    train = order[:900]
    paths = {"float": root / "float.onnx"}
    onnx.save(build_cnn(x[train], data.target[train]), paths["float"])
    for flavour in ALL_FLAVOURS:
        paths[flavour] = root / f"{flavour}.onnx"
        quantize_cnn(paths["float"], paths[flavour], x[train[:64]], flavour)
    rest = order[900:]
    np.savez(root / "repair.npz", x=x[rest[:500]], y=data.target[rest[:500]])
    np.savez(root / "val.npz", x=x[rest[500:]], y=data.target[rest[500:]])
    paths["repair"], paths["val"] = root / "repair.npz", root / "val.npz"
    return paths


def images(path: Path, n: int | None = None) -> ImageSet:
    with np.load(path) as arrays:
        x, y = arrays["x"][:n], arrays["y"][:n]
    return ImageSet(x=x, labels=y, class_names=tuple(map(str, range(10))), paths=tuple(map(str, range(len(x)))))


# --- rows: im2col against ONNX Runtime's own convolution ------------------------------------------


def conv_node_model(geometry: ConvGeometry, out_channels: int, size: tuple[int, int], seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out_channels, geometry.in_channels // geometry.group, *geometry.kernel)).astype(np.float32)
    attrs = {
        "kernel_shape": list(geometry.kernel),
        "strides": list(geometry.strides),
        "dilations": list(geometry.dilations),
        "group": geometry.group,
    }
    if geometry.auto_pad == "NOTSET":
        attrs["pads"] = list(geometry.pads)
    else:
        attrs["auto_pad"] = geometry.auto_pad
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)],
        "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, geometry.in_channels, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(rng.normal(size=out_channels).astype(np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@st.composite
def geometries(draw: st.DrawFn) -> tuple[ConvGeometry, int, tuple[int, int]]:
    group = draw(st.sampled_from([1, 2, 4]))
    in_channels = group * draw(st.integers(1, 2))
    out_channels = group * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    auto_pad = draw(st.sampled_from(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    # ONNX Runtime refuses dilations with SAME padding
    dilations = (1, 1) if auto_pad.startswith("SAME") else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4)) if auto_pad == "NOTSET" else (0, 0, 0, 0)
    size = (draw(st.integers(6, 9)), draw(st.integers(5, 8)))
    geometry = ConvGeometry(kernel, strides, pads, dilations, group, in_channels, auto_pad)  # type: ignore[arg-type]
    return geometry, out_channels, size


@given(case=geometries(), per_image=st.sampled_from([None, 1, 3]))
def test_patch_rows_through_the_weights_are_onnx_runtimes_convolution(case, per_image) -> None:  # type: ignore[no-untyped-def]
    geometry, out_channels, size = case
    model = conv_node_model(geometry, out_channels, size, seed=out_channels)
    x = np.random.default_rng(1).normal(size=(3, geometry.in_channels, *size)).astype(np.float32)
    (y,) = run_model(model, x)
    assert y.shape[2:] == geometry.output_size(*size)
    positions = y.shape[2] * y.shape[3]
    image, position = sample_positions(np.array([4, 7, 9]), positions, per_image, seed=0)
    rows = patch_rows(x, geometry, image, position)
    assert rows.shape == (len(image), geometry.in_channels * geometry.kernel[0] * geometry.kernel[1])
    w, b = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer)
    mine = grouped_linear(rows, w.reshape(out_channels, -1), b, geometry.group)
    np.testing.assert_allclose(mine, output_rows(y, image, position), rtol=1e-4, atol=1e-4)


def test_sampled_positions_do_not_depend_on_the_batch() -> None:
    whole = sample_positions(np.arange(10), 49, 5, seed=3)
    split = [sample_positions(np.arange(a, b), 49, 5, seed=3) for a, b in ((0, 4), (4, 10))]
    assert np.array_equal(whole[1], np.concatenate([s[1] for s in split]))
    assert np.array_equal(whole[0], np.repeat(np.arange(10), 5))
    again = sample_positions(np.arange(10), 49, 5, seed=4)
    assert not np.array_equal(whole[1], again[1])  # the seed decides
    every_image, every_position = sample_positions(np.arange(2), 6, 64, seed=0)  # more asked than there are
    assert every_position.tolist() == [0, 1, 2, 3, 4, 5] * 2 and every_image.tolist() == [0] * 6 + [1] * 6


# --- reading conv layers in every form ----------------------------------------------------------------


@pytest.mark.parametrize("flavour", ALL_FLAVOURS)
def test_every_conv_of_every_flavour_is_a_paired_layer(cnn: dict[str, Path], flavour: str) -> None:
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn[flavour]))
    assert [layer.name for layer in find_layers(float_model)] == CONV_LAYERS
    for name in CONV_LAYERS:
        pair = pair_layer(float_model, quant, name)
        assert pair.quant_layer.conv == pair.float_layer.conv
        assert pair.quant_layer.quantized


@pytest.mark.parametrize("flavour", ALL_FLAVOURS)
@pytest.mark.parametrize("name", CONV_LAYERS[:4])
def test_conv_rows_reproduce_quants_pre_activation(cnn: dict[str, Path], flavour: str, name: str) -> None:
    """The solver's linear model of a conv channel (rows @ w + b) is what QUANT computes at those rows."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn[flavour]))
    pair = pair_layer(float_model, quant, name)
    x = images(cnn["repair"], 40).x
    activity = read_layer_activity(float_model, quant, pair, x, 16, positions_per_image=5)
    layer = pair.quant_layer
    w, b = layer_parameters(quant, layer)
    computed = grouped_linear(activity.quant_inputs, w, b, layer.groups)
    scale = np.max(np.abs(activity.quant_pre))
    if flavour == "dynamic" or layer.output_encoding is not None:
        # dynamic: x is quantized per batch in the graph too; QOperator: y is read back through its integer output
        assert np.max(np.abs(computed - activity.quant_pre)) <= 0.02 * scale
    else:
        np.testing.assert_allclose(computed, activity.quant_pre, atol=1e-4 * scale)
    assert activity.quant_inputs.shape == (len(activity.row_image), layer.row_width)
    assert np.array_equal(np.unique(activity.row_image), np.arange(len(x)))
    # the same rows whatever the batch size (dynamic quantization scales x per batch: its values change)
    again = read_layer_activity(float_model, quant, pair, x, 7, positions_per_image=5)
    np.testing.assert_array_equal(again.float_pre, activity.float_pre)
    if flavour != "dynamic":
        np.testing.assert_array_equal(again.quant_inputs, activity.quant_inputs)


@pytest.mark.parametrize("flavour", ["qdq_s8_tensor", "qdq_s4_channel", "qop_s8_channel", "dynamic"])
@pytest.mark.parametrize("name", ["/dw/Conv", "/g2/Conv"])
def test_rewriting_conv_channels_moves_only_them_and_exactly(cnn: dict[str, Path], flavour: str, name: str) -> None:
    """Whole-step deltas on two channels: only their integers move, and the pre-activation moves by rows @ dw."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn[flavour]))
    layer = pair_layer(float_model, quant, name).quant_layer
    assert isinstance(layer.weight, QuantizedTensor)
    stored = numpy_helper.to_array(initializers(quant)[layer.weight.quantized])
    scale = numpy_helper.to_array(initializers(quant)[layer.weight.scale]).astype(np.float64)
    channels = [1, layer.n_out - 1]
    deltas = {}
    for j in channels:
        step = scale[j] if scale.size > 1 else float(scale)
        deltas[j] = np.zeros(layer.n_in)
        deltas[j][: min(3, layer.n_in)] = [step, -step, 2 * step][: min(3, layer.n_in)]
    repaired, stats = apply_deltas(quant, layer, deltas)
    check_full(repaired)
    after = numpy_helper.to_array(initializers(repaired)[layer.weight.quantized])
    assert after.shape == stored.shape and after.dtype == stored.dtype
    moved = np.flatnonzero(np.any((after != stored).reshape(len(stored), -1), axis=1))
    assert set(moved.tolist()) <= set(channels) and moved.size > 0
    # only this initializer changed
    before_inits, after_inits = initializers(quant), initializers(repaired)
    assert {k for k in before_inits if before_inits[k] != after_inits[k]} == {layer.weight.quantized}
    assert list(repaired.graph.node) == list(quant.graph.node)
    # the pre-activation of the repaired model is the old one plus rows @ delta (QDQ: exactly)
    if flavour.startswith("qdq"):
        pair_before = pair_layer(float_model, quant, name)
        pair_after = pair_layer(float_model, repaired, name)
        x = images(cnn["repair"], 20).x
        before = read_layer_activity(float_model, quant, pair_before, x, 20, positions_per_image=4)
        now = read_layer_activity(float_model, repaired, pair_after, x, 20, positions_per_image=4)
        w0, b0 = layer_parameters(quant, layer)
        w1, b1 = layer_parameters(repaired, layer)
        expected = before.quant_pre + grouped_linear(before.quant_inputs, w1 - w0, b1 - b0, layer.groups)
        np.testing.assert_allclose(now.quant_pre, expected, atol=1e-4 * np.max(np.abs(expected)))
        assert stats.changed[channels[0]] > 0


# --- the encodings on conv channels -----------------------------------------------------------------


@pytest.mark.parametrize("encoding", [Encoding.RECONSTRUCT, Encoding.BIAS_CORRECTION, Encoding.SOFT, Encoding.PAPER])
def test_each_encoding_repairs_a_depthwise_layer(cnn: dict[str, Path], encoding: Encoding) -> None:
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    pair = pair_layer(float_model, quant, "/dw/Conv")
    activity = read_layer_activity(float_model, quant, pair, images(cnn["repair"], 120).x, 64, positions_per_image=8)
    neurons = ALL_NEURONS if encoding is Encoding.RECONSTRUCT else 4
    repaired, outcome = repair_layer(
        quant, pair, activity, Method(encoding, neurons=neurons), SolveConfig(encoding=encoding)
    )
    check_full(repaired)
    assert outcome.rows == len(activity.row_image) == 120 * 8
    assert outcome.spectrum is not None and outcome.spectrum.af.shape == (8,)
    if encoding in (Encoding.RECONSTRUCT, Encoding.BIAS_CORRECTION):
        assert outcome.sqnr_after is not None and outcome.sqnr_before is not None
        assert outcome.sqnr_after >= outcome.sqnr_before - 1e-9  # reconstruct keeps only what lowers the error
    assert len(outcome.solutions) == len(outcome.selected)


def test_reconstruct_on_the_first_layer_raises_its_sqnr(cnn: dict[str, Path]) -> None:
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s4_channel"]))
    pair = pair_layer(float_model, quant, "/c1/Conv")
    activity = read_layer_activity(float_model, quant, pair, images(cnn["repair"], 200).x, 64)
    method = Method(Encoding.RECONSTRUCT, neurons=ALL_NEURONS)
    _, outcome = repair_layer(quant, pair, activity, method, SolveConfig(encoding=Encoding.RECONSTRUCT))
    assert outcome.sqnr_after > outcome.sqnr_before + 1.0  # 4-bit weights of 9 each: much to gain


# --- the whole network, in order, guarded --------------------------------------------------------------


def test_resolve_layers_all_first_last(cnn: dict[str, Path]) -> None:
    float_model = onnx.load(str(cnn["float"]))
    assert resolve_layers(float_model, ("all",)) == CONV_LAYERS
    assert resolve_layers(float_model, ("first:2",)) == CONV_LAYERS[:2]
    assert resolve_layers(float_model, ("last:1", "first:1")) == [CONV_LAYERS[0], CONV_LAYERS[-1]]
    assert resolve_layers(float_model, ("/fc/Gemm", "/dw/Conv")) == ["/dw/Conv", "/fc/Gemm"]  # graph order


@pytest.mark.parametrize("flavour", ALL_FLAVOURS)
def test_fix_layers_all_end_to_end(cnn: dict[str, Path], flavour: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    output, report_path = tmp_path / "r.onnx", tmp_path / "r.json"
    args = [cnn["float"], cnn[flavour], cnn["repair"], "--val", cnn["val"], "--layers", "all", "-o", output]
    code = main(["fix", *map(str, args), "--report", str(report_path), "-q"])
    capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert code in (0, 1)
    guard = report["guard"]
    assert [step["layer"] for step in guard["layers"]] == CONV_LAYERS
    assert report["encoding"] == "reconstruct"
    assert 45 <= guard["holdout_size"] <= 55  # 10 % of the 500 repair images, stratified by class
    if code == 1:  # nothing beat QUANT on the held-out images: nothing written
        assert not output.exists() and report["written"] is False
        return
    repaired, quant = onnx.load(str(output)), onnx.load(str(cnn[flavour]))
    check_full(repaired)
    assert list(repaired.graph.node) == list(quant.graph.node)
    assert list(repaired.opset_import) == list(quant.opset_import)
    before, after = initializers(quant), initializers(repaired)
    assert before.keys() == after.keys()
    for name in before:
        assert (before[name].data_type, list(before[name].dims)) == (after[name].data_type, list(after[name].dims))
    # held-out: never worse than QUANT; validation: the written model at least as good as QUANT here
    assert guard["holdout_after"]["agreement"] >= guard["holdout_before"]["agreement"]
    kept = [layer["layer"] for layer in report["layers"]]
    assert kept == [step["layer"] for step in guard["layers"] if step["kept"]]
    for layer in report["layers"]:
        assert layer["sqnr_after"] >= layer["sqnr_before"] - 0.5
        assert (
            layer["channels_changed"]
            <= pair_layer(onnx.load(str(cnn["float"])), quant, layer["layer"]).quant_layer.n_out
        )


def test_whole_network_beats_quant_on_int4(cnn: dict[str, Path]) -> None:
    """The 4-bit twin loses most of its agreement; repairing every layer in order wins much of it back."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s4_channel"]))
    config = RepairConfig(layers=("all",), neurons=ALL_NEURONS, solve=SolveConfig(encoding=Encoding.RECONSTRUCT))
    result = repair(float_model, quant, images(cnn["repair"]), images(cnn["val"]), config)
    assert result.model is not None
    ev = result.evaluation
    assert ev.repaired_agreement > ev.quant_agreement + 0.2, (ev.quant_agreement, ev.repaired_agreement)
    assert result.holdout_after is not None and result.holdout_before is not None
    assert result.holdout_after.beats(result.holdout_before)


def test_a_layer_that_hurts_is_rolled_back(cnn: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard keeps a layer only if the held-out images say it helps: a damaging repair is undone."""
    import onnxrepair.repair as repair_module

    real = repair_module.repair_layer

    def damaging(quant_model, pair, activity, method, *args, **kwargs):  # type: ignore[no-untyped-def]
        model, outcome = real(quant_model, pair, activity, method, *args, **kwargs)
        if pair.float_layer.name != "/c1/Conv":
            return model, outcome
        layer = pair.quant_layer
        w, _ = layer_parameters(model, layer)
        damaged, _ = apply_deltas(model, layer, {j: -0.8 * w[j] for j in range(layer.n_out)})
        return damaged, outcome

    monkeypatch.setattr(repair_module, "repair_layer", damaging)
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    config = RepairConfig(layers=("first:2",), neurons=ALL_NEURONS, solve=SolveConfig(encoding=Encoding.RECONSTRUCT))
    result = repair(float_model, quant, images(cnn["repair"]), images(cnn["val"]), config)
    steps = {step.repair.pair.float_layer.name: step.kept for step in result.guard}
    assert steps["/c1/Conv"] is False
    assert [layer.pair.float_layer.name for layer in result.layers] == [n for n, kept in steps.items() if kept]
    if result.model is not None:  # c1's weights are QUANT's: the damage was rolled back
        c1 = pair_layer(float_model, quant, "/c1/Conv").quant_layer
        assert isinstance(c1.weight, QuantizedTensor)
        name = c1.weight.quantized
        assert initializers(result.model)[name] == initializers(quant)[name]


def test_list_layers_shows_convolutions(cnn: dict[str, Path], capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["fix", "--list-layers", str(cnn["float"]), str(cnn["qdq_s8_tensor"])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("/dw/Conv", "conv 3x3/2 dw", "conv 3x3 d2 g2", "/fc/Gemm", "dense"):
        assert text in out


def test_tapped_prefix_gives_the_same_values(cnn: dict[str, Path]) -> None:
    """Reading a layer without scores runs only the graph up to it, and gives the same rows."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    pair = pair_layer(float_model, quant, "/g2/Conv")
    x = images(cnn["repair"], 30).x
    whole = read_layer_activity(float_model, quant, pair, x, 16, positions_per_image=3)
    cut = read_layer_activity(float_model, quant, pair, x, 16, positions_per_image=3, scores=False)
    assert cut.float_scores is None and whole.float_scores is not None
    for field in ("float_pre", "quant_pre", "quant_inputs", "row_image"):
        np.testing.assert_array_equal(getattr(cut, field), getattr(whole, field))


def test_float_targets_line_up_with_the_layers_rows(cnn: dict[str, Path]) -> None:
    """FLOAT read once for several layers gives the rows reading each layer alone gives (a small budget: windows)."""
    from onnxrepair.activity import FloatTargets

    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    x = images(cnn["repair"], 24).x
    layers = find_layers(float_model)
    targets = FloatTargets(float_model, layers, x, 10, positions_per_image=4, seed=2, budget_bytes=4000)
    for layer in layers:
        pair = pair_layer(float_model, quant, layer.name)
        alone = read_layer_activity(float_model, quant, pair, x, 10, positions_per_image=4, seed=2, scores=False)
        np.testing.assert_array_equal(targets.rows(layer.name), alone.float_pre)
        given = read_layer_activity(
            float_model, quant, pair, x, 10, positions_per_image=4, seed=2, scores=False, float_rows=alone.float_pre
        )
        np.testing.assert_array_equal(given.quant_inputs, alone.quant_inputs)


@pytest.mark.parametrize("flavour", ["qdq_s8_tensor", "qdq_s4_channel", "qop_s8_channel"])
def test_kept_tensors_give_the_rows_the_model_input_gives(cnn: dict[str, Path], flavour: str) -> None:
    """Segments: each layer's rows from the tensors kept at its cut are the rows read from the model input."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn[flavour]))
    pairs = [pair_layer(float_model, quant, name) for name in CONV_LAYERS]
    # QOperator: ONNX Runtime requantizes y with its integer kernels (saturating on CPUs without VNNI)
    check_kept_rows(float_model, quant, pairs, images(cnn["repair"], 30).x, 0.06 if flavour.startswith("qop") else 1e-4)


def test_whole_network_reads_kept_tensors_and_matches_reading_from_the_input(
    cnn: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast reader (kept tensors) and the plain one (each layer from the model input) repair alike."""
    import onnxrepair.repair as repair_module

    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    config = RepairConfig(layers=("all",), neurons=ALL_NEURONS, solve=SolveConfig(encoding=Encoding.RECONSTRUCT))
    fast = repair(float_model, quant, images(cnn["repair"]), images(cnn["val"]), config)
    monkeypatch.setattr(repair_module.Segments, "plan", classmethod(lambda cls, *args: None))
    plain = repair(float_model, quant, images(cnn["repair"]), images(cnn["val"]), config)
    assert [s.kept for s in fast.guard] == [s.kept for s in plain.guard]
    for a, b in zip(fast.guard, plain.guard, strict=True):
        assert a.holdout.agreement == pytest.approx(b.holdout.agreement, abs=0.02)
    assert fast.evaluation.repaired_agreement == pytest.approx(plain.evaluation.repaired_agreement, abs=0.02)


def test_a_layer_before_a_residual_add_is_fitted_to_make_the_sum_floats(cnn: dict[str, Path]) -> None:
    """/sk/Conv feeds /res/Add with /g2's branch: its target is FLOAT's sum minus QUANT's other branch."""
    from onnxrepair.activity import FloatTargets, kept_activity
    from onnxrepair.readers import skip_of
    from onnxrepair.segments import Segments

    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    pair = pair_layer(float_model, quant, "/sk/Conv")
    assert pair.float_layer.residual is not None and pair.float_layer.residual.output == "res"
    skip = skip_of(pair)
    assert skip is not None
    assert skip_of(pair_layer(float_model, quant, "/g2/Conv")) is None  # a Relu before FLOAT's Add: no residual
    x = images(cnn["repair"], 20).x
    targets = FloatTargets(float_model, [pair.float_layer], x, 8, positions_per_image=None, residual_sums=True)
    activity = read_layer_activity(
        float_model, quant, pair, x, 8, positions_per_image=None, scores=False,
        float_rows=targets.rows("/sk/Conv"), skip=skip,
    )  # fmt: skip
    (float_sum,) = run_model(tap(float_model, ["res"]), x, ["res"])
    (quant_branch,) = run_model(tap(quant, [skip]), x, [skip])
    expected = (float_sum - quant_branch).transpose(0, 2, 3, 1).reshape(-1, 12)  # all positions, image-major
    np.testing.assert_allclose(activity.float_pre, expected, rtol=1e-5, atol=1e-5)
    # the kept tensors give the same target
    plan = Segments.plan(quant, [pair.quant_layer], len(x), [skip])
    assert plan is not None and plan.skips[0] is not None
    kept = plan.start(quant, x, 8, None)
    w, b = layer_parameters(quant, pair.quant_layer)
    from_kept = kept_activity(
        pair.quant_layer, lambda s, e: plan.inputs[0].read(kept, s, e), len(x), targets.rows("/sk/Conv"), w, b, 8,
        positions_per_image=None, read_skip=lambda s, e: plan.skips[0].read(kept, s, e),
    )  # fmt: skip
    np.testing.assert_allclose(from_kept.float_pre, expected, rtol=1e-4, atol=1e-4)
