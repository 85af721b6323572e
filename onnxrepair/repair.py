"""The repair pipeline: for each layer, a method (or the guarded search), then evaluation.

Takes models and image arrays, returns the repaired model and what happened;
it opens no file and prints nothing (progress goes through a `Progress` sink
that the CLI provides).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxrepair.activity import FloatTargets
from onnxrepair.config import Encoding, RepairConfig
from onnxrepair.data import ImageSet, stratified_split
from onnxrepair.errors import ModelPairingError, OnnxRepairError
from onnxrepair.evaluation import Evaluation, evaluate_scores
from onnxrepair.graph import (
    Layer,
    LayerPair,
    check_models_match,
    describe_parameter,
    find_layers,
    pair_layer,
)
from onnxrepair.methods import LayerRepair, Method, repair_layer
from onnxrepair.parallel import Executor, close_executor, make_executor
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.readers import InputReader, KeptReader, LayerReader, skip_of
from onnxrepair.runtime import make_session, output_name, run_batched
from onnxrepair.search import Confirmation, HoldoutScorer, Score, Trial, confirm_methods, search_layer
from onnxrepair.segments import Segments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of each stage.

    Attributes:
        inference: reading spectra (tapped models over the repair images).
        solve: the solvers (or bias correction).
        rewrite: writing the changes into the model and checking it.
        search: the whole guarded search (its spectra, solves, rewrites and
            held-out scoring); 0 without --search.
        evaluate: the three models on the validation set.
    """

    inference: float
    solve: float
    rewrite: float
    evaluate: float
    total: float
    search: float = 0.0


@dataclass(frozen=True)
class GuardStep:
    """One layer of a guarded run: what its repair scored on the held-out images, and whether it was kept."""

    repair: LayerRepair
    holdout: Score
    kept: bool
    seconds: float


@dataclass(frozen=True)
class RepairRun:
    """Everything a repair run produced.

    Attributes:
        model: the repaired QDQ model; None when the search found nothing
            better than the quantized model on its held-out images.
        layers: what was applied, in order (one entry per layer without
            --search; the accepted methods with it).
        trials: every configuration the search tried (empty without --search).
        holdout_before, holdout_after: the search's held-out scores of the
            quantized and the returned model.
        evaluation: float / quantized / repaired on the validation set (the
            quantized model stands in for the repaired one when none was found).
        repair_size: images used to solve (the search's held-out part excluded).
        holdout_size: images the search scored on.
        confirmation: the cross-validated check of the kept methods (None when
            the search kept nothing or the check is off).
        peak_memory_mb: the largest resident set of the run (its worker
            processes included), None where the platform does not say.
        guard: with the held-out guard, every layer repaired, kept or rolled back, in order.
    """

    model: onnx.ModelProto | None
    layers: list[LayerRepair]
    evaluation: Evaluation
    timings: Timings
    repair_size: int
    holdout_size: int = 0
    trials: list[Trial] = field(default_factory=list)
    holdout_before: Score | None = None
    holdout_after: Score | None = None
    confirmation: Confirmation | None = None
    peak_memory_mb: float | None = None
    guard: list[GuardStep] = field(default_factory=list)


def default_encoding(layers: Sequence[Layer]) -> Encoding:
    """`soft` for one dense layer (the paper's setting); `reconstruct` for convolutions and several layers.

    Measured in docs/BENCHMARKS.md: sign constraints fit a classifier's decision, but a convolution's
    channels feed later layers whose inputs should stay what the float model gives them.
    """
    if len(layers) == 1 and layers[0].conv is None:
        return Encoding.SOFT
    return Encoding.RECONSTRUCT


