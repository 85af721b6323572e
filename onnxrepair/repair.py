"""The repair pipeline: spectra -> ranking -> per-neuron solves -> rewrite -> evaluation.

Takes models and image arrays, returns the repaired model and what happened;
it opens no file and prints nothing (progress goes through a `Progress` sink
that the CLI provides).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.config import RepairConfig
from onnxrepair.data import ImageSet
from onnxrepair.errors import OnnxRepairError, UnsupportedModelError
from onnxrepair.evaluate import Evaluation, evaluate_scores
from onnxrepair.graph import (
    DenseLayer,
    LayerPair,
    check_models_match,
    dense_parameters,
    describe_parameter,
    find_dense_layers,
    input_spec,
    pair_layer,
    with_outputs,
)
from onnxrepair.localize import rank_neurons, suspiciousness
from onnxrepair.rewrite import RewriteStats, apply_weight_deltas
from onnxrepair.runtime import make_session, output_name, run_batched
from onnxrepair.solve import NeuronProblem, NeuronSolution, solve_neuron
from onnxrepair.spectrum import Spectrum, activation_flips, collect_spectrum, failing_mask

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """Where long-running steps report progress: `task` yields an `advance(n)` callable."""

    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


class NoProgress:
    """A Progress that shows nothing (library use, tests, --quiet)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of each stage."""

    inference: float
    solve: float
    rewrite: float
    evaluate: float
    total: float


@dataclass(frozen=True)
class RepairResult:
    """Everything a repair run produced.

    Attributes:
        model: the repaired QDQ model.
        pair: the float and QDQ layer that was repaired.
        spectrum: counts over the repair set.
        scores: suspiciousness of every neuron under the chosen metric.
        selected: the neurons given to the solver, most suspicious first.
        solutions: one per selected neuron, solved or not, in the same order.
        rewrite: how many integer weights changed or were clamped.
        evaluation: float / quant / repaired on the validation set.
        timings: seconds per stage.
    """

    model: onnx.ModelProto
    pair: LayerPair
    spectrum: Spectrum
    scores: NDArray[np.float64]
    selected: list[int]
    solutions: list[NeuronSolution]
    rewrite: RewriteStats
    evaluation: Evaluation
    timings: Timings
    repair_size: int

    @property
    def repaired_neurons(self) -> list[int]:
        return [s.neuron for s in self.solutions if s.solved]

    @property
    def unsolved(self) -> list[int]:
        return [s.neuron for s in self.solutions if not s.solved]


@dataclass(frozen=True)
class LayerActivity:
    """What the repair set shows about one layer: read from both models."""

    float_scores: NDArray[np.float32]  # [n, classes]
    quant_scores: NDArray[np.float32]
    float_pre: NDArray[np.float32]  # [n, neurons] pre-activation
    quant_pre: NDArray[np.float32]
    quant_inputs: NDArray[np.float32]  # [n, n_in] the layer input in the quantized model


def repair(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    repair_set: ImageSet,
    validation_set: ImageSet,
    config: RepairConfig,
    progress: Progress | None = None,
) -> RepairResult:
    """Repair `config.neurons` neurons of one dense layer of `quant_model` (QNNRepair, Algorithm 1).

    Raises:
        OnnxRepairError: the models do not match or cannot be repaired.
    """
    progress = progress or NoProgress()
    started = time.perf_counter()
    check_models_match(float_model, quant_model)
    pair = pair_layer(float_model, quant_model, config.layer)
    logger.info("repairing layer %s (paired by %s)", pair.float_layer.name, pair.paired_by)

    activity = read_layer_activity(float_model, quant_model, pair, repair_set.x, config.batch_size, progress)
    inference_seconds = time.perf_counter() - started

    failing = failing_mask(activity.float_scores, activity.quant_scores)
    spectrum = collect_spectrum(failing, activation_flips(activity.float_pre, activity.quant_pre))
    scores = suspiciousness(spectrum, config.metric, config.seed)
    selected = [int(i) for i in rank_neurons(scores)[: config.neurons]]
    logger.info("%d of %d repair inputs fail; selected neurons %s", spectrum.n_failing, len(failing), selected)

    solve_started = time.perf_counter()
    weights, bias = dense_parameters(quant_model, pair.quant_layer)
    inputs = activity.quant_inputs.astype(np.float64)
    solutions = []
    with progress.task("solving", len(selected)) as advance:
        for neuron in selected:
            problem = NeuronProblem(
                neuron, weights[neuron], float(bias[neuron]), inputs, activity.float_pre[:, neuron] > 0
            )
            solution = solve_neuron(problem, config.solve)
            if not solution.solved:
                logger.info("neuron %d left unchanged: %s", neuron, solution.reason)
            solutions.append(solution)
            advance(1)
    solve_seconds = time.perf_counter() - solve_started

    rewrite_started = time.perf_counter()
    deltas = {s.neuron: s.weight_delta for s in solutions if s.weight_delta is not None}
    repaired, rewrite_stats = apply_weight_deltas(quant_model, pair.quant_layer, deltas)
    onnx.checker.check_model(repaired)
    rewrite_seconds = time.perf_counter() - rewrite_started

    evaluate_started = time.perf_counter()
    evaluation = evaluate_models(float_model, quant_model, repaired, validation_set, config.batch_size, progress)
    evaluate_seconds = time.perf_counter() - evaluate_started
    timings = Timings(
        inference=inference_seconds,
        solve=solve_seconds,
        rewrite=rewrite_seconds,
        evaluate=evaluate_seconds,
        total=time.perf_counter() - started,
    )
    return RepairResult(
        model=repaired,
        pair=pair,
        spectrum=spectrum,
        scores=scores,
        selected=selected,
        solutions=solutions,
        rewrite=rewrite_stats,
        evaluation=evaluation,
        timings=timings,
        repair_size=len(repair_set),
    )


def read_layer_activity(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    x: NDArray[np.float32],
    batch_size: int,
    progress: Progress,
) -> LayerActivity:
    """Run tapped copies of both models that also output the layer's input and pre-activation."""
    f_layer, q_layer = pair.float_layer, pair.quant_layer
    f_out, q_out = output_name(float_model), output_name(quant_model)
    with progress.task("reading spectra", 2 * len(x)) as advance:
        f = _run_tapped(float_model, "FLOAT", [f_out, f_layer.output_tensor], x, batch_size, advance)
        q = _run_tapped(
            quant_model, "QUANT", [q_out, q_layer.input_tensor, q_layer.output_tensor], x, batch_size, advance
        )
    _check_width(f[f_layer.output_tensor], f_layer, "FLOAT")
    _check_width(q[q_layer.output_tensor], q_layer, "QUANT")
    return LayerActivity(
        float_scores=f[f_out],
        quant_scores=q[q_out],
        float_pre=f[f_layer.output_tensor],
        quant_pre=q[q_layer.output_tensor],
        quant_inputs=q[q_layer.input_tensor],
    )


