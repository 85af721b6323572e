"""reconstruct.py (least squares on Gram statistics, rounding, the held-out check); solve_fit (L1, row generation)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import SlowClock
from hypothesis import given
from hypothesis import strategies as st

from onnxrepair.config import Encoding, SolveConfig, SolverBackend
from onnxrepair.reconstruct import (
    ReconstructionProblem,
    _descend_on_grid,
    _stacked,
    gram_statistics,
    reconstruct,
    squared_errors,
)
from onnxrepair.solve import FitProblem, NeuronGrid, SolveStatus, solve_fit


def problem(
    rng: np.random.Generator,
    rows: int,
    n_in: int,
    out: int,
    groups: int = 1,
    step: float = 0.05,
    noise: float = 0.0,
    holdout_share: float = 0.25,
) -> tuple[ReconstructionProblem, np.ndarray, np.ndarray]:
    """Rows, a target made by weights on the grid (plus noise), and stored weights a few steps off them."""
    x = rng.normal(size=(rows, groups * n_in)).astype(np.float32)
    true_w = np.round(rng.normal(size=(out, n_in)) / step) * step
    true_b = rng.normal(size=out)
    per_group = out // groups
    target = (
        np.concatenate(
            [x[:, g * n_in : (g + 1) * n_in] @ true_w[g * per_group : (g + 1) * per_group].T for g in range(groups)],
            axis=1,
        )
        + true_b
    )
    target = (target + noise * rng.normal(size=target.shape)).astype(np.float32)
    stored = true_w + step * rng.integers(-3, 4, size=true_w.shape)
    holdout = rng.random(rows) < holdout_share
    return (
        ReconstructionProblem(
            rows=x,
            target=target,
            weights=stored,
            bias=np.zeros(out),
            weight_step=np.full((out, n_in), step),
            weight_low=np.full((out, n_in), -127.0),
            weight_high=np.full((out, n_in), 127.0),
            bias_step=np.full(out, 1e-6),
            bias_low=np.full(out, -1e9),
            bias_high=np.full(out, 1e9),
            groups=groups,
            holdout=holdout,
        ),
        true_w,
        true_b,
    )


@pytest.mark.parametrize("groups", [1, 4])
def test_weights_on_the_grid_are_found_again(groups: int) -> None:
    rng = np.random.default_rng(0)
    case, true_w, true_b = problem(rng, rows=400, n_in=6, out=8, groups=groups)
    result = reconstruct(case, ridge=0.0)
    assert result.kept.all()
    np.testing.assert_allclose(case.weights + result.weight_delta, true_w, atol=1e-9)
    np.testing.assert_allclose(result.bias_delta, true_b, atol=1e-5)
    assert np.all(result.error_after < 1e-6 * result.error_before)


def test_changes_are_whole_steps_within_the_range() -> None:
    rng = np.random.default_rng(1)
    case, _, _ = problem(rng, rows=300, n_in=5, out=4, noise=0.3)
    case = dataclasses.replace(case, weight_low=np.full((4, 5), -1.0), weight_high=np.full((4, 5), 2.0))
    result = reconstruct(case)
    steps = result.weight_delta / 0.05
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert steps.min() >= -1 - 1e-9 and steps.max() <= 2 + 1e-9


def test_noise_is_not_fitted_the_held_out_rows_say_no() -> None:
    """A target the rows cannot explain: fitting 40 inputs to 60 rows of noise does not lower the held-out error."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 40)).astype(np.float32)
    target = rng.normal(size=(80, 6)).astype(np.float32)
    case = ReconstructionProblem(
        rows=x,
        target=target,
        weights=np.zeros((6, 40)),
        bias=np.zeros(6),
        weight_step=np.full((6, 40), 0.01),
        weight_low=np.full((6, 40), -127.0),
        weight_high=np.full((6, 40), 127.0),
        bias_step=None,
        bias_low=None,
        bias_high=None,
        groups=1,
        holdout=np.arange(80) >= 60,
    )
    result = reconstruct(case, ridge=1e-6)
    assert not result.kept.any()
    assert not result.weight_delta.any() and not result.bias_delta.any()
    np.testing.assert_array_equal(result.error_after, result.error_before)