def resolve_layers(float_model: onnx.ModelProto, names: tuple[str, ...]) -> list[str]:
    """Layer names from --layer values: node names, "all", or "first:K" / "last:K" for the first / last K layers.

    Layers come back in graph order (topological), whatever order they were named in, and each once.

    Raises:
        ModelPairingError: an unknown name or a bad "first:K" / "last:K".
    """
    available = [layer.name for layer in find_layers(float_model)]
    if not available:
        pair_layer(float_model, float_model, None)  # raises UnsupportedModelError, naming the nodes and why
    if not names:
        return available[-1:]
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(available)
        elif name.startswith(("first:", "last:")):
            which, count = name.split(":", 1)
            if not count.isdigit() or int(count) < 1:
                raise ModelPairingError(f"'{name}' is not a layer count; write {which}:K with K >= 1, e.g. {which}:2")
            chosen.update(available[: int(count)] if which == "first" else available[-int(count) :])
        elif name in available:
            chosen.add(name)
        else:
            pair_layer(float_model, float_model, name)  # raises, naming the layers there are
    return [name for name in available if name in chosen]


def repair(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    repair_set: ImageSet,
    validation_set: ImageSet,
    config: RepairConfig,
    progress: Progress | None = None,
) -> RepairRun:
    """Repair the configured layers of `quant_model`, one after another (QNNRepair, Algorithm 1).

    Each layer's spectra are read from the model as patched so far. With
    `config.search`, a held-out part of `repair_set` scores the candidates.

    Raises:
        OnnxRepairError: the models do not match or cannot be repaired.
    """
    progress = progress or NoProgress()
    executor = make_executor(config.executor, config.jobs, config.ray_address)
    try:
        result = _repair(float_model, quant_model, repair_set, validation_set, config, progress, executor)
    finally:
        close_executor(executor)
    return dataclasses.replace(result, peak_memory_mb=peak_memory_mb())


def peak_memory_mb() -> float | None:
    """The largest resident set of this process or of a finished worker process so far, in MiB (None off Unix)."""
    try:
        import resource
    except ImportError:
        return None
    largest_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return largest_kib / 1024


