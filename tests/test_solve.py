"""solve.py: the paper's LP, hand-solvable cases, infeasibility, and HiGHS against CBC."""

from __future__ import annotations

import numpy as np
import pytest

from onnxrepair import solve as solve_module
from onnxrepair.config import Encoding, Objective, SolveConfig, SolverBackend
from onnxrepair.solve import (
    LinearProgram,
    NeuronGrid,
    NeuronProblem,
    SolveStatus,
    max_violation,
    neuron_program,
    paper_program,
    solve_neuron,
    solve_program,
)

BACKENDS = list(SolverBackend)


def config(backend: SolverBackend, margin: float = 1e-3) -> SolveConfig:
    return SolveConfig(encoding=Encoding.PAPER, margin=margin, time_limit=30.0, backend=backend)


def random_problem(rng: np.random.Generator, n: int, m: int) -> NeuronProblem:
    """A feasible instance: the float signs come from a hidden weight vector w*, the quantized
    weights are w* plus noise, so the LP has to move the weights back towards w*."""
    x = rng.normal(size=(n, m))
    w_star = rng.normal(size=m)
    b = float(rng.normal())
    float_pre = x @ w_star + b
    keep = np.abs(float_pre) > 0.1  # a margin the hidden solution satisfies
    w_quant = w_star + rng.normal(scale=0.3, size=m)
    neuron = int(rng.integers(0, 10))
    return NeuronProblem(neuron, weights=w_quant, bias=b, inputs=x[keep], float_on=float_pre[keep] > 0)


def independent_check(problem: NeuronProblem, delta: np.ndarray, margin: float, tol: float = 1e-6) -> None:
    """The repaired neuron has the float model's sign on every input, by the margin (numpy only)."""
    pre = problem.inputs @ (problem.weights + delta) + problem.bias
    sign = np.where(problem.float_on, 1.0, -1.0)
    assert np.all(sign * pre >= margin - tol), np.min(sign * pre)
    assert np.all((pre > 0) == problem.float_on)


def test_paper_program_shapes_and_rows() -> None:
    # One neuron, m = 2 weights, n = 3 inputs: z = (delta_1, delta_2, M).
    problem = NeuronProblem(
        neuron=0,
        weights=np.array([1.0, -2.0]),
        bias=0.5,
        inputs=np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        float_on=np.array([True, False, True]),
    )
    lp = paper_program(problem, margin=0.1)
    assert lp.c.tolist() == [0.0, 0.0, 1.0]
    assert lp.a.shape == (3 + 2 * 2, 3)
    # sign rows: -s_k x_k . delta <= s_k (x_k . w + b) - margin
    #   k=0, s=+1: x.w+b = 1.5  -> [-1, 0, 0] <=  1.5 - 0.1 =  1.4
    #   k=1, s=-1: x.w+b = -1.5 -> [ 0, 1, 0] <=  1.5 - 0.1 =  1.4
    #   k=2, s=+1: x.w+b = -0.5 -> [-1,-1, 0] <= -0.5 - 0.1 = -0.6
    np.testing.assert_allclose(lp.a[:3], [[-1, 0, 0], [0, 1, 0], [-1, -1, 0]])
    np.testing.assert_allclose(lp.rhs[:3], [1.4, 1.4, -0.6])
    # bound rows: delta_i - M <= 0 and -delta_i - M <= 0
    np.testing.assert_allclose(lp.a[3:], [[1, 0, -1], [0, 1, -1], [-1, 0, -1], [0, -1, -1]])
    np.testing.assert_array_equal(lp.rhs[3:], 0.0)
    assert np.all(np.isneginf(lp.lower[:2])) and lp.lower[2] == 0.0
    assert np.all(np.isposinf(lp.upper))


