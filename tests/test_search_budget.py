"""Issue 14.6: the guarded search's candidates finish within its budget, and the reads it repeats are cheaper.

The budget test runs `search_layer` on a fake clock: scoring a model and reading a
layer each take 10 "seconds", a candidate's solve 1, so which candidates start is
decided by the schedule alone, never by how loaded this machine is.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_conv import cnn, images  # noqa: F401  (the CNN fixture: conv layers with every geometry)

from onnxrepair import search
from onnxrepair.activity import read_layer_activity
from onnxrepair.config import RepairConfig, SearchConfig
from onnxrepair.graph import layer_parameters, pair_layer
from onnxrepair.rewrite import apply_deltas
from onnxrepair.search import Score, search_layer

SCORE_SECONDS, READ_SECONDS, SOLVE_SECONDS = 10.0, 10.0, 1.0


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Schedule:
    """What the fake search did: when each candidate's solves were told to stop, when it returned."""

    clock: FakeClock
    improving: bool
    solve_deadlines: list[float] = field(default_factory=list)
    reads: int = 0
    scored: int = 0

    def score(self, model: object) -> Score:
        self.clock.now += SCORE_SECONDS
        self.scored += 1
        # each candidate scores better than the last one when improving, else no candidate beats QUANT
        return Score(0.5 + 0.01 * self.scored if self.improving else 0.5, None, None)

    def read(self, *args: object, **kwargs: object) -> object:
        self.clock.now += READ_SECONDS
        self.reads += 1
        return types.SimpleNamespace(is_output_layer=lambda: False, float_pre=None, float_scores=None)

    def repair(self, model: object, *args: object, deadline: float, **kwargs: object) -> tuple[object, object]:
        self.solve_deadlines.append(deadline)
        self.clock.now += SOLVE_SECONDS
        return object(), types.SimpleNamespace(solve_seconds=SOLVE_SECONDS)


