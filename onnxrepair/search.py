"""Guarded search over repair methods (Algorithm 1: "otherwise try other combinations").

Each candidate method is applied on top of the best model found so far and
scored on a held-out part of the repair images that no solver sees; it is kept
only when it is better there on one figure and worse on none: agreement with
the float model's top-1 class, and accuracy when the images are labelled. So
the search never returns a model that scores worse than the one it started
from, and stops when its time
budget is spent, with the best so far.

Candidates, cheapest and most often useful first: bias correction; the joint
logit encoding on all classes (output layer only); the soft encoding over all
neurons and then over the top N for N in `neuron_counts`; logit on the top N;
the same for the integer encoding (a MILP: slower); the other metrics; the
paper's encoding last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.config import Encoding, Metric, RepairConfig, SearchConfig
from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import LayerPair
from onnxrepair.methods import LayerRepair, Method, read_layer_activity, repair_layer
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.runtime import make_session, output_name, run_batched

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    """A model's top-1 agreement with the float model (and accuracy, when labelled) on held-out images."""

    agreement: float
    accuracy: float | None

    def beats(self, other: Score) -> bool:
        """Better on one figure and worse on none: agreement, and accuracy when both are labelled."""
        pairs = [(self.agreement, other.agreement)]
        if self.accuracy is not None and other.accuracy is not None:
            pairs.append((self.accuracy, other.accuracy))
        return all(mine >= theirs for mine, theirs in pairs) and any(mine > theirs for mine, theirs in pairs)


@dataclass(frozen=True)
class Trial:
    """One configuration the search tried, with its held-out score."""

    layer: str
    method: str
    score: Score | None
    accepted: bool
    seconds: float
    note: str = ""


class HoldoutScorer:
    """Scores models on held-out images against the float model's top-1 classes."""

    def __init__(
        self, float_model: onnx.ModelProto, x: NDArray[np.float32], labels: NDArray[np.int64] | None, batch_size: int
    ) -> None:
        self.x, self.labels, self.batch_size = x, labels, batch_size
        self.float_top1 = self._top1(float_model, "FLOAT")

    def score(self, model: onnx.ModelProto) -> Score:
        top1 = self._top1(model, "candidate")
        accuracy = None if self.labels is None else float(np.mean(top1 == self.labels))
        return Score(float(np.mean(top1 == self.float_top1)), accuracy)

    def _top1(self, model: onnx.ModelProto, role: str) -> NDArray[np.int64]:
        name = output_name(model)
        scores = run_batched(make_session(model, role), self.x, [name], self.batch_size)[name]
        return np.argmax(scores, axis=1)


def candidate_methods(n_out: int, output_layer: bool, search: SearchConfig) -> list[Method]:
    """The methods to try on a layer with `n_out` neurons, in order, without duplicates."""
    counts = [n for n in sorted(set(search.neuron_counts)) if n < n_out]
    middle_first = sorted(counts, key=lambda n: abs(n - 10))  # N=10, the paper's default, first
    methods = [Method(Encoding.BIAS_CORRECTION, Metric.EUCLID, n_out)]
    if output_layer:
        methods.append(Method(Encoding.LOGIT, Metric.EUCLID, n_out))
    # soft is a fast LP; integer is a MILP: slower, but exact on the integer grid
    for encoding in (Encoding.SOFT, Encoding.INTEGER):
        methods.append(Method(encoding, Metric.EUCLID, n_out))
        methods.extend(Method(encoding, Metric.EUCLID, n) for n in middle_first)
        if output_layer and encoding is Encoding.SOFT:
            methods.extend(Method(Encoding.LOGIT, Metric.EUCLID, n) for n in middle_first)
    others = [m for m in Metric if m is not Metric.EUCLID]
    methods.extend(Method(Encoding.SOFT, metric, n) for metric in others for n in middle_first[:1])
    methods.append(Method(Encoding.PAPER, Metric.EUCLID, middle_first[0] if middle_first else n_out))
    return list(dict.fromkeys(methods))


def search_layer(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pair_of: Callable[[onnx.ModelProto], LayerPair],
    fit_x: NDArray[np.float32],
    scorer: HoldoutScorer,
    config: RepairConfig,
    deadline: float,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, list[LayerRepair], list[Trial]]:
    """Hill-climb over candidate methods for one layer; returns (best model, what it applied, every trial)."""
    assert config.search is not None
    progress = progress or NoProgress()
    best_model, best_score = quant_model, scorer.score(quant_model)
    pair = pair_of(best_model)
    name, n_out = pair.float_layer.name, pair.quant_layer.n_out
    activity = read_layer_activity(float_model, best_model, pair, fit_x, config.batch_size)
    methods = candidate_methods(n_out, activity.is_output_layer(), config.search)
    applied: list[LayerRepair] = []
    trials = [Trial(name, "unrepaired", best_score, True, 0.0)]
    with progress.task(f"searching {name}", len(methods)) as advance:
        for method in methods:
            if time.perf_counter() >= deadline:
                break
            started = time.perf_counter()
            label = method.describe(n_out)
            try:
                model, outcome = repair_layer(
                    best_model, pair, activity, method, config.solve, config.seed, deadline=deadline
                )
            except UnsupportedModelError as exc:
                trials.append(Trial(name, label, None, False, time.perf_counter() - started, str(exc)))
                continue
            score = scorer.score(model)
            accepted = score.beats(best_score)
            trials.append(Trial(name, label, score, accepted, time.perf_counter() - started))
            logger.info("%s: %s -> agreement %.4f%s", name, label, score.agreement, " (kept)" * accepted)
            if accepted:
                best_model, best_score = model, score
                applied.append(outcome)
                # the next candidate starts from the patched model: read its spectra again
                pair = pair_of(best_model)
                activity = read_layer_activity(float_model, best_model, pair, fit_x, config.batch_size)
            advance(1)
    return best_model, applied, trials
