"""One repair method applied once to one layer: read spectra, rank, solve, rewrite.

A method is an encoding (solve.py), a metric and a number of neurons. The
``bias-correction`` method needs no solver: each neuron's bias moves by the
mean float-minus-quantized pre-activation over the repair inputs (empirical
bias correction, as AIMET does), which removes the average error a quantized
layer adds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.config import Encoding, Metric, SolveConfig
from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import (
    Layer,
    LayerGrid,
    LayerPair,
    clips_negatives,
    input_spec,
    layer_grid,
    layer_parameters,
    tap_layer,
    with_outputs,
)
from onnxrepair.localize import rank_neurons, suspiciousness
from onnxrepair.parallel import Executor, SerialExecutor
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.rewrite import RewriteStats, apply_deltas
from onnxrepair.runtime import make_session, output_name, run_batched
from onnxrepair.solve import (
    LogitProblem,
    NeuronGrid,
    NeuronProblem,
    NeuronSolution,
    SolveStatus,
    solve_logit,
    solve_neuron,
)
from onnxrepair.spectrum import Spectrum, activation_flips, collect_spectrum, failing_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One repair configuration: encoding, ranking metric and number of neurons."""

    encoding: Encoding
    metric: Metric = Metric.EUCLID
    neurons: int = 10

    def describe(self, n_out: int | None = None) -> str:
        if self.encoding is Encoding.BIAS_CORRECTION:
            return "bias-correction (all neurons)"
        n = "all" if n_out is not None and self.neurons >= n_out else str(self.neurons)
        return f"{self.encoding.value}, {self.metric.value}, N={n}"


@dataclass(frozen=True)
class LayerActivity:
    """What the repair inputs show about one layer, read from both models."""

    float_scores: NDArray[np.float32]  # [n, classes]
    quant_scores: NDArray[np.float32]
    float_pre: NDArray[np.float32]  # [n, neurons] pre-activation
    quant_pre: NDArray[np.float32]
    quant_inputs: NDArray[np.float32]  # [n, n_in] the layer input in the quantized model

    def is_output_layer(self) -> bool:
        """The layer's outputs are the class scores (up to a monotone map such as Softmax)."""
        if self.float_pre.shape[1] != self.float_scores.shape[1]:
            return False
        same = np.argmax(self.float_pre, axis=1) == np.argmax(self.float_scores, axis=1)
        return bool(np.mean(same) >= 0.99)


@dataclass(frozen=True)
class LayerRepair:
    """What one method did to one layer.

    Attributes:
        selected: the neurons given to the solver, most suspicious first.
        solutions: one per selected neuron, solved or not, in the same order.
    """

    pair: LayerPair
    method: Method
    spectrum: Spectrum
    scores: NDArray[np.float64]
    selected: list[int]
    solutions: list[NeuronSolution]
    rewrite: RewriteStats
    solve_seconds: float

    @property
    def repaired_neurons(self) -> list[int]:
        return [s.neuron for s in self.solutions if s.solved]

    @property
    def unsolved(self) -> list[int]:
        return [s.neuron for s in self.solutions if not s.solved]


def read_layer_activity(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    x: NDArray[np.float32],
    batch_size: int,
    progress: Progress | None = None,
    *,
    providers: Sequence[str] | None = None,
) -> LayerActivity:
    """Run tapped copies of both models that also output the layer's input and pre-activation.

    `providers`: ONNX Runtime execution providers (default: CUDA when present, then CPU).
    """
    progress = progress or NoProgress()
    f_layer, q_layer = pair.float_layer, pair.quant_layer
    f_out, q_out = output_name(float_model), output_name(quant_model)
    # integer-operator layers: x and y are read through DequantizeLinear nodes added to the tapped copy
    f_model, _, f_pre = tap_layer(float_model, f_layer)
    q_model, q_in, q_pre = tap_layer(quant_model, q_layer)
    with progress.task("reading spectra", 2 * len(x)) as advance:
        f = _run_tapped(f_model, "FLOAT", [f_out, f_pre], x, batch_size, advance, providers)
        q = _run_tapped(q_model, "QUANT", [q_out, q_in, q_pre], x, batch_size, advance, providers)
    _check_width(f[f_pre], f_layer, "FLOAT")
    _check_width(q[q_pre], q_layer, "QUANT")
    _check_width(q[q_in], q_layer, "QUANT", side="input")
    quant_pre = q[q_pre]
    if q_layer.output_encoding is not None and clips_negatives(quant_model, q_layer.output_encoding):
        # A Relu fused into the integer output: y = max(pre, 0) hides how negative each neuron is (bias
        # correction needs it). The pre-activation is Q's exact integer accumulator, x @ W^T + b in reals.
        weights, bias = layer_parameters(quant_model, q_layer)
        quant_pre = (q[q_in].astype(np.float64) @ weights.T + bias).astype(np.float32)
    return LayerActivity(
        float_scores=f[f_out],
        quant_scores=q[q_out],
        float_pre=f[f_pre],
        quant_pre=quant_pre,
        quant_inputs=q[q_in],
    )


