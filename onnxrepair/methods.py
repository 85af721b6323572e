"""One repair method applied once to one layer: spectra, rank, solve, rewrite.

A method is an encoding (solve.py), a metric and a number of neurons. The
layer is seen through its rows (activity.py): a dense layer's inputs, a
convolution's patches. Two methods need no LP solver: ``bias-correction``
moves each channel's bias by the mean float-minus-quantized pre-activation
over the rows (empirical bias correction, as AIMET does), and
``reconstruct`` fits each channel's weights and bias to the float
pre-activation by ridge least squares, rounded to the integer grid and kept
only where held-out rows confirm it (reconstruct.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.activity import LayerActivity
from onnxrepair.config import WHOLE_LAYER_ENCODINGS, Encoding, Metric, SolveConfig
from onnxrepair.errors import UnsupportedModelError, WorkerDiedError
from onnxrepair.graph import Layer, LayerGrid, LayerPair, find_layers, layer_grid, layer_parameters
from onnxrepair.localize import rank_neurons, suspiciousness
from onnxrepair.parallel import Executor, SerialExecutor
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.reconstruct import ReconstructionProblem, reconstruct
from onnxrepair.rewrite import RewriteStats, apply_deltas
from onnxrepair.rows import grouped_linear
from onnxrepair.solve import (
    FitProblem,
    LogitProblem,
    NeuronGrid,
    NeuronProblem,
    NeuronSolution,
    SolveStatus,
    logit_program_bytes,
    solve_fit,
    solve_logit,
    solve_neuron,
)
from onnxrepair.spectrum import Spectrum, activation_flips, collect_spectrum, sqnr_db

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One repair configuration: encoding, ranking metric and number of neurons."""

    encoding: Encoding
    metric: Metric = Metric.EUCLID
    neurons: int = 10

    def changes_every_channel(self, n_out: int) -> bool:
        """No ranking needed: every channel of the layer is repaired (so no spectrum either)."""
        return self.encoding in WHOLE_LAYER_ENCODINGS and (
            self.encoding is Encoding.BIAS_CORRECTION or self.neurons >= n_out
        )

    def describe(self, n_out: int | None = None) -> str:
        if self.encoding is Encoding.BIAS_CORRECTION:
            return "bias-correction (all neurons)"
        if self.encoding.reconstructs and n_out is not None and self.neurons >= n_out:
            return f"{self.encoding.value} (all channels)"
        n = "all" if n_out is not None and self.neurons >= n_out else str(self.neurons)
        return f"{self.encoding.value}, {self.metric.value}, N={n}"


@dataclass(frozen=True)
class LayerRepair:
    """What one method did to one layer.

    Attributes:
        selected: the neurons given to the solver, most suspicious first.
        solutions: one per selected neuron, solved or not, in the same order.
        spectrum: the activation spectrum of the repair rows; None when the layer was read without
            class scores (a method over every channel ranks nothing).
        sqnr_before, sqnr_after: SQNR (dB) of the layer's output against its target (FLOAT's
            pre-activation, or for a layer before a residual Add FLOAT's sum less QUANT's other branch),
            both clipped as the layer's activation and output quantization clip them, over the repair
            rows (at most _SQNR_ROWS of them, evenly spaced), before and after the change as written.
        rows: rows the layer was repaired on (images, or images x positions of a convolution).
    """

    pair: LayerPair
    method: Method
    spectrum: Spectrum | None
    scores: NDArray[np.float64]
    selected: list[int]
    solutions: list[NeuronSolution]
    rewrite: RewriteStats
    solve_seconds: float
    sqnr_before: float | None = None
    sqnr_after: float | None = None
    rows: int = 0

    @property
    def repaired_neurons(self) -> list[int]:
        return [s.neuron for s in self.solutions if s.solved]

    @property
    def unsolved(self) -> list[int]:
        return [s.neuron for s in self.solutions if not s.solved]


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
    layer = pair.quant_layer
    failing = activity.failing_rows()
    if failing is None:  # read without class scores: no spectrum, channels in their order
        if neurons is None and not method.changes_every_channel(layer.n_out):
            raise ValueError("ranking neurons needs the class scores: read the layer with scores=True")
        spectrum, scores = None, np.zeros(layer.n_out)
    else:
        spectrum = collect_spectrum(failing, activation_flips(activity.float_pre, activity.quant_pre))
        scores = suspiciousness(spectrum, method.metric, seed)
    config = dataclasses.replace(solve_config, encoding=method.encoding)
    started = time.perf_counter()
    if method.encoding is Encoding.BIAS_CORRECTION:
        selected = list(range(layer.n_out))
        solutions = _bias_correction(layer, activity)
    else:
        ranked = rank_neurons(scores)[: method.neurons] if neurons is None else neurons
        selected = [int(i) for i in ranked]
        if method.encoding is Encoding.RECONSTRUCT:
            solutions = _reconstruct(quant_model, pair, activity, selected, seed)
        elif method.encoding.reconstructs:
            executor = executor or SerialExecutor()
            solutions = _fit(quant_model, pair, activity, selected, config, seed, progress, deadline, executor)
        else:
            executor = executor or SerialExecutor()
            solutions = _solve(quant_model, pair, activity, selected, config, progress, deadline, executor)
    solve_seconds = time.perf_counter() - started
    deltas = {s.neuron: s.weight_delta for s in solutions if s.weight_delta is not None}
    bias_deltas = {s.neuron: s.bias_delta for s in solutions if s.weight_delta is not None}
    repaired, stats = apply_deltas(quant_model, layer, deltas, bias_deltas)
    onnx.checker.check_model(repaired)
    before, after = _sqnr_change(quant_model, repaired, pair, activity, sorted(deltas))
    return repaired, LayerRepair(
        pair,
        method,
        spectrum,
        scores,
        selected,
        solutions,
        stats,
        solve_seconds,
        before,
        after,
        len(activity.row_image),
    )


