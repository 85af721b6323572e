"""Issue 12, item 2: models in the QDQ forms NNCF and AIMET-ONNX write are read and repaired end to end.

The models are made by hand in those forms (tests/dialect_models.py): neither tool is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_full, run_model
from conv_models import CONV_LAYERS, build_cnn
from dialect_models import DIALECTS, quantize_like
from onnx import numpy_helper

from onnxrepair.cli import main
from onnxrepair.graph import (
    QuantizedTensor,
    describe_parameter,
    initializers,
    layer_parameters,
    pair_layer,
    parameter_scale,
    stored_integers,
)
from onnxrepair.rewrite import apply_deltas


@pytest.fixture(scope="module")
def dialects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("dialects")
    data = load_digits()
    x = (np.round(data.data / 16.0 * 255) / 255).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(x))
    train, rest = order[:900], order[900:]
    float_model = build_cnn(x[train], data.target[train])
    paths = {"float": root / "float.onnx"}
    onnx.save(float_model, paths["float"])
    for dialect in DIALECTS:
        paths[dialect] = root / f"{dialect}.onnx"
        onnx.save(quantize_like(float_model, x[train[:64]], dialect), paths[dialect])
    np.savez(root / "repair.npz", x=x[rest[:500]], y=data.target[rest[:500]])
    np.savez(root / "val.npz", x=x[rest[500:]], y=data.target[rest[500:]])
    paths["repair"], paths["val"] = root / "repair.npz", root / "val.npz"
    return paths


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_layer_of_each_dialect_is_read(dialects: dict[str, Path], dialect: str) -> None:
    float_model, quant = onnx.load(str(dialects["float"])), onnx.load(str(dialects[dialect]))
    for name in CONV_LAYERS:
        layer = pair_layer(float_model, quant, name).quant_layer
        assert isinstance(layer.weight, QuantizedTensor)
        assert (layer.weight.quantize_node is not None) == (dialect == "aimet")
        text = describe_parameter(quant, layer.weight)
        assert ("int4" if dialect.endswith("int4") else "int8") in text and "per-channel (axis 0)" in text
        # the dequantized weights are the float ones to within half a step
        w_float, b_float = layer_parameters(float_model, pair_layer(float_model, quant, name).float_layer)
        w_quant, b_quant = layer_parameters(quant, layer)
        step = parameter_scale(initializers(quant), layer.weight).reshape(-1, 1)
        assert np.all(np.abs(w_quant - w_float) <= step / 2 + 1e-6)
        assert np.allclose(b_quant, b_float, atol=1e-2)
    first = pair_layer(float_model, quant, "/c1/Conv").quant_layer
    assert isinstance(first.weight, QuantizedTensor)
    q = stored_integers(initializers(quant), first.weight)
    if dialect == "nncf":
        assert np.max(np.abs(q)) == 64  # NNCF's first layer: 7 bits


@pytest.mark.parametrize("dialect", DIALECTS)
def test_fix_layers_all_on_each_dialect(dialects: dict[str, Path], dialect: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    output, report_path = tmp_path / "r.onnx", tmp_path / "r.json"
    args = [dialects["float"], dialects[dialect], dialects["repair"], "--val", dialects["val"], "--layers", "all"]
    code = main(["fix", *map(str, args), "-o", str(output), "--report", str(report_path), "-q"])
    err = capsys.readouterr().err
    assert code in (0, 1), err
    report = json.loads(report_path.read_text())
    assert [step["layer"] for step in report["guard"]["layers"]] == CONV_LAYERS
    if code == 1:
        assert not output.exists()
        return
    quant, repaired = onnx.load(str(dialects[dialect])), onnx.load(str(output))
    check_full(repaired)
    assert list(repaired.graph.node) == list(quant.graph.node)
    assert list(repaired.opset_import) == list(quant.opset_import)
    float_model = onnx.load(str(dialects["float"]))
    allowed = set()
    for name in CONV_LAYERS:
        layer = pair_layer(float_model, quant, name).quant_layer
        assert isinstance(layer.weight, QuantizedTensor)
        allowed.add(layer.weight.quantized)
        bias = layer.bias
        allowed.add(bias.quantized if isinstance(bias, QuantizedTensor) else bias.initializer)  # type: ignore[union-attr]
        before_q = stored_integers(initializers(quant), layer.weight)
        after_q = stored_integers(initializers(repaired), layer.weight)
        reach = np.max(np.abs(before_q.astype(np.int64)))
        assert np.max(np.abs(after_q.astype(np.int64))) <= reach  # the quantizer's own range is kept
        if dialect == "aimet":  # the float initializer stays on the grid it is quantized to at run time
            stored = numpy_helper.to_array(initializers(repaired)[layer.weight.quantized]).astype(np.float64)
            scale = parameter_scale(initializers(repaired), layer.weight).reshape((-1,) + (1,) * (stored.ndim - 1))
            np.testing.assert_allclose(stored / scale, np.round(stored / scale), atol=1e-4)
    before, after = initializers(quant), initializers(repaired)
    assert {name for name in before if before[name] != after[name]} <= allowed
    assert report["repaired_agreement"] >= report["quant_agreement"]


def test_a_weight_quantized_at_run_time_is_rewritten_on_its_grid(dialects: dict[str, Path]) -> None:
    float_model, quant = onnx.load(str(dialects["float"])), onnx.load(str(dialects["aimet"]))
    layer = pair_layer(float_model, quant, "/g2/Conv").quant_layer
    assert isinstance(layer.weight, QuantizedTensor) and layer.weight.quantize_node is not None
    q = stored_integers(initializers(quant), layer.weight).reshape(layer.n_out, -1).astype(np.int64)
    step = parameter_scale(initializers(quant), layer.weight)
    delta = np.zeros(layer.n_in)
    delta[:2] = [step[3], -2 * step[3]]
    repaired, stats = apply_deltas(quant, layer, {3: delta})
    check_full(repaired)
    q_after = stored_integers(initializers(repaired), layer.weight).reshape(layer.n_out, -1).astype(np.int64)
    expected = q.copy()
    expected[3, :2] = np.clip(q[3, :2] + [1, -2], -128, 127)
    np.testing.assert_array_equal(q_after, expected)
    assert stats.changed[3] == int(np.count_nonzero(expected[3] != q[3]))
    # ONNX Runtime quantizes the new float values back to exactly these integers: the weights it uses moved by delta
    w_before, _ = layer_parameters(quant, layer)
    w_after, _ = layer_parameters(repaired, layer)
    np.testing.assert_allclose(
        w_after - w_before, np.where(np.arange(layer.n_out)[:, None] == 3, expected - q, 0) * step[:, None], atol=1e-6
    )
    x = np.load(dialects["val"])["x"][:5]
    (scores,) = run_model(repaired, x)
    assert np.all(np.isfinite(scores))
