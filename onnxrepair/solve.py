"""Repair problems -> python-mip -> weight and bias deltas.

Per-neuron encodings, for one neuron with incoming weights w (m values) and
bias b, over the repair inputs x_k (rows of X, [n, m], the layer input as the
quantized model computes it); s_k = +1 when the float model's pre-activation
is > 0 on input k and -1 otherwise:

    paper     minimise  M                         (or sum |delta| with --objective l1)
              s.t.      s_k (x_k . (w + delta) + b) >= margin           for all k
                        |delta_i| <= M
    soft      minimise  (1/n) sum_k slack_k + norm_weight * |change|
              s.t.      s_k (x_k . (w + delta) + b + beta) >= margin - slack_k,  slack_k >= 0
    integer   as soft, with delta_i = step_i * u_i and beta = step_b * u_b for
              integers u within the stored integers' range: the model written is
              exactly the model solved, nothing is rounded afterwards.

The structured solve (`SolveConfig.structured`) writes `paper` with the L-infinity
objective in ratio form (v = delta / M, t = 1 / M, `paper_ratio_program`): one row
per input, the norm as bounds, the same optimum.

beta, the bias change, is a variable when `repair_bias` is on. |change| is
sum |delta_i| + |beta| (L1, through auxiliary t >= +-change) or
max(|delta_i|, |beta|) (L-infinity, through one auxiliary M).

The joint `logit` encoding for an output layer is in `logit_program`. The
reconstruction programs (`fit_program`), over rows whose float pre-activation
y_k is the target:

    reconstruct-lp       minimise (1/n) sum_k |x_k . (w + delta) + b + beta - y_k| + norm_weight * |change|
    reconstruct-integer  the same in whole quantization steps (a MILP)
Programs are dense arrays (c, A, rhs, bounds, integrality), except the slack
variables that soft programs give every row: one entry per row (LinearProgram).
This module is the only one that imports a solver. It knows nothing of ONNX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import highspy
import mip
import numpy as np
from numpy.typing import NDArray

from onnxrepair.config import Encoding, Objective, SolveConfig, SolverBackend

logger = logging.getLogger(__name__)


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"
    FEASIBLE = "feasible"  # a solution, not proven optimal (time limit)
    INFEASIBLE = "infeasible"
    TIME_LIMIT = "time_limit"  # no solution within the time limit
    UNCHANGED = "unchanged"  # solved, but the change did not help on held-out rows: left as it is
    ERROR = "error"


@dataclass(frozen=True)
class NeuronProblem:
    """What the solver needs to repair one neuron.

    Attributes:
        neuron: index of the neuron in its layer.
        weights: [m] incoming weights as the quantized model uses them (dequantized).
        bias: the neuron's bias as the quantized model uses it.
        inputs: [n, m] layer inputs of the repair images, as the quantized model computes them.
        float_on: [n] True where the float model's pre-activation is > 0.
        grid: where the parameters may move in whole integer steps (needed by `integer`).
    """

    neuron: int
    weights: NDArray[np.float64]
    bias: float
    inputs: NDArray[np.float64]
    float_on: NDArray[np.bool_]
    grid: NeuronGrid | None = None


@dataclass(frozen=True)
class NeuronGrid:
    """One neuron's integer grid: step sizes and the whole-step range that stays in the integer type.

    Attributes:
        weight_step, weight_low, weight_high: [m].
        bias_step, bias_low, bias_high: the bias; bias_step None when the layer
            has no bias (it then cannot be repaired), 0 when it is stored as float.
    """

    weight_step: NDArray[np.float64]
    weight_low: NDArray[np.float64]
    weight_high: NDArray[np.float64]
    bias_step: float | None = None
    bias_low: float = -np.inf
    bias_high: float = np.inf


@dataclass(frozen=True)
class LogitProblem:
    """The output layer's repair over class scores, jointly for the selected neurons (classes).

    Attributes:
        neurons: the selected classes, whose weights and biases may change.
        weights: [classes, m] all classes' weights as the quantized model uses them.
        bias: [classes].
        inputs: [n, m] layer inputs as the quantized model computes them.
        targets: [n] the class that must win on each input (the float model's top-1).
        grids: per selected neuron, its grid (for the bias variable and steps).
    """

    neurons: list[int]
    weights: NDArray[np.float64]
    bias: NDArray[np.float64]
    inputs: NDArray[np.float64]
    targets: NDArray[np.int64]
    grids: list[NeuronGrid | None] = field(default_factory=list)


@dataclass(frozen=True)
class LinearProgram:
    """minimise c.z subject to A z <= rhs and lower <= z <= upper.

    A = [a | S]: `a` dense over the first a.shape[1] variables; S over the slack variables after them,
    held as one entry per row: row i has -1 on slack `slack[i]` (none where it is negative; no S at
    all without `slack`). A soft program has a slack per row, and its -I block held dense took k^2
    floats: 8.6 GB for the 32,872 rows of one channel of the bundled CNN's first convolution.

    Attributes:
        integer: [v] True for variables that must take whole values (empty: none).
    """

    c: NDArray[np.float64]  # [v]
    a: NDArray[np.float64]  # [rows, v without the slacks]
    rhs: NDArray[np.float64]  # [rows]
    lower: NDArray[np.float64]  # [v], -inf for free
    upper: NDArray[np.float64]  # [v], +inf for free
    integer: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))
    slack: NDArray[np.int64] | None = None  # [rows]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, variables) of the whole A."""
        return len(self.rhs), len(self.c)

    def slack_entries(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(row, column) of every -1 of S, in row order; empty without slacks."""
        if self.slack is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(self.slack >= 0)
        return rows, self.a.shape[1] + self.slack[rows]

    def matrix(self) -> NDArray[np.float64]:
        """The whole A, dense (small programs and tests only)."""
        full = np.zeros(self.shape)
        full[:, : self.a.shape[1]] = self.a
        full[self.slack_entries()] = -1.0
        return full

    def rows_times(self, z: NDArray[np.float64]) -> NDArray[np.float64]:
        """A z, without making A dense."""
        product = self.a @ z[: self.a.shape[1]]
        rows, columns = self.slack_entries()
        product[rows] -= z[columns]
        return product


@dataclass(frozen=True)
class ParameterBlock:
    """Where one neuron's parameters sit in z: delta = weight_scale * u[weights], beta = bias_scale * u[bias].

    u = z, or u = z[i] - z[i + negative] when the program splits each
    parameter into a positive and a negative part (`negative` > 0).
    """

    weights: slice
    weight_scale: NDArray[np.float64]  # [m]
    bias: int | None
    bias_scale: float
    negative: int = 0

    def unpack(self, z: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
        u = z - np.roll(z, -self.negative) if self.negative else z
        delta = self.weight_scale * u[self.weights]
        beta = 0.0 if self.bias is None else self.bias_scale * float(u[self.bias])
        return delta, beta


@dataclass(frozen=True)
class NeuronSolution:
    """The outcome for one neuron; `weight_delta` is None unless a solution was found.

    Attributes:
        constraints: the sign rows (one per repair input) in the last program
            solved: all of them without row generation.
        reason: why there is no solution, in words; empty when solved.
        rounds: programs solved (more than one when row generation added rows).
    """

    neuron: int
    status: SolveStatus
    weight_delta: NDArray[np.float64] | None
    objective: float | None
    seconds: float
    constraints: int
    reason: str = ""
    bias_delta: float = 0.0
    rounds: int = 1

    @property
    def solved(self) -> bool:
        return self.weight_delta is not None


@dataclass(frozen=True)
class FitProblem:
    """One channel's reconstruction: make inputs @ (weights + delta) + bias + beta match `target` (L1).

    Attributes:
        inputs: [n, m] rows (the layer input as the quantized model computes it).
        target: [n] the float model's pre-activation at the same rows.
        grid: the channel's integer grid (the integer encoding's steps and bounds).
    """

    neuron: int
    weights: NDArray[np.float64]
    bias: float
    inputs: NDArray[np.float64]
    target: NDArray[np.float64]
    grid: NeuronGrid | None = None


def fit_program(
    problem: FitProblem,
    working: NDArray[np.bool_],
    integer: bool,
    repair_bias: bool,
    norm_weight: float,
) -> tuple[LinearProgram, ParameterBlock]:
    """The L1 reconstruction program over the `working` rows, the other rows summed with their current sign.

    z = (u_plus [p], u_minus [p], t [working rows]), change = step * (u_plus - u_minus),
    p = m weights (+ 1 bias). A working row k has t_k >= |r_k|, r_k = r0_k + x_k . delta + beta
    the residual (r0 at no change); a row outside the working set adds sign(r0_k) * r_k / n to the
    objective, which is at most |r_k| / n and equals it while its residual keeps its sign: the
    program is a relaxation of the full one, exact when no row outside the set changes sign.
    """
    x, n = problem.inputs, len(problem.target)
    m = x.shape[1]
    grid = problem.grid
    if integer and grid is None:
        raise ValueError("the integer encoding needs the channel's grid")
    has_bias = repair_bias and (grid is None or grid.bias_step is not None)
    w_scale = grid.weight_step if integer and grid is not None else np.ones(m)
    b_scale = float(grid.bias_step) if integer and grid is not None and grid.bias_step else 1.0
    p = m + int(has_bias)
    scale = np.append(w_scale, b_scale) if has_bias else w_scale
    columns = x * w_scale if not has_bias else np.hstack([x * w_scale, np.full((n, 1), b_scale)])  # d r_k / d u
    residual = x @ problem.weights + problem.bias - problem.target
    sign = np.sign(residual)
    rest = ~working
    summed = (sign[rest] @ columns[rest]) / max(n, 1)  # d/du of the rows outside the working set
    rows = columns[working]
    k = len(rows)
    # t_k >= +r_k:  cols.u - t_k <= -r0_k ;  t_k >= -r_k:  -cols.u - t_k <= r0_k
    a = np.block([[rows, -rows], [-rows, rows]])
    rhs = np.concatenate([-residual[working], residual[working]])
    c = np.concatenate([summed + norm_weight * scale, -summed + norm_weight * scale, np.full(k, 1.0 / max(n, 1))])
    high = np.full(p, np.inf)
    low_split = np.full(p, np.inf)
    whole = np.zeros(p, dtype=bool)
    if integer and grid is not None:
        high[:m], low_split[:m], whole[:m] = np.maximum(grid.weight_high, 0), np.maximum(-grid.weight_low, 0), True
        if has_bias and grid.bias_step:
            high[m], low_split[m], whole[m] = max(grid.bias_high, 0.0), max(-grid.bias_low, 0.0), True
    if norm_weight > 0:
        # The rows outside the working set enter linearly, so without bounds the relaxation could run off to
        # minus infinity (it did, on every continuous fit whose first working set, max(_MIN_FIT_ROWS, 2 x
        # fan-in) rows, left rows out: HiGHS said Unbounded). No optimum of the full program goes further than
        # this: its norm term alone, norm_weight * scale_i * |u_i|, is at most its objective at no change,
        # mean |r0|.
        reach = np.abs(residual).mean() / (norm_weight * scale)
        reach = np.where(whole, np.floor(reach), reach)
        high, low_split = np.minimum(high, reach), np.minimum(low_split, reach)
    program = LinearProgram(
        c=c,
        a=a,
        rhs=rhs,
        lower=np.zeros(2 * p + k),
        upper=np.concatenate([high, low_split, np.full(k, np.inf)]),
        integer=np.concatenate([whole, whole, np.zeros(k, dtype=bool)]),
        slack=np.concatenate([np.arange(k), np.arange(k)]),
    )
    return program, ParameterBlock(slice(0, m), w_scale, m if has_bias else None, b_scale, p)


def solve_fit(problem: FitProblem, config: SolveConfig) -> NeuronSolution:
    """Solve the channel's L1 reconstruction by row generation (see `fit_program`); failures come back as a status.

    The working set starts with the rows whose residual is nearest zero (where a change can flip its
    sign), and grows by every row whose sign the last solution flipped, until none flips: then the
    relaxation's optimum is the full program's. Once `config.time_limit` is spent it stops: TIME_LIMIT.
    """
    start = time.perf_counter()
    n = len(problem.target)
    residual = problem.inputs @ problem.weights + problem.bias - problem.target
    working = np.zeros(n, dtype=bool)
    working[np.argsort(np.abs(residual))[: max(_MIN_FIT_ROWS, 2 * problem.inputs.shape[1])]] = True
    # --full-lp, or no norm term to bound the relaxation (see fit_program): every row in the program
    working |= (residual == 0) | (not config.structured) | (config.norm_weight <= 0)
    integer = config.encoding is Encoding.RECONSTRUCT_INTEGER
    options = config.highs_options if integer else (("presolve", "off"), *config.highs_options)
    rounds = solved_rows = 0
    while True:
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds > 1 and elapsed >= config.time_limit:
            return _out_of_time(problem.neuron, config, elapsed, solved_rows, rounds - 1)
        program, block = fit_program(problem, working, integer, config.resolved_repair_bias, config.norm_weight)
        time_left = max(config.time_limit - elapsed, 0.01)
        solved_rows = int(working.sum())
        result = solve_program(program, config.backend, time_left, options)
        status, z, objective = result.status, result.z, result.objective
        if z is None:
            seconds, reason = time.perf_counter() - start, result.reason(config)
            return NeuronSolution(
                problem.neuron, status, None, None, seconds, int(working.sum()), reason, rounds=rounds
            )
        delta, beta = block.unpack(z)
        moved = residual + problem.inputs @ delta + beta
        flipped = ~working & (np.sign(moved) * np.sign(residual) < 0)
        if not flipped.any():
            seconds = time.perf_counter() - start
            return NeuronSolution(
                problem.neuron, status, delta, objective, seconds, int(working.sum()), "", beta, rounds=rounds
            )
        working |= flipped


_MIN_FIT_ROWS = 64


def _out_of_time(neuron: int, config: SolveConfig, elapsed: float, rows: int, solved: int) -> NeuronSolution:
    """Row generation past its limit, after `solved` programs (the last over `rows` rows): each further round
    would get a token 0.01 s and the loop would go on until no row breaks (a search step given 1.7 s on the
    bundled CNN's conv1 took 25 s), so it stops, and the relaxation's last solution, which breaks rows it has
    not seen, is not used."""
    rounds = f"{solved} round{'s' if solved != 1 else ''}"
    reason = f"{_REASONS[SolveStatus.TIME_LIMIT](config)} (row generation stopped after {rounds})"
    return NeuronSolution(neuron, SolveStatus.TIME_LIMIT, None, None, elapsed, rows, reason, rounds=solved)


def paper_program(problem: NeuronProblem, margin: float) -> LinearProgram:
    """The paper's L-infinity LP for one neuron, z = (delta, M) (see the module docstring)."""
    program, _ = neuron_program(problem, Encoding.PAPER, Objective.LINF, repair_bias=False, margin=margin)
    return program


def neuron_program(
    problem: NeuronProblem,
    encoding: Encoding,
    objective: Objective,
    repair_bias: bool,
    margin: float,
    norm_weight: float = 0.01,
    slack_weight: float | None = None,
    split_l1: bool = True,
) -> tuple[LinearProgram, ParameterBlock]:
    """One neuron's program under `encoding` (paper, soft or integer), and where its parameters sit in z.

    u = (weight steps [m], bias step [1 if the bias is a variable]); change = step size * u.
    With an L1 objective and `split_l1`, u = u_plus - u_minus with both >= 0 and
    z = (u_plus, u_minus, slack [n if soft]): the norm is a sum of variables and
    needs no rows, so a program has one row per repair input and nothing else
    (on a 1280-input head this makes each solve several times faster than the
    textbook form). Otherwise z = (u, norm auxiliaries, slack) with the rows of
    `_norm_rows`. `slack_weight` (default 1/n) lets a program over some of the
    rows keep the full program's objective.
    """
    x, w = problem.inputs, problem.weights
    n, m = x.shape
    grid = problem.grid
    integer = encoding is Encoding.INTEGER
    if integer and grid is None:
        raise ValueError("the integer encoding needs the neuron's grid")
    has_bias = repair_bias and (grid is None or grid.bias_step is not None)  # a layer without bias keeps none
    w_scale = grid.weight_step if integer and grid is not None else np.ones(m)
    b_scale = float(grid.bias_step) if integer and grid is not None and grid.bias_step else 1.0
    n_params = m + int(has_bias)
    param_scale = np.append(w_scale, b_scale) if has_bias else w_scale  # change = param_scale * u
    u_low, u_high = np.full(n_params, -np.inf), np.full(n_params, np.inf)
    u_integer = np.zeros(n_params, dtype=bool)
    if integer and grid is not None:
        u_low[:m], u_high[:m], u_integer[:m] = grid.weight_low, grid.weight_high, True
        if has_bias and grid.bias_step:
            u_low[m], u_high[m], u_integer[m] = grid.bias_low, grid.bias_high, True
    n_slack = n if encoding.soft else 0
    norm_coef = norm_weight if n_slack else 1.0

    sign = np.where(problem.float_on, 1.0, -1.0)  # s_k, [n]
    # sign rows: -s_k (x_k * w_scale) . u - s_k b_scale u_b - slack_k <= s_k (x_k . w + b) - margin
    u_rows = -sign[:, None] * x * w_scale
    if has_bias:
        u_rows = np.hstack([u_rows, (-sign * b_scale)[:, None]])
    sign_rhs = sign * (x @ w + problem.bias) - margin
    split = split_l1 and objective is Objective.L1
    if split:
        param_rows = np.hstack([u_rows, -u_rows])
        param_cost = norm_coef * np.concatenate([param_scale, param_scale])
        param_low = np.zeros(2 * n_params)
        param_high = np.concatenate([np.maximum(u_high, 0.0), np.maximum(-u_low, 0.0)])
        param_integer = np.concatenate([u_integer, u_integer])
        n_aux = 0
    else:
        n_aux = n_params if objective is Objective.L1 else 1
        param_rows = np.hstack([u_rows, np.zeros((n, n_aux))])
        param_cost = np.concatenate([np.zeros(n_params), np.full(n_aux, norm_coef)])
        param_low = np.concatenate([u_low, np.zeros(n_aux)])
        param_high = np.concatenate([u_high, np.full(n_aux, np.inf)])
        param_integer = np.concatenate([u_integer, np.zeros(n_aux, dtype=bool)])
    slack0 = param_rows.shape[1]
    v = slack0 + n_slack
    rows, rhs = [param_rows], [sign_rhs]
    n_norm_rows = 0 if split else 2 * n_params
    if not split:
        rows.append(_norm_rows(param_scale, objective, n_params, v)[:, :slack0])
        rhs.append(np.zeros(n_norm_rows))
    # sign row k has -1 on slack_k; the norm rows have none
    slack = np.concatenate([np.arange(n), np.full(n_norm_rows, -1)]) if n_slack else None
    c = np.zeros(v)
    c[:slack0] = param_cost
    c[slack0:] = slack_weight if slack_weight is not None else 1.0 / n if n else 0.0
    program = LinearProgram(
        c=c,
        a=np.vstack(rows),
        rhs=np.concatenate(rhs),
        lower=np.concatenate([param_low, np.zeros(n_slack)]),
        upper=np.concatenate([param_high, np.full(n_slack, np.inf)]),
        integer=np.concatenate([param_integer, np.zeros(n_slack, dtype=bool)]),
        slack=slack,
    )
    block = ParameterBlock(slice(0, m), w_scale, m if has_bias else None, b_scale, n_params if split else 0)
    return program, block


def solve_neuron(problem: NeuronProblem, config: SolveConfig) -> NeuronSolution:
    """Solve the neuron's program; every failure comes back as a status with a reason.

    With `config.structured` (the default) the program is solved over a
    working set of its sign rows: the rows broken or nearly so before any
    change, then every row the last solution breaks, until it breaks none. A
    program over fewer rows is a relaxation of the full one (a dropped row only
    constrains, and its slack only adds to the objective), so a solution that
    breaks no dropped row is optimal for the full program, and a relaxation
    with no solution means the full program has none. Most inputs sit far from
    the neuron's threshold, so the working set stays a small share of the rows.
    Once `config.time_limit` is spent it stops: TIME_LIMIT, no change.
    """
    start = time.perf_counter()
    n = len(problem.float_on)
    margin = config.resolved_margin
    sign = np.where(problem.float_on, 1.0, -1.0)
    signed = sign * (problem.inputs @ problem.weights + problem.bias)
    # the paper's L-infinity program in ratio form (`paper_ratio_program`): same optimum, no norm rows
    ratio = config.structured and config.encoding is Encoding.PAPER and config.resolved_objective is Objective.LINF
    working = _initial_rows(signed, margin) if config.structured else np.ones(n, dtype=bool)
    if ratio:
        # its later rounds go on from the last basis, so rows that might break are cheaper added when they do
        # (measured on the ImageNet head: a quarter less time than starting with as many of the nearest kept rows)
        working = signed < margin
    options = config.highs_options
    if config.structured and config.encoding is not Encoding.INTEGER:
        # measured (tools/bench_speed.py): presolve finds nothing to remove in these dense LPs and costs
        # 2-3x the dual simplex itself; MILPs keep it (it tightens the integer bounds)
        options = (("presolve", "off"), *options)
    session = _PaperRatio(problem, config, margin, options) if ratio else None
    rounds = solved_rows = 0
    while True:
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds > 1 and elapsed >= config.time_limit:
            return _out_of_time(problem.neuron, config, elapsed, solved_rows, rounds - 1)
        time_left = max(config.time_limit - elapsed, 0.01)
        solved_rows = int(working.sum())
        if session is not None:
            result, change = session.solve(working, time_left)
            delta, beta = change if change is not None else (None, 0.0)
        else:
            program, block = neuron_program(
                _rows_of(problem, working),
                config.encoding,
                config.resolved_objective,
                config.resolved_repair_bias,
                margin,
                config.norm_weight,
                slack_weight=1.0 / n if n else 0.0,
                split_l1=config.structured,
            )
            result = solve_program(program, config.backend, time_left, options)
            delta, beta = block.unpack(result.z) if result.z is not None else (None, 0.0)
        status, objective = result.status, result.objective
        if delta is None:
            seconds, reason = time.perf_counter() - start, result.reason(config)
            rows = int(working.sum())
            return NeuronSolution(problem.neuron, status, None, None, seconds, rows, reason, rounds=rounds)
        repaired = sign * (problem.inputs @ (problem.weights + delta) + problem.bias + beta)
        broken = ~working & (repaired < margin - 1e-9)
        if not broken.any():
            seconds = time.perf_counter() - start
            return NeuronSolution(
                problem.neuron, status, delta, objective, seconds, int(working.sum()), "", beta, rounds=rounds
            )
        working |= broken


def paper_ratio_program(problem: NeuronProblem, repair_bias: bool, margin: float) -> LinearProgram:
    """The paper's L-infinity program in ratio form: z = (v [m weights, + 1 bias if a variable], t).

    For an optimum M > 0, v = change / M and t = 1 / M (the Charnes-Cooper change of variables) turn

        minimise M  s.t.  s_k (x_k . (w + delta) + b + beta) >= margin,  |delta_i|, |beta| <= M

    into

        maximise t  s.t.  s_k (x_k . v + v_b) >= (margin - s_k (x_k . w + b)) t,  -1 <= v <= 1,  t >= 0

    with the same optimum (M* = 1 / t*, delta = v / t*). The 2m rows |delta_i| <= M become bounds, so a
    program has one row per repair input: on a 1280-input head the textbook form's basis has 2,560 norm
    rows besides the ~150 sign rows, and dual simplex spends most of a neuron's time in them (issue 14).
    t* = 0 means no finite M: the textbook program is infeasible. (Needs a broken row: r_k > 0 for some k,
    else t is unbounded and M* = 0.)
    """
    x, n, m = problem.inputs, *problem.inputs.shape
    grid = problem.grid
    has_bias = repair_bias and (grid is None or grid.bias_step is not None)
    sign = np.where(problem.float_on, 1.0, -1.0)
    need = margin - sign * (x @ problem.weights + problem.bias)  # r_k
    # -s_k (x_k . v + v_b) + r_k t <= 0
    columns = [-sign[:, None] * x, *([(-sign)[:, None]] if has_bias else []), need[:, None]]
    p = m + int(has_bias)
    c = np.zeros(p + 1)
    c[p] = -1.0
    return LinearProgram(
        c=c,
        a=np.hstack(columns),
        rhs=np.zeros(n),
        lower=np.append(np.full(p, -1.0), 0.0),
        upper=np.append(np.full(p, 1.0), np.inf),
    )


class _PaperRatio:
    """The paper's L-infinity program over a growing set of rows, through `paper_ratio_program`.

    With HiGHS the program is built once and each round adds its new rows to it, so dual simplex goes on
    from the last optimal basis (the new rows are what it breaks) instead of starting again; with CBC
    each round solves the program over all the rows so far.
    """

    def __init__(self, problem: NeuronProblem, config: SolveConfig, margin: float, options: HighsOptions) -> None:
        self.problem, self.config, self.margin, self.options = problem, config, margin, options
        self.repair_bias = config.resolved_repair_bias
        self.sign = np.where(problem.float_on, 1.0, -1.0)
        self.signed = self.sign * (problem.inputs @ problem.weights + problem.bias)
        self.held = np.zeros(len(self.sign), dtype=bool)  # rows in the HiGHS model
        self.highs: highspy.Highs | None = None

    def solve(self, working: NDArray[np.bool_], time_limit: float) -> tuple[ProgramResult, Change | None]:
        """The optimum over the `working` rows: (result with objective M, (delta, beta) or None)."""
        m = len(self.problem.weights)
        if not np.any(self.signed[working] < self.margin):  # no row broken: no change is the optimum
            return ProgramResult(SolveStatus.OPTIMAL, np.zeros(m), 0.0), (np.zeros(m), 0.0)
        result = self._solve_ratio(working, time_limit)
        if result.z is not None and result.z[-1] > 0:
            t = float(result.z[-1])
            delta = result.z[:m] / t
            beta = float(result.z[m]) / t if len(result.z) > m + 1 else 0.0
            rows = _rows_of(self.problem, working)
            kept = self.sign[working] * (rows.inputs @ (rows.weights + delta) + rows.bias + beta)
            if np.min(kept) >= self.margin - _RATIO_TOLERANCE:
                return ProgramResult(result.status, result.z, 1.0 / t, result.solver_status), (delta, beta)
        elif result.status in (SolveStatus.TIME_LIMIT, SolveStatus.FEASIBLE):  # out of time, and no M > 0 in hand
            return ProgramResult(SolveStatus.TIME_LIMIT, None, None, result.solver_status), None
        # t* = 0 (infeasible, or too close to it to trust the division): the textbook program decides
        rows = _rows_of(self.problem, working)
        program, block = neuron_program(
            rows, Encoding.PAPER, Objective.LINF, self.repair_bias, self.margin, split_l1=False
        )
        result = solve_program(program, self.config.backend, time_limit, self.options)
        return result, block.unpack(result.z) if result.z is not None else None

    def _solve_ratio(self, working: NDArray[np.bool_], time_limit: float) -> ProgramResult:
        if self.config.backend is not SolverBackend.HIGHS:
            program = paper_ratio_program(_rows_of(self.problem, working), self.repair_bias, self.margin)
            return solve_program(program, self.config.backend, time_limit, self.options)
        added = working & ~self.held
        program = paper_ratio_program(_rows_of(self.problem, added), self.repair_bias, self.margin)
        self.held |= added
        if self.highs is None:
            self.highs = _highs_model(program, time_limit, self.options)
        else:
            start, index, value = _rowwise(program)
            k = len(program.rhs)
            self.highs.addRows(k, np.full(k, -highspy.kHighsInf), program.rhs, len(index), start, index, value)
            self.highs.setOptionValue("time_limit", float(time_limit))
        return _run_highs(self.highs, program.integer)


HighsOptions = tuple[tuple[str, str | float | int | bool], ...]
Change = tuple[NDArray[np.float64], float]


# how far below the margin a row of a change from the ratio form may end (the textbook program's rows hold
# to HiGHS's primal feasibility tolerance, 1e-7): more, and the textbook program is solved instead
_RATIO_TOLERANCE = 1e-6


def _initial_rows(signed: NDArray[np.float64], margin: float) -> NDArray[np.bool_]:
    """The rows a first solve needs: every row broken before any change, and as many of the nearest kept ones."""
    broken = signed < margin
    nearest = max(_MIN_WORKING_ROWS, int(broken.sum()))
    working = broken.copy()
    kept = np.flatnonzero(~broken)
    working[kept[np.argsort(signed[kept])[:nearest]]] = True
    return working


_MIN_WORKING_ROWS = 32


def _rows_of(problem: NeuronProblem, rows: NDArray[np.bool_]) -> NeuronProblem:
    if rows.all():
        return problem
    return dataclasses.replace(problem, inputs=problem.inputs[rows], float_on=problem.float_on[rows])


def logit_program(
    problem: LogitProblem,
    objective: Objective,
    repair_bias: bool,
    margin: float,
    norm_weight: float,
) -> tuple[LinearProgram, list[ParameterBlock]]:
    """The joint class-score program for an output layer.

    For every input k with target class t_k and every other class c, where t_k
    or c is selected (otherwise the row cannot change):

        z_t(k) - z_c(k) >= margin - slack_k,     z_c(k) = x_k . (w_c + delta_c) + b_c + beta_c

    minimise (1/n) sum_k slack_k + norm_weight * |change|, the change summed
    over the selected classes. z = (per selected class: delta [m], beta [1 if
    bias]; norm auxiliaries; slack [n]).
    """
    x = problem.inputs
    n, m = x.shape
    classes = problem.weights.shape[0]
    # a grid without bias step means the layer has no bias: there is none to move
    repair_bias = repair_bias and all(g is None or g.bias_step is not None for g in problem.grids)
    selected = {neuron: i for i, neuron in enumerate(problem.neurons)}
    per_class = m + int(repair_bias)
    n_params = per_class * len(selected)
    n_aux = n_params if objective is Objective.L1 else 1
    aux0, slack0 = n_params, n_params + n_aux
    v = slack0 + n
    base = x @ problem.weights.T + problem.bias  # [n, classes] the quantized scores, linear model

    def add_class(row: NDArray[np.float64], neuron: int, sign: float) -> None:
        start = selected[neuron] * per_class
        row[start : start + m] += sign * x_row
        if repair_bias:
            row[start + m] += sign

    rows, rhs = [], []
    for k in range(n):
        target = int(problem.targets[k])
        x_row = x[k]
        for other in range(classes):
            if other == target or (other not in selected and target not in selected):
                continue
            # -(z_t - z_c) changes - slack_k <= (base_t - base_c) - margin
            row = np.zeros(v)
            if target in selected:
                add_class(row, target, -1.0)
            if other in selected:
                add_class(row, other, 1.0)
            row[slack0 + k] = -1.0
            rows.append(row)
            rhs.append(base[k, target] - base[k, other] - margin)
    norm_rows = _norm_rows(np.ones(n_params), objective, aux0, v)
    c = np.zeros(v)
    c[aux0 : aux0 + n_aux] = norm_weight
    c[slack0:] = 1.0 / n
    lower = np.full(v, -np.inf)
    lower[aux0:] = 0.0
    program = LinearProgram(
        c=c,
        a=np.vstack([np.array(rows).reshape(-1, v), norm_rows]),
        rhs=np.concatenate([np.asarray(rhs, dtype=np.float64), np.zeros(2 * n_params)]),
        lower=lower,
        upper=np.full(v, np.inf),
    )
    blocks = [
        ParameterBlock(
            slice(i * per_class, i * per_class + m), np.ones(m), i * per_class + m if repair_bias else None, 1.0
        )
        for i in range(len(selected))
    ]
    return program, blocks


def logit_program_bytes(problem: LogitProblem) -> int:
    """The memory the joint class-score program's dense matrix takes (`logit_program`), to refuse it before."""
    n, m = problem.inputs.shape
    classes = problem.weights.shape[0]
    selected = set(problem.neurons)
    rows = sum(classes - 1 if int(t) in selected else len(selected) for t in problem.targets)
    columns = 2 * len(selected) * (m + 1) + n
    return 8 * rows * columns


def solve_logit(problem: LogitProblem, config: SolveConfig) -> list[NeuronSolution]:
    """Solve the joint class-score program; one NeuronSolution per selected class (sharing status and time)."""
    start = time.perf_counter()
    program, blocks = logit_program(
        problem, config.resolved_objective, config.resolved_repair_bias, config.resolved_margin, config.norm_weight
    )
    result = solve_program(program, config.backend, config.time_limit, config.highs_options)
    status, z, objective = result.status, result.z, result.objective
    seconds = time.perf_counter() - start
    parameters = sum(len(b.weight_scale) + int(b.bias is not None) for b in blocks)
    score_rows = len(program.rhs) - 2 * parameters  # without the norm rows
    solutions = []
    for neuron, block in zip(problem.neurons, blocks, strict=True):
        if z is None:
            solutions.append(NeuronSolution(neuron, status, None, None, seconds, score_rows, result.reason(config)))
        else:
            delta, beta = block.unpack(z)
            solutions.append(NeuronSolution(neuron, status, delta, objective, seconds, score_rows, "", beta))
    return solutions


def _norm_rows(param_scale: NDArray[np.float64], objective: Objective, aux0: int, v: int) -> NDArray[np.float64]:
    """Rows bounding each change: +-scale_i u_i - t_i <= 0 (L1) or +-scale_i u_i - M <= 0 (L-infinity).

    The parameters u are z[:p]; the auxiliaries t (L1, p of them) or M start at z[aux0].
    """
    p = len(param_scale)
    rows = np.zeros((2 * p, v))
    for block, direction in ((rows[:p], 1.0), (rows[p:], -1.0)):
        block[:, :p] = direction * np.diag(param_scale)
        if objective is Objective.L1:
            block[:, aux0 : aux0 + p] = -np.eye(p)
        else:
            block[:, aux0] = -1.0
    return rows


_REASONS = {
    SolveStatus.INFEASIBLE: lambda config: (
        "no weight change makes the neuron's sign match the float model on every repair input"
    ),
    SolveStatus.TIME_LIMIT: lambda config: f"no solution within the time limit of {config.time_limit:g} s",
    SolveStatus.ERROR: lambda config: "the solver failed",
    SolveStatus.UNCHANGED: lambda config: "its change does not lower its error on held-out rows",
    SolveStatus.OPTIMAL: lambda config: "",
    SolveStatus.FEASIBLE: lambda config: "",
}


@dataclass(frozen=True)
class ProgramResult:
    """What a solver made of a LinearProgram: `z` and `objective` are None unless it found a solution.

    `solver_status` is the solver's own name for the outcome (HiGHS: Optimal, Infeasible...; CBC
    through python-mip: OPTIMAL, INFEASIBLE...), given in every reason that is not a solution.
    """

    status: SolveStatus
    z: NDArray[np.float64] | None
    objective: float | None
    solver_status: str = ""

    def reason(self, config: SolveConfig) -> str:
        """Why there is no solution, in words, with the solver's own status name; empty with one."""
        text = _REASONS[self.status](config)
        return f"{text} ({self.solver_status})" if text and self.solver_status else text


def solve_program(
    program: LinearProgram,
    backend: SolverBackend,
    time_limit: float,
    highs_options: tuple[tuple[str, str | float | int | bool], ...] = (),
) -> ProgramResult:
    """Solve a LinearProgram.

    HiGHS gets the matrix in one call through highspy; python-mip, which
    drives CBC, adds rows term by term in Python (about 2 ms per row of 1,280
    inputs: most of a neuron's solve time on an ImageNet head).
    """
    if backend is SolverBackend.HIGHS:
        return _solve_with_highspy(program, time_limit, highs_options)
    return _solve_with_mip(program, backend, time_limit)


def _solve_with_highspy(
    program: LinearProgram, time_limit: float, options: tuple[tuple[str, str | float | int | bool], ...]
) -> ProgramResult:
    return _run_highs(_highs_model(program, time_limit, options), program.integer)


def _highs_model(
    program: LinearProgram, time_limit: float, options: tuple[tuple[str, str | float | int | bool], ...]
) -> highspy.Highs:
    """A Highs object holding `program`, quiet, on one thread, with `options` applied last."""
    with _native_stdout_silenced():  # the banner is printed when the object is made
        highs = highspy.Highs()
    integer = program.integer if len(program.integer) else np.zeros(len(program.c), dtype=bool)
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("threads", 1)
    highs.setOptionValue("time_limit", float(time_limit))
    for name, value in options:
        highs.setOptionValue(name, value)
    lp = highspy.HighsLp()
    rows, columns = program.shape
    lp.num_col_, lp.num_row_ = columns, rows
    lp.col_cost_ = program.c
    lp.col_lower_ = np.where(np.isinf(program.lower), -highspy.kHighsInf, program.lower)
    lp.col_upper_ = np.where(np.isinf(program.upper), highspy.kHighsInf, program.upper)
    lp.row_lower_ = np.full(rows, -highspy.kHighsInf)
    lp.row_upper_ = program.rhs
    start, index, value = _rowwise(program)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = columns, rows
    lp.a_matrix_.start_ = np.append(start, len(index)).astype(np.int32)
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    if integer.any():
        kinds = (highspy.HighsVarType.kContinuous, highspy.HighsVarType.kInteger)
        lp.integrality_ = [kinds[int(whole)] for whole in integer]
    highs.passModel(lp)
    return highs


def _rowwise(program: LinearProgram) -> tuple[NDArray[np.int32], NDArray[np.int32], NDArray[np.float64]]:
    """A's nonzeros row by row: (each row's first entry, column indices, values), the slack entries last in
    their rows (their columns come after the dense ones, so every row stays in column order)."""
    a, rows = program.a, len(program.rhs)
    row_index, column_index = np.nonzero(a)  # row by row, each row in column order
    slack_rows, slack_columns = program.slack_entries()
    dense = np.bincount(row_index, minlength=rows)
    length = dense + np.bincount(slack_rows, minlength=rows)
    start = np.cumsum(length) - length
    index = np.empty(int(length.sum()), dtype=np.int32)
    value = np.empty(len(index))
    # a dense entry's place: its row's start plus its rank in the row
    place = start[row_index] + np.arange(len(row_index)) - (np.cumsum(dense) - dense)[row_index]
    index[place], value[place] = column_index, a[row_index, column_index]
    place = start[slack_rows] + dense[slack_rows]  # after the row's dense entries
    index[place], value[place] = slack_columns, -1.0
    return start.astype(np.int32), index, value


def _run_highs(highs: highspy.Highs, integer: NDArray[np.bool_]) -> ProgramResult:
    """Run HiGHS on the model it holds (from its last basis, if it has one) and read the outcome."""
    integer = integer if len(integer) else np.zeros(highs.getNumCol(), dtype=bool)
    highs.run()
    model_status = highs.getModelStatus()
    if model_status == highspy.HighsModelStatus.kUnboundedOrInfeasible:
        # Without presolve, dual simplex cannot tell the two apart; presolve can: solve again with it
        highs.setOptionValue("presolve", "on")
        highs.clearSolver()
        highs.run()
        model_status = highs.getModelStatus()
    name = f"HiGHS: {highs.modelStatusToString(model_status)}"
    status = _HIGHS_STATUS.get(model_status, SolveStatus.ERROR)
    if status is SolveStatus.TIME_LIMIT and highs.getInfo().primal_solution_status == highspy.kSolutionStatusFeasible:
        status = SolveStatus.FEASIBLE
    if status not in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE):
        return ProgramResult(status, None, None, name)
    z = np.array(highs.getSolution().col_value, dtype=np.float64)
    z[integer] = np.round(z[integer])  # solvers return whole values up to a tolerance
    return ProgramResult(status, z, float(highs.getInfo().objective_function_value), name)


# Every HiGHS model status. Unbounded-or-infeasible (after the re-solve with presolve) is infeasible: every
# program here minimises a sum of non-negative terms, so none is unbounded. A limit reached is TIME_LIMIT
# (FEASIBLE with a solution in hand); the rest are errors, named in the reason.
_HIGHS_STATUS = {
    highspy.HighsModelStatus.kOptimal: SolveStatus.OPTIMAL,
    highspy.HighsModelStatus.kInfeasible: SolveStatus.INFEASIBLE,
    highspy.HighsModelStatus.kUnboundedOrInfeasible: SolveStatus.INFEASIBLE,
    highspy.HighsModelStatus.kTimeLimit: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kIterationLimit: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kSolutionLimit: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kInterrupt: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kHighsInterrupt: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kObjectiveBound: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kObjectiveTarget: SolveStatus.TIME_LIMIT,
    highspy.HighsModelStatus.kUnbounded: SolveStatus.ERROR,
    highspy.HighsModelStatus.kModelEmpty: SolveStatus.ERROR,
    highspy.HighsModelStatus.kModelError: SolveStatus.ERROR,
    highspy.HighsModelStatus.kLoadError: SolveStatus.ERROR,
    highspy.HighsModelStatus.kPresolveError: SolveStatus.ERROR,
    highspy.HighsModelStatus.kSolveError: SolveStatus.ERROR,
    highspy.HighsModelStatus.kPostsolveError: SolveStatus.ERROR,
    highspy.HighsModelStatus.kMemoryLimit: SolveStatus.ERROR,
    highspy.HighsModelStatus.kNotset: SolveStatus.ERROR,
    highspy.HighsModelStatus.kUnknown: SolveStatus.ERROR,
}


def _solve_with_mip(program: LinearProgram, backend: SolverBackend, time_limit: float) -> ProgramResult:
    model = mip.Model(sense=mip.MINIMIZE, solver_name=_MIP_NAMES[backend])
    model.verbose = 0
    model.threads = 1
    integer = program.integer if len(program.integer) else np.zeros(len(program.c), dtype=bool)
    variables = [
        model.add_var(
            lb=_mip_bound(lo, -mip.INF), ub=_mip_bound(hi, mip.INF), var_type=mip.INTEGER if whole else mip.CONTINUOUS
        )
        for lo, hi, whole in zip(program.lower, program.upper, integer, strict=True)
    ]
    model.objective = mip.LinExpr(
        variables=[variables[i] for i in np.flatnonzero(program.c)],
        coeffs=[float(v) for v in program.c[program.c != 0]],
    )
    start, index, value = _rowwise(program)
    ends = np.append(start, len(index))[1:]
    for first, end, rhs in zip(start, ends, program.rhs, strict=True):
        lhs = mip.LinExpr(variables=[variables[i] for i in index[first:end]], coeffs=value[first:end].tolist())
        model.add_constr(lhs <= float(rhs))
    with _native_stdout_silenced():  # CBC's LP code prints even with verbose=0
        result = model.optimize(max_seconds=time_limit)
    status = _STATUS.get(result, SolveStatus.ERROR)
    name = f"{backend.value.upper()}: {result.name}"
    if status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE):
        z = np.array([v.x for v in variables], dtype=np.float64)
        z[integer] = np.round(z[integer])  # solvers return whole values up to a tolerance
        return ProgramResult(status, z, float(model.objective_value), name)
    return ProgramResult(status, None, None, name)


