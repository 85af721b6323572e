"""The out-of-fold check the guarded search runs before it writes a model."""

from __future__ import annotations

import dataclasses
from math import comb
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample
from helpers_issue3 import run_fix, top1

from onnxrepair.activity import read_layer_activity
from onnxrepair.config import RepairConfig, SearchConfig
from onnxrepair.data import load_image_folder, preprocessing_for_input, stratified_folds, stratified_split
from onnxrepair.graph import input_spec, pair_layer
from onnxrepair.methods import repair_layer
from onnxrepair.repair import repair
from onnxrepair.search import confirm_methods, is_confirmed, sign_test_p_value


@pytest.mark.parametrize(
    ("wins", "losses", "expected"),
    [(0, 0, 1.0), (4, 0, 1 / 16), (5, 0, 1 / 32), (3, 3, 42 / 64), (0, 3, 1.0), (39, 18, None)],
)
def test_sign_test_p_value(wins: int, losses: int, expected: float | None) -> None:
    n = wins + losses
    if expected is None:  # the tail sum written out
        expected = sum(comb(n, k) for k in range(wins, n + 1)) / 2**n
    assert sign_test_p_value(wins, losses) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fixed", "broken", "gained", "lost", "confidence", "expected"),
    [
        (4, 0, None, None, 0.95, False),  # p = 0.0625: could be luck
        (5, 0, None, None, 0.95, True),  # p = 0.03125
        (39, 18, 31, 27, 0.95, True),
        (39, 18, 27, 31, 0.95, False),  # agreement up, accuracy down
        (7, 3, 5, 5, 0.95, False),
        (7, 3, 5, 5, 0.0, True),  # confidence 0: any net gain
        (3, 3, None, None, 0.0, False),  # no net gain is never a gain
    ],
)
def test_is_confirmed(
    fixed: int, broken: int, gained: int | None, lost: int | None, confidence: float, expected: bool
) -> None:
    assert is_confirmed(fixed, broken, gained, lost, confidence) is expected


def test_stratified_folds_deal_every_class_evenly() -> None:
    labels = np.repeat(np.arange(5), [10, 7, 4, 1, 13])
    folds = stratified_folds(labels, 4, seed=3)
    assert folds.shape == labels.shape and set(folds.tolist()) <= {0, 1, 2, 3}
    for cls in range(5):
        counts = np.bincount(folds[labels == cls], minlength=4)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(folds, stratified_folds(labels, 4, seed=3))
    assert not np.array_equal(folds, stratified_folds(labels, 4, seed=4))


@pytest.fixture(scope="module")
def digits_run(digits: DigitsExample):  # type: ignore[no-untyped-def]
    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    spec = input_spec(float_model)
    images = load_image_folder(digits.images, preprocessing_for_input(spec.name, spec.shape))
    repair_idx, val_idx = stratified_split(images.strata, 0.2, 0)
    repair_set, val_set = images.subset(repair_idx), images.subset(val_idx)
    config = RepairConfig(search=SearchConfig(budget=600.0, neuron_counts=(), confirm_folds=3))
    result = repair(float_model, quant_model, repair_set, val_set, config)
    return float_model, quant_model, repair_set, config, result


def test_confirmation_pools_out_of_fold_scores(digits_run) -> None:  # type: ignore[no-untyped-def]
    """Recomputed here: each fold scored by the kept methods re-solved without it, from QUANT."""
    float_model, quant_model, repair_set, config, result = digits_run
    assert result.layers, "the search kept nothing on its held-out part, so there is nothing to confirm"
    check = result.confirmation
    assert check is not None and check.folds == 3

    fold_of = stratified_folds(repair_set.strata, 3, config.seed)
    repaired = np.empty(len(repair_set), np.int64)
    for fold in range(3):
        fit = fold_of != fold
        model = quant_model
        for step in result.layers:
            pair = pair_layer(float_model, model, step.pair.float_layer.name)
            activity = read_layer_activity(float_model, model, pair, repair_set.x[fit], config.batch_size)
            neurons = step.repaired_neurons  # the neurons the search changed, re-solved on this fold's data
            model, _ = repair_layer(model, pair, activity, step.method, config.solve, config.seed, neurons=neurons)
        repaired[~fit] = top1(model, repair_set.x[~fit])
    everything = np.asarray(repair_set.x)  # a folder's rows are read from disk
    reference, quant = top1(float_model, everything), top1(quant_model, everything)
    assert check.fixed == np.sum((repaired == reference) & (quant != reference))
    assert check.broken == np.sum((repaired != reference) & (quant == reference))
    labels = repair_set.labels
    assert check.accuracy_gained == np.sum((repaired == labels) & (quant != labels))
    assert check.accuracy_lost == np.sum((repaired != labels) & (quant == labels))
    assert check.p_value == pytest.approx(sign_test_p_value(check.fixed, check.broken))
    assert check.confirmed is is_confirmed(check.fixed, check.broken, check.accuracy_gained, check.accuracy_lost, 0.95)
    assert (result.model is not None) is check.confirmed


