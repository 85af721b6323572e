"""The structured solve (split L1 variables, row generation) gives the full program's optimum (issue 4, item 2)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import SlowClock

from onnxrepair.config import Encoding, Objective, SolveConfig, SolverBackend
from onnxrepair.solve import NeuronGrid, NeuronProblem, SolveStatus, max_violation, neuron_program, solve_neuron


def head_like_problem(rng: np.random.Generator, n: int, m: int, integer: bool) -> NeuronProblem:
    """A neuron over non-negative features (like a classifier head after pooling), most inputs far from 0.

    The float signs come from hidden weights; the quantized weights are those
    plus noise, so some rows are broken and most are satisfied by a wide margin.
    """
    x = np.abs(rng.normal(size=(n, m))) * (rng.random((n, m)) < 0.5)
    w_star = rng.normal(scale=0.3, size=m)
    bias = float(rng.normal(scale=0.5))
    float_on = x @ w_star + bias > 0
    weights = w_star + rng.normal(scale=0.05, size=m)
    grid = None
    if integer:
        step = np.full(m, 0.02)
        weights = np.round(weights / step) * step
        grid = NeuronGrid(step, np.full(m, -20.0), np.full(m, 20.0), 0.001, -1000.0, 1000.0)
    return NeuronProblem(int(rng.integers(100)), weights, bias, x, float_on, grid)


CASES = [
    (Encoding.SOFT, Objective.L1),
    (Encoding.SOFT, Objective.LINF),
    (Encoding.PAPER, Objective.LINF),
    (Encoding.PAPER, Objective.L1),
    (Encoding.INTEGER, Objective.L1),
]


@pytest.mark.parametrize(("encoding", "objective"), CASES, ids=lambda v: v.value)
@pytest.mark.parametrize("seed", range(4))
def test_row_generation_reaches_the_full_optimum(encoding: Encoding, objective: Objective, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = (120, 8) if encoding is Encoding.INTEGER else (400, 30)
    problem = head_like_problem(rng, n, m, integer=encoding is Encoding.INTEGER)
    config = SolveConfig(encoding=encoding, objective=objective, time_limit=60.0)
    full = solve_neuron(problem, dataclasses.replace(config, structured=False))
    generated = solve_neuron(problem, config)

    assert generated.status is full.status
    if not full.solved:
        assert encoding is Encoding.PAPER and full.status is SolveStatus.INFEASIBLE and not generated.solved
        return
    assert full.constraints == n
    assert generated.constraints < n  # it really left rows out
    assert generated.objective == pytest.approx(full.objective, rel=1e-6, abs=1e-7)
    # the generated solution is feasible for the full program, with the full program's objective
    program, block = neuron_program(  # the textbook full program: z = (u, norm auxiliaries, slack)
        problem,
        encoding,
        objective,
        config.resolved_repair_bias,
        config.resolved_margin,
        config.norm_weight,
        split_l1=False,
    )
    z = full_program_point(problem, config, generated.weight_delta, generated.bias_delta, block)
    assert max_violation(program, z) <= 1e-6
    assert float(program.c @ z) == pytest.approx(full.objective, rel=1e-6, abs=1e-7)


def full_program_point(problem, config, delta, beta, block) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The full program's z for a (delta, beta): parameters, tightest norm auxiliaries and slacks."""
    m, n = len(problem.weights), len(problem.float_on)
    u = delta / block.weight_scale
    params = u if block.bias is None else np.append(u, beta / block.bias_scale)
    change = np.abs(params * np.append(block.weight_scale, block.bias_scale)[: len(params)])
    aux = change if config.resolved_objective is Objective.L1 else np.array([change.max()])
    z = np.concatenate([params, aux])
    if config.encoding.soft:
        sign = np.where(problem.float_on, 1.0, -1.0)
        signed = sign * (problem.inputs @ (problem.weights + delta) + problem.bias + beta)
        z = np.concatenate([z, np.maximum(config.resolved_margin - signed, 0.0)])
    assert len(params) in (m, m + 1) and (not config.encoding.soft or len(z) == len(params) + len(aux) + n)
    return z


