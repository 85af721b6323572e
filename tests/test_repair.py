"""repair.py: the library pipeline on the digits models (no files, no console)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from conftest import DigitsExample, check_full

from onnxrepair.activity import read_layer_activity
from onnxrepair.config import Encoding, Metric, RepairConfig, SolveConfig
from onnxrepair.data import ImageSet
from onnxrepair.errors import ModelPairingError
from onnxrepair.graph import initializers, layer_parameters, pair_layer
from onnxrepair.localize import rank_neurons
from onnxrepair.progress import NoProgress
from onnxrepair.repair import list_layers, repair
from onnxrepair.report import report_dict
from onnxrepair.spectrum import activation_flips


def image_set(x: np.ndarray, y: np.ndarray) -> ImageSet:
    names = tuple(str(i) for i in range(10))
    return ImageSet(x=x, labels=y, class_names=names, paths=tuple(f"{i}.png" for i in range(len(x))))


@pytest.fixture(scope="module")
def sets(digits: DigitsExample) -> tuple[ImageSet, ImageSet]:
    order = np.random.default_rng(0).permutation(len(digits.x))
    repair_idx, val_idx = order[:500], order[500:800]
    return image_set(digits.x[repair_idx], digits.y[repair_idx]), image_set(digits.x[val_idx], digits.y[val_idx])


@pytest.mark.parametrize(("layer", "metric", "neurons"), [(None, Metric.EUCLID, 4), ("/fc1/Gemm", Metric.OCHIAI, 30)])
def test_repair_result_is_consistent(
    digits: DigitsExample, sets: tuple[ImageSet, ImageSet], layer: str | None, metric: Metric, neurons: int
) -> None:
    float_model = onnx.load(str(digits.float_path))
    quant_model = onnx.load(str(digits.quant_path))
    quant_bytes = quant_model.SerializeToString()
    repair_set, val_set = sets
    config = RepairConfig(
        layers=(layer,) if layer else (), metric=metric, neurons=neurons, solve=SolveConfig(encoding=Encoding.PAPER)
    )
    result = repair(float_model, quant_model, repair_set, val_set, config)

    assert quant_model.SerializeToString() == quant_bytes
    assert result.model is not None
    check_full(result.model)
    assert len(result.layers) == 1
    outcome = result.layers[0]
    n_out = outcome.pair.quant_layer.n_out
    assert len(outcome.selected) == min(neurons, n_out)  # asking for more neurons than exist takes them all
    assert outcome.selected == rank_neurons(outcome.scores)[: len(outcome.selected)].tolist()
    assert [s.neuron for s in outcome.solutions] == outcome.selected
    assert sorted(outcome.repaired_neurons + outcome.unsolved) == sorted(outcome.selected)
    assert outcome.spectrum.n_failing + outcome.spectrum.n_passing == len(repair_set) == result.repair_size
    assert result.evaluation.size == len(val_set)
    assert set(outcome.rewrite.changed) == set(outcome.repaired_neurons)
    for solution in outcome.solutions:
        assert solution.solved == (solution.weight_delta is not None)
        assert solution.solved or solution.reason

    # Integer weights of unselected neurons are untouched; every changed row belongs to a repaired neuron.
    w_before, b_before = layer_parameters(quant_model, outcome.pair.quant_layer)
    w_after, b_after = layer_parameters(result.model, outcome.pair.quant_layer)
    changed_rows = set(np.flatnonzero(np.any(w_before != w_after, axis=1)).tolist())
    assert changed_rows <= set(outcome.repaired_neurons)
    assert sum(outcome.rewrite.changed.values()) == int(np.count_nonzero(w_before != w_after))
    np.testing.assert_array_equal(b_before, b_after)  # the paper's encoding leaves biases alone

    report = report_dict(result, config, inputs={}, preprocessing="test", output=None)
    assert report["neurons"] == outcome.repaired_neurons and report["unsolved"] == outcome.unsolved
    json.dumps(report, allow_nan=False)


def test_nothing_to_fix_changes_nothing(digits: DigitsExample) -> None:
    # Keep only repair inputs on which every fc2 neuron already has the float model's sign in QUANT,
    # by more than the margin: each LP is solved by delta = 0, and the model comes back unchanged.
    float_model = onnx.load(str(digits.float_path))
    quant_model = onnx.load(str(digits.quant_path))
    pair = pair_layer(float_model, quant_model, None)
    activity = read_layer_activity(float_model, quant_model, pair, digits.x, 256, NoProgress())
    w, b = layer_parameters(quant_model, pair.quant_layer)
    lp_pre = activity.quant_inputs.astype(np.float64) @ w.T + b  # what the LP sees
    margin = SolveConfig(encoding=Encoding.PAPER).resolved_margin
    agree = ~activation_flips(activity.float_pre, lp_pre).any(axis=1) & (np.abs(lp_pre).min(axis=1) > 2 * margin)
    assert agree.sum() > 100
    chosen = np.flatnonzero(agree)[:200]
    clean = image_set(digits.x[chosen], digits.y[chosen])
    result = repair(
        float_model, quant_model, clean, clean, RepairConfig(neurons=10, solve=SolveConfig(encoding=Encoding.PAPER))
    )
    outcome = result.layers[0]
    assert result.model is not None
    assert outcome.spectrum.af.sum() + outcome.spectrum.as_.sum() == 0
    assert all(s.solved and s.objective == pytest.approx(0.0, abs=1e-9) for s in outcome.solutions)
    assert all(v == 0 for v in outcome.rewrite.changed.values())
    assert initializers(result.model) == initializers(quant_model)
    assert result.evaluation.fixed == result.evaluation.broken == 0


def test_unknown_layer_raises(digits: DigitsExample, sets: tuple[ImageSet, ImageSet]) -> None:
    with pytest.raises(ModelPairingError, match="nope"):
        repair(
            onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path)), *sets, RepairConfig(layers=("nope",))
        )


def test_list_layers(digits: DigitsExample) -> None:
    rows = list_layers(onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path)))
    assert [row.layer.name for row in rows] == ["/fc1/Gemm", "/fc2/Gemm"]
    assert all(row.pair is not None and row.reason == "" and row.weights == "int4 per-tensor" for row in rows)


def test_report_has_no_infinity(digits: DigitsExample, sets: tuple[ImageSet, ImageSet]) -> None:
    # DStar scores +inf for some neurons; JSON has no infinity, so the report writes null.
    config = RepairConfig(neurons=2)
    result = repair(onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path)), *sets, config)
    outcome = result.layers[0]
    scores = outcome.scores.copy()
    scores[outcome.selected[0]] = np.inf
    changed = dataclasses.replace(result, layers=[dataclasses.replace(outcome, scores=scores)])
    report = report_dict(changed, config, inputs={}, preprocessing="", output=None)
    per_neuron = report["layers"][0]["per_neuron"]
    assert per_neuron[0]["score"] is None
    assert per_neuron[1]["score"] == pytest.approx(scores[outcome.selected[1]])
    json.dumps(report, allow_nan=False)