def test_cli_writes_nothing_when_the_gain_is_not_confirmed(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At confidence 0.999999 the sign test needs >= 20 fixed and none broken: more than these digits allow."""
    output, report_path = tmp_path / "repaired.onnx", tmp_path / "report.json"
    args = [digits.float_path, digits.quant_path, digits.images, "-o", output, "--search", "--budget", "300"]
    run = run_fix(capsys, *args, "--confidence", "0.999999", report=report_path)
    assert run.code == 1, run.err
    assert not output.exists()
    report = run.report
    assert report["written"] is False
    check = report["search"]["confirmation"]
    assert check["confirmed"] is False and check["folds"] == 4
    assert check["p_value"] > 1e-6
    assert any(t["kept"] for t in report["search"]["tried"][1:])  # the held-out part alone would have written it
    text = " ".join(run.out.split())
    assert "out-of-fold" in text and "no model was written" in text


@pytest.mark.parametrize("bad", [["--confirm-folds", "1"], ["--confirm-folds", "-2"], ["--confidence", "1"]])
def test_cli_confirmation_options_are_checked(digits: DigitsExample, bad: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        run_fix(capsys, digits.float_path, digits.quant_path, digits.images, "--search", *bad)
    assert exc.value.code == 2


def test_confirmation_with_fewer_images_than_folds(digits_run) -> None:  # type: ignore[no-untyped-def]
    """Empty folds are skipped, not run through ONNX Runtime with zero rows."""
    float_model, quant_model, repair_set, config, result = digits_run
    tiny = repair_set.subset(np.arange(2))  # 3 folds: one of them is empty
    check = confirm_methods(float_model, quant_model, result.layers, tiny, dataclasses.replace(config))
    assert check.folds == 3 and check.fixed + check.broken <= 2


def test_nothing_kept_is_nothing_confirmed(digits_run) -> None:  # type: ignore[no-untyped-def]
    """No kept step: no fold is read or solved, and the check does not pass (it raised IndexError)."""
    float_model, quant_model, repair_set, config, _ = digits_run
    check = confirm_methods(float_model, quant_model, [], repair_set, config)
    assert not check.confirmed and check.fixed == check.broken == 0 and check.p_value == 1.0


def test_a_search_that_keeps_nothing_writes_nothing_even_if_a_rescore_differs(  # type: ignore[no-untyped-def]
    digits_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions of QUANT can differ in their last bits (another provider): an unchanged QUANT must not
    read as 'closer to FLOAT' and be written, or go on to an out-of-fold check of nothing."""
    import onnxrepair.repair as repair_module
    from onnxrepair.search import HoldoutScorer, Score

    float_model, quant_model, repair_set, config, _ = digits_run
    scores = iter([Score(0.9, 0.8, 0.2000002), Score(0.9, 0.8, 0.2000001)])  # QUANT twice, "closer" the 2nd time
    monkeypatch.setattr(HoldoutScorer, "score", lambda self, model: next(scores))
    monkeypatch.setattr(repair_module, "search_layer", lambda float_m, quant_m, *args, **kw: (quant_m, [], []))
    result = repair(float_model, quant_model, repair_set, repair_set, config)
    assert result.model is None and result.layers == [] and result.confirmation is None
