"""evaluate.py: accuracy, agreement, fixed and broken counts on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from onnxrepair.evaluation import evaluate_scores


def one_hot(classes: list[int], n: int = 3) -> np.ndarray:
    scores = np.zeros((len(classes), n))
    scores[np.arange(len(classes)), classes] = 1.0
    return scores


def test_evaluate_by_hand() -> None:
    f = one_hot([0, 1, 2, 0, 1])
    q = one_hot([0, 2, 2, 1, 1])
    r = one_hot([0, 1, 1, 1, 0])
    labels = np.array([0, 1, 2, 1, 1])
    ev = evaluate_scores(f, q, r, labels)
    # accuracy: float T T T F T = 4/5, quant T F T T T = 4/5, repaired T T F T F = 3/5
    assert (ev.float_accuracy, ev.quant_accuracy, ev.repaired_accuracy) == pytest.approx((0.8, 0.8, 0.6))
    # agreement with float: quant T F T F T = 3/5, repaired T T F F F = 2/5
    assert (ev.quant_agreement, ev.repaired_agreement) == pytest.approx((0.6, 0.4))
    # fixed: quant disagreed, repaired agrees -> input 1; broken: quant agreed, repaired does not -> 2 and 4
    assert (ev.fixed, ev.broken) == (1, 2)
    assert ev.size == 5


def test_evaluate_without_labels() -> None:
    f = one_hot([0, 1])
    ev = evaluate_scores(f, f, one_hot([1, 1]), None)
    assert ev.float_accuracy is ev.quant_accuracy is ev.repaired_accuracy is None
    assert (ev.quant_agreement, ev.repaired_agreement, ev.fixed, ev.broken) == (1.0, 0.5, 0, 1)


def test_identical_models_agree() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 10))
    ev = evaluate_scores(scores, scores, scores, rng.integers(0, 10, 50))
    assert ev.quant_agreement == ev.repaired_agreement == 1.0
    assert ev.fixed == ev.broken == 0
    assert ev.float_accuracy == ev.quant_accuracy == ev.repaired_accuracy
