#!/usr/bin/env python
"""How fast onnxrepair repairs an ImageNet classifier head (issue 4).

The paper needed about 15 hours for MobileNetV2's 1280 -> 1000 head. This
bench repairs the same shape of head, EfficientNet-Lite0's ``/_fc/Gemm``,
built offline by ``tools/build_imagenet_example.py`` into ``cache/imagenet/``
(int8 QDQ, 1,000 repair and 500 validation photo crops, no labels: the measure
is top-1 agreement with the float model). Run from the repository root::

    python tools/bench_speed.py                          # prints Markdown
    python tools/bench_speed.py --out docs/BENCHMARKS.md # and writes its section there

Three parts (four with ``--search-budgets``), all on the same machine in one run:

0. Whole-network repair (``fix --layers all``, issue 11) of each quantized
   model given by ``--whole`` (default: ``quant.onnx``, per-channel u8
   reduce_range, and ``quant_s8s8_tensor.onnx``, per-tensor s8s8): wall time,
   peak memory, layers kept by the held-out guard, and agreement with the float
   model on the validation crops. ``--executors local,ray`` runs each model
   once per executor, one after the other (``--jobs N``, then ``--executor ray``
   on a local instance with N CPUs), and says whether the two wrote the same
   bytes.

1. ``onnxrepair fix`` as a user runs it (one subprocess per N and encoding in
   ``--encodings``, default ``soft``; e.g. ``--encodings soft,paper`` to time the
   paper's L-infinity encoding beside it, issue 14; other options default):
   inference, per-neuron solve seconds (median, p90, max), unsolved neurons,
   total wall time, peak memory (the report's keys), and agreement with the
   float model on the validation crops.
2. The naive full program (every repair input a row, the L1 norm through
   auxiliary rows: the textbook LP, ``--full-lp``) against the structured solve
   (split L1 variables, row generation) on a sample of the head's neurons, one
   process, one neuron at a time, for each encoding of ``--encodings``: seconds
   of each and the objective each reaches, so the speed-up is a ratio measured
   side by side; and the HiGHS LP method (dual or primal simplex, interior
   point, presolve) for the structured solve on the same neurons.
3. With ``--search-budgets 60``: the guarded search (``fix --search --budget
   60``) on ``quant.onnx``, and the same command without ``--search``: peak
   memory of each (issue 14.6 bounds the search's at 2x the plain run's) and
   the search's own seconds against its budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from bench_quality import fix_command, machine, versions  # noqa: E402

START = "<!-- tools/bench_speed.py section: rewritten on each run with --out -->"
END = "<!-- end of tools/bench_speed.py section -->"


@dataclass
class FixRun:
    label: str  # N for the head runs, the QUANT file for whole-network runs
    wall_seconds: float
    exit_code: int
    report: dict[str, Any] | None
    error: str = ""
    encoding: str = ""  # head runs: the --encoding given


def run_cli_fix(cache: Path, quant: str, tag: str, options: list[str], args: argparse.Namespace) -> FixRun:
    """One `onnxrepair fix FLOAT QUANT repair.npy --val val.npy OPTIONS` subprocess; returns its report."""
    out_dir = cache / "speed"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"{tag}.json"
    report.unlink(missing_ok=True)
    cmd = [
        *fix_command(),
        "fix",
        str(cache / "float.onnx"),
        str(cache / quant),
        str(cache / "repair.npy"),
        "--val",
        str(cache / "val.npy"),
        "-o",
        str(out_dir / f"{tag}.onnx"),
        "--report",
        str(report),
        "--force",
        "-q",
        *options,
        "--jobs",
        str(args.jobs),
        *args.fix_args.split(),
    ]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    loaded = json.loads(report.read_text()) if report.exists() else None
    error = "" if proc.returncode in (0, 1) else (proc.stderr.strip().splitlines() or ["?"])[-1]
    return FixRun(tag, wall, proc.returncode, loaded, error)


def run_fix(cache: Path, neurons: str, encoding: str, args: argparse.Namespace) -> FixRun:
    """The head with N neurons (every one for "all") under `encoding`."""
    count = "100000" if neurons == "all" else neurons  # more than the layer has: every neuron
    options = ["--neurons", count, "--encoding", encoding]
    run = run_cli_fix(cache, "quant.onnx", f"n{neurons}-{encoding}", options, args)
    return dataclasses.replace(run, label=neurons, encoding=encoding)


def run_whole(cache: Path, quant: str, executor: str, args: argparse.Namespace) -> FixRun:
    """Every layer of `quant` (`--layers all`, its defaults), on `executor` (local: `--jobs` processes)."""
    options = ["--layers", "all", *(["--executor", executor] if executor != "local" else [])]
    tag = f"whole-{Path(quant).stem}" + ("" if executor == "local" else f"-{executor}")
    run = run_cli_fix(cache, quant, tag, options, args)
    label = quant if executor == "local" else f"{quant}, --executor {executor}"
    if executor != "local":
        ours, local = cache / "speed" / f"{tag}.onnx", cache / "speed" / f"whole-{Path(quant).stem}.onnx"
        if ours.exists() and local.exists():
            label += ", same bytes as local" if ours.read_bytes() == local.read_bytes() else ", DIFFERENT bytes"
    return dataclasses.replace(run, label=label)


def run_search(cache: Path, budget: str, args: argparse.Namespace) -> FixRun:
    """The guarded search (`--search --budget B`) on `quant.onnx`, its defaults otherwise."""
    run = run_cli_fix(cache, "quant.onnx", f"search-{budget}", ["--search", "--budget", budget], args)
    return dataclasses.replace(run, label=budget)


def search_markdown(runs: list[FixRun], plain: FixRun | None, args: argparse.Namespace) -> list[str]:
    """Issue 14.6: the search in bounded memory (against the plain run's peak) and within its budget."""
    plain_peak = None if plain is None or plain.report is None else plain.report.get("peak_memory_mb")
    lines = [
        "### Guarded search (`--search`)",
        "",
        f"Each row is one `onnxrepair fix FLOAT quant.onnx repair.npy --val val.npy --search --budget B --jobs "
        f"{args.jobs}` run; search s = the report's `search_seconds` (the candidates, their spectra, solves and "
        "held-out scores; the out-of-fold check and the final evaluation come after it); the plain run is the "
        f"same command without `--search` (the head, default encoding): peak {fmt(plain_peak, 0)} MB.",
        "",
        "| budget s | wall s | search s | peak memory MB | peak / plain | configs tried / kept | "
        "held-out agreement | validation agreement quant -> result | exit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rep = run.report
        if rep is None or run.exit_code not in (0, 1):
            lines.append(f"| {run.label} | {run.wall_seconds:.1f} | error: {run.error} |||||||")
            continue
        search = rep.get("search") or {}
        tried = search.get("tried") or []
        peak = rep.get("peak_memory_mb")
        ratio = f"{peak / plain_peak:.2f}x" if peak and plain_peak else "—"
        before, after = search.get("holdout_before") or {}, search.get("holdout_after") or {}
        lines.append(
            f"| {run.label} | {run.wall_seconds:.1f} | {fmt(rep.get('search_seconds'), 1)} | {fmt(peak, 0)} | "
            f"{ratio} | {len(tried)} / {sum(bool(t.get('kept')) for t in tried)} | "
            f"{pct(before.get('agreement'))} -> {pct(after.get('agreement'))} | "
            f"{pct(rep.get('quant_agreement'))} -> {pct(rep.get('repaired_agreement'))} | {run.exit_code} |"
        )
    return lines


def whole_markdown(runs: list[FixRun], args: argparse.Namespace) -> list[str]:
    lines = [
        "### Whole network (`--layers all`)",
        "",
        f"Each row is one `onnxrepair fix FLOAT QUANT repair.npy --val val.npy --layers all --jobs {args.jobs}` run "
        "(defaults otherwise: encoding `reconstruct`, the held-out guard on a tenth of the repair crops); wall "
        "= the subprocess, interpreter start included; peak memory = the report's `peak_memory_mb`.",
        "",
        "| QUANT | wall s | inference s | solve s | peak memory MB | layers kept / repaired | channels changed | "
        "held-out agreement | validation agreement quant -> repaired | fixed / broken |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rep = run.report
        if rep is None or run.exit_code not in (0, 1):
            lines.append(f"| `{run.label}` | {run.wall_seconds:.1f} | error: {run.error} ||||||||")
            continue
        guard = rep.get("guard") or {}
        steps = guard.get("layers") or []
        channels = sum(int(lay.get("channels_changed") or 0) for lay in rep.get("layers") or [])
        before, after = guard.get("holdout_before") or {}, guard.get("holdout_after") or {}
        lines.append(
            f"| `{run.label}` | {run.wall_seconds:.1f} | {fmt(rep.get('inference_seconds'), 1)} | "
            f"{fmt(rep.get('solve_seconds'), 1)} | {fmt(rep.get('peak_memory_mb'), 0)} | "
            f"{sum(bool(s.get('kept')) for s in steps)} / {len(steps)} | {channels} | "
            f"{pct(before.get('agreement'))} -> {pct(after.get('agreement'))} | "
            f"{pct(rep.get('quant_agreement'))} -> {pct(rep.get('repaired_agreement'))} | "
            f"{rep.get('fixed')} / {rep.get('broken')} |"
        )
    return lines


@dataclass
class Comparison:
    encoding: str
    neuron: int
    full_seconds: float
    full_objective: float | None
    generated_seconds: float
    generated_objective: float | None
    generated_rows: int
    rounds: int
    rows: int
    methods: dict[str, tuple[float, float | None]]  # LP method -> (seconds, objective), structured solve


# HiGHS settings compared on the structured solve (the first is what onnxrepair uses for these LPs)
LP_METHODS = {
    "dual simplex, presolve off (default)": (),
    "dual simplex, presolve on": (("presolve", "on"),),
    "primal simplex, presolve off": (("solver", "simplex"), ("simplex_strategy", 4)),
    "interior point, presolve off": (("solver", "ipm"),),
}


def compare_naive(
    cache: Path, sample: int, seed: int, time_limit: float, encodings: list[str]
) -> tuple[list[Comparison], float]:
    """Full program vs row generation on `sample` neurons of the head, under each of `encodings`."""
    import onnx

    from onnxrepair.activity import read_layer_activity
    from onnxrepair.config import Encoding, SolveConfig
    from onnxrepair.data import load_array_file
    from onnxrepair.graph import find_layers, input_spec, pair_layer
    from onnxrepair.methods import layer_problems
    from onnxrepair.solve import solve_neuron

    float_model = onnx.load(str(cache / "float.onnx"))
    quant_model = onnx.load(str(cache / "quant.onnx"))
    images = load_array_file(cache / "repair.npy", input_spec(float_model).shape)
    head = find_layers(float_model)[-1].name
    pair = pair_layer(float_model, quant_model, head)
    started = time.perf_counter()
    activity = read_layer_activity(float_model, quant_model, pair, images.x, 64)
    inference = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(pair.quant_layer.n_out, size=sample, replace=False).tolist())
    results = []
    for encoding, problem in (
        (encoding, problem) for encoding in encodings for problem in layer_problems(quant_model, pair, activity, chosen)
    ):
        config = SolveConfig(encoding=Encoding(encoding), time_limit=time_limit)
        methods = {}
        for label, options in LP_METHODS.items():
            solution = solve_neuron(problem, replace(config, highs_options=options))
            methods[label] = (solution.seconds, solution.objective)
        generated = solve_neuron(problem, config)
        full = solve_neuron(problem, replace(config, structured=False))
        results.append(
            Comparison(
                encoding,
                problem.neuron,
                full.seconds,
                full.objective,
                generated.seconds,
                generated.objective,
                generated.constraints,
                generated.rounds,
                len(problem.float_on),
                methods,
            )
        )
        print(
            f"{encoding} neuron {problem.neuron}: full {full.seconds:.1f} s (objective {full.objective}), "
            f"rows generated {generated.seconds:.2f} s (objective {generated.objective}, {generated.constraints} rows, "
            f"{generated.rounds} rounds)",
            file=sys.stderr,
            flush=True,
        )
    return results, inference


def build_summary(build: dict[str, Any]) -> str:
    """One line on the model and data from build.json (written by tools/build_imagenet_example.py)."""
    try:
        counts, head = build["counts"], build["head"]
        agreement = build["evaluation"]["val"]["top1_agreement"]
        return (
            f"head `{head['name']}` ({head['weight']['type']} {head['weight']['shape']}, per-channel), "
            f"{counts['repair']} repair and {counts['val']} validation crops from disjoint photos, "
            f"{counts['calibration']} calibration crops; the quantized model agrees with the float one on "
            f"{100 * agreement:.1f} % of the validation crops."
        )
    except (KeyError, TypeError):
        return ""


def shown_path(path: Path) -> str:
    """`path` relative to the repository when it is inside it (the docs should not name this machine's folders)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"


def markdown(runs: list[FixRun], comparisons: list[Comparison], args: argparse.Namespace, build: dict) -> list[str]:
    lines = [
        "## Speed on an ImageNet classifier (EfficientNet-Lite0)",
        "",
        "Produced by:",
        "",
        "    python " + " ".join(["tools/bench_speed.py", *sys.argv[1:]]),
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- model and data: `tools/build_imagenet_example.py` -> `{shown_path(args.cache)}` (not committed; "
        f"`build.json` there lists the source photos): {build.get('summary', '')}",
        "- each row is one `onnxrepair fix FLOAT QUANT repair.npy --val val.npy --neurons N --encoding ENCODING "
        f"--jobs {args.jobs}` run (metric euclid, the head is the default layer; `soft` is the default encoding, "
        "`paper` the paper's hard sign constraints with an L-infinity objective); the columns are the "
        "report's keys; wall = the subprocess, interpreter start included. No labels exist: agreement = "
        "share of the 500 validation crops whose top-1 class equals the float model's.",
        "",
        "| N | encoding | wall s | inference s | solve s (all neurons) | per-neuron median s | p90 s | max s | "
        "unsolved | peak memory MB | agreement quant -> repaired | fixed / broken |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rep = run.report
        if rep is None or run.exit_code not in (0, 1):
            lines.append(f"| {run.label} | {run.encoding} | {run.wall_seconds:.1f} | error: {run.error} |||||||||")
            continue
        unsolved = rep.get("unsolved") or []
        reasons = sorted({n.get("reason") for lay in rep["layers"] for n in lay["per_neuron"] if n.get("reason")})
        lines.append(
            f"| {run.label} | {run.encoding} | {run.wall_seconds:.1f} | {fmt(rep.get('inference_seconds'), 1)} | "
            f"{fmt(rep.get('solve_seconds'), 1)} | {fmt(rep.get('solve_seconds_median'), 3)} | "
            f"{fmt(rep.get('solve_seconds_p90'), 3)} | {fmt(rep.get('solve_seconds_max'), 3)} | "
            f"{len(unsolved)}{' (' + '; '.join(reasons) + ')' if reasons else ''} | "
            f"{fmt(rep.get('peak_memory_mb'), 0)} | {pct(rep.get('quant_agreement'))} -> "
            f"{pct(rep.get('repaired_agreement'))} | {rep.get('fixed')} / {rep.get('broken')} |"
        )
    if comparisons:
        lines += comparison_markdown(comparisons, args)
    return lines


def comparison_markdown(comparisons: list[Comparison], args: argparse.Namespace) -> list[str]:
    """The full program against the structured solve, and the LP methods, one summary per encoding."""
    lines = [
        "",
        f"Naive full program (`--full-lp`) vs the structured solve, {len({c.neuron for c in comparisons})} neurons "
        f"of the head sampled with seed {args.seed}, one process, the same problem for both (1,000 repair crops):",
        "",
        "| encoding | neuron | full program s | objective | structured s | objective | rows used / all | rounds | "
        "speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.encoding} | {c.neuron} | {c.full_seconds:.2f} | {fmt(c.full_objective, 6)} | "
            f"{c.generated_seconds:.3f} | {fmt(c.generated_objective, 6)} | {c.generated_rows} / {c.rows} | "
            f"{c.rounds} | {c.full_seconds / c.generated_seconds:.0f}x |"
        )
    encodings = list(dict.fromkeys(c.encoding for c in comparisons))
    lines.append("")
    for encoding in encodings:
        chosen = [c for c in comparisons if c.encoding == encoding]
        ratios = [c.full_seconds / c.generated_seconds for c in chosen]
        diffs = [
            abs(c.full_objective - c.generated_objective) / max(abs(c.full_objective), 1e-12)
            for c in chosen
            if c.full_objective is not None and c.generated_objective is not None
        ]
        lines.append(
            f"- {encoding}: median seconds full {np.median([c.full_seconds for c in chosen]):.2f}, structured "
            f"{np.median([c.generated_seconds for c in chosen]):.3f}; median speed-up {np.median(ratios):.0f}x "
            f"(min {min(ratios):.0f}x); largest relative objective difference {max(diffs, default=float('nan')):.1e}"
        )
    lines += [
        "",
        "LP method for the structured solve (HiGHS options, the same sampled neurons, side by side):",
        "",
        "| encoding | HiGHS setting | median s | max s | largest objective difference to the default |",
        "|---|---|---|---|---|",
    ]
    default = next(iter(LP_METHODS))
    for encoding in encodings:
        chosen = [c for c in comparisons if c.encoding == encoding]
        for label in LP_METHODS:
            seconds = [c.methods[label][0] for c in chosen]
            gaps = [
                abs((c.methods[label][1] or 0.0) - (c.methods[default][1] or 0.0))
                / max(abs(c.methods[default][1] or 0.0), 1e-12)
                for c in chosen
            ]
            lines.append(f"| {encoding} | {label} | {np.median(seconds):.3f} | {max(seconds):.3f} | {max(gaps):.1e} |")
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    """Replace this bench's section of `path` (or append it), leaving the rest of the file as it is."""
    text = path.read_text() if path.exists() else ""
    section = "\n".join([START, "", *lines, "", END])
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    from onnxrepair.parallel import available_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "imagenet")
    parser.add_argument("--neurons", default="10,100,all", help="values of N for the fix runs (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=available_cores())
    parser.add_argument("--naive-sample", type=int, default=5, help="neurons for the full-program comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="per full program, seconds")
    parser.add_argument(
        "--encodings",
        default="soft",
        help="encodings of the head runs and the full-program comparison, e.g. soft,paper (default: %(default)s)",
    )
    parser.add_argument("--fix-args", default="", help="extra options for every fix run")
    parser.add_argument(
        "--whole",
        default="quant.onnx,quant_s8s8_tensor.onnx",
        help="quantized models in --cache to repair whole (--layers all); empty: skip (default: %(default)s)",
    )
    parser.add_argument(
        "--executors",
        default="local",
        help="executors of the whole-network runs, each model once per executor: local, ray (default: %(default)s)",
    )
    parser.add_argument(
        "--search-budgets",
        default="",
        help="budgets (s) of guarded-search runs on quant.onnx, with one plain run for the memory ratio; "
        "empty: skip (default)",
    )
    parser.add_argument("--out", type=Path, help="write the section into this Markdown file")
    args = parser.parse_args()

    if not (args.cache / "quant.onnx").exists():
        print(f"building the example into {args.cache} (tools/build_imagenet_example.py)", file=sys.stderr)
        subprocess.run([sys.executable, str(TOOLS / "build_imagenet_example.py"), "--out", str(args.cache)], check=True)
    build_json = args.cache / "build.json"
    build = json.loads(build_json.read_text()) if build_json.exists() else {}
    build["summary"] = build_summary(build)

    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    whole = [run_whole(args.cache, q.strip(), e, args) for q in args.whole.split(",") if q.strip() for e in executors]
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    runs = [run_fix(args.cache, n.strip(), e, args) for n in args.neurons.split(",") if n.strip() for e in encodings]
    budgets = [b.strip() for b in args.search_budgets.split(",") if b.strip()]
    searches = [run_search(args.cache, b, args) for b in budgets]
    plain = run_cli_fix(args.cache, "quant.onnx", "plain", [], args) if budgets else None
    comparisons: list[Comparison] = []
    if args.naive_sample > 0:
        comparisons, _ = compare_naive(args.cache, args.naive_sample, args.seed, args.time_limit, encodings)
    lines = markdown(runs, comparisons, args, build)
    if whole:
        lines += ["", *whole_markdown(whole, args)]
    if searches:
        lines += ["", *search_markdown(searches, plain, args)]
    print("\n".join(lines))
    if args.out:
        write_section(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