def test_a_layer_without_bias_keeps_it_at_zero() -> None:
    rng = np.random.default_rng(3)
    case, _, _ = problem(rng, rows=200, n_in=4, out=3)
    case = dataclasses.replace(case, bias_step=None, bias_low=None, bias_high=None)
    result = reconstruct(case)
    assert not result.bias_delta.any()


@given(seed=st.integers(0, 10_000), groups=st.sampled_from([1, 2, 3]))
def test_gram_statistics_are_the_rows_products(seed: int, groups: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(37, groups * 3)).astype(np.float32)
    target = rng.normal(size=(37, groups * 2)).astype(np.float32)
    stats = gram_statistics(rows, target, groups)
    for g in range(groups):
        a = np.hstack([rows[:, g * 3 : (g + 1) * 3].astype(np.float64), np.ones((37, 1))])
        np.testing.assert_allclose(stats.gram[g], a.T @ a, rtol=1e-10)
        expected = a.T @ target[:, g * 2 : (g + 1) * 2]
        np.testing.assert_allclose(stats.cross[g], expected, rtol=1e-10, atol=1e-10)
    weights, bias = rng.normal(size=(groups * 2, 3)), rng.normal(size=groups * 2)
    predicted = (
        np.concatenate(
            [rows[:, g * 3 : (g + 1) * 3].astype(np.float64) @ weights[g * 2 : (g + 1) * 2].T for g in range(groups)],
            axis=1,
        )
        + bias
    )
    np.testing.assert_allclose(squared_errors(stats, weights, bias), ((predicted - target) ** 2).sum(axis=0), rtol=1e-8)


@given(seed=st.integers(0, 10_000))
def test_descending_on_the_grid_never_raises_the_fitted_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    case, _, _ = problem(rng, rows=120, n_in=7, out=3, step=0.3, noise=0.5)
    stats = gram_statistics(case.rows, case.target, 1)
    nearest = np.round((rng.normal(size=case.weights.shape) * 0.3) / 0.3) * 0.3  # some start on the grid
    bias = rng.normal(size=3)
    improved = _descend_on_grid(stats.gram, stats.cross, case, nearest, bias, has_bias=True)
    np.testing.assert_allclose(improved / 0.3, np.round(improved / 0.3), atol=1e-9)

    def objective(delta: np.ndarray) -> np.ndarray:
        theta = _stacked(case.weights + delta, bias, 1)
        return np.einsum("gpj,gpj->gj", theta, stats.gram @ theta) - 2 * np.einsum("gpj,gpj->gj", theta, stats.cross)

    # the weights alone can only improve (the bias is refitted as well, which only lowers it further)
    assert np.all(objective(improved) <= objective(nearest) + 1e-6 * np.abs(objective(nearest)))


# --- the L1 programs -----------------------------------------------------------------------------------


def fit_case(seed: int, n: int = 60, m: int = 4) -> FitProblem:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, m))
    target = x @ rng.normal(size=m) + 0.3 + 0.2 * rng.normal(size=n)
    grid = NeuronGrid(np.full(m, 0.1), np.full(m, -20.0), np.full(m, 20.0), 0.01, -1000.0, 1000.0)
    return FitProblem(0, rng.normal(size=m), 0.0, x, target, grid)


@given(seed=st.integers(0, 10_000))
def test_row_generation_finds_the_full_programs_optimum(seed: int) -> None:
    case = fit_case(seed)
    config = SolveConfig(encoding=Encoding.RECONSTRUCT_LP, norm_weight=0.01)
    generated = solve_fit(case, config)
    full = solve_fit(case, dataclasses.replace(config, structured=False))
    assert generated.status is full.status is SolveStatus.OPTIMAL

    def objective(solution) -> float:  # type: ignore[no-untyped-def]
        residual = case.inputs @ (case.weights + solution.weight_delta) + solution.bias_delta - case.target
        change = np.abs(solution.weight_delta).sum() + abs(solution.bias_delta)
        return float(np.abs(residual).mean() + 0.01 * change)

    assert objective(generated) == pytest.approx(objective(full), rel=1e-6, abs=1e-9)
    assert generated.constraints <= full.constraints


