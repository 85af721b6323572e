"""Per-neuron repair problems -> python-mip -> weight deltas.

Encoding ``paper`` (QNNRepair, Section 4.2), for one neuron with incoming
weights w (m values) and bias b, over the repair inputs x_k (rows of X, [n, m],
the layer input as the quantized model computes it):

    variables   delta_1..delta_m free,  M >= 0
    minimise    M
    subject to  -M <= delta_i <= M                               for all i
                s_k * (x_k . (w + delta) + b) >= margin           for all k

where s_k = +1 when the float model's pre-activation is > 0 on input k and -1
otherwise: the repaired neuron must be on exactly where the float one is, by
at least `margin`. Written as rows A z <= rhs over z = (delta, M):

    sign rows   -s_k x_k . delta            <= s_k (x_k . w + b) - margin
    bound rows   delta_i - M <= 0,  -delta_i - M <= 0

This module is the only one that imports a solver. It knows nothing of ONNX.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mip
import numpy as np
from numpy.typing import NDArray

from onnxrepair.config import SolveConfig, SolverBackend

logger = logging.getLogger(__name__)


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"
    FEASIBLE = "feasible"  # a solution, not proven optimal (time limit)
    INFEASIBLE = "infeasible"
    TIME_LIMIT = "time_limit"  # no solution within the time limit
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
    """

    neuron: int
    weights: NDArray[np.float64]
    bias: float
    inputs: NDArray[np.float64]
    float_on: NDArray[np.bool_]


@dataclass(frozen=True)
class LinearProgram:
    """minimise c.z subject to A z <= rhs and lower <= z <= upper (dense arrays)."""

    c: NDArray[np.float64]  # [v]
    a: NDArray[np.float64]  # [rows, v]
    rhs: NDArray[np.float64]  # [rows]
    lower: NDArray[np.float64]  # [v], -inf for free
    upper: NDArray[np.float64]  # [v], +inf for free


@dataclass(frozen=True)
class NeuronSolution:
    """The outcome for one neuron; `weight_delta` is None unless a solution was found.

    Attributes:
        reason: why there is no solution, in words; empty when solved.
    """

    neuron: int
    status: SolveStatus
    weight_delta: NDArray[np.float64] | None
    objective: float | None
    seconds: float
    constraints: int
    reason: str = ""

    @property
    def solved(self) -> bool:
        return self.weight_delta is not None


def paper_program(problem: NeuronProblem, margin: float) -> LinearProgram:
    """The paper's L-infinity LP for one neuron (see the module docstring)."""
    x, w = problem.inputs, problem.weights
    n, m = x.shape
    sign = np.where(problem.float_on, 1.0, -1.0)  # s_k, [n]
    sign_rows = np.hstack([-sign[:, None] * x, np.zeros((n, 1))])  # [n, m+1]
    sign_rhs = sign * (x @ w + problem.bias) - margin  # [n]
    eye = np.eye(m)
    minus_m = -np.ones((m, 1))
    bound_rows = np.vstack([np.hstack([eye, minus_m]), np.hstack([-eye, minus_m])])  # [2m, m+1]
    c = np.zeros(m + 1)
    c[m] = 1.0
    lower = np.full(m + 1, -np.inf)
    lower[m] = 0.0
    return LinearProgram(
        c=c,
        a=np.vstack([sign_rows, bound_rows]),
        rhs=np.concatenate([sign_rhs, np.zeros(2 * m)]),
        lower=lower,
        upper=np.full(m + 1, np.inf),
    )


def solve_neuron(problem: NeuronProblem, config: SolveConfig) -> NeuronSolution:
    """Build and solve the neuron's program; every failure comes back as a status with a reason."""
    start = time.perf_counter()
    program = paper_program(problem, config.margin)
    m = len(problem.weights)
    status, z, objective = solve_program(program, config.backend, config.time_limit)
    seconds = time.perf_counter() - start
    delta = None if z is None else z[:m]
    reason = {
        SolveStatus.INFEASIBLE: "no weight change makes the neuron's sign match the float model on every repair input",
        SolveStatus.TIME_LIMIT: f"no solution within the time limit of {config.time_limit:g} s",
        SolveStatus.ERROR: "the solver reported an error",
    }.get(status, "")
    return NeuronSolution(problem.neuron, status, delta, objective, seconds, len(program.rhs), reason)


def solve_program(
    program: LinearProgram, backend: SolverBackend, time_limit: float
) -> tuple[SolveStatus, NDArray[np.float64] | None, float | None]:
    """Solve a LinearProgram with python-mip; returns (status, z or None, objective or None)."""
    model = mip.Model(sense=mip.MINIMIZE, solver_name=_MIP_NAMES[backend])
    model.verbose = 0
    model.threads = 1
    variables = [
        model.add_var(lb=_mip_bound(lo, -mip.INF), ub=_mip_bound(hi, mip.INF))
        for lo, hi in zip(program.lower, program.upper, strict=True)
    ]
    model.objective = mip.LinExpr(
        variables=[variables[i] for i in np.flatnonzero(program.c)],
        coeffs=[float(v) for v in program.c[program.c != 0]],
    )
    for row, rhs in zip(program.a, program.rhs, strict=True):
        nonzero = np.flatnonzero(row)
        lhs = mip.LinExpr(variables=[variables[i] for i in nonzero], coeffs=row[nonzero].tolist())
        model.add_constr(lhs <= float(rhs))
    with _native_stdout_silenced():  # CBC's LP code prints even with verbose=0
        result = model.optimize(max_seconds=time_limit)
    status = _STATUS.get(result, SolveStatus.ERROR)
    if status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE):
        z = np.array([v.x for v in variables], dtype=np.float64)
        return status, z, float(model.objective_value)
    if result == mip.OptimizationStatus.NO_SOLUTION_FOUND:
        return SolveStatus.TIME_LIMIT, None, None
    return status, None, None


def max_violation(program: LinearProgram, z: NDArray[np.float64]) -> float:
    """The largest amount by which z breaks a row or a bound (0 when it satisfies all)."""
    rows = np.max(program.a @ z - program.rhs, initial=0.0)
    bounds = max(np.max(program.lower - z, initial=0.0), np.max(z - program.upper, initial=0.0))
    return float(max(rows, bounds, 0.0))


_MIP_NAMES = {SolverBackend.HIGHS: mip.HIGHS, SolverBackend.CBC: mip.CBC}

_STATUS = {
    mip.OptimizationStatus.OPTIMAL: SolveStatus.OPTIMAL,
    mip.OptimizationStatus.FEASIBLE: SolveStatus.FEASIBLE,
    mip.OptimizationStatus.INFEASIBLE: SolveStatus.INFEASIBLE,
    mip.OptimizationStatus.INT_INFEASIBLE: SolveStatus.INFEASIBLE,
    mip.OptimizationStatus.NO_SOLUTION_FOUND: SolveStatus.TIME_LIMIT,
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