def evaluate_models(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    repaired_model: onnx.ModelProto,
    images: ImageSet,
    batch_size: int,
    progress: Progress | None = None,
) -> Evaluation:
    """Top-1 accuracy and agreement of the three untapped models on `images`."""
    progress = progress or NoProgress()
    scores = []
    with progress.task("evaluating", 3 * len(images)) as advance:
        for model, role in ((float_model, "FLOAT"), (quant_model, "QUANT"), (repaired_model, "repaired")):
            name = output_name(model)
            session = make_session(model, role)
            scores.append(run_batched(session, images.x, [name], batch_size, advance)[name])
    float_scores, quant_scores, repaired_scores = scores
    return evaluate_scores(float_scores, quant_scores, repaired_scores, images.labels)


@dataclass(frozen=True)
class LayerRow:
    """One dense layer of FLOAT as `--list-layers` shows it."""

    layer: DenseLayer
    pair: LayerPair | None
    weights: str  # how QUANT stores the paired layer's weights, e.g. "int8 per-tensor"
    reason: str  # why the layer cannot be repaired; empty when it can


def list_layers(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[LayerRow]:
    """Every dense layer of FLOAT with its QDQ pair, or the reason it has none."""
    rows = []
    for layer in find_dense_layers(float_model):
        try:
            pair = pair_layer(float_model, quant_model, layer.name)
        except OnnxRepairError as exc:  # shown to the user as the reason the layer is not repairable
            rows.append(LayerRow(layer, None, "", str(exc)))
        else:
            rows.append(LayerRow(layer, pair, describe_parameter(quant_model, pair.quant_layer.weight), ""))
    return rows


def _run_tapped(
    model: onnx.ModelProto,
    role: str,
    names: list[str],
    x: NDArray[np.float32],
    batch_size: int,
    advance: Callable[[int], None],
) -> dict[str, NDArray[np.float32]]:
    input_name = input_spec(model).name
    outputs = [n for n in dict.fromkeys(names) if n != input_name]
    session = make_session(with_outputs(model, outputs), role)
    values = run_batched(session, x, outputs, batch_size, advance)
    if input_name in names:  # the layer reads the graph input directly
        values[input_name] = x.reshape(len(x), -1)
    return values


def _check_width(pre: NDArray, layer: DenseLayer, role: str) -> None:
    if pre.shape[1] != layer.n_out:
        raise UnsupportedModelError(
            f"{role} layer '{layer.name}' output has {pre.shape[1]} values per input, expected {layer.n_out}; "
            "only layers over [batch, features] inputs can be repaired"
        )
