"""localize.py: the seven metrics against counts worked out by hand, their edges, and ranking."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxrepair.config import Metric
from onnxrepair.localize import rank_neurons, suspiciousness
from onnxrepair.spectrum import Spectrum


def spectrum(af: list[int], nf: list[int], as_: list[int], ns: list[int]) -> Spectrum:
    """A Spectrum from per-neuron counts; every neuron must see the same inputs."""
    n_failing = {a + n for a, n in zip(af, nf, strict=True)}
    n_passing = {a + n for a, n in zip(as_, ns, strict=True)}
    assert len(n_failing) == 1 and len(n_passing) == 1, "inconsistent hand counts"
    return Spectrum(
        af=np.array(af, np.int64),
        nf=np.array(nf, np.int64),
        as_=np.array(as_, np.int64),
        ns=np.array(ns, np.int64),
        n_failing=n_failing.pop(),
        n_passing=n_passing.pop(),
    )


# Four failing and six passing inputs; three neurons:
#   neuron 0: af=3 nf=1 as=2 ns=4
#   neuron 1: af=1 nf=3 as=0 ns=6
#   neuron 2: af=0 nf=4 as=6 ns=0
HAND = spectrum(af=[3, 1, 0], nf=[1, 3, 4], as_=[2, 0, 6], ns=[4, 6, 0])

EXPECTED = {
    # (af/(af+nf)) / (af/(af+nf) + as/(as+ns)):
    #   n0: (3/4) / (3/4 + 2/6) = (9/12) / (13/12) = 9/13
    #   n1: (1/4) / (1/4 + 0/6) = 1
    #   n2: (0/4) / (0/4 + 6/6) = 0
    Metric.TARANTULA: [9 / 13, 1.0, 0.0],
    # af / sqrt((af+as)(af+nf)):  n0: 3/sqrt(5*4)   n1: 1/sqrt(1*4) = 1/2   n2: 0/sqrt(6*4) = 0
    Metric.OCHIAI: [3 / math.sqrt(20), 0.5, 0.0],
    # af^2 / (as+nf):  n0: 9/(2+1) = 3   n1: 1/(0+3)   n2: 0/(6+4) = 0
    Metric.DSTAR: [3.0, 1 / 3, 0.0],
    # af / (af+nf+as):  n0: 3/6   n1: 1/4   n2: 0/10
    Metric.JACCARD: [0.5, 0.25, 0.0],
    # |af/(af+nf) - as/(as+ns)|:  n0: |3/4 - 2/6| = 5/12   n1: |1/4 - 0| = 1/4   n2: |0 - 6/6| = 1
    Metric.AMPLE: [5 / 12, 0.25, 1.0],
    # sqrt(af + ns):  n0: sqrt(3+4)   n1: sqrt(1+6)   n2: sqrt(0+0)
    Metric.EUCLID: [math.sqrt(7), math.sqrt(7), 0.0],
    # af - h:  n0: as=2 -> h=2 -> 3-2 = 1   n1: as=0 -> h=0 -> 1   n2: as=6 -> h=2+0.1*4=2.4 -> -2.4
    Metric.WONG3: [1.0, 1.0, -2.4],
}


@pytest.mark.parametrize("metric", list(EXPECTED), ids=lambda m: m.value)
def test_metric_matches_hand_computation(metric: Metric) -> None:
    scores = suspiciousness(HAND, metric)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, EXPECTED[metric], rtol=1e-12, atol=1e-12)


def test_every_paper_metric_is_covered() -> None:
    assert set(EXPECTED) == set(Metric) - {Metric.RANDOM}


@pytest.mark.parametrize("metric", list(Metric), ids=lambda m: m.value)
def test_zero_numerator_and_denominator_give_zero_without_warnings(metric: Metric) -> None:
    # No input at all: every count is 0, so every ratio is 0/0.
    empty = spectrum(af=[0, 0], nf=[0, 0], as_=[0, 0], ns=[0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning for 0/0 would be an error here
        scores = suspiciousness(empty, metric)
    assert scores.shape == (2,)
    assert np.all(np.isfinite(scores))
    if metric is not Metric.RANDOM:
        np.testing.assert_array_equal(scores, [0.0, 0.0])


def test_tarantula_with_no_passing_inputs() -> None:
    # as+ns = 0: the pass rate is 0/0 = 0, so Tarantula = (af/(af+nf)) / (af/(af+nf) + 0) = 1 when af > 0.
    s = spectrum(af=[2, 0], nf=[1, 3], as_=[0, 0], ns=[0, 0])
    np.testing.assert_array_equal(suspiciousness(s, Metric.TARANTULA), [1.0, 0.0])
    # Ample: |2/3 - 0| and |0 - 0|
    np.testing.assert_allclose(suspiciousness(s, Metric.AMPLE), [2 / 3, 0.0])


def test_dstar_zero_denominator_with_failures_ranks_first() -> None:
    # neuron 0: af=1 nf=3 as=0 ns=6 -> 1/3
    # neuron 1: af=4 nf=0 as=0 ns=6 -> as+nf = 0 with af > 0: most suspicious (+inf)
    # neuron 2: af=3 nf=1 as=0 ns=6 -> 9/1 = 9, the largest finite score
    # neuron 3: af=0 nf=4 as=0 ns=6 -> 0/4 = 0
    s = spectrum(af=[1, 4, 3, 0], nf=[3, 0, 1, 4], as_=[0, 0, 0, 0], ns=[6, 6, 6, 6])
    scores = suspiciousness(s, Metric.DSTAR)
    assert np.isposinf(scores[1])
    np.testing.assert_allclose(scores[[0, 2, 3]], [1 / 3, 9.0, 0.0])
    assert list(rank_neurons(scores)) == [1, 2, 0, 3]


def test_dstar_zero_denominator_without_failures_is_zero() -> None:
    # af = 0 and as+nf = 0: no failing input at all and the neuron never flips -> 0, not inf or nan.
    s = spectrum(af=[0], nf=[0], as_=[0], ns=[5])
    assert suspiciousness(s, Metric.DSTAR)[0] == 0.0


@pytest.mark.parametrize(
    ("as_", "h"),
    [
        # as <= 2: h = as
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        # 2 < as <= 10: h = 2 + 0.1 (as - 2)
        (3, 2.1),
        (7, 2.5),
        (10, 2.8),
        # as > 10: h = 2.8 + 0.001 (as - 10)
        (11, 2.801),
        (110, 2.9),
    ],
)
def test_wong3_branches(as_: int, h: float) -> None:
    af = 5
    s = spectrum(af=[af], nf=[1], as_=[as_], ns=[200 - as_])
    np.testing.assert_allclose(suspiciousness(s, Metric.WONG3), [af - h], rtol=0, atol=1e-12)


def test_wong3_is_continuous_at_the_branch_points() -> None:
    # h(2) = 2 from both sides' formulas and h(10) = 2.8 from both: the score is monotone in as.
    s = spectrum(af=[5] * 13, nf=[0] * 13, as_=list(range(13)), ns=[20 - a for a in range(13)])
    scores = suspiciousness(s, Metric.WONG3)
    assert np.all(np.diff(scores) < 0)


def test_random_metric_is_seeded() -> None:
    s = spectrum(af=[1] * 50, nf=[0] * 50, as_=[0] * 50, ns=[1] * 50)
    first = rank_neurons(suspiciousness(s, Metric.RANDOM, seed=7))
    again = rank_neurons(suspiciousness(s, Metric.RANDOM, seed=7))
    other = rank_neurons(suspiciousness(s, Metric.RANDOM, seed=8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert sorted(first) == list(range(50))


def test_random_metric_ignores_the_counts() -> None:
    # A random baseline that looked at the counts would not be a baseline.
    a = spectrum(af=[1, 0, 3], nf=[2, 3, 0], as_=[0, 1, 2], ns=[2, 1, 0])
    b = spectrum(af=[0, 3, 1], nf=[3, 0, 2], as_=[2, 0, 1], ns=[0, 2, 1])
    np.testing.assert_array_equal(suspiciousness(a, Metric.RANDOM, 3), suspiciousness(b, Metric.RANDOM, 3))


def test_seed_does_not_change_deterministic_metrics() -> None:
    for metric in EXPECTED:
        np.testing.assert_array_equal(suspiciousness(HAND, metric, seed=1), suspiciousness(HAND, metric, seed=2))


def test_rank_neurons_orders_by_score_and_breaks_ties_by_index() -> None:
    scores = np.array([1.0, 3.0, 3.0, np.inf, 0.0, 3.0, -np.inf, 1.0])
    # inf first; the three 3.0 in index order; then the two 1.0 in index order; 0; -inf last.
    assert rank_neurons(scores).tolist() == [3, 1, 2, 5, 0, 7, 4, 6]
    assert rank_neurons(scores).dtype == np.int64


def test_ranking_of_hand_spectrum() -> None:
    # Euclid ties neurons 0 and 1 at sqrt(7): the lower index goes first.
    assert rank_neurons(suspiciousness(HAND, Metric.EUCLID)).tolist() == [0, 1, 2]
    # Ample: 1 > 5/12 > 1/4
    assert rank_neurons(suspiciousness(HAND, Metric.AMPLE)).tolist() == [2, 0, 1]


@given(st.lists(st.integers(min_value=-3, max_value=3).map(float), min_size=1, max_size=30))
def test_rank_neurons_property(values: list[float]) -> None:
    scores = np.array(values)
    order = rank_neurons(scores)
    assert sorted(order.tolist()) == list(range(len(values)))
    ranked = scores[order]
    assert np.all(ranked[:-1] >= ranked[1:])
    for a, b in zip(order[:-1], order[1:], strict=True):
        if scores[a] == scores[b]:
            assert a < b