def test_row_generation_adds_rows_when_the_first_set_is_not_enough() -> None:
    """Rows just outside the first working set, which the first solution breaks, are added in a later round."""
    rng = np.random.default_rng(7)
    problem = head_like_problem(rng, 2000, 40, integer=False)
    config = SolveConfig(encoding=Encoding.SOFT, norm_weight=1e-4, time_limit=60.0)
    generated = solve_neuron(problem, config)
    full = solve_neuron(problem, dataclasses.replace(config, structured=False))
    assert generated.rounds > 1
    assert generated.objective == pytest.approx(full.objective, rel=1e-6, abs=1e-7)


def test_an_infeasible_paper_program_is_reported_as_infeasible() -> None:
    """Two equal inputs the float model puts on opposite sides: no weights satisfy both, rows left out or not."""
    rng = np.random.default_rng(3)
    problem = head_like_problem(rng, 300, 10, integer=False)
    inputs = np.vstack([problem.inputs, problem.inputs[:1], problem.inputs[:1]])
    float_on = np.append(problem.float_on, [True, False])
    problem = dataclasses.replace(problem, inputs=inputs, float_on=float_on)
    for structured in (True, False):
        config = SolveConfig(encoding=Encoding.PAPER, time_limit=60.0, structured=structured)
        solution = solve_neuron(problem, config)
        assert solution.status is SolveStatus.INFEASIBLE and not solution.solved
        assert "no weight change" in solution.reason


# --- the paper's L-infinity program in ratio form (issue 14, item 1) ----------------------------------------


def test_the_paper_linf_program_solved_has_one_row_per_working_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """No 2m rows |delta_i| <= M: they made the paper's encoding 5x slower than soft on an ImageNet head."""
    import highspy

    shapes: list[tuple[int, int]] = []
    real = highspy.Highs.run

    def recording(self):  # type: ignore[no-untyped-def]
        shapes.append((self.getNumRow(), self.getNumCol()))
        return real(self)

    monkeypatch.setattr(highspy.Highs, "run", recording)
    problem = head_like_problem(np.random.default_rng(3), 400, 30, integer=False)
    solution = solve_neuron(problem, SolveConfig(encoding=Encoding.PAPER, time_limit=60.0))
    assert solution.status is SolveStatus.OPTIMAL
    assert len(shapes) == solution.rounds
    assert all(rows <= solution.constraints and columns == 30 + 1 for rows, columns in shapes), shapes