def _repair(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    repair_set: ImageSet,
    validation_set: ImageSet,
    config: RepairConfig,
    progress: Progress,
    executor: Executor,
) -> RepairRun:
    started = time.perf_counter()
    check_models_match(float_model, quant_model)
    names = resolve_layers(float_model, config.layers)
    for name in names:
        pair_layer(float_model, quant_model, name)  # every layer is checked before any work
    guarded = config.guarded(len(names))
    fit_set, scorer, holdout_size = repair_set, None, 0
    if config.search is not None or guarded:
        fit_idx, holdout_idx = stratified_split(repair_set.strata, config.resolved_holdout_fraction, config.seed)
        fit_set, holdout = repair_set.subset(fit_idx), repair_set.subset(holdout_idx)
        scorer = HoldoutScorer(float_model, holdout.x, holdout.labels, config.batch_size, config.providers or None)
        holdout_size = len(holdout)
    holdout_before = scorer.score(quant_model) if scorer is not None else None

    current = quant_model
    layers: list[LayerRepair] = []
    trials: list[Trial] = []
    guard_steps: list[GuardStep] = []
    best = holdout_before
    inference_seconds = solve_seconds = rewrite_seconds = search_seconds = 0.0
    method = Method(config.solve.encoding, config.metric, config.neurons)
    reader = (
        None
        if config.search is not None
        else _reader(float_model, quant_model, names, fit_set, scorer, config, method, progress, executor)
    )
    overall = progress.task("layers", len(names)) if len(names) > 1 else contextlib.nullcontext(_no_advance)
    with overall as advance_layers:
        for position, name in enumerate(names):
            if reader is None:  # --search
                assert scorer is not None and config.search is not None
                left = started + config.search.budget - time.perf_counter()
                deadline = time.perf_counter() + left / (len(names) - position)
                current, applied, tried = search_layer(
                    float_model,
                    current,
                    functools.partial(_pair_in, float_model, name),
                    fit_set.x,
                    scorer,
                    config,
                    deadline,
                    progress,
                    executor,
                )
                layers.extend(applied)
                trials.extend(tried)
                search_seconds = time.perf_counter() - started
                solve_seconds += sum(layer.solve_seconds for layer in applied)
                advance_layers(1)
                continue
            layer_started = time.perf_counter()
            pair = pair_layer(float_model, current, name)
            logger.info("repairing layer %s (paired by %s)", pair.float_layer.name, pair.paired_by)
            activity = reader.activity(current, pair, position, method.changes_every_channel(pair.quant_layer.n_out))
            inference_seconds += time.perf_counter() - layer_started
            step = time.perf_counter()
            candidate, outcome = repair_layer(
                current, pair, activity, method, config.solve, config.seed, progress, executor=executor
            )
            del activity  # rows can take hundreds of MB; the next layer reads its own
            solve_seconds += outcome.solve_seconds
            rewrite_seconds += time.perf_counter() - step - outcome.solve_seconds
            took = True
            if best is not None:
                score = reader.score(candidate, position)
                took = score.helps_over(best)
                logger.info("%s: held-out agreement %.4f, divergence %.4g%s", name, score.agreement,
                            score.output_error or 0.0, "" if took else " (rolled back)")  # fmt: skip
                guard_steps.append(GuardStep(outcome, score, took, time.perf_counter() - layer_started))
                best = score if took else best
            if took:
                current = candidate
                layers.append(outcome)
            reader.moved_on(current, position, took)
            advance_layers(1)
    holdout_after = scorer.score(current) if scorer is not None else None
    # a model where nothing was kept is QUANT: never "improved", however two sessions' last bits differ
    improved = bool(layers) and (
        holdout_before is None or (holdout_after is not None and holdout_after.improves_on(holdout_before))
    )
    confirmation = None
    if improved and config.search is not None and config.search.confirm_folds > 0:
        confirmation = confirm_methods(float_model, quant_model, layers, repair_set, config, progress, executor)
        improved = confirmation.confirmed
    model = current if improved else None

    evaluate_started = time.perf_counter()
    evaluation = evaluate_models(
        float_model,
        quant_model,
        model or quant_model,
        validation_set,
        config.batch_size,
        progress,
        config.providers or None,
    )
    evaluate_seconds = time.perf_counter() - evaluate_started
    total = time.perf_counter() - started
    timings = Timings(
        inference=inference_seconds,
        solve=solve_seconds,
        rewrite=rewrite_seconds,
        evaluate=evaluate_seconds,
        total=total,
        search=search_seconds,
    )
    return RepairRun(
        model=model,
        layers=layers,
        guard=guard_steps,
        evaluation=evaluation,
        timings=timings,
        repair_size=len(fit_set),
        holdout_size=holdout_size,
        trials=trials,
        holdout_before=holdout_before,
        holdout_after=holdout_after,
        confirmation=confirmation,
    )


def _reader(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    names: list[str],
    fit_set: ImageSet,
    scorer: HoldoutScorer | None,
    config: RepairConfig,
    method: Method,
    progress: Progress,
    executor: Executor,
) -> LayerReader:
    """Kept tensors when every layer changes every channel and the model allows it; the model input otherwise."""
    pairs = [pair_layer(float_model, quant_model, name) for name in names]
    providers = config.providers or None
    # FLOAT's targets of the layers repaired over every channel, several layers per pass
    targets = FloatTargets(
        float_model,
        [pair.float_layer for pair in pairs],
        fit_set.x,
        config.batch_size,
        providers=providers,
        positions_per_image=config.positions_per_image,
        seed=config.seed,
        progress=progress,
        residual_sums=True,
        executor=executor,
    )
    common = (targets, scorer, config.batch_size, config.positions_per_image, config.seed, providers, executor)
    if len(names) > 1 and all(method.changes_every_channel(pair.quant_layer.n_out) for pair in pairs):
        images = len(fit_set) + (0 if scorer is None else len(scorer.x))
        plan = Segments.plan(quant_model, [pair.quant_layer for pair in pairs], images, [skip_of(p) for p in pairs])
        if plan is not None:
            logger.info("reading layers from tensors kept at %d cuts", len(plan.cuts))
            return KeptReader(plan, quant_model, fit_set.x, *common)
        logger.info("reading each layer from the model input (the layers' inputs cannot be kept)")
    return InputReader(float_model, fit_set.x, *common, progress=progress)