def _sqnr_change(
    quant_model: onnx.ModelProto,
    repaired: onnx.ModelProto,
    pair: LayerPair,
    activity: LayerActivity,
    changed: list[int],
) -> tuple[float, float]:
    """SQNR of the layer's output on the rows, before and after the change as written.

    Both sides pass through the layer's clip (`clip_range`: its Relu/Clip, the range QUANT quantizes
    it to), so what the next layer never sees does not count.
    """
    layer = pair.quant_layer
    sample = slice(None, None, max(1, len(activity.row_image) // _SQNR_ROWS))
    low, high = clip_range(pair) or (-np.inf, np.inf)
    float_out, quant_pre = np.clip(activity.float_pre[sample], low, high), activity.quant_pre[sample]
    before = sqnr_db(float_out, np.clip(quant_pre, low, high))
    if not changed:
        return before, before
    old_w, old_b = layer_parameters(quant_model, layer)
    # read again from the repaired model: a re-encoded bias has a new scale under a new name
    new_w, new_b = layer_parameters(
        repaired, next(found for found in find_layers(repaired) if found.name == layer.name)
    )
    moved = grouped_linear(activity.quant_inputs[sample], new_w - old_w, new_b - old_b, layer.groups)
    return before, sqnr_db(float_out, np.clip(quant_pre + moved, low, high))


_SQNR_ROWS = 20_000


def clip_range(pair: LayerPair) -> tuple[float, float] | None:
    """Where the layer's output is clipped: FLOAT's Relu/Clip after it, narrowed by the range QUANT quantizes
    the output to (a value beyond it comes out as the bound whatever its size)."""
    ranges = [r for r in (pair.float_layer.clip, pair.quant_layer.clip) if r is not None]
    if not ranges:
        return None
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (low, high) if low < high else None


def clipped_target(
    float_pre: NDArray[np.float32], quant_pre: NDArray[np.float32], clip: tuple[float, float] | None
) -> NDArray[np.float32]:
    """What the quantized pre-activation should be, given that the layer's output is clipped (`clip_range`).

    Where FLOAT's value is clipped (below the floor or above the ceiling), any value clipped the same way
    gives the same output: the target there is the quantized value itself when it is clipped too (no error
    to fix), else the clip bound. Fitting those rows to FLOAT's exact value would spend the few integer
    steps a channel has on differences that the activation erases.
    """
    if clip is None:
        return float_pre
    low, high = clip
    target = np.where(float_pre <= low, np.minimum(quant_pre, low), float_pre)
    return np.where(float_pre >= high, np.maximum(quant_pre, high), target).astype(np.float32)


# images held out of a reconstruction's fit: their rows decide which channels keep their change
RECONSTRUCT_CHECK_FRACTION = 0.25


def _reconstruct(
    quant_model: onnx.ModelProto, pair: LayerPair, activity: LayerActivity, selected: list[int], seed: int
) -> list[NeuronSolution]:
    layer = pair.quant_layer
    holdout = _check_rows(activity, seed)
    weights, bias = layer_parameters(quant_model, layer)
    grid = layer_grid(quant_model, layer)
    started = time.perf_counter()
    result = reconstruct(
        ReconstructionProblem(
            rows=activity.quant_inputs,
            target=clipped_target(activity.float_pre, activity.quant_pre, clip_range(pair)),
            weights=weights,
            bias=bias,
            weight_step=grid.weight_step,
            weight_low=grid.weight_low,
            weight_high=grid.weight_high,
            bias_step=grid.bias_step,
            bias_low=grid.bias_low,
            bias_high=grid.bias_high,
            groups=layer.groups,
            holdout=holdout,
        )
    )
    seconds = (time.perf_counter() - started) / max(len(selected), 1)
    rows = int((~holdout).sum())
    solutions = []
    for j in selected:
        if result.kept[j]:
            solutions.append(
                NeuronSolution(
                    j,
                    SolveStatus.OPTIMAL,
                    result.weight_delta[j],
                    float(result.error_after[j]),
                    seconds,
                    rows,
                    "",
                    float(result.bias_delta[j]),
                )  # fmt: skip
            )
        else:
            reason = "its rounded change does not lower its error on held-out rows"
            solutions.append(NeuronSolution(j, SolveStatus.UNCHANGED, None, None, seconds, rows, reason))
    return solutions


def _check_rows(activity: LayerActivity, seed: int) -> NDArray[np.bool_]:
    """[r] True for the rows of a seeded RECONSTRUCT_CHECK_FRACTION of the images: never fitted, they decide."""
    images = np.unique(activity.row_image)
    if len(images) < 2:
        raise UnsupportedModelError("reconstruction needs at least 2 repair images (it checks on held-out ones)")
    rng = np.random.default_rng(seed)
    held = rng.choice(images, size=max(1, round(RECONSTRUCT_CHECK_FRACTION * len(images))), replace=False)
    return np.isin(activity.row_image, held)


def _fit(
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    activity: LayerActivity,
    selected: list[int],
    config: SolveConfig,
    seed: int,
    progress: Progress,
    deadline: float | None,
    executor: Executor,
) -> list[NeuronSolution]:
    """reconstruct-lp / reconstruct-integer: one L1 program per channel over the fitted rows, then the same
    held-out check as `reconstruct` (on the L1 error of the change as it will be stored, rounded)."""
    layer = pair.quant_layer
    holdout = _check_rows(activity, seed)
    weights, bias = layer_parameters(quant_model, layer)
    grid = layer_grid(quant_model, layer)
    target = clipped_target(activity.float_pre, activity.quant_pre, clip_range(pair)).astype(np.float64)
    inputs: dict[int, NDArray[np.float64]] = {}
    problems = []
    for j in selected:
        columns = layer.columns(j)
        if columns.start not in inputs:
            inputs[columns.start] = activity.quant_inputs[~holdout, columns].astype(np.float64)
        fit_target = target[~holdout, j]
        problems.append(
            FitProblem(j, weights[j], float(bias[j]), inputs[columns.start], fit_target, _neuron_grid(grid, j))
        )
    solutions = _map_solves(problems, config, progress, deadline, executor, pair.quant_layer.name)
    checked = []
    for solution in solutions:
        j = solution.neuron
        if solution.weight_delta is None:
            checked.append(solution)
            continue
        rows = activity.quant_inputs[holdout, layer.columns(j)].astype(np.float64)
        before = rows @ weights[j] + bias[j] - target[holdout, j]
        stored = _on_grid(solution.weight_delta, grid.weight_step[j], grid.weight_low[j], grid.weight_high[j])
        after = before + rows @ stored + solution.bias_delta
        if np.abs(after).sum() < np.abs(before).sum() * (1 - 1e-9):
            checked.append(solution)
        else:
            reason = "its rounded change does not lower its error on held-out rows"
            checked.append(
                dataclasses.replace(solution, status=SolveStatus.UNCHANGED, weight_delta=None, reason=reason)
            )
    return checked


def _on_grid(
    delta: NDArray[np.float64], step: NDArray[np.float64], low: NDArray[np.float64], high: NDArray[np.float64]
) -> NDArray[np.float64]:
    """A weight change as rewrite.apply_deltas will store it: whole steps, within the integer type's range."""
    whole = np.clip(np.round(delta / np.where(step > 0, step, 1.0)), low, high)
    return np.where(step > 0, whole * step, delta)


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
        if not activity.is_output_layer() or pair.quant_layer.groups > 1:
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
        check_logit_size(joint, pair.float_layer.name)
        if deadline is not None and time.perf_counter() >= deadline:
            reason = "the search budget ran out"
            return [NeuronSolution(j, SolveStatus.TIME_LIMIT, None, None, 0.0, 0, reason) for j in selected]
        with progress.task("solving (joint)", 1) as advance:
            solutions = solve_logit(joint, _within(config, deadline))
            advance(1)
        return solutions
    problems = layer_problems(quant_model, pair, activity, selected)
    return _map_solves(problems, config, progress, deadline, executor, pair.quant_layer.name)


def _map_solves(
    problems: Sequence[NeuronProblem | FitProblem],
    config: SolveConfig,
    progress: Progress,
    deadline: float | None,
    executor: Executor,
    layer: str,
) -> list[NeuronSolution]:
    """Solve every problem through `executor`, in order, each before the deadline.

    Raises:
        WorkerDiedError: a problem's worker process died on every try (named by layer and channel).
    """
    # a worker process costs a second to start: worth it only for several problems of some size
    if len(problems) < 2 * executor.jobs or problems[0].inputs.size < _FAN_OUT_MIN_INPUTS:
        executor = SerialExecutor()
    wall_deadline = None if deadline is None else time.time() + (deadline - time.perf_counter())
    solve = functools.partial(solve_before, config=config, wall_deadline=wall_deadline)
    solutions = []
    with progress.task("solving", len(problems)) as advance:
        try:
            for solution in executor.map(solve, problems):
                if not solution.solved:
                    logger.info("neuron %d left unchanged: %s", solution.neuron, solution.reason)
                solutions.append(solution)
                advance(1)
        except WorkerDiedError as died:
            raise WorkerDiedError(
                f"solving channel {problems[died.index].neuron} of layer '{layer}' failed: {died}; nothing was "
                "written (a solver process that runs out of memory dies this way: try fewer --jobs)",
                died.index,
            ) from died
    return solutions


_FAN_OUT_MIN_INPUTS = 100_000  # repair inputs x layer inputs
# The joint class-score program is a dense matrix (one row per input and competing class): on an ImageNet
# head it would take terabytes (issue 14: the search was killed for memory). Larger ones are refused.
# Solving one takes about 3x its matrix (measured: a 3.0 GB matrix raised the peak by 8.6 GB); at 1 GB
# and at 512 MB the 120 s search on EfficientNet-Lite0's head peaked at 2.06-2.07x the plain run's
# memory (issue 14.6 bounds it at 2x), a joint program over 5 of its classes being the largest step.
MAX_LOGIT_PROGRAM_BYTES = 2**28


def check_logit_size(joint: LogitProblem, layer: str) -> None:
    """Refuse a joint class-score program whose matrix would exceed MAX_LOGIT_PROGRAM_BYTES."""
    size = logit_program_bytes(joint)
    if size > MAX_LOGIT_PROGRAM_BYTES:
        raise UnsupportedModelError(
            f"--encoding logit over {len(joint.neurons)} of the {joint.weights.shape[0]} classes of "
            f"'{layer}' with {len(joint.inputs)} repair inputs would be a {size / 2**30:.1f} GB program; "
            "select fewer neurons (--neurons) or use another encoding"
        )


def layer_problems(
    quant_model: onnx.ModelProto, pair: LayerPair, activity: LayerActivity, selected: list[int]
) -> list[NeuronProblem]:
    """One problem per selected neuron, as `repair_layer` solves them; the neurons of a group share one array.

    Sharing matters for --jobs: the array is pickled once per chunk of problems, not once per neuron. A
    convolution's channel reads its group's columns of the rows (all of them with one group).
    """
    layer = pair.quant_layer
    weights, bias = layer_parameters(quant_model, layer)
    grid = layer_grid(quant_model, layer)
    inputs: dict[int, NDArray[np.float64]] = {}
    problems = []
    for j in selected:
        columns = layer.columns(j)
        if columns.start not in inputs:
            inputs[columns.start] = activity.quant_inputs[:, columns].astype(np.float64)
        problems.append(
            NeuronProblem(
                j,
                weights[j],
                float(bias[j]),
                inputs[columns.start],
                activity.float_pre[:, j] > 0,
                _neuron_grid(grid, j),
            )  # fmt: skip
        )
    return problems


def solve_before(
    problem: NeuronProblem | FitProblem, config: SolveConfig, wall_deadline: float | None
) -> NeuronSolution:
    """Solve one neuron unless the deadline (a time.time() value, valid across processes) has passed."""
    if wall_deadline is not None:
        left = wall_deadline - time.time()
        if left <= _MIN_SOLVE_SECONDS:
            reason = "the search budget ran out"
            return NeuronSolution(problem.neuron, SolveStatus.TIME_LIMIT, None, None, 0.0, 0, reason)
        # never past the deadline: a solve given a second when 0.1 s was left took the 120 s search to 120.1 s
        config = dataclasses.replace(config, time_limit=min(config.time_limit, left))
    if isinstance(problem, FitProblem):
        return solve_fit(problem, config)
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


# A neuron is not started with less time than this left before the deadline: it could not finish.
_MIN_SOLVE_SECONDS = 0.05


def _within(config: SolveConfig, deadline: float | None) -> SolveConfig:
    """The config with its time limit cut to what is left before the deadline."""
    if deadline is None:
        return config
    left = max(deadline - time.perf_counter(), _MIN_SOLVE_SECONDS)
    return dataclasses.replace(config, time_limit=min(config.time_limit, left))