def test_later_rounds_add_rows_to_the_program_instead_of_building_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dual simplex goes on from the last round's basis: one model passed to HiGHS per neuron."""
    import highspy

    passed = {"n": 0}
    real = highspy.Highs.passModel

    def counting(self, *args):  # type: ignore[no-untyped-def]
        passed["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(highspy.Highs, "passModel", counting)
    problem = head_like_problem(np.random.default_rng(5), 2000, 40, integer=False)
    config = SolveConfig(encoding=Encoding.PAPER, time_limit=60.0)
    solution = solve_neuron(problem, config)
    assert solution.rounds > 1 and passed["n"] == 1
    textbook = solve_neuron(problem, dataclasses.replace(config, structured=False))
    assert solution.objective == pytest.approx(textbook.objective, rel=1e-6, abs=1e-9)


def test_the_paper_ratio_program_starts_from_the_broken_rows_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Later rounds are warm-started, so kept rows near the threshold are added only once a solution breaks them."""
    import highspy

    rows: list[int] = []
    real = highspy.Highs.run

    def recording(self):  # type: ignore[no-untyped-def]
        rows.append(self.getNumRow())
        return real(self)

    monkeypatch.setattr(highspy.Highs, "run", recording)
    problem = head_like_problem(np.random.default_rng(6), 2000, 40, integer=False)
    config = SolveConfig(encoding=Encoding.PAPER, time_limit=60.0)
    solution = solve_neuron(problem, config)
    sign = np.where(problem.float_on, 1.0, -1.0)
    broken = sign * (problem.inputs @ problem.weights + problem.bias) < config.resolved_margin
    assert solution.status is SolveStatus.OPTIMAL and solution.rounds > 1
    assert rows[0] == broken.sum() and rows[-1] == solution.constraints


@pytest.mark.parametrize("backend", list(SolverBackend), ids=lambda b: b.value)
@pytest.mark.parametrize("repair_bias", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_the_ratio_form_has_the_textbook_optimum(backend: SolverBackend, repair_bias: bool, seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    problem = head_like_problem(rng, 300, 20, integer=False)
    config = SolveConfig(encoding=Encoding.PAPER, repair_bias=repair_bias, backend=backend, time_limit=60.0)
    textbook = solve_neuron(problem, dataclasses.replace(config, structured=False))
    ratio = solve_neuron(problem, config)
    assert ratio.status is textbook.status is SolveStatus.OPTIMAL
    assert ratio.objective == pytest.approx(textbook.objective, rel=1e-6, abs=1e-9)
    assert ratio.weight_delta is not None
    change = np.append(ratio.weight_delta, ratio.bias_delta)
    assert np.max(np.abs(change)) == pytest.approx(ratio.objective, rel=1e-6)  # M is the largest change
    assert repair_bias or ratio.bias_delta == 0.0
    sign = np.where(problem.float_on, 1.0, -1.0)
    kept = sign * (problem.inputs @ (problem.weights + ratio.weight_delta) + problem.bias + ratio.bias_delta)
    assert kept.min() >= config.resolved_margin - 1e-6


def test_a_ratio_solution_that_breaks_a_row_is_solved_again_in_textbook_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """t* close to 0 divides tolerances by t*: a change that does not keep every row is not trusted."""
    from onnxrepair import solve

    real = solve._run_highs
    forms: list[str] = []

    def spoiled(highs, integer):  # type: ignore[no-untyped-def]
        result = real(highs, integer)
        ratio_form = highs.getLp().col_cost_[-1] < 0  # maximise t
        forms.append("ratio" if ratio_form else "textbook")
        if ratio_form and result.z is not None:
            z = result.z.copy()
            z[:-1] = 0.0  # v = 0 with t > 0: no change, which keeps no broken row
            return dataclasses.replace(result, z=z)
        return result

    monkeypatch.setattr(solve, "_run_highs", spoiled)
    problem = head_like_problem(np.random.default_rng(4), 300, 20, integer=False)
    config = SolveConfig(encoding=Encoding.PAPER, time_limit=60.0)
    solution = solve_neuron(problem, config)
    monkeypatch.setattr(solve, "_run_highs", real)
    textbook = solve_neuron(problem, dataclasses.replace(config, structured=False))
    assert forms[:2] == ["ratio", "textbook"]
    assert solution.status is SolveStatus.OPTIMAL
    assert solution.objective == pytest.approx(textbook.objective, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(("encoding", "objective"), [(Encoding.SOFT, Objective.L1), (Encoding.PAPER, Objective.L1)])
def test_row_generation_stops_at_the_time_limit(
    encoding: Encoding, objective: Objective, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: once the limit was spent every further round got 0.01 s and the loop went on until no row
    broke (a search step given 1.7 s on the bundled CNN's conv1 took 25 s)."""
    import onnxrepair.solve as solve_module

    problem = head_like_problem(np.random.default_rng(1), 2000, 60, integer=False)
    config = SolveConfig(encoding=encoding, objective=objective, time_limit=25.0)
    assert solve_neuron(problem, config).rounds >= 2  # it needs more than one round
    monkeypatch.setattr(solve_module, "time", SlowClock())
    late = solve_neuron(problem, config)
    assert late.status is SolveStatus.TIME_LIMIT and not late.solved
    assert late.rounds <= 2
    assert "time limit of 25 s" in late.reason and "row generation stopped" in late.reason
