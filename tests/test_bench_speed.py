"""tools/bench_speed.py: the encoding column (issue 14, item 1: the paper's encoding timed beside soft)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_speed  # noqa: E402


def report(median: float) -> dict:
    return {
        "inference_seconds": 30.0,
        "solve_seconds": 100.0,
        "solve_seconds_median": median,
        "solve_seconds_p90": 2 * median,
        "solve_seconds_max": 3 * median,
        "unsolved": [],
        "layers": [{"per_neuron": []}],
        "peak_memory_mb": 2000.0,
        "quant_agreement": 0.768,
        "repaired_agreement": 0.77,
        "fixed": 3,
        "broken": 1,
    }


def test_head_runs_and_comparisons_name_their_encoding() -> None:
    args = argparse.Namespace(jobs=2, seed=0, cache=Path("cache/imagenet"))
    runs = [
        bench_speed.FixRun("all", 200.0, 0, report(0.29), encoding="soft"),
        bench_speed.FixRun("all", 300.0, 0, report(0.31), encoding="paper"),
    ]
    methods = {label: (0.5, 0.01) for label in bench_speed.LP_METHODS}
    comparisons = [
        bench_speed.Comparison("soft", 7, 10.0, 0.02, 0.2, 0.02, 150, 2, 1000, methods),
        bench_speed.Comparison("paper", 7, 20.0, 0.01, 0.4, 0.01, 160, 3, 1000, methods),
    ]
    lines = bench_speed.markdown(runs, comparisons, args, {})
    assert any(line.startswith("| N | encoding |") for line in lines)
    assert any(line.startswith("| all | paper | 300.0 |") and "| 0.310 |" in line for line in lines)
    assert any(line.startswith("| paper | 7 | 20.00 |") for line in lines)
    assert any(line.startswith("- paper: median seconds full 20.00, structured 0.400") for line in lines)
    assert sum(line.startswith("| soft | dual simplex") for line in lines) == 2