def test_max_violation() -> None:
    lp = LinearProgram(
        c=np.array([1.0]),
        a=np.array([[1.0], [-1.0]]),  # z <= 2 and -z <= 0
        rhs=np.array([2.0, 0.0]),
        lower=np.array([-1.0]),
        upper=np.array([5.0]),
    )
    assert max_violation(lp, np.array([1.0])) == 0.0
    assert max_violation(lp, np.array([2.5])) == pytest.approx(0.5)  # row 0: 2.5 <= 2
    assert max_violation(lp, np.array([-0.25])) == pytest.approx(0.25)  # row 1: 0.25 <= 0
    assert max_violation(lp, np.array([-3.0])) == pytest.approx(3.0)  # row 1 by 3, lower bound by 2
    assert max_violation(lp, np.array([7.0])) == pytest.approx(5.0)  # row 0 by 5, upper bound by 2


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_solve_program_hand_case(backend: SolverBackend) -> None:
    # minimise z1 + 2 z2 subject to z1 + z2 >= 3 (written -z1 - z2 <= -3), 0 <= z1 <= 2, z2 >= 0:
    # z1 is cheaper, so z1 = 2 and z2 = 1; objective 2 + 2 = 4.
    lp = LinearProgram(
        c=np.array([1.0, 2.0]),
        a=np.array([[-1.0, -1.0]]),
        rhs=np.array([-3.0]),
        lower=np.array([0.0, 0.0]),
        upper=np.array([2.0, np.inf]),
    )
    result = solve_program(lp, backend, 10.0)
    status, z, objective = result.status, result.z, result.objective
    assert status is SolveStatus.OPTIMAL
    np.testing.assert_allclose(z, [2.0, 1.0], atol=1e-7)
    assert objective == pytest.approx(4.0, abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_one_weight_hand_case(backend: SolverBackend) -> None:
    # w = 1, b = 0, one input x = 1 where the float neuron is off (s = -1).
    # Constraint: -(1 * (1 + d) + 0) >= margin  ->  d <= -1 - margin.  Minimise |d|: d = -(1 + margin).
    margin = 0.25
    problem = NeuronProblem(0, np.array([1.0]), 0.0, np.array([[1.0]]), np.array([False]))
    solution = solve_neuron(problem, config(backend, margin))
    assert solution.status is SolveStatus.OPTIMAL and solution.solved
    np.testing.assert_allclose(solution.weight_delta, [-1.25], atol=1e-7)
    assert solution.objective == pytest.approx(1.25, abs=1e-7)
    assert solution.reason == ""
    assert solution.constraints == 1


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_two_weight_hand_case(backend: SolverBackend) -> None:
    # w = (1, 1), b = 0.5, inputs x0 = (1, 1) with float off, x1 = (1, -1) with float on.
    #   x0: -(2.5 + d1 + d2) >= m  ->  d1 + d2 <= -2.5 - m
    #   x1:  0.5 + d1 - d2   >= m  ->  d1 - d2 >= m - 0.5
    # With |d_i| <= M, d1 + d2 >= -2M, so M >= (2.5 + m) / 2. Choosing d1 = d2 = -(2.5 + m) / 2
    # meets x0 exactly and x1 with d1 - d2 = 0 >= m - 0.5 (for m <= 0.5), so the optimum is
    # M* = (2.5 + m) / 2, and x0's row forces d1 = d2 = -M* (any other pair has max |d_i| > M*).
    margin = 0.1
    problem = NeuronProblem(3, np.array([1.0, 1.0]), 0.5, np.array([[1.0, 1.0], [1.0, -1.0]]), np.array([False, True]))
    solution = solve_neuron(problem, config(backend, margin))
    assert solution.status is SolveStatus.OPTIMAL
    assert solution.neuron == 3
    assert solution.objective == pytest.approx(1.3, abs=1e-7)
    np.testing.assert_allclose(solution.weight_delta, [-1.3, -1.3], atol=1e-6)
    independent_check(problem, solution.weight_delta, margin)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_already_correct_needs_no_change(backend: SolverBackend) -> None:
    # Every input is on the right side by more than the margin: nothing to fix -> nothing changes.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    w = rng.normal(size=5)
    pre = x @ w + 0.2
    keep = np.abs(pre) > 0.05
    problem = NeuronProblem(0, w, 0.2, x[keep], pre[keep] > 0)
    solution = solve_neuron(problem, config(backend, margin=0.01))
    assert solution.status is SolveStatus.OPTIMAL
    assert solution.objective == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(solution.weight_delta, 0.0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_infeasible_case(backend: SolverBackend) -> None:
    # The same input must be on and off at once: no weights can do that.
    problem = NeuronProblem(5, np.array([1.0, 0.5]), 0.0, np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([True, False]))
    solution = solve_neuron(problem, config(backend))
    assert solution.status is SolveStatus.INFEASIBLE
    assert solution.weight_delta is None and not solution.solved
    assert solution.objective is None
    assert solution.reason.strip()
    assert solution.neuron == 5


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_zero_input_with_wrong_bias_sign_is_infeasible(backend: SolverBackend) -> None:
    # x = 0 makes the pre-activation equal to the bias, which the paper encoding does not change:
    # b = -1 is off, the float neuron is on -> infeasible, not a crash on an all-zero row.
    problem = NeuronProblem(0, np.array([1.0, 2.0]), -1.0, np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([True, True]))
    solution = solve_neuron(problem, config(backend))
    assert solution.status is SolveStatus.INFEASIBLE and solution.reason


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("seed", range(4))
def test_solution_satisfies_every_constraint(backend: SolverBackend, seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, n=40, m=6)
    margin = 0.05
    solution = solve_neuron(problem, config(backend, margin))
    assert solution.status is SolveStatus.OPTIMAL
    delta = solution.weight_delta
    assert delta is not None and delta.shape == (6,)
    z = np.append(delta, solution.objective)
    assert max_violation(paper_program(problem, margin), z) <= 1e-6
    independent_check(problem, delta, margin)
    # The objective is M, and at the optimum M = max |delta_i|.
    assert solution.objective == pytest.approx(np.max(np.abs(delta)), abs=1e-6)
    # The random instance really needed a change.
    assert solution.objective > 1e-3
    assert 1 <= solution.constraints <= len(problem.inputs)
    assert solution.seconds >= 0.0


def test_optimum_is_minimal() -> None:
    # Shrinking the solution towards zero must break a constraint: the optimum is not slack.
    rng = np.random.default_rng(1)
    problem = random_problem(rng, n=40, m=6)
    margin = 0.05
    solution = solve_neuron(problem, config(SolverBackend.HIGHS, margin))
    assert solution.weight_delta is not None
    shrunk = solution.weight_delta * 0.99
    pre = problem.inputs @ (problem.weights + shrunk) + problem.bias
    sign = np.where(problem.float_on, 1.0, -1.0)
    # Any delta with max|delta| < M* violates some row; a scaled copy of the optimum is one such delta.
    assert np.min(sign * pre) < margin - 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_highs_and_cbc_agree(seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, n=int(rng.integers(10, 60)), m=int(rng.integers(2, 12)))
    highs = solve_neuron(problem, config(SolverBackend.HIGHS, 0.02))
    cbc = solve_neuron(problem, config(SolverBackend.CBC, 0.02))
    assert highs.status is cbc.status is SolveStatus.OPTIMAL
    assert highs.objective == pytest.approx(cbc.objective, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("encoding", [Encoding.SOFT, Encoding.INTEGER])
@pytest.mark.parametrize("split", [True, False])
def test_highs_and_cbc_agree_on_programs_with_slacks(encoding: Encoding, split: bool) -> None:
    """CBC reads a program's rows from the same sparse form as HiGHS, slacks included."""
    rng = np.random.default_rng(3)
    n, m = 40, 5
    x = rng.normal(size=(n, m))
    grid = NeuronGrid(np.full(m, 0.05), np.full(m, -20.0), np.full(m, 20.0), 0.01, -100.0, 100.0)
    problem = NeuronProblem(0, rng.normal(size=m), 0.1, x, rng.random(n) < 0.5, grid)
    objective = Objective.L1 if split else Objective.LINF
    program, _ = neuron_program(problem, encoding, objective, True, 0.05, split_l1=split)
    assert program.slack is not None
    highs = solve_program(program, SolverBackend.HIGHS, 30.0)
    cbc = solve_program(program, SolverBackend.CBC, 30.0)
    assert highs.status is cbc.status is SolveStatus.OPTIMAL
    gap = 1e-3 if encoding is Encoding.INTEGER else 1e-6  # a MILP stops within the solvers' relative gap
    assert highs.objective == pytest.approx(cbc.objective, rel=gap, abs=1e-8)
    assert max_violation(program, cbc.z) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_a_program_over_no_rows_solves(backend: SolverBackend) -> None:
    """No repair input at all: a program with its variables and no row (the row index had one entry too many)."""
    problem = NeuronProblem(0, np.ones(3), 0.0, np.zeros((0, 3)), np.zeros(0, dtype=bool))
    program, _ = neuron_program(problem, Encoding.SOFT, Objective.L1, True, 0.05)
    start, index, _ = solve_module._rowwise(program)
    assert len(start) == 0 and len(index) == 0
    assert solve_program(program, backend, 10.0).status is SolveStatus.OPTIMAL


# --- solver statuses (issue 14: "the solver reported an error" where the program was infeasible) -----------


def infeasible_program() -> LinearProgram:
    """z <= -1 and z >= 1."""
    return LinearProgram(
        c=np.array([1.0]),
        a=np.array([[1.0], [-1.0]]),
        rhs=np.array([-1.0, -1.0]),
        lower=np.array([-np.inf]),
        upper=np.array([np.inf]),
    )


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_an_infeasible_program_is_infeasible_and_the_reason_names_the_solvers_status(backend: SolverBackend) -> None:
    result = solve_program(
        infeasible_program(), backend, 10.0, (("presolve", "off"),) if backend.value == "highs" else ()
    )
    assert result.status is SolveStatus.INFEASIBLE and result.z is None
    reason = result.reason(SolveConfig())
    assert reason.startswith("no weight change") and ("Infeasible" in reason or "INFEASIBLE" in reason)


def test_unbounded_or_infeasible_without_presolve_is_solved_again_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """HiGHS's dual simplex with presolve off answers kUnboundedOrInfeasible; presolve then tells which."""
    import highspy

    calls = {"n": 0}
    real = highspy.Highs.getModelStatus

    def ambiguous_first(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return highspy.HighsModelStatus.kUnboundedOrInfeasible if calls["n"] == 1 else real(self)

    monkeypatch.setattr(highspy.Highs, "getModelStatus", ambiguous_first)
    result = solve_program(infeasible_program(), SolverBackend.HIGHS, 10.0, (("presolve", "off"),))
    assert calls["n"] == 2  # asked again after the re-solve
    assert result.status is SolveStatus.INFEASIBLE
    assert "Infeasible" in result.solver_status


def test_every_highs_status_maps_to_a_solve_status() -> None:
    import highspy

    from onnxrepair.solve import _HIGHS_STATUS

    statuses = [
        getattr(highspy.HighsModelStatus, name) for name in dir(highspy.HighsModelStatus) if name.startswith("k")
    ]
    assert set(statuses) <= set(_HIGHS_STATUS)
    assert _HIGHS_STATUS[highspy.HighsModelStatus.kUnboundedOrInfeasible] is SolveStatus.INFEASIBLE


@pytest.mark.parametrize("split", [True, False])
def test_a_soft_program_holds_its_slacks_as_one_entry_per_row(split: bool) -> None:
    """Before, the -I block of the slacks was dense: k^2 floats (8.6 GB for one conv channel's 32,872 rows)."""
    rng = np.random.default_rng(0)
    n, m = 3000, 9
    x = rng.normal(size=(n, m))
    problem = NeuronProblem(0, rng.normal(size=m), 0.1, x, rng.random(n) < 0.5)
    objective = Objective.L1
    program, _ = neuron_program(problem, Encoding.SOFT, objective, True, 0.01, split_l1=split)
    assert program.a.nbytes < 2 * n * (2 * (m + 1) + 4) * 8  # no n x n block
    full = program.matrix()
    assert full.shape == program.shape
    slack_columns = full[:, program.a.shape[1] :]
    np.testing.assert_array_equal(slack_columns[:n], -np.eye(n))  # one slack per sign row
    np.testing.assert_array_equal(slack_columns[n:], 0.0)  # none on the norm rows
    z = rng.normal(size=program.shape[1])
    np.testing.assert_allclose(program.rows_times(z), full @ z)
    start, index, value = solve_module._rowwise(program)
    rebuilt = np.zeros(program.shape)
    for row, (first, end) in enumerate(zip(start, [*start[1:], len(index)], strict=True)):
        assert np.all(np.diff(index[first:end]) > 0)  # each row in column order
        rebuilt[row, index[first:end]] = value[first:end]
    np.testing.assert_array_equal(rebuilt, full)