@pytest.mark.parametrize("improving", [True, False])
@pytest.mark.parametrize("deadline", [35.0, 45.0, 80.0])
def test_every_candidate_is_scored_before_the_deadline(
    monkeypatch: pytest.MonkeyPatch, improving: bool, deadline: float
) -> None:
    """Before: a candidate started whenever the deadline had not passed yet, and a kept one was
    followed by a full read of the layer: 41 or 42 of a 35 s budget."""
    clock = FakeClock()
    schedule = Schedule(clock, improving)
    monkeypatch.setattr(search, "time", types.SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(search, "read_layer_activity", schedule.read)
    monkeypatch.setattr(search, "repair_layer", schedule.repair)
    layer = types.SimpleNamespace(
        float_layer=types.SimpleNamespace(name="dense"), quant_layer=types.SimpleNamespace(n_out=10)
    )
    config = RepairConfig(search=SearchConfig(budget=deadline, neuron_counts=(5,), confirm_folds=0))

    _, applied, trials = search_layer(
        None,
        None,
        lambda model: layer,
        None,
        schedule,
        config,
        deadline,  # type: ignore[arg-type]
    )

    assert clock.now <= deadline
    tried = len(trials) - 1
    assert tried >= 1  # 20 s of the budget go to QUANT's score and the first read; one candidate fits
    assert len(schedule.solve_deadlines) == tried
    # a candidate's solves stop early enough for its score to come in before the deadline
    assert all(stop <= deadline - search.OVERHEAD_MARGIN * SCORE_SECONDS for stop in schedule.solve_deadlines)
    assert len(applied) == (tried if improving else 0)
    # no candidate was left out that would have fitted: after the last one there was no room for another
    read_after = READ_SECONDS if improving else 0.0
    another = read_after + search.OVERHEAD_MARGIN * (SOLVE_SECONDS + SCORE_SECONDS)
    assert clock.now + another > deadline or tried == len(
        search.candidate_methods(10, False, config.search)  # type: ignore[arg-type]
    )


def test_a_layer_read_again_after_its_own_change_needs_only_quant(cnn: dict[str, Path]) -> None:  # noqa: F811
    """The search (and the out-of-fold check) read a layer again after changing only its weights: FLOAT's
    rows and scores are passed in and FLOAT is not run; the rows are those of a full read, conv positions too."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    x = images(cnn["repair"], 30).x
    for name in ["/c1/Conv", "/dw/Conv", "/g2/Conv", "/fc/Gemm"]:
        pair = pair_layer(float_model, quant, name)
        before = read_layer_activity(float_model, quant, pair, x, 8, positions_per_image=4)
        layer = pair.quant_layer
        weights, _ = layer_parameters(quant, layer)
        step = np.max(np.abs(weights[0])) / 64
        repaired, _ = apply_deltas(quant, layer, {0: np.full(layer.n_in, step)})
        pair_after = pair_layer(float_model, repaired, name)
        full = read_layer_activity(float_model, repaired, pair_after, x, 8, positions_per_image=4)
        quant_only = read_layer_activity(
            float_model,
            repaired,
            pair_after,
            x,
            8,
            positions_per_image=4,
            float_rows=before.float_pre,
            float_scores=before.float_scores,
        )
        assert not np.array_equal(full.quant_pre, before.quant_pre)  # the change shows
        for part in ["float_scores", "quant_scores", "float_pre", "quant_pre", "quant_inputs", "row_image"]:
            np.testing.assert_array_equal(getattr(quant_only, part), getattr(full, part), err_msg=part)


def test_float_rows_without_float_scores_cannot_give_scores(cnn: dict[str, Path]) -> None:  # noqa: F811
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    pair = pair_layer(float_model, quant, "/dw/Conv")
    x = images(cnn["repair"], 8).x
    rows = read_layer_activity(float_model, quant, pair, x, 8, positions_per_image=2).float_pre
    with pytest.raises(ValueError, match="class scores"):
        read_layer_activity(float_model, quant, pair, x, 8, positions_per_image=2, float_rows=rows)


def test_the_rows_of_some_images_are_those_images_rows(cnn: dict[str, Path]) -> None:  # noqa: F811
    """LayerActivity.of_images: a fold's part of a read of every image, renumbered from 0."""
    float_model, quant = onnx.load(str(cnn["float"])), onnx.load(str(cnn["qdq_s8_tensor"]))
    pair = pair_layer(float_model, quant, "/g2/Conv")
    x = images(cnn["repair"], 24).x
    everything = read_layer_activity(float_model, quant, pair, x, 8, positions_per_image=3)
    chosen = np.array([1, 2, 7, 20, 23])
    part = everything.of_images(chosen)
    assert part.float_scores is not None and everything.float_scores is not None
    np.testing.assert_array_equal(part.float_scores, everything.float_scores[chosen])
    assert np.array_equal(np.unique(part.row_image), np.arange(len(chosen)))
    for k, image in enumerate(chosen):
        mine, theirs = part.row_image == k, everything.row_image == image
        assert mine.sum() == theirs.sum() == 3
        np.testing.assert_array_equal(part.quant_inputs[mine], everything.quant_inputs[theirs])
        np.testing.assert_array_equal(part.float_pre[mine], everything.float_pre[theirs])
        np.testing.assert_array_equal(part.quant_pre[mine], everything.quant_pre[theirs])


def test_a_neuron_solve_never_runs_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a neuron started with 0.1 s left was given a full second (the 120 s search ended at 120.1 s)."""
    import time

    from onnxrepair import methods
    from onnxrepair.config import SolveConfig
    from onnxrepair.solve import SolveStatus

    limits: list[float] = []
    monkeypatch.setattr(methods, "solve_neuron", lambda problem, config: limits.append(config.time_limit) or "solved")
    problem = types.SimpleNamespace(neuron=3)
    config = SolveConfig(time_limit=60.0)

    assert methods.solve_before(problem, config, time.time() + 0.4) == "solved"  # type: ignore[arg-type]
    assert 0.0 < limits[0] <= 0.4
    late = methods.solve_before(problem, config, time.time() + 0.01)  # type: ignore[arg-type]
    assert late.status is SolveStatus.TIME_LIMIT and "budget" in late.reason and len(limits) == 1
    assert methods.solve_before(problem, config, None) == "solved" and limits[1] == 60.0  # type: ignore[arg-type]


def test_a_joint_program_is_not_started_after_the_deadline(digits) -> None:  # type: ignore[no-untyped-def]
    """The out-of-fold check passes its deadline to every step: a logit step past it solved with a
    0.05 s limit instead of being left out (a neuron's solve in the same place was left out)."""
    import time

    from onnxrepair.config import Encoding, Metric, SolveConfig
    from onnxrepair.methods import Method, repair_layer
    from onnxrepair.solve import SolveStatus

    float_model, quant = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    pair = pair_layer(float_model, quant, None)
    activity = read_layer_activity(float_model, quant, pair, digits.x[:200], 64)
    method = Method(Encoding.LOGIT, Metric.EUCLID, 3)
    late = time.perf_counter() - 1.0
    model, outcome = repair_layer(quant, pair, activity, method, SolveConfig(), deadline=late)
    assert outcome.solutions and all(s.status is SolveStatus.TIME_LIMIT for s in outcome.solutions)
    assert all("budget" in s.reason for s in outcome.solutions)
    assert sum(outcome.rewrite.changed.values()) == 0
