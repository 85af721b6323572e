"""Guarded search over repair methods (Algorithm 1: "otherwise try other combinations").

Each candidate method is applied on top of the best model found so far and
scored on a held-out part of the repair images that no solver sees; it is kept
only when it is better there on one figure and worse on none: agreement with
the float model's top-1 class, and accuracy when the images are labelled. So
the search never returns a model that scores worse than the one it started
from, and stops when its time budget is spent, with the best so far.

The held-out part is small and chose among many candidates, so a win there
can be noise. Before a model is written, `confirm_methods` applies the kept
methods again on folds of the whole repair set and asks for a significant
out-of-fold gain (repair.py writes nothing otherwise).

Candidates, cheapest and most often useful first: reconstruction (least
squares to the float pre-activation); bias correction; the joint
logit encoding on all classes (output layer only); the soft encoding over all
neurons and then over the top N for N in `neuron_counts`; logit on the top N;
the same for the integer encoding (a MILP: slower); the other metrics; the
paper's encoding last.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.activity import read_layer_activity
from onnxrepair.config import Encoding, Metric, RepairConfig, SearchConfig
from onnxrepair.data import ImageSet, stratified_folds
from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import LayerPair, pair_layer
from onnxrepair.methods import LayerRepair, Method, repair_layer
from onnxrepair.parallel import Executor
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.runtime import make_session, output_name, run_batched
from onnxrepair.solve import SolveStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    """A model's top-1 agreement with the float model (and accuracy, when labelled) on held-out images.

    `output_error` is the mean KL divergence of its class distribution from the float model's: a
    finer measure than top-1 agreement, which one layer's repair rarely moves on a few hundred images.
    """

    agreement: float
    accuracy: float | None
    output_error: float | None = None

    def beats(self, other: Score) -> bool:
        """Better on one figure and worse on none: agreement, and accuracy when both are labelled."""
        pairs = self._figures(other)
        return all(mine >= theirs for mine, theirs in pairs) and any(mine > theirs for mine, theirs in pairs)

    def improves_on(self, other: Score) -> bool:
        """What a guarded model must show before it is written: it beats `other`, or, where top-1 ties on a
        few hundred held-out images, it is closer to FLOAT's class distributions (lower divergence)."""
        if self.beats(other):
            return True
        if not all(mine == theirs for mine, theirs in self._figures(other)):
            return False
        if self.output_error is None or other.output_error is None:
            return False
        return self.output_error < other.output_error

    def _figures(self, other: Score) -> list[tuple[float, float]]:
        """(mine, theirs) for agreement, and for accuracy when both are labelled."""
        pairs = [(self.agreement, other.agreement)]
        if self.accuracy is not None and other.accuracy is not None:
            pairs.append((self.accuracy, other.accuracy))
        return pairs

    def helps_over(self, other: Score) -> bool:
        """The guard's test of one layer: the class distributions are closer to FLOAT's (lower divergence).

        Top-1 agreement on a few hundred held-out images moves by a few images either way with one
        layer's change (measured on EfficientNet-Lite0: a rule that also asked agreement not to drop
        rolled back 31 of 50 layers, most of which lowered the divergence); the whole model must still
        beat QUANT on agreement before anything is written.
        """
        if self.output_error is None or other.output_error is None:
            return self.beats(other)
        return self.output_error < other.output_error


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
    """Scores models on held-out images against the float model's top-1 classes and class scores."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        x: NDArray[np.float32],
        labels: NDArray[np.int64] | None,
        batch_size: int,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.x, self.labels, self.batch_size, self.providers = x, labels, batch_size, providers
        self.float_scores = class_scores(float_model, x, batch_size, "FLOAT", providers)
        self.float_top1 = np.argmax(self.float_scores, axis=1)

    def score(self, model: onnx.ModelProto) -> Score:
        return self.score_of(self.scores(model))

    def scores(self, model: onnx.ModelProto) -> NDArray[np.float32]:
        return class_scores(model, self.x, self.batch_size, "candidate", self.providers)

    def score_of(self, scores: NDArray[np.float32]) -> Score:
        top1 = np.argmax(scores, axis=1)
        accuracy = None if self.labels is None else float(np.mean(top1 == self.labels))
        return Score(float(np.mean(top1 == self.float_top1)), accuracy, divergence(self.float_scores, scores))


def divergence(float_scores: NDArray, scores: NDArray) -> float:
    """Mean KL(float || candidate) of the class distributions: softmax of the scores, or the scores themselves
    when FLOAT's already are probabilities (skl2onnx classifiers).

    FLOAT decides which, for both: a quantized model's probabilities come in steps of its output
    scale and need not sum to 1 within any tolerance, and read as logits they looked nearly uniform
    (on the MLP int4 every image then diverged by about 1.4 nats, whatever the repair).
    """
    probabilities = _are_probabilities(float_scores)
    reference, candidate = _distribution(float_scores, probabilities), _distribution(scores, probabilities)
    eps = 1e-12
    return float(np.mean(np.sum(reference * (np.log(reference + eps) - np.log(candidate + eps)), axis=1)))


def _are_probabilities(scores: NDArray) -> bool:
    values = np.asarray(scores, np.float64)
    return bool(np.all(values >= 0) and np.allclose(values.sum(axis=1), 1.0, atol=1e-3))


def _distribution(scores: NDArray, probabilities: bool) -> NDArray[np.float64]:
    values = np.asarray(scores, np.float64)
    if probabilities:
        values = np.maximum(values, 0.0)
        totals = values.sum(axis=1, keepdims=True)
        return np.where(totals > 0, values / np.where(totals > 0, totals, 1.0), 1.0 / values.shape[1])
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def class_scores(
    model: onnx.ModelProto,
    x: NDArray[np.float32],
    batch_size: int,
    role: str,
    providers: Sequence[str] | None = None,
) -> NDArray[np.float32]:
    """The model's class scores for every input, from a default (untapped) session."""
    name = output_name(model)
    return run_batched(make_session(model, role, providers), x, [name], batch_size)[name]