def _no_advance(n: int) -> None:
    """The progress of a single layer: its own bars say enough."""


def _pair_in(float_model: onnx.ModelProto, name: str, quant_model: onnx.ModelProto) -> LayerPair:
    return pair_layer(float_model, quant_model, name)


def evaluate_models(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    repaired_model: onnx.ModelProto,
    images: ImageSet,
    batch_size: int,
    progress: Progress | None = None,
    providers: Sequence[str] | None = None,
) -> Evaluation:
    """Top-1 accuracy and agreement of the three untapped models on `images`."""
    progress = progress or NoProgress()
    scores = []
    with progress.task("evaluating", 3 * len(images)) as advance:
        for model, role in ((float_model, "FLOAT"), (quant_model, "QUANT"), (repaired_model, "repaired")):
            name = output_name(model)
            session = make_session(model, role, providers)
            scores.append(run_batched(session, images.x, [name], batch_size, advance)[name])
    float_scores, quant_scores, repaired_scores = scores
    return evaluate_scores(float_scores, quant_scores, repaired_scores, images.labels)


@dataclass(frozen=True)
class ModelScore:
    """One model on one set of inputs (`onnxrepair eval`).

    Attributes:
        accuracy: top-1 accuracy against the labels; None without labels.
        agreement: share of inputs whose top-1 class equals the reference
            model's; None without a reference.
    """

    size: int
    accuracy: float | None
    agreement: float | None


def score_model(
    model: onnx.ModelProto,
    images: ImageSet,
    batch_size: int,
    reference: onnx.ModelProto | None = None,
    providers: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> ModelScore:
    """Top-1 accuracy of `model`, and its agreement with `reference` when one is given."""
    progress = progress or NoProgress()
    models = [(model, "MODEL")] + ([(reference, "--against")] if reference is not None else [])
    top1 = []
    logger.info("scoring %s on %d inputs", " and ".join(role for _, role in models), len(images))
    with progress.task("evaluating", len(models) * len(images)) as advance:
        for each, role in models:
            name = output_name(each)
            scores = run_batched(make_session(each, role, providers), images.x, [name], batch_size, advance)[name]
            top1.append(np.argmax(scores, axis=1))
    accuracy = None if images.labels is None else float(np.mean(top1[0] == images.labels))
    agreement = None if reference is None else float(np.mean(top1[0] == top1[1]))
    return ModelScore(len(images), accuracy, agreement)


@dataclass(frozen=True)
class LayerRow:
    """One dense layer of FLOAT as `--list-layers` shows it."""

    layer: Layer
    pair: LayerPair | None
    weights: str  # how QUANT stores the paired layer's weights, e.g. "int8 per-tensor"
    reason: str  # why the layer cannot be repaired; empty when it can


def list_layers(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[LayerRow]:
    """Every dense layer of FLOAT with its QDQ pair, or the reason it has none."""
    rows = []
    for layer in find_layers(float_model):
        try:
            pair = pair_layer(float_model, quant_model, layer.name)
        except OnnxRepairError as exc:  # shown to the user as the reason the layer is not repairable
            rows.append(LayerRow(layer, None, "", str(exc)))
        else:
            weights = describe_parameter(quant_model, pair.quant_layer.weight)
            if pair.quant_layer.op != layer.op:  # an integer operator: say which (QGemm, MatMulInteger+Add...)
                weights = f"{weights}, {pair.quant_layer.op}"
            rows.append(LayerRow(layer, pair, weights, ""))
    return rows