def repair_layer(
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    activity: LayerActivity,
    method: Method,
    solve_config: SolveConfig,
    seed: int = 0,
    progress: Progress | None = None,
    deadline: float | None = None,
    executor: Executor | None = None,
    neurons: Sequence[int] | None = None,
) -> tuple[onnx.ModelProto, LayerRepair]:
    """Apply `method` to the layer of `quant_model` and return the patched copy.

    Args:
        deadline: a time.perf_counter() value; neurons not started by then are
            left unchanged with that reason (the search's budget).
        executor: where the per-neuron problems are solved (default: here, one by one).
        neurons: solve these neurons instead of the method's top N (to apply a
            method again exactly as it was applied before).

    Raises:
        UnsupportedModelError: `logit` on a layer that is not the output layer,
            or bias correction on a layer without bias.
    """
    progress = progress or NoProgress()
    failing = failing_mask(activity.float_scores, activity.quant_scores)
    spectrum = collect_spectrum(failing, activation_flips(activity.float_pre, activity.quant_pre))
    scores = suspiciousness(spectrum, method.metric, seed)
    layer = pair.quant_layer
    config = dataclasses.replace(solve_config, encoding=method.encoding)
    started = time.perf_counter()
    if method.encoding is Encoding.BIAS_CORRECTION:
        selected = list(range(layer.n_out))
        solutions = _bias_correction(layer, activity)
    else:
        ranked = rank_neurons(scores)[: method.neurons] if neurons is None else neurons
        selected = [int(i) for i in ranked]
        executor = executor or SerialExecutor()
        solutions = _solve(quant_model, pair, activity, selected, config, progress, deadline, executor)
    solve_seconds = time.perf_counter() - started
    deltas = {s.neuron: s.weight_delta for s in solutions if s.weight_delta is not None}
    bias_deltas = {s.neuron: s.bias_delta for s in solutions if s.weight_delta is not None}
    repaired, stats = apply_deltas(quant_model, layer, deltas, bias_deltas)
    onnx.checker.check_model(repaired)
    return repaired, LayerRepair(pair, method, spectrum, scores, selected, solutions, stats, solve_seconds)


def _solve(
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    activity: LayerActivity,
    selected: list[int],
    config: SolveConfig,
    progress: Progress,
    deadline: float | None,
    executor: Executor,
) -> list[NeuronSolution]:
    if config.encoding is Encoding.LOGIT:
        if not activity.is_output_layer():
            raise UnsupportedModelError(
                f"--encoding logit repairs the output layer only, and '{pair.float_layer.name}' does not give "
                "the class scores; pick the last layer or another encoding"
            )
        weights, bias = layer_parameters(quant_model, pair.quant_layer)
        grid = layer_grid(quant_model, pair.quant_layer)
        targets = np.argmax(activity.float_scores, axis=1).astype(np.int64)
        inputs = activity.quant_inputs.astype(np.float64)
        grids: list[NeuronGrid | None] = [_neuron_grid(grid, j) for j in selected]
        joint = LogitProblem(selected, weights, bias, inputs, targets, grids)
        with progress.task("solving (joint)", 1) as advance:
            solutions = solve_logit(joint, _within(config, deadline))
            advance(1)
        return solutions
    problems = layer_problems(quant_model, pair, activity, selected)
    # a worker process costs a second to start: worth it only for several problems of some size
    if len(problems) < 2 * executor.jobs or problems[0].inputs.size < _FAN_OUT_MIN_INPUTS:
        executor = SerialExecutor()
    wall_deadline = None if deadline is None else time.time() + (deadline - time.perf_counter())
    solve = functools.partial(solve_before, config=config, wall_deadline=wall_deadline)
    solutions = []
    with progress.task("solving", len(selected)) as advance:
        for solution in executor.map(solve, problems):
            if not solution.solved:
                logger.info("neuron %d left unchanged: %s", solution.neuron, solution.reason)
            solutions.append(solution)
            advance(1)
    return solutions