@pytest.mark.parametrize("encoding", [Encoding.RECONSTRUCT_LP, Encoding.RECONSTRUCT_INTEGER])
@pytest.mark.parametrize("seed", range(3))
def test_row_generation_over_many_rows_reaches_the_full_optimum(encoding: Encoding, seed: int) -> None:
    """With more rows than the first working set holds, the rows left out enter the relaxation linearly:
    before its variables were bounded, every continuous fit came back Unbounded (a solver error)."""
    case = fit_case(seed, n=400, m=6)
    config = SolveConfig(encoding=encoding, norm_weight=0.01, time_limit=30)
    generated = solve_fit(case, config)
    full = solve_fit(case, dataclasses.replace(config, structured=False))
    assert generated.status is full.status is SolveStatus.OPTIMAL
    assert generated.constraints < full.constraints  # rows really were left out

    def objective(solution) -> float:  # type: ignore[no-untyped-def]
        residual = case.inputs @ (case.weights + solution.weight_delta) + solution.bias_delta - case.target
        change = np.abs(solution.weight_delta).sum() + abs(solution.bias_delta)
        return float(np.abs(residual).mean() + 0.01 * change)

    assert objective(generated) == pytest.approx(objective(full), rel=1e-6, abs=1e-9)


def test_the_integer_fit_moves_whole_steps_and_lowers_the_error() -> None:
    case = fit_case(5, n=40, m=3)
    solution = solve_fit(case, SolveConfig(encoding=Encoding.RECONSTRUCT_INTEGER, time_limit=30))
    assert solution.solved
    steps = solution.weight_delta / 0.1
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    before = np.abs(case.inputs @ case.weights - case.target).mean()
    after = np.abs(case.inputs @ (case.weights + solution.weight_delta) + solution.bias_delta - case.target).mean()
    assert after < before


def test_the_fit_stops_at_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row generation of the L1 fit ends with TIME_LIMIT once its limit is spent, not after every round."""
    import onnxrepair.solve as solve_module

    case = fit_case(3, n=400, m=6)
    config = SolveConfig(encoding=Encoding.RECONSTRUCT_LP, time_limit=25.0)
    assert solve_fit(case, config).rounds >= 2  # it needs more than one round
    monkeypatch.setattr(solve_module, "time", SlowClock())
    late = solve_fit(case, config)
    assert late.status is SolveStatus.TIME_LIMIT and not late.solved
    assert late.rounds <= 2 and "row generation stopped" in late.reason


@pytest.mark.parametrize("norm_weight", [0.01, 1.0])
@pytest.mark.parametrize("encoding", [Encoding.RECONSTRUCT_LP, Encoding.RECONSTRUCT_INTEGER])
def test_the_bound_on_the_fit_cuts_off_no_optimum(encoding: Encoding, norm_weight: float) -> None:
    """fit_program bounds each variable by mean |r0| / (norm_weight x scale): the full program (every row)
    has the same optimum with and without that bound."""
    import onnxrepair.solve as solve_module

    integer = encoding is Encoding.RECONSTRUCT_INTEGER
    for seed in range(4):
        case = fit_case(seed, n=200, m=5)
        every_row = np.ones(len(case.target), dtype=bool)
        bounded, _ = solve_module.fit_program(case, every_row, integer, True, norm_weight)
        grid_only, _ = solve_module.fit_program(case, every_row, integer, True, 0.0)  # no norm term: no bound
        free = dataclasses.replace(bounded, upper=grid_only.upper)
        if not integer or norm_weight >= 1.0:  # (the integer grid's +-20 steps are tighter at 0.01)
            assert np.any(bounded.upper < free.upper)  # the bound is there
        with_bound = solve_module.solve_program(bounded, SolverBackend.HIGHS, 30.0)
        without = solve_module.solve_program(free, SolverBackend.HIGHS, 30.0)
        assert with_bound.status is without.status is SolveStatus.OPTIMAL
        assert with_bound.objective == pytest.approx(without.objective, rel=1e-7, abs=1e-9)