def top1_classes(
    model: onnx.ModelProto,
    x: NDArray[np.float32],
    batch_size: int,
    role: str,
    providers: Sequence[str] | None = None,
) -> NDArray[np.int64]:
    """The model's top-1 class for every input, from a default (untapped) session."""
    return np.argmax(class_scores(model, x, batch_size, role, providers), axis=1)


def candidate_methods(n_out: int, output_layer: bool, search: SearchConfig) -> list[Method]:
    """The methods to try on a layer with `n_out` neurons, in order, without duplicates."""
    counts = [n for n in sorted(set(search.neuron_counts)) if n < n_out]
    middle_first = sorted(counts, key=lambda n: abs(n - 10))  # N=10, the paper's default, first
    # reconstruction first: on every CNN measured it gains most, in one vectorised solve per layer
    methods = [
        Method(Encoding.RECONSTRUCT, Metric.EUCLID, n_out),
        Method(Encoding.BIAS_CORRECTION, Metric.EUCLID, n_out),
    ]
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


# A candidate is started only when the time left covers this much more than the longest
# any candidate has spent outside its solves (a held-out score can be slower the next time).
OVERHEAD_MARGIN = 1.25


def search_layer(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pair_of: Callable[[onnx.ModelProto], LayerPair],
    fit_x: NDArray[np.float32],
    scorer: HoldoutScorer,
    config: RepairConfig,
    deadline: float,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> tuple[onnx.ModelProto, list[LayerRepair], list[Trial]]:
    """Hill-climb over candidate methods for one layer; returns (best model, what it applied, every trial).

    Every candidate must finish by `deadline`, its held-out score included: one is started only
    when the time left covers the longest a candidate has spent outside its solves (at first, the
    held-out score of QUANT), with OVERHEAD_MARGIN, and its solves stop that long before the deadline. After a kept
    candidate the layer is read again (QUANT only: FLOAT's side has not changed) only when another
    candidate could still run after the read.
    """
    assert config.search is not None
    progress = progress or NoProgress()
    providers = config.providers or None
    clock = time.perf_counter
    started = clock()
    best_model, best_score = quant_model, scorer.score(quant_model)
    # what a candidate costs besides its solves (scoring, rewriting), with room for a slower score
    overhead = OVERHEAD_MARGIN * (clock() - started)
    pair = pair_of(best_model)
    name, n_out = pair.float_layer.name, pair.quant_layer.n_out
    read_started = clock()
    activity = read_layer_activity(float_model, best_model, pair, fit_x, config.batch_size, providers=providers)
    read_seconds = clock() - read_started
    methods = candidate_methods(n_out, activity.is_output_layer(), config.search)
    applied: list[LayerRepair] = []
    trials = [Trial(name, "unrepaired", best_score, True, 0.0)]
    with progress.task(f"searching {name}", len(methods)) as advance:
        for method in methods:
            if clock() + overhead >= deadline:  # it could not be scored in time
                break
            trial_started = clock()
            label = method.describe(n_out)
            try:
                model, outcome = repair_layer(
                    best_model,
                    pair,
                    activity,
                    method,
                    config.solve,
                    config.seed,
                    deadline=deadline - overhead,
                    executor=executor,
                )
            except UnsupportedModelError as exc:
                trials.append(Trial(name, label, None, False, clock() - trial_started, str(exc)))
                continue
            score = scorer.score(model)
            accepted = score.beats(best_score)
            seconds = clock() - trial_started
            overhead = max(overhead, OVERHEAD_MARGIN * (seconds - outcome.solve_seconds))
            trials.append(Trial(name, label, score, accepted, seconds))
            logger.info("%s: %s -> agreement %.4f%s", name, label, score.agreement, " (kept)" * accepted)
            advance(1)
            if not accepted:
                continue
            best_model, best_score = model, score
            applied.append(outcome)
            if clock() + read_seconds + overhead >= deadline:  # no candidate could follow the read
                break
            # the next candidate starts from the patched model: read its spectra again
            read_started = clock()
            pair = pair_of(best_model)
            activity = read_layer_activity(
                float_model,
                best_model,
                pair,
                fit_x,
                config.batch_size,
                providers=providers,
                float_rows=activity.float_pre,
                float_scores=activity.float_scores,
            )
            read_seconds = clock() - read_started
    return best_model, applied, trials


@dataclass(frozen=True)
class Confirmation:
    """Out-of-fold evidence, pooled over the whole repair set, that the methods the search kept help.

    The held-out part that chose the methods is small (a 1-3 image difference
    there is noise) and was used to choose among many candidates, so its score
    is optimistic. Here the kept methods are applied again, from QUANT, once
    per fold with that fold left out, and each fold is scored by the model
    solved without it: every repair image is scored once, by a model that never
    saw it.

    Attributes:
        folds: how many folds.
        fixed, broken: images where QUANT disagreed with FLOAT and the re-solved
            model agrees, and the other way round.
        accuracy_gained, accuracy_lost: the same for the labels (None when unlabelled).
        p_value: one-sided exact sign test of fixed against broken: the chance of
            at least this many fixed among fixed + broken if the methods did nothing.
        confirmed: fixed > broken, p_value <= 1 - confidence, and no net loss of accuracy.
        unfinished: neuron solves the check left out because its time ran out
            (it gets twice the kept methods' solve time per fold, at least a
            minute); those neurons stay unchanged in that fold's model, which
            can only weaken the evidence.
    """

    folds: int
    fixed: int
    broken: int
    accuracy_gained: int | None
    accuracy_lost: int | None
    p_value: float
    confirmed: bool
    seconds: float
    unfinished: int = 0


def sign_test_p_value(wins: int, losses: int) -> float:
    """P(at least `wins` successes in wins + losses fair coin flips): one-sided exact sign test."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def confirm_methods(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    steps: list[LayerRepair],
    repair_set: ImageSet,
    config: RepairConfig,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> Confirmation:
    """Cross-validate the kept methods over `repair_set` (see `Confirmation`).

    Each kept method is applied to the neurons it changed in the search (so a
    method the search's budget cut short is not completed here).
    """
    assert config.search is not None
    progress = progress or NoProgress()
    started = time.perf_counter()
    folds = config.search.confirm_folds
    if not steps:  # nothing was kept: nothing to confirm
        return Confirmation(folds, 0, 0, None, None, 1.0, False, 0.0)
    fold_of = stratified_folds(repair_set.strata, folds, config.seed)
    providers = config.providers or None
    # The first kept step's layer, read once over every repair image: both models' top-1 classes
    # and each fold's rows for that step (before: both models again per fold, and two more passes)
    first = pair_layer(float_model, quant_model, steps[0].pair.float_layer.name)
    everything = read_layer_activity(
        float_model, quant_model, first, repair_set.x, config.batch_size, providers=providers, executor=executor
    )
    assert everything.float_scores is not None and everything.quant_scores is not None
    float_top1 = np.argmax(everything.float_scores, axis=1)
    quant_top1 = np.argmax(everything.quant_scores, axis=1)
    repaired_top1 = quant_top1.copy()
    # each fold costs about what the kept methods cost in the search; neurons not started by then stay unchanged
    deadline = started + max(_MIN_CONFIRM_SECONDS, 2 * folds * sum(step.solve_seconds for step in steps))
    unfinished = 0
    with progress.task(f"confirming on {folds} folds", folds) as advance:
        for fold in range(folds):
            fit, scored = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
            if len(scored) == 0 or len(fit) == 0:  # fewer images than folds
                advance(1)
                continue
            fit_x = repair_set.subset(fit).x  # not a copy when the rows are on disk
            model = quant_model
            read, read_all = everything, True  # the last read of the layer, and whether of every image
            for index, step in enumerate(steps):
                name = step.pair.float_layer.name
                pair = pair_layer(float_model, model, name)
                if index > 0 and name == steps[index - 1].pair.float_layer.name:
                    # only this layer's weights changed since its last read: FLOAT's side is as it was
                    read = read_layer_activity(
                        float_model,
                        model,
                        pair,
                        repair_set.x if read_all else fit_x,
                        config.batch_size,
                        providers=providers,
                        float_rows=read.float_pre,
                        float_scores=read.float_scores,
                        executor=executor,
                    )
                elif index > 0:
                    read = read_layer_activity(
                        float_model, model, pair, fit_x, config.batch_size, providers=providers, executor=executor
                    )
                    read_all = False
                activity = read.of_images(fit) if read_all else read
                try:
                    model, outcome = repair_layer(
                        model,
                        pair,
                        activity,
                        step.method,
                        config.solve,
                        config.seed,
                        deadline=deadline,
                        executor=executor,
                        neurons=step.repaired_neurons,
                    )
                except UnsupportedModelError:  # e.g. a fold too small to hold images out of a reconstruction
                    unfinished += len(step.repaired_neurons)
                    continue
                unfinished += sum(s.status is SolveStatus.TIME_LIMIT for s in outcome.solutions)
            scored_x = repair_set.subset(scored).x
            repaired_top1[scored] = top1_classes(model, scored_x, config.batch_size, "candidate", providers)
            advance(1)
    repaired_agrees, quant_agrees = repaired_top1 == float_top1, quant_top1 == float_top1
    fixed, broken = int(np.sum(repaired_agrees & ~quant_agrees)), int(np.sum(quant_agrees & ~repaired_agrees))
    gained = lost = None
    if repair_set.labels is not None:
        repaired_right, quant_right = repaired_top1 == repair_set.labels, quant_top1 == repair_set.labels
        gained, lost = int(np.sum(repaired_right & ~quant_right)), int(np.sum(quant_right & ~repaired_right))
    p_value = sign_test_p_value(fixed, broken)
    confirmed = is_confirmed(fixed, broken, gained, lost, config.search.confidence)
    seconds = time.perf_counter() - started
    return Confirmation(folds, fixed, broken, gained, lost, p_value, confirmed, seconds, unfinished)


_MIN_CONFIRM_SECONDS = 60.0


def is_confirmed(fixed: int, broken: int, gained: int | None, lost: int | None, confidence: float) -> bool:
    """More fixed than broken, significantly so at `confidence`, and no net loss of accuracy."""
    accuracy_kept = gained is None or lost is None or gained >= lost
    return fixed > broken and sign_test_p_value(fixed, broken) <= 1.0 - confidence and accuracy_kept
