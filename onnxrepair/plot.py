"""The neuron-importance picture for `--plot`: how the scores of one layer spread.

Figure 2 of the QNNRepair paper shows, for the last dense layer of MobileNetV2,
the importance of every neuron plotted against its index, and the same scores
ranked from highest to lowest. The pair shows what the top-N choice rests on:
whether a few neurons stand out (a steep head on the ranked curve, isolated
spikes in the scatter) or many score alike, so that the cut at N is close to
arbitrary and a random pick would do about as well.

plot_importance draws that pair for the layer being repaired:

    left   score by neuron index; the neurons chosen for repair highlighted
    right  scores sorted descending (rank 1 = most suspicious), the top-N cut
           drawn as a vertical line and the chosen neurons marked on the curve

DStar scores +inf for a neuron that flips on failing tests only (see
localize.py); such neurons cannot sit on a finite axis, so both panels draw
them on a dashed line above the highest finite score, with their own marker and
legend entry. matplotlib is an optional extra (`pip install 'onnxrepair[plot]'`),
imported only when a plot is asked for, and rendered with the Agg canvas, never
through pyplot's global state. The PNG is written atomically like every output.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from onnxrepair.errors import OnnxRepairError
from onnxrepair.files import write_bytes_atomically

INSTALL_HINT = "pip install 'onnxrepair[plot]'"

_POINT = "#4c72b0"
_SELECTED = "#dd5500"
_INFINITE = "#b2182b"
_LABELLED_AT_MOST = 12  # selected neurons get their index written next to them up to this many


def plot_importance(
    scores: NDArray[np.float64],
    path: Path,
    *,
    metric: str,
    layer: str,
    selected: Sequence[int] = (),
) -> None:
    """Draw the importance scatter and ranked curve of one layer and write them to `path` as PNG.

    Args:
        scores: one score per neuron (higher is more suspicious); +inf allowed, NaN not.
        path: the PNG to write; its folder must exist (the caller checks overwriting).
        metric: the metric's name, for the title.
        layer: the layer's name, for the title.
        selected: indices of the neurons chosen for repair; len(selected) is the top-N cut.

    Raises:
        OnnxRepairError: matplotlib is not installed.
        ValueError: scores is empty, not 1-D, holds NaN or -inf, or a selected index is out of range.
    """
    figure_class, canvas_class = _import_matplotlib()
    values = np.asarray(scores, dtype=np.float64)
    chosen = _check(values, selected)

    infinite = np.isposinf(values)
    finite_values = values[~infinite]
    top = float(finite_values.max()) if finite_values.size else 0.0
    bottom = float(finite_values.min()) if finite_values.size else 0.0
    inf_level = top + max(0.15 * (top - bottom), 0.15 * abs(top), 1.0 if top == bottom else 0.0)
    shown = np.where(infinite, inf_level, values)

    count = values.size
    order = np.argsort(-values, kind="stable")  # same order as localize.rank_neurons
    rank_of = np.empty(count, dtype=np.int64)
    rank_of[order] = np.arange(1, count + 1)

    figure = figure_class(figsize=(13, 5), dpi=110, layout="constrained")
    canvas_class(figure)
    left, right = figure.subplots(1, 2)
    size = float(np.clip(3000 / count, 6, 36))

    # Left: by neuron index.
    index = np.arange(count)
    plain = ~infinite
    if plain.any():
        left.scatter(index[plain], shown[plain], s=size, color=_POINT, alpha=0.75, linewidths=0, label="neuron")
    if infinite.any():
        left.scatter(
            index[infinite],
            shown[infinite],
            s=size * 2.5,
            marker="^",
            color=_INFINITE,
            zorder=3,
            label=f"score +inf ({int(infinite.sum())}), drawn at top",
        )
    if chosen.size:
        left.scatter(
            chosen,
            shown[chosen],
            s=size * 4,
            facecolors="none",
            edgecolors=_SELECTED,
            linewidths=1.6,
            zorder=4,
            label=f"selected for repair ({chosen.size})",
        )
        if chosen.size <= _LABELLED_AT_MOST:
            for neuron in chosen:
                left.annotate(
                    str(neuron),
                    (neuron, shown[neuron]),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=8,
                    color=_SELECTED,
                )
    left.set_title("Importance by neuron index")
    left.set_xlabel("neuron index")
    left.set_ylabel(f"{metric} score")
    left.set_xlim(-0.02 * count - 0.5, count - 0.5 + 0.02 * count)

    # Right: ranked curve.
    ranks = np.arange(1, count + 1)
    ranked = shown[order]
    finite_ranks = ~infinite[order]
    if finite_ranks.any():
        right.plot(
            ranks[finite_ranks],
            ranked[finite_ranks],
            color=_POINT,
            linewidth=1.5,
            marker="o" if count <= 100 else None,
            markersize=3,
            label="score, highest first",
        )
    if infinite.any():
        right.scatter(
            ranks[~finite_ranks],
            ranked[~finite_ranks],
            s=size * 2.5,
            marker="^",
            color=_INFINITE,
            zorder=3,
            label=f"score +inf ({int(infinite.sum())}), drawn at top",
        )
    if chosen.size:
        right.scatter(
            rank_of[chosen],
            shown[chosen],
            s=size * 4,
            facecolors="none",
            edgecolors=_SELECTED,
            linewidths=1.6,
            zorder=4,
            label="selected for repair",
        )
        right.axvline(chosen.size + 0.5, color=_SELECTED, linestyle="--", linewidth=1.2, label=f"top-{chosen.size} cut")
    right.set_title("Ranked importance")
    right.set_xlabel("rank (1 = most suspicious)")
    right.set_ylabel(f"{metric} score")
    right.set_xlim(1 - 0.02 * count - 0.5, count + 0.5 + 0.02 * count)

    for axes in (left, right):
        if infinite.any():
            _mark_infinity(axes, inf_level, numbers=finite_values.size > 0)
        if top == bottom and not infinite.all():
            axes.text(
                0.5,
                0.06,
                f"every finite score is {top:g}",
                transform=axes.transAxes,
                ha="center",
                fontsize=9,
                color="0.35",
            )
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize=8, framealpha=0.9)

    figure.suptitle(f"Neuron importance of layer {layer} ({metric}, {count} neurons)", fontsize=12)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomically(path, buffer.getvalue())


def _mark_infinity(axes: Any, inf_level: float, *, numbers: bool) -> None:
    """A dotted line at the height +inf scores are drawn at, and a "+inf" tick there in place of a number.

    With `numbers` false (every score is +inf) the axis shows that one tick and nothing else.
    """
    axes.axhline(inf_level, color=_INFINITE, linestyle=":", linewidth=1)
    if not numbers:
        axes.set_yticks([inf_level], ["+inf"])
        axes.set_ylim(inf_level - 1.0, inf_level + 1.0)
        axes.get_yticklabels()[-1].set_color(_INFINITE)
        return
    low, high = axes.get_ylim()
    high = max(high, inf_level + 0.04 * (high - low))
    clearance = 0.06 * (high - low)  # drop number ticks that would collide with the "+inf" label
    ticks = [float(t) for t in axes.get_yticks() if low <= t < inf_level - clearance]
    labels = axes.yaxis.get_major_formatter().format_ticks(ticks)
    axes.set_yticks([*ticks, inf_level], [*labels, "+inf"])
    axes.set_ylim(low, high)
    axes.get_yticklabels()[-1].set_color(_INFINITE)


def _import_matplotlib() -> tuple[Any, Any]:
    """The Figure and Agg canvas classes, or the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (imported first so a missing package is caught here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise OnnxRepairError(f"--plot needs matplotlib, which is not installed; run {INSTALL_HINT}") from error
    return Figure, FigureCanvasAgg


def _check(values: NDArray[np.float64], selected: Sequence[int]) -> NDArray[np.int64]:
    """The selected indices as an array, after checking the scores and indices can be drawn."""
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {values.shape}")
    if np.isnan(values).any() or np.isneginf(values).any():
        raise ValueError("scores must not hold NaN or -inf")
    chosen = np.asarray(list(selected), dtype=np.int64)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= values.size):
        raise ValueError(f"selected neuron indices must lie in [0, {values.size}), got {chosen.tolist()}")
    return np.unique(chosen)  # sorted, each neuron once
