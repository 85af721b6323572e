"""Reconstruction: fit a layer's channels so that the quantized pre-activation matches the float one.

For every channel j with weights w_j (on its integer grid) and bias b_j, over
rows a_k (the layer input as the quantized model computes it) and the float
model's pre-activation y_kj of the same rows:

    minimise  sum_k (a_k . w + b - y_kj)^2  +  ridge * mean(diag(A^T A)) * |w - w_j|^2

(ridge least squares towards the stored weights), then round the change to
whole steps of each weight's own scale, clamped to the integer type's range,
and refit the bias, which has a far finer grid (int32 at scale_x * scale_w, or
float), to the rounded weights. A channel is changed only when the rounded
result lowers its squared error on held-out rows: rows of images the fit
never saw.

Everything runs on Gram statistics ([A, 1]^T [A, 1], [A, 1]^T y, y^T y per
group of channels that read the same columns), accumulated in chunks of rows:
no row is stored twice, and a depthwise layer's thousands of tiny problems are
one batched solve. Numeric only: arrays in, arrays out; no ONNX, no solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# Ridge strength relative to the mean diagonal of A^T A: measured in docs/BENCHMARKS.md
# ("Reconstruction ridge"); it mostly matters where rows are few against the fan-in.
DEFAULT_RIDGE = 0.1
_CHUNK_BYTES = 64 * 2**20  # rows converted to float64 at a time
_SWEEPS = 8  # coordinate sweeps over a channel's weights after rounding (most settle in 2-4)


@dataclass(frozen=True)
class ReconstructionProblem:
    """One layer's reconstruction over rows.

    Attributes:
        rows: [r, groups * n_in] layer inputs (channel j reads the columns of group j // (out / groups)).
        target: [r, out] the float model's pre-activation at the same rows.
        weights: [out, n_in] current (dequantized) weights; bias: [out].
        weight_step, weight_low, weight_high: [out, n_in] each weight's step and the whole steps it may move.
        bias_step: [out] the bias's step (0: float, moves freely); None when the layer has no bias.
        bias_low, bias_high: [out] whole bias steps it may move (None with bias_step None).
        groups: channel groups (1 for a dense layer).
        holdout: [r] True for rows of held-out images (never fitted; they decide what is kept).
    """

    rows: NDArray[np.float32]
    target: NDArray[np.float32]
    weights: NDArray[np.float64]
    bias: NDArray[np.float64]
    weight_step: NDArray[np.float64]
    weight_low: NDArray[np.float64]
    weight_high: NDArray[np.float64]
    bias_step: NDArray[np.float64] | None
    bias_low: NDArray[np.float64] | None
    bias_high: NDArray[np.float64] | None
    groups: int
    holdout: NDArray[np.bool_]


@dataclass(frozen=True)
class Reconstruction:
    """The fitted, rounded change per channel, and the held-out errors that decided it.

    Attributes:
        weight_delta: [out, n_in] change of the dequantized weights, whole steps (0 for channels not kept).
        bias_delta: [out] change of the bias (0 for channels not kept).
        kept: [out] True where the change lowered the held-out error.
        error_before, error_after: [out] squared error on held-out rows per channel, before and after
            (after equals before where not kept).
    """

    weight_delta: NDArray[np.float64]
    bias_delta: NDArray[np.float64]
    kept: NDArray[np.bool_]
    error_before: NDArray[np.float64]
    error_after: NDArray[np.float64]


@dataclass(frozen=True)
class GramStatistics:
    """Per group: G = [A, 1]^T [A, 1] ([groups, p, p]), c = [A, 1]^T Y ([groups, p, out / groups]), yy ([out])."""

    gram: NDArray[np.float64]
    cross: NDArray[np.float64]
    squares: NDArray[np.float64]
    rows: int


def gram_statistics(
    rows: NDArray[np.float32], target: NDArray[np.float32], groups: int, mask: NDArray[np.bool_] | None = None
) -> GramStatistics:
    """Accumulate the statistics of `rows` (those `mask` keeps) against `target`, in chunks of at most
    _CHUNK_BYTES in float64: a wide layer's rows are never copied whole."""
    r, width = rows.shape
    out = target.shape[1]
    n_in, per_group = width // groups, out // groups
    gram = np.zeros((groups, n_in + 1, n_in + 1))
    cross = np.zeros((groups, n_in + 1, per_group))
    squares = np.zeros(out)
    chunk = max(64, _CHUNK_BYTES // (8 * (width + groups)))
    count = 0
    for start in range(0, r, chunk):
        keep = slice(None) if mask is None else mask[start : start + chunk]
        a = rows[start : start + chunk][keep].astype(np.float64)
        y = target[start : start + chunk][keep].astype(np.float64)
        k = len(a)
        count += k
        if k == 0:
            continue
        a = np.concatenate([a.reshape(k, groups, n_in), np.ones((k, groups, 1))], axis=2).transpose(1, 0, 2)
        y_grouped = y.reshape(k, groups, per_group).transpose(1, 0, 2)  # [groups, k, per_group]
        gram += a.transpose(0, 2, 1) @ a
        cross += a.transpose(0, 2, 1) @ y_grouped
        squares += np.einsum("kj,kj->j", y, y)
    return GramStatistics(gram, cross, squares, count)


def squared_errors(
    stats: GramStatistics, weights: NDArray[np.float64], bias: NDArray[np.float64]
) -> NDArray[np.float64]:
    """sum_k (a_k . w_j + b_j - y_kj)^2 for every channel j, from the statistics: [out]."""
    theta = _stacked(weights, bias, stats.gram.shape[0])  # [groups, p, per_group]
    quadratic = np.einsum("gpj,gpj->gj", theta, stats.gram @ theta)
    linear = np.einsum("gpj,gpj->gj", theta, stats.cross)
    return np.maximum(quadratic.reshape(-1) - 2 * linear.reshape(-1) + stats.squares, 0.0)


def reconstruct(problem: ReconstructionProblem, ridge: float = DEFAULT_RIDGE) -> Reconstruction:
    """Fit every channel on the rows not held out, round, refit the bias, keep what lowers the held-out error."""
    groups = problem.groups
    fit = gram_statistics(problem.rows, problem.target, groups, ~problem.holdout)
    check = gram_statistics(problem.rows, problem.target, groups, problem.holdout)
    out, n_in = problem.weights.shape
    has_bias = problem.bias_step is not None
    p = n_in + 1
    # ridge towards the stored weights; the bias (last variable) is not penalised
    diagonal = np.einsum("gii->gi", fit.gram[:, :n_in, :n_in])
    strength = ridge * np.maximum(diagonal.mean(axis=1), 1e-12)  # [groups]
    penalty = np.zeros((groups, p, p))
    penalty[:, np.arange(n_in), np.arange(n_in)] = strength[:, None]
    gram, cross = fit.gram + penalty, fit.cross + penalty @ _stacked(problem.weights, problem.bias, groups)
    if not has_bias:  # the bias stays 0: drop its row and column
        gram[:, n_in, :] = 0.0
        gram[:, :, n_in] = 0.0
        gram[:, n_in, n_in] = 1.0
        cross[:, n_in, :] = 0.0
    gram[:, np.arange(p), np.arange(p)] += 1e-12 * np.maximum(np.einsum("gii->gi", gram), 1.0)  # never singular
    solved = np.linalg.solve(gram, cross)  # [groups, p, per_group]
    fitted = solved[:, :n_in, :].transpose(0, 2, 1).reshape(out, n_in)

    steps = np.where(problem.weight_step > 0, problem.weight_step, 1.0)
    whole = np.clip(np.round((fitted - problem.weights) / steps), problem.weight_low, problem.weight_high)
    weight_delta = np.where(problem.weight_step > 0, whole * problem.weight_step, fitted - problem.weights)
    start = problem.bias + (solved[:, n_in, :].reshape(out) - problem.bias if has_bias else 0.0)
    weight_delta = _descend_on_grid(gram, cross, problem, weight_delta, start, has_bias)
    rounded = problem.weights + weight_delta
    bias_delta = np.zeros(out)
    if has_bias:
        bias_delta = _refit_bias(fit, rounded, problem, groups) - problem.bias

    before = squared_errors(check, problem.weights, problem.bias)
    after = squared_errors(check, rounded, problem.bias + bias_delta)
    kept = after < before * (1 - 1e-9)
    weight_delta[~kept] = 0.0
    bias_delta[~kept] = 0.0
    return Reconstruction(weight_delta, bias_delta, kept, before, np.where(kept, after, before))


def _descend_on_grid(
    gram: NDArray[np.float64],
    cross: NDArray[np.float64],
    problem: ReconstructionProblem,
    weight_delta: NDArray[np.float64],
    bias: NDArray[np.float64],
    has_bias: bool,
    sweeps: int = _SWEEPS,
) -> NDArray[np.float64]:
    """Improve the rounded weights one coordinate at a time, in whole steps, on the fitted objective.

    Rounding each weight to its nearest step ignores how the errors of the
    weights of one channel add up; moving one weight at a time to its best
    whole step given the others (the bias re-fitted after each sweep) only
    lowers theta^T G theta - 2 c^T theta, and stops when a sweep moves
    nothing. Every channel of every group moves at once.
    """
    groups = gram.shape[0]
    out, n_in = problem.weights.shape
    per_group = out // groups
    steps = problem.weight_step.reshape(groups, per_group, n_in).transpose(0, 2, 1)  # [groups, n_in, per_group]
    if not np.all(steps > 0):
        return weight_delta  # float-stored weights: nothing to round
    low = problem.weight_low.reshape(groups, per_group, n_in).transpose(0, 2, 1)
    high = problem.weight_high.reshape(groups, per_group, n_in).transpose(0, 2, 1)
    whole = np.round(weight_delta / problem.weight_step).reshape(groups, per_group, n_in).transpose(0, 2, 1)
    theta = _stacked(problem.weights + weight_delta, bias, groups)  # [groups, p, per_group]
    residual = gram @ theta - cross  # half the gradient
    diagonal = np.einsum("gii->gi", gram)  # [groups, p]
    for _ in range(sweeps):
        moved = 0
        for i in range(n_in):
            wanted = np.round(-residual[:, i, :] / (diagonal[:, i, None] * steps[:, i, :]))
            change = np.clip(whole[:, i, :] + wanted, low[:, i, :], high[:, i, :]) - whole[:, i, :]
            if not change.any():
                continue
            moved += int(np.count_nonzero(change))
            whole[:, i, :] += change
            residual += gram[:, :, i, None] * (change * steps[:, i, :])[:, None, :]
        if has_bias:
            shift = -residual[:, n_in, :] / diagonal[:, n_in, None]
            residual += gram[:, :, n_in, None] * shift[:, None, :]
        if moved == 0:
            break
    return (whole * steps).transpose(0, 2, 1).reshape(out, n_in)


def _refit_bias(
    fit: GramStatistics, weights: NDArray[np.float64], problem: ReconstructionProblem, groups: int
) -> NDArray[np.float64]:
    """The bias that minimises the fitted rows' error given `weights`, on the bias grid: mean residual, rounded."""
    out, n_in = weights.shape
    per_group = out // groups
    # d/db: n b + sum_k a_k . w - sum_k y_k = 0, with sum_k a_k the last row of G and sum_k y_k the last row of c
    row_sums = fit.gram[:, n_in, :n_in]  # [groups, n_in]
    predicted = np.einsum("gi,goi->go", row_sums, weights.reshape(groups, per_group, n_in)).reshape(out)
    targets = fit.cross[:, n_in, :].reshape(out)
    bias = (targets - predicted) / max(fit.rows, 1)
    assert problem.bias_step is not None and problem.bias_low is not None and problem.bias_high is not None
    step = problem.bias_step
    on_grid = problem.bias + np.clip(
        np.round((bias - problem.bias) / np.where(step > 0, step, 1.0)), problem.bias_low, problem.bias_high
    ) * np.where(step > 0, step, 0.0)
    return np.where(step > 0, on_grid, bias)


def _stacked(weights: NDArray[np.float64], bias: NDArray[np.float64], groups: int) -> NDArray[np.float64]:
    """[out, n_in] weights and [out] bias as [groups, n_in + 1, out / groups] columns."""
    out, n_in = weights.shape
    theta = np.concatenate([weights, bias[:, None]], axis=1)  # [out, p]
    return theta.reshape(groups, out // groups, n_in + 1).transpose(0, 2, 1)