def max_violation(program: LinearProgram, z: NDArray[np.float64]) -> float:
    """The largest amount by which z breaks a row or a bound (0 when it satisfies all)."""
    rows = np.max(program.rows_times(z) - program.rhs, initial=0.0)
    bounds = max(np.max(program.lower - z, initial=0.0), np.max(z - program.upper, initial=0.0))
    return float(max(rows, bounds, 0.0))


_MIP_NAMES = {SolverBackend.HIGHS: mip.HIGHS, SolverBackend.CBC: mip.CBC}

# Every python-mip status (CUTOFF: nothing better than a cutoff, which onnxrepair never sets)
_STATUS = {
    mip.OptimizationStatus.OPTIMAL: SolveStatus.OPTIMAL,
    mip.OptimizationStatus.FEASIBLE: SolveStatus.FEASIBLE,
    mip.OptimizationStatus.INFEASIBLE: SolveStatus.INFEASIBLE,
    mip.OptimizationStatus.INT_INFEASIBLE: SolveStatus.INFEASIBLE,
    mip.OptimizationStatus.NO_SOLUTION_FOUND: SolveStatus.TIME_LIMIT,
    mip.OptimizationStatus.UNBOUNDED: SolveStatus.ERROR,
    mip.OptimizationStatus.CUTOFF: SolveStatus.ERROR,
    mip.OptimizationStatus.LOADED: SolveStatus.ERROR,
    mip.OptimizationStatus.ERROR: SolveStatus.ERROR,
    mip.OptimizationStatus.OTHER: SolveStatus.ERROR,
}


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _mip_bound(value: float, infinite: float) -> float:
    return infinite if np.isinf(value) else float(value)
