"""What a repair run shows the user: rich tables, progress bars, and the JSON report.

The only module that imports rich.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxrepair import __version__
from onnxrepair.config import RepairConfig
from onnxrepair.repair import LayerRow, RepairResult


class RichProgress:
    """A repair.Progress that draws one transient bar per task on `console`."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self._bars = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._bars.__exit__(kind, value, tb)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        task_id = self._bars.add_task(description, total=total)
        try:
            yield lambda n: self._bars.advance(task_id, n)
        finally:
            self._bars.remove_task(task_id)


def report_dict(
    result: RepairResult,
    config: RepairConfig,
    inputs: dict[str, str],
    preprocessing: str,
    output: str | None,
) -> dict[str, Any]:
    """The JSON report: the documented keys first, details after."""
    ev = result.evaluation
    by_neuron = {s.neuron: s for s in result.solutions}
    return {
        "float_accuracy": ev.float_accuracy,
        "quant_accuracy": ev.quant_accuracy,
        "repaired_accuracy": ev.repaired_accuracy,
        "quant_agreement": ev.quant_agreement,
        "repaired_agreement": ev.repaired_agreement,
        "validation_size": ev.size,
        "repair_size": result.repair_size,
        "layer": result.pair.float_layer.name,
        "metric": config.metric.value,
        "neurons": result.repaired_neurons,
        "unsolved": result.unsolved,
        "solve_seconds": result.timings.solve,
        "total_seconds": result.timings.total,
        "fixed": ev.fixed,
        "broken": ev.broken,
        "quant_layer": result.pair.quant_layer.name,
        "paired_by": result.pair.paired_by,
        "repair_failing": result.spectrum.n_failing,
        "encoding": config.solve.encoding.value,
        "solver": config.solve.backend.value,
        "margin": config.solve.margin,
        "time_limit": config.solve.time_limit,
        "neurons_requested": config.neurons,
        "seed": config.seed,
        "preprocessing": preprocessing,
        "inference_seconds": result.timings.inference,
        "rewrite_seconds": result.timings.rewrite,
        "evaluate_seconds": result.timings.evaluate,
        "inputs": inputs,
        "output": output,
        "onnxrepair_version": __version__,
        "per_neuron": [
            {
                "neuron": neuron,
                "score": _finite(result.scores[neuron]),
                "status": by_neuron[neuron].status.value,
                "max_abs_delta": by_neuron[neuron].objective,
                "weights_changed": result.rewrite.changed.get(neuron, 0),
                "weights_clamped": result.rewrite.clamped.get(neuron, 0),
                "largest_delta_in_steps": result.rewrite.largest_step.get(neuron),
                "solve_seconds": by_neuron[neuron].seconds,
                "constraints": by_neuron[neuron].constraints,
                "reason": by_neuron[neuron].reason,
            }
            for neuron in result.selected
        ],
    }


def print_summary(console: Console, result: RepairResult, config: RepairConfig) -> None:
    """Float, quantized and repaired side by side; gains in green, losses in red."""
    ev = result.evaluation
    table = Table(title=f"Validation set ({ev.size} images)", title_justify="left")
    table.add_column("")
    for name in ("float", "quantized", "repaired"):
        table.add_column(name, justify="right")
    if ev.float_accuracy is not None:
        table.add_row(
            "top-1 accuracy",
            _pct(ev.float_accuracy),
            _pct(ev.quant_accuracy),
            _compared(ev.repaired_accuracy, ev.quant_accuracy),
        )
    table.add_row(
        "agreement with float", "", _pct(ev.quant_agreement), _compared(ev.repaired_agreement, ev.quant_agreement)
    )
    table.add_row("disagreements fixed / broken", "", "", f"{ev.fixed} / {ev.broken}")
    console.print(table)
    changed = sum(result.rewrite.changed.values())
    clamped = sum(result.rewrite.clamped.values())
    console.print(
        f"layer [bold]{result.pair.float_layer.name}[/], metric {config.metric.value}, "
        f"encoding {config.solve.encoding.value}: {len(result.repaired_neurons)} of {len(result.selected)} "
        f"neurons solved {result.repaired_neurons}, {changed} integer weights changed"
        + (f" ({clamped} clamped to the integer range)" if clamped else "")
    )
    if result.repaired_neurons and changed == 0:
        console.print(
            "  [yellow]every solved change is smaller than half a weight quantization step, so rounding "
            "to the integer weights erased it[/] (largest: "
            f"{max(result.rewrite.largest_step.values(), default=0.0):.2f} steps)"
        )
    unsolved_by_reason: dict[str, list[int]] = {}
    for solution in result.solutions:
        if not solution.solved:
            unsolved_by_reason.setdefault(solution.reason, []).append(solution.neuron)
    for reason, neurons in unsolved_by_reason.items():
        console.print(f"  [yellow]{len(neurons)} neuron(s) left unchanged {neurons}[/]: {escape(reason)}")
    t = result.timings
    console.print(
        f"time: {t.total:.1f} s (inference {t.inference:.1f} s, solving {t.solve:.1f} s, "
        f"rewriting {t.rewrite:.2f} s, evaluation {t.evaluate:.1f} s)"
    )


def print_layers(console: Console, rows: list[LayerRow]) -> None:
    """The dense layers of FLOAT and whether each can be repaired."""
    table = Table(title="Dense layers of FLOAT (the last one is the default --layer)", title_justify="left")
    # The layer name is what --layer takes: never cut or wrapped.
    table.add_column("layer", no_wrap=True, min_width=max((len(r.layer.name) for r in rows), default=5))
    for column in ("op", "in -> out", "QUANT layer", "QUANT weights", "repairable"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shape = f"{row.layer.n_in} -> {row.layer.n_out}"
        if row.pair is None:
            table.add_row(row.layer.name, row.layer.op, shape, "", "", f"[red]no[/]: {escape(row.reason)}")
        else:
            quant = f"{row.pair.quant_layer.name} (by {row.pair.paired_by})"
            table.add_row(row.layer.name, row.layer.op, shape, quant, row.weights, "[green]yes[/]")
    console.print(table)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _compared(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return _pct(value)
    colour = "green" if value > baseline else "red" if value < baseline else "default"
    return f"[{colour}]{_pct(value)}[/]"


def _finite(value: float) -> float | None:
    """JSON has no infinity: DStar's +inf becomes null."""
    return float(value) if np.isfinite(value) else None