_FAN_OUT_MIN_INPUTS = 100_000  # repair inputs x layer inputs


def layer_problems(
    quant_model: onnx.ModelProto, pair: LayerPair, activity: LayerActivity, selected: list[int]
) -> list[NeuronProblem]:
    """One problem per selected neuron, as `repair_layer` solves them; all share one `inputs` array.

    Sharing matters for --jobs: the array is pickled once per chunk of problems, not once per neuron.
    """
    weights, bias = layer_parameters(quant_model, pair.quant_layer)
    grid = layer_grid(quant_model, pair.quant_layer)
    inputs = activity.quant_inputs.astype(np.float64)
    return [
        NeuronProblem(j, weights[j], float(bias[j]), inputs, activity.float_pre[:, j] > 0, _neuron_grid(grid, j))
        for j in selected
    ]


def solve_before(problem: NeuronProblem, config: SolveConfig, wall_deadline: float | None) -> NeuronSolution:
    """Solve one neuron unless the deadline (a time.time() value, valid across processes) has passed."""
    if wall_deadline is not None:
        left = wall_deadline - time.time()
        if left <= 0:
            reason = "the search budget ran out"
            return NeuronSolution(problem.neuron, SolveStatus.TIME_LIMIT, None, None, 0.0, 0, reason)
        config = dataclasses.replace(config, time_limit=min(config.time_limit, max(left, 1.0)))
    return solve_neuron(problem, config)


def _bias_correction(layer: Layer, activity: LayerActivity) -> list[NeuronSolution]:
    if layer.bias is None:
        raise UnsupportedModelError(f"layer '{layer.name}' has no bias, so bias correction cannot repair it")
    shift = np.mean(activity.float_pre.astype(np.float64) - activity.quant_pre.astype(np.float64), axis=0)
    return [
        NeuronSolution(j, SolveStatus.OPTIMAL, np.zeros(layer.n_in), None, 0.0, 0, "", float(shift[j]))
        for j in range(layer.n_out)
    ]


def _neuron_grid(grid: LayerGrid, j: int) -> NeuronGrid:
    if grid.bias_step is None or grid.bias_low is None or grid.bias_high is None:
        return NeuronGrid(grid.weight_step[j], grid.weight_low[j], grid.weight_high[j])
    return NeuronGrid(
        weight_step=grid.weight_step[j],
        weight_low=grid.weight_low[j],
        weight_high=grid.weight_high[j],
        bias_step=float(grid.bias_step[j]),
        bias_low=float(grid.bias_low[j]),
        bias_high=float(grid.bias_high[j]),
    )


def _within(config: SolveConfig, deadline: float | None) -> SolveConfig:
    """The config with its time limit cut to what is left before the deadline."""
    if deadline is None:
        return config
    left = max(deadline - time.perf_counter(), 1.0)
    return dataclasses.replace(config, time_limit=min(config.time_limit, left))


def _run_tapped(
    model: onnx.ModelProto,
    role: str,
    names: list[str],
    x: NDArray[np.float32],
    batch_size: int,
    advance: Callable[[int], None],
    providers: Sequence[str] | None,
) -> dict[str, NDArray[np.float32]]:
    input_name = input_spec(model).name
    outputs = [n for n in dict.fromkeys(names) if n != input_name]
    session = make_session(with_outputs(model, outputs), role, providers)
    values = run_batched(session, x, outputs, batch_size, advance)
    if input_name in names:  # the layer reads the graph input directly
        values[input_name] = x.reshape(len(x), -1)
    return values


def _check_width(values: NDArray, layer: Layer, role: str, side: str = "output") -> None:
    """A layer over [batch, features] (or a 1x1 map) has n_out outputs and n_in inputs per input."""
    expected = layer.n_out if side == "output" else layer.n_in
    if values.shape[1] != expected:
        raise UnsupportedModelError(
            f"{role} layer '{layer.name}' ({layer.op}) {side} has {values.shape[1]} values per input, expected "
            f"{expected}; only layers over [batch, features] inputs (or a 1x1 Conv over a 1x1 map) can be repaired"
        )
