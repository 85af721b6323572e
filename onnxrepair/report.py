"""What a repair run shows the user: rich tables, progress bars, and the JSON report.

The only module that imports rich.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxrepair import __version__
from onnxrepair.config import Encoding, RepairConfig
from onnxrepair.inspection import Inspection
from onnxrepair.layers import RejectedLayer
from onnxrepair.methods import LayerRepair
from onnxrepair.repair import LayerRow, ModelScore, RepairRun
from onnxrepair.search import Score


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
    result: RepairRun,
    config: RepairConfig,
    inputs: dict[str, str],
    preprocessing: str,
    output: str | None,
) -> dict[str, Any]:
    """The JSON report: the documented keys first, details after.

    `neurons` and `unsolved` are lists of indices when one layer was repaired,
    and objects {layer: indices} when several were. With --search, `metric`
    and `encoding` say "search" and `methods` lists what the search kept.
    """
    ev = result.evaluation
    written = result.model is not None
    names = list(dict.fromkeys(layer.pair.float_layer.name for layer in result.layers)) or [
        t.layer for t in result.trials[:1]
    ]
    return {
        "float_accuracy": ev.float_accuracy,
        "quant_accuracy": ev.quant_accuracy,
        "repaired_accuracy": ev.repaired_accuracy if written else None,
        "quant_agreement": ev.quant_agreement,
        "repaired_agreement": ev.repaired_agreement if written else None,
        "validation_size": ev.size,
        "repair_size": result.repair_size,
        "layer": ", ".join(names),
        "metric": "search" if config.search else config.metric.value,
        "neurons": _by_layer(result, lambda layer: layer.repaired_neurons),
        "unsolved": _by_layer(result, lambda layer: layer.unsolved),
        "solve_seconds": result.timings.solve,
        **_solve_time_stats(result),
        "inference_seconds": result.timings.inference,
        "peak_memory_mb": result.peak_memory_mb,
        "total_seconds": result.timings.total,
        "written": written,
        "worse_than_quant": ev.worse_than_quant if written else None,
        "fixed": ev.fixed if written else None,
        "broken": ev.broken if written else None,
        "methods": [
            f"{layer.pair.float_layer.name}: {layer.method.describe(layer.pair.quant_layer.n_out)}"
            for layer in result.layers
        ],
        "encoding": "search" if config.search else config.solve.encoding.value,
        "objective": config.solve.resolved_objective.value,
        "repair_bias": config.solve.resolved_repair_bias,
        "solver": config.solve.backend.value,
        "margin": config.solve.resolved_margin,
        "norm_weight": config.solve.norm_weight,
        "time_limit": config.solve.time_limit,
        "neurons_requested": config.neurons,
        "seed": config.seed,
        "jobs": config.jobs,
        "executor": config.executor,
        "providers": list(config.providers),
        "preprocessing": preprocessing,
        "rewrite_seconds": result.timings.rewrite,
        "search_seconds": result.timings.search,
        "evaluate_seconds": result.timings.evaluate,
        "inputs": inputs,
        "output": output,
        "onnxrepair_version": __version__,
        "layers": [_layer_dict(layer) for layer in result.layers],
        "search": None if config.search is None else _search_dict(result, config),
        "guard": _guard_dict(result) if result.guard else None,
    }


def _guard_dict(result: RepairRun) -> dict[str, Any]:
    return {
        "holdout_size": result.holdout_size,
        "holdout_before": _score_dict(result.holdout_before),
        "holdout_after": _score_dict(result.holdout_after),
        "layers": [
            {
                "layer": step.repair.pair.float_layer.name,
                "kept": step.kept,
                "holdout_agreement": step.holdout.agreement,
                "holdout_accuracy": step.holdout.accuracy,
                "holdout_divergence": step.holdout.output_error,
                "seconds": step.seconds,
            }
            for step in result.guard
        ],
    }


def _solve_time_stats(result: RepairRun) -> dict[str, float | None]:
    """Median, 90th percentile and largest seconds of one solver run (a neuron, or a joint logit program)."""
    seconds: list[float] = []
    for layer in result.layers:
        if layer.method.encoding is Encoding.BIAS_CORRECTION:
            continue
        runs = layer.solutions[:1] if layer.method.encoding is Encoding.LOGIT else layer.solutions
        seconds.extend(s.seconds for s in runs if s.constraints)  # 0 rows: never started (budget)
    if not seconds:
        return {"solve_seconds_median": None, "solve_seconds_p90": None, "solve_seconds_max": None}
    return {
        "solve_seconds_median": float(np.median(seconds)),
        "solve_seconds_p90": float(np.percentile(seconds, 90)),
        "solve_seconds_max": float(np.max(seconds)),
    }


def _by_layer(result: RepairRun, pick: Callable[[LayerRepair], list[int]]) -> list[int] | dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for layer in result.layers:
        chosen = grouped.setdefault(layer.pair.float_layer.name, [])
        chosen.extend(n for n in pick(layer) if n not in chosen)
    if len(grouped) <= 1:
        return next(iter(grouped.values()), [])
    return grouped


def _layer_dict(layer: LayerRepair) -> dict[str, Any]:
    by_neuron = {s.neuron: s for s in layer.solutions}
    rewrite = layer.rewrite
    return {
        "layer": layer.pair.float_layer.name,
        "quant_layer": layer.pair.quant_layer.name,
        "paired_by": layer.pair.paired_by,
        "method": layer.method.describe(layer.pair.quant_layer.n_out),
        "encoding": layer.method.encoding.value,
        "metric": layer.method.metric.value,
        "kind": layer.pair.quant_layer.kind,
        "repair_failing": None if layer.spectrum is None else layer.spectrum.n_failing,
        "rows": layer.rows,
        "channels_changed": len(_changed_channels(layer)),
        "weights_changed": sum(rewrite.changed.values()),
        "biases_changed": len(rewrite.bias_changed),
        "sqnr_before": layer.sqnr_before,
        "sqnr_after": layer.sqnr_after,
        "solve_seconds": layer.solve_seconds,
        "bias_reencoded": rewrite.bias_reencoded,
        "per_neuron": [
            {
                "neuron": neuron,
                "score": _finite(layer.scores[neuron]),
                "status": by_neuron[neuron].status.value,
                "objective": by_neuron[neuron].objective,
                "weights_changed": rewrite.changed.get(neuron, 0),
                "weights_clamped": rewrite.clamped.get(neuron, 0),
                "largest_delta_in_steps": rewrite.largest_step.get(neuron),
                "bias_delta": by_neuron[neuron].bias_delta,
                "bias_changed": neuron in rewrite.bias_changed,
                "solve_seconds": by_neuron[neuron].seconds,
                "constraints": by_neuron[neuron].constraints,
                "reason": by_neuron[neuron].reason,
            }
            for neuron in layer.selected
        ],
    }


def _search_dict(result: RepairRun, config: RepairConfig) -> dict[str, Any]:
    assert config.search is not None
    return {
        "budget": config.search.budget,
        "holdout_size": result.holdout_size,
        "holdout_before": _score_dict(result.holdout_before),
        "holdout_after": _score_dict(result.holdout_after),
        "confirmation": None if result.confirmation is None else dataclasses.asdict(result.confirmation),
        "tried": [
            {
                "layer": t.layer,
                "method": t.method,
                "holdout_agreement": t.score.agreement if t.score else None,
                "holdout_accuracy": t.score.accuracy if t.score else None,
                "kept": t.accepted,
                "seconds": t.seconds,
                "note": t.note,
            }
            for t in result.trials
        ],
    }


def nothing_better_reason(result: RepairRun) -> str:
    """Why the search wrote no model, in one sentence."""
    check = result.confirmation
    if check is None or check.confirmed:
        return "no configuration beat the quantized model on the held-out repair images"
    accuracy = ""
    if check.accuracy_gained is not None:
        accuracy = f", accuracy {check.accuracy_gained} gained / {check.accuracy_lost} lost"
    return (
        f"the kept methods beat the quantized model on the held-out repair images, but re-applied on "
        f"{check.folds} folds of the repair images they fixed {check.fixed} and broke {check.broken} "
        f"out-of-fold disagreements (sign test p = {check.p_value:.3g}{accuracy}): not a reliable gain"
    )


def _score_dict(score: Score | None) -> dict[str, float | None] | None:
    if score is None:
        return None
    return {"agreement": score.agreement, "accuracy": score.accuracy, "divergence": score.output_error}


def _changed_channels(layer: LayerRepair) -> set[int]:
    rewrite = layer.rewrite
    return {n for n, count in rewrite.changed.items() if count} | set(rewrite.bias_changed)


def print_summary(console: Console, result: RepairRun, config: RepairConfig) -> None:
    """Float, quantized and repaired side by side; gains in green, losses in red."""
    if result.trials:
        _print_trials(console, result)
    ev = result.evaluation
    written = result.model is not None
    table = Table(title=f"Validation set ({ev.size} images, never used to repair)", title_justify="left")
    table.add_column("")
    for name in ("float", "quantized", "repaired"):
        table.add_column(name, justify="right")
    if ev.float_accuracy is not None:
        table.add_row(
            "top-1 accuracy",
            _pct(ev.float_accuracy),
            _pct(ev.quant_accuracy),
            _compared(ev.repaired_accuracy, ev.quant_accuracy) if written else "-",
        )
    repaired_agreement = _compared(ev.repaired_agreement, ev.quant_agreement) if written else "-"
    table.add_row("agreement with float", "", _pct(ev.quant_agreement), repaired_agreement)
    table.add_row("disagreements fixed / broken", "", "", f"{ev.fixed} / {ev.broken}" if written else "-")
    console.print(table)
    if written and ev.worse_than_quant:
        console.print(
            "[bold red]the repaired model is worse than the quantized one on the validation images[/] "
            f"(agreement {_pct(ev.quant_agreement)} -> {_pct(ev.repaired_agreement)}"
            + (
                f", accuracy {_pct(ev.quant_accuracy)} -> {_pct(ev.repaired_accuracy)}"
                if ev.quant_accuracy is not None
                else ""
            )
            + "); it was written as asked: --layers all or --search write a model only when it beats QUANT on "
            "held-out repair images",
            soft_wrap=True,
        )
    if result.guard or len(result.layers) > _LAYER_LINES:
        _print_layer_table(console, result)
    else:
        for layer in result.layers:
            _print_layer(console, layer)
    t = result.timings
    stages = (
        f"search {t.search:.1f} s, "
        if t.search
        else f"inference {t.inference:.1f} s, solving {t.solve:.1f} s, rewriting {t.rewrite:.2f} s, "
    )
    if result.confirmation is not None:
        stages += f"out-of-fold check {result.confirmation.seconds:.1f} s, "
    if result.confirmation is not None:
        check = result.confirmation
        verdict = "[green]confirmed[/]" if check.confirmed else "[yellow]not confirmed[/]"
        console.print(
            f"out-of-fold check ({check.folds} folds of the repair images): {check.fixed} disagreements fixed, "
            f"{check.broken} broken, sign test p = {check.p_value:.3g}: {verdict} ({check.seconds:.1f} s)"
        )
    console.print(f"time: {t.total:.1f} s ({stages}evaluation {t.evaluate:.1f} s)")


_LAYER_LINES = 4  # more layers than this are summed up in a table, one row each


def _print_layer_table(console: Console, result: RepairRun) -> None:
    """One row per layer repaired (kept or rolled back by the guard), then the totals."""
    steps = result.guard or [None] * len(result.layers)
    repairs = [step.repair for step in result.guard] if result.guard else result.layers
    title = "Layers, in order" + (f" (held-out: {result.holdout_size} repair images)" if result.guard else "")
    table = Table(title=title, title_justify="left")
    for column in ("layer", "kind", "channels changed", "weights", "biases", "SQNR dB", "held-out agreement", "kept"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for layer, step in zip(repairs, steps, strict=True):
        rewrite = layer.rewrite
        sqnr = "" if layer.sqnr_before is None else f"{layer.sqnr_before:.1f} -> {layer.sqnr_after:.1f}"
        table.add_row(
            escape(layer.pair.float_layer.name),
            layer.pair.quant_layer.kind,
            f"{len(_changed_channels(layer))} / {layer.pair.quant_layer.n_out}",
            str(sum(rewrite.changed.values())),
            str(len(rewrite.bias_changed)),
            sqnr,
            "" if step is None else _pct(step.holdout.agreement),
            "" if step is None else "[green]yes[/]" if step.kept else "[yellow]rolled back[/]",
        )
    console.print(table)
    kept = result.layers
    channels = sum(len(_changed_channels(layer)) for layer in kept)
    weights = sum(sum(layer.rewrite.changed.values()) for layer in kept)
    rolled_back = len(result.guard) - len(kept) if result.guard else 0
    console.print(
        f"{len(kept)} layer(s) changed"
        + (f", {rolled_back} rolled back (no better on the held-out images)" if rolled_back else "")
        + f": {channels} channels, {weights} integer weights",
        soft_wrap=True,
    )
    if result.guard and result.holdout_before is not None and result.holdout_after is not None:
        console.print(
            f"held-out agreement {_pct(result.holdout_before.agreement)} -> {_pct(result.holdout_after.agreement)}",
            soft_wrap=True,
        )


def _print_layer(console: Console, layer: LayerRepair) -> None:
    rewrite = layer.rewrite
    changed = sum(rewrite.changed.values())
    clamped = sum(rewrite.clamped.values())
    bias = f", {len(rewrite.bias_changed)} biases changed" if rewrite.bias_changed else ""
    console.print(
        f"layer [bold]{escape(layer.pair.float_layer.name)}[/], {layer.method.describe(layer.pair.quant_layer.n_out)}: "
        f"{len(layer.repaired_neurons)} of {len(layer.selected)} neurons solved, "
        f"{changed} integer weights changed{bias}"
        + (f" ({clamped} clamped to the integer range)" if clamped else "")
        + (" (bias re-encoded with a new scale)" if rewrite.bias_reencoded else ""),
        soft_wrap=True,
    )
    if layer.repaired_neurons and changed == 0 and not rewrite.bias_changed:
        console.print(
            "  [yellow]every solved change is smaller than half a quantization step, so rounding "
            "to the integer weights erased it[/] (largest: "
            f"{max(rewrite.largest_step.values(), default=0.0):.2f} steps)"
        )
    unsolved_by_reason: dict[str, list[int]] = {}
    for solution in layer.solutions:
        if not solution.solved:
            unsolved_by_reason.setdefault(solution.reason, []).append(solution.neuron)
    for reason, neurons in unsolved_by_reason.items():
        console.print(f"  [yellow]{len(neurons)} neuron(s) left unchanged {neurons}[/]: {escape(reason)}")


def _print_trials(console: Console, result: RepairRun) -> None:
    table = Table(title=f"Search ({result.holdout_size} held-out repair images)", title_justify="left")
    for column in ("layer", "method", "held-out agreement", "accuracy", "s", "kept"):
        table.add_column(column, justify="right" if column not in ("layer", "method") else "left")
    for t in result.trials:
        table.add_row(
            escape(t.layer),
            escape(t.method) + (f" [dim]({escape(t.note)})[/]" if t.note else ""),
            _pct(t.score.agreement) if t.score else "-",
            _pct(t.score.accuracy) if t.score else "-",
            f"{t.seconds:.1f}",
            "[green]yes[/]" if t.accepted else "",
        )
    console.print(table)


def print_model_score(console: Console, model: Path, score: ModelScore, against: Path | None) -> None:
    """What `onnxrepair eval` found, as one small table."""
    table = Table(title=f"{escape(str(model))} on {score.size} images", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("top-1 accuracy", _pct(score.accuracy) + ("" if score.accuracy is not None else " (no labels)"))
    if against is not None:
        table.add_row(f"agreement with {escape(str(against))}", _pct(score.agreement))
    console.print(table)


def print_layers(console: Console, rows: list[LayerRow], rejected: Sequence[RejectedLayer] = ()) -> None:
    """The layers of FLOAT and whether each can be repaired; then the layer-like nodes that are not layers."""
    table = Table(title="Layers of FLOAT, in graph order (the last one is the default --layer)", title_justify="left")
    # The layer name is what --layer takes: never cut or wrapped.
    table.add_column("layer", no_wrap=True, min_width=max((len(r.layer.name) for r in rows), default=5))
    for column in ("op", "kind", "in -> out", "QUANT layer", "QUANT weights", "repairable"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shape = f"{row.layer.n_in} -> {row.layer.n_out}"
        cells = [escape(row.layer.name), row.layer.op, row.layer.kind, shape]
        if row.pair is None:
            table.add_row(*cells, "", "", f"[red]no[/]: {escape(row.reason)}")
        else:
            quant = f"{row.pair.quant_layer.name} (by {row.pair.paired_by})"
            table.add_row(*cells, escape(quant), row.weights, "[green]yes[/]")
    console.print(table)
    for node in rejected:
        console.print(f"not a layer: {escape(node.describe())}", highlight=False, soft_wrap=True)


def print_inspection(console: Console, inspection: Inspection, command: str | None) -> None:
    """The per-layer table of `inspect`, the top neurons of the suggested layer, and the suggestion."""
    console.print(
        f"{inspection.images} images: FLOAT and QUANT agree on {_pct(inspection.agreement)} "
        f"({inspection.failing} failing); top-1 accuracy FLOAT {_pct(inspection.float_accuracy)}, "
        f"QUANT {_pct(inspection.quant_accuracy)}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(
        title="Layers of FLOAT against QUANT (flips: on/off status differs; SQNR: lower is noisier)",
        title_justify="left",
    )
    table.add_column("layer", no_wrap=True, min_width=max((len(r.name) for r in inspection.layers), default=5))
    table.add_column("op", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("in->out", no_wrap=True, justify="right")
    table.add_column("QUANT weights", overflow="fold")
    for column in ("flips", "on failing", "SQNR dB"):
        table.add_column(column, no_wrap=True, justify="right")
    for layer in inspection.layers:
        shape = f"{layer.n_in}->{layer.n_out}"
        if layer.reason:
            reason = f"[red]not repairable[/]: {escape(layer.reason)}"
            table.add_row(escape(layer.name), layer.op, layer.kind, shape, reason, "", "", "")
            continue
        marker = " [green]<-[/]" if layer.name == inspection.recommended_layer else ""
        table.add_row(
            escape(layer.name) + marker,
            layer.op,
            layer.kind,
            shape,
            escape(layer.weights),
            _pct(layer.flip_share),
            _pct(layer.flip_share_failing),
            "n/a" if layer.sqnr_db is None else f"{layer.sqnr_db:.1f}",
        )
    console.print(table)
    chosen = next((layer for layer in inspection.layers if layer.name == inspection.recommended_layer), None)
    if chosen is not None and chosen.top_neurons:
        ranks = Table(title=f"Most suspicious neurons of {escape(chosen.name)}, per metric", title_justify="left")
        ranks.add_column("metric")
        ranks.add_column("neurons, most suspicious first")
        for metric, neurons in chosen.top_neurons.items():
            ranks.add_row(metric, ", ".join(str(n) for n in neurons))
        console.print(ranks)
    console.print(f"suggestion: {escape(inspection.recommendation)}", highlight=False, soft_wrap=True)
    if command:
        console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)


def inspection_dict(inspection: Inspection, inputs: dict[str, str], preprocessing: str) -> dict[str, Any]:
    """The JSON form of `inspect`'s findings."""
    return {
        "onnxrepair_version": __version__,
        "inputs": inputs,
        "preprocessing": preprocessing,
        **dataclasses.asdict(inspection),
    }


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
