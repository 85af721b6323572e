#!/usr/bin/env python
"""How much of the quantization accuracy gap each repair method recovers.

One command, run from the repository root::

    python tools/bench_quality.py                         # everything, prints a Markdown table
    python tools/bench_quality.py --out docs/BENCHMARKS.md
    python tools/bench_quality.py --models cnn --settings int4 --methods paper,bias-correction
    python tools/bench_quality.py --settings int4 --layer penultimate --out docs/BENCHMARKS.md --append

It builds what is missing (cached under ``cache/``):

* ``cnn``: the bundled example (``models/float.onnx``, ``models/repair``,
  ``models/val``: PNG folders), a small torch CNN exported with the TorchScript
  exporter. ``tools/build_example.py`` rebuilds it.
* ``mlp``: a scikit-learn ``MLPClassifier`` converted with skl2onnx
  (``tools/build_mlp_example.py`` -> ``cache/mlp/``), data as ``.npz`` with the
  same Fashion-MNIST test images as the CNN's repair and validation folders.

and quantizes both float models with ONNX Runtime's ``quantize_static`` (QDQ,
QUInt8 activations, MinMax calibration on the same 32 Fashion-MNIST *training*
images that ``tools/build_example.py`` uses) into ``cache/bench/<model>/``:

* ``int8``: per-tensor QInt8 weights;
* ``int4``: per-tensor QInt4 weights (the bundled ``models/quant.onnx`` setting);
* ``int8-pc`` / ``int4-pc``: the same with ``per_channel=True``, the first
  thing a user would try instead of repairing. Measured, not repaired.

Then, for each (model, setting), it runs the repair command line as a user
would (``python -m onnxrepair.cli fix FLOAT QUANT REPAIR --val VAL -o OUT
--report R.json --force -q ...``), one subprocess per method, one after the
other, and reads the JSON report. A run that fails (exit 2, e.g. an option this
version does not have) becomes a row ``error: <message>``; the bench goes on.

Methods (``--methods``): ``random`` (paper encoding, random top-N),
``paper-<metric>`` for the seven metrics (``paper`` = all seven), ``soft``,
``integer``, ``logit``, ``bias-correction`` (``new`` = these four), ``search``
(``--search --budget B`` on the bench's layer), ``search-last2`` (the same
over the last two dense layers, ``--layer last:2``), and the whole network in
graph order (``whole`` = ``--layers all``, the default reconstruct encoding
with the held-out guard; ``whole-bias`` with bias correction, ``whole-lp``
with the L1 reconstruction LP, ``whole-noguard`` without the guard; group
``whole``). ``--layer penultimate``
repairs each model's second-to-last dense layer instead of the last one.

``--out FILE`` writes the Markdown (command, date, machine, versions, setup,
table, gap recovered); ``--append`` adds a section to it instead. Text below
the marker line at the end of the file is kept on reruns. Repaired models and
reports stay in ``cache/bench/<model>/<setting>/<layer>/``.

Accuracies are top-1 on the validation set (500 images, never used for repair)
in a default ONNX Runtime CPU session; "agreement" is the share of validation
images on which the model's top-1 class equals the float model's; "gap
recovered" is (repaired - quant) / (float - quant) in validation accuracy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

METRICS = ["tarantula", "ochiai", "dstar", "jaccard", "ample", "euclid", "wong3"]
NEW_ENCODINGS = ["soft", "integer", "logit", "bias-correction"]
# every layer in graph order (`--layers all`): the default encoding (reconstruct), bias correction alone,
# the L1 reconstruction LP, and without the held-out guard
WHOLE = ["whole", "whole-bias", "whole-lp", "whole-noguard"]
ALL_METHODS = ["random", *(f"paper-{m}" for m in METRICS), *NEW_ENCODINGS, "search", "search-last2", *WHOLE]
METHOD_GROUPS = {"paper": [f"paper-{m}" for m in METRICS], "new": NEW_ENCODINGS, "whole": WHOLE, "all": ALL_METHODS}

N_CALIB = 32
SETTINGS = {
    # name: (weight type, per channel, repaired?)
    "int8": ("QInt8", False),
    "int4": ("QInt4", False),
}


# --------------------------------------------------------------------------- models and data
@dataclass
class ModelSpec:
    name: str
    description: str
    float_path: Path
    repair: Path  # folder of class subfolders, or .npz
    val: Path

    def load(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Model-ready x and labels y of the repair or val set, as the bench reads them."""
        path = self.repair if which == "repair" else self.val
        if path.suffix == ".npz":
            with np.load(path) as d:
                return d["x"].astype(np.float32), d["y"].astype(np.int64)
        from build_example import read_png_folder

        return read_png_folder(path)

    def calibration(self) -> np.ndarray:
        """The 32 training images build_example.py calibrates with, shaped for this model."""
        from build_example import SEED, load_split, to_input

        images, _ = load_split("train")
        idx = np.random.default_rng(SEED + 1).choice(len(images), size=256, replace=False)[:N_CALIB]
        x = to_input(images[idx])
        return x.reshape(len(x), -1) if self.name == "mlp" else x


def model_specs(cache: Path) -> dict[str, ModelSpec]:
    mlp = cache / "mlp"
    return {
        "cnn": ModelSpec(
            "cnn",
            "torch CNN (Conv16-Pool-Conv32-Pool-Gemm 800->64-Relu-Gemm 64->10), TorchScript exporter, "
            "opset 17; data: PNG folders `models/repair`, `models/val`",
            ROOT / "models" / "float.onnx",
            ROOT / "models" / "repair",
            ROOT / "models" / "val",
        ),
        "mlp": ModelSpec(
            "mlp",
            "scikit-learn MLPClassifier (784-128-64-10, relu) through skl2onnx (MatMul + Add, "
            "default target opset, zipmap off); data: `.npz` files, the same test images as the CNN's",
            mlp / "float.onnx",
            mlp / "repair.npz",
            mlp / "val.npz",
        ),
    }


def ensure_model(spec: ModelSpec, log) -> None:
    if spec.name == "cnn":
        missing = [p for p in (spec.float_path, spec.repair, spec.val) if not p.exists()]
        if missing:
            raise SystemExit(f"missing {missing[0]}: rebuild the bundled example with tools/build_example.py")
        return
    if all(p.exists() for p in (spec.float_path, spec.repair, spec.val)):
        return
    log(f"building the MLP example into {spec.float_path.parent} ...")
    cmd = [sys.executable, str(TOOLS / "build_mlp_example.py"), "--out", str(spec.float_path.parent)]
    subprocess.run(cmd, check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_quantized(spec: ModelSpec, setting: str, per_channel: bool, cache: Path, log) -> Path:
    """Quantize spec.float_path with one setting into cache/bench/<model>/<setting>[-pc].onnx (cached:
    rebuilt when the float model changed)."""
    from build_example import ArrayReader
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    weight_type, _ = SETTINGS[setting]
    name = setting + ("-pc" if per_channel else "")
    out = cache / "bench" / spec.name / f"{name}.onnx"
    stamp = out.with_suffix(".json")
    key = {
        "float_sha256": sha256(spec.float_path),
        "weight_type": weight_type,
        "activation_type": "QUInt8",
        "per_channel": per_channel,
        "calibrate_method": "MinMax",
        "n_calib": N_CALIB,
        "format": "QDQ",
        "reduce_range": False,
    }
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        return out
    log(f"quantizing {spec.name} {name} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "please run pre-processing" hint
    quantize_static(
        str(spec.float_path),
        str(out),
        calibration_data_reader=ArrayReader(spec.calibration()),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=getattr(QuantType, weight_type),
        calibrate_method=CalibrationMethod.MinMax,
    )
    stamp.write_text(json.dumps(key, indent=2) + "\n")
    return out


def top1(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 classes from the first float output (the class scores), default session options."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = next(o.name for o in sess.get_outputs() if o.type == "tensor(float)")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run([out], {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)]).argmax(1)


# --------------------------------------------------------------------------- runs
@dataclass
class Row:
    model: str
    setting: str
    method: str
    accuracy: float | None = None
    agreement: float | None = None
    seconds: float | None = None
    gap_recovered: float | None = None
    note: str = ""
    command: list[str] = field(default_factory=list)
    exit_code: int | None = None
    wall_seconds: float | None = None
    report: dict[str, Any] | None = None


def dense_layer_names(path: Path) -> list[str]:
    """Names of the dense layers (Gemm, MatMul followed by Add) of a float model, in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    return [
        n.name
        for n in graph.node
        if n.op_type == "Gemm" or (n.op_type == "MatMul" and "Add" in consumers.get(n.output[0], []))
    ]


def resolve_layer(spec: ModelSpec, value: str | None) -> str | None:
    """--layer of the bench: a node name (passed through), `penultimate` (the second-to-last dense
    layer of each model), or per-model names `cnn=/fc1/Gemm,mlp=MatMul1`."""
    if not value or value == "last":
        return None
    if "=" in value:
        per_model = dict(item.split("=", 1) for item in value.split(",") if item)
        return resolve_layer(spec, per_model.get(spec.name))
    if value == "penultimate":
        names = dense_layer_names(spec.float_path)
        if len(names) < 2:
            raise SystemExit(f"{spec.name}: only {len(names)} dense layer(s), no penultimate one")
        return names[-2]
    return value


def method_args(method: str, neurons: int, budget: float) -> list[str]:
    if method == "random":
        return ["--encoding", "paper", "--metric", "random", "--neurons", str(neurons)]
    if method.startswith("paper-"):
        return ["--encoding", "paper", "--metric", method.removeprefix("paper-"), "--neurons", str(neurons)]
    if method in NEW_ENCODINGS:
        return ["--encoding", method, "--neurons", str(neurons)]
    if method == "search":
        return ["--search", "--budget", f"{budget:g}"]
    if method == "search-last2":
        return ["--search", "--budget", f"{budget:g}", "--layer", "last:2"]
    if method in WHOLE:
        extra = {"whole-bias": ["--encoding", "bias-correction"], "whole-lp": ["--encoding", "reconstruct-lp"]}
        return ["--layers", "all", *extra.get(method, []), *(["--no-guard"] if method == "whole-noguard" else [])]
    raise ValueError(method)


def method_label(method: str, neurons: int, budget: float) -> str:
    if method == "random":
        return f"paper, random top-{neurons}"
    if method.startswith("paper-"):
        return f"paper, {method.removeprefix('paper-')} top-{neurons}"
    if method == "bias-correction":
        return "bias-correction"
    if method in NEW_ENCODINGS:
        return f"{method}, euclid top-{neurons}"
    if method == "search-last2":
        return f"guarded search, last 2 layers (budget {budget:g} s)"
    if method in WHOLE:
        return {
            "whole": "whole network, reconstruct (`--layers all`)",
            "whole-bias": "whole network, bias-correction",
            "whole-lp": "whole network, reconstruct-lp",
            "whole-noguard": "whole network, reconstruct, no guard",
        }[method]
    return f"guarded search (budget {budget:g} s)"


def fix_command() -> list[str]:
    script = Path(sys.executable).with_name("onnxrepair")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxrepair.cli"]


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith(("error", "onnxrepair: error", "onnxrepair fix: error"))]
    line = (errors or lines or ["(no message)"])[-1]
    for prefix in ("onnxrepair fix: error:", "onnxrepair: error:", "error:"):
        if line.lower().startswith(prefix):
            line = line[len(prefix) :].strip()
            break
    return line if len(line) <= 300 else line[:297] + "..."


def summarize_report(rep: dict[str, Any]) -> str:
    """A short note from a repair report: what was solved and changed (defensive: keys may move)."""
    parts = []
    search = rep.get("search")
    layers = rep.get("layers") if isinstance(rep.get("layers"), list) else [rep]
    if isinstance(search, dict):
        tried = search.get("tried") or []
        if isinstance(tried, list):
            parts.append(f"{len(tried)} configs tried")
        steps = [str(lay.get("method") or lay.get("encoding")) for lay in layers if isinstance(lay, dict)]
        if steps:
            parts.append("kept: " + " + ".join(steps))
        after = search.get("holdout_after")
        before = search.get("holdout_before")
        if isinstance(after, dict) and isinstance(before, dict):
            parts.append(
                (
                    f"held-out agreement {pct(before.get('agreement'))} -> {pct(after.get('agreement'))}, "
                    f"acc {pct(before.get('accuracy'))} -> {pct(after.get('accuracy'))}"
                ).replace(" %", "%")
            )
        check = search.get("confirmation")
        if isinstance(check, dict):
            verdict = "confirmed" if check.get("confirmed") else "not confirmed"
            parts.append(
                f"out-of-fold check ({check.get('folds')} folds): fixed/broken {check.get('fixed')}/"
                f"{check.get('broken')}, p = {float(check.get('p_value') or 0):.3g}, {verdict}"
            )
    elif isinstance(rep.get("guard"), dict):
        guard = rep["guard"]
        steps = guard.get("layers") or []
        parts.append(f"{sum(bool(s.get('kept')) for s in steps)}/{len(steps)} layers kept by the guard")
        before, after = guard.get("holdout_before") or {}, guard.get("holdout_after") or {}
        parts.append(
            f"held-out agreement {pct(before.get('agreement'))} -> {pct(after.get('agreement'))}".replace(" %", "%")
        )
    else:
        neurons = rep.get("neurons")
        unsolved = rep.get("unsolved")
        if isinstance(neurons, list) and isinstance(unsolved, list) and rep.get("encoding") != "bias-correction":
            parts.append(f"{len(neurons)}/{len(neurons) + len(unsolved)} solved")
    whole = [lay for lay in layers if isinstance(lay, dict) and "channels_changed" in lay]
    if len(whole) > 2:
        parts.append(f"{sum(int(lay['channels_changed']) for lay in whole)} channels changed in {len(whole)} layers")
    changed = clamped = 0
    seen = False
    for lay in layers:
        per = lay.get("per_neuron") if isinstance(lay, dict) else None
        for p in per if isinstance(per, list) else []:
            if isinstance(p, dict) and "weights_changed" in p:
                seen = True
                changed += int(p.get("weights_changed") or 0)
                clamped += int(p.get("weights_clamped") or 0)
    if seen:
        parts.append(f"{changed} int weights changed" + (f" ({clamped} clamped)" if clamped else ""))
    if any(isinstance(lay, dict) and lay.get("bias_reencoded") for lay in layers):
        parts.append("bias re-encoded")
    if rep.get("fixed") is not None and rep.get("broken") is not None:
        parts.append(f"fixed/broken {rep['fixed']}/{rep['broken']}")
    return "; ".join(parts)


def run_method(
    spec: ModelSpec,
    setting: str,
    quant: Path,
    method: str,
    args: argparse.Namespace,
    cache: Path,
    ref: dict[str, float],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> Row:
    layer = resolve_layer(spec, args.layer)
    tag = "default-layer" if not layer else "layer-" + "".join(c if c.isalnum() else "_" for c in layer).strip("_")
    run_dir = cache / "bench" / spec.name / setting / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / f"{method}.onnx"
    report = run_dir / f"{method}.json"
    for stale in (out, report):
        stale.unlink(missing_ok=True)
    cmd = [
        *fix_command(),
        "fix",
        str(spec.float_path),
        str(quant),
        str(spec.repair),
        "--val",
        str(spec.val),
        "-o",
        str(out),
        "--report",
        str(report),
        "--force",
        "-q",
        *method_args(method, args.neurons, args.budget),
    ]
    if layer and method != "search-last2" and method not in WHOLE:
        cmd += ["--layer", layer]
    if args.time_limit is not None:
        cmd += ["--time-limit", f"{args.time_limit:g}"]
    cmd += shlex.split(args.fix_args)
    row = Row(spec.name, setting, method_label(method, args.neurons, args.budget), command=cmd)
    t0 = time.time()
    timeout = args.timeout if not method.startswith("search") else max(args.timeout, args.budget + 300)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        row.wall_seconds = time.time() - t0
        row.note = f"error: no result after {timeout:g} s (killed)"
        return row
    row.wall_seconds = time.time() - t0
    row.exit_code = proc.returncode
    rep = json.loads(report.read_text()) if report.exists() else None
    row.report = rep
    if proc.returncode not in (0, 1) or rep is None:
        msg = last_error_line(proc.stderr or proc.stdout)
        row.note = f"error: {msg}" + ("" if proc.returncode == 2 else f" (exit {proc.returncode})")
        return row
    row.seconds = rep.get("total_seconds", row.wall_seconds)
    # exit 1 (guarded search): nothing better found, no model written -> the deployed model stays Q
    kept_quant = proc.returncode == 1 or not out.exists()
    acc = rep.get("repaired_accuracy")
    agree = rep.get("repaired_agreement")
    if kept_quant:
        acc = rep.get("quant_accuracy", ref["quant"])
        agree = rep.get("quant_agreement", ref["quant_agree"])
    row.accuracy, row.agreement = acc, agree
    note = summarize_report(rep)
    if kept_quant:
        note = f"no better model found (exit {proc.returncode}), Q kept" + (f"; {note}" if note else "")
    for key, mine in (("float_accuracy", ref["float"]), ("quant_accuracy", ref["quant"])):
        theirs = rep.get(key)
        if isinstance(theirs, int | float) and abs(theirs - mine) > 1e-9:
            note += f"; report {key} {theirs:.2%} != bench's {mine:.2%}"
    if not kept_quant and acc is not None:
        # cross-check the report against the written model, scored the same way as the reference rows
        x_val, y_val, f_val = val
        pred = top1(out, x_val)
        mine_acc, mine_agree = float((pred == y_val).mean()), float((pred == f_val).mean())
        if abs(mine_acc - acc) > 1e-9 or (agree is not None and abs(mine_agree - agree) > 1e-9):
            note += f"; written model scores {mine_acc:.2%} / {mine_agree:.2%} in the bench"
    row.note = note
    gap = ref["float"] - ref["quant"]
    if acc is not None and gap > 0:
        row.gap_recovered = (acc - ref["quant"]) / gap
    return row


# --------------------------------------------------------------------------- output
def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.platform()}, {cpu}, {cores} cores, Python {platform.python_version()}"


def versions() -> str:
    import importlib.metadata as md

    names = ["onnxrepair", "onnx", "onnxruntime", "mip", "highsbox", "scikit-learn", "skl2onnx", "numpy"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxrepair"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        out.insert(1, f"git {head}" + (" + uncommitted changes in onnxrepair/" if dirty else ""))
    except (OSError, subprocess.CalledProcessError):
        pass
    return ", ".join(out)


def markdown_table(rows: list[Row], groups: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    lines = [
        "| model | setting | method | val accuracy | agreement with float | gap recovered | repair seconds | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, setting), ref in groups.items():
        gap = ref["float"] - ref["quant"]

        def rec(acc: float | None, gap: float = gap, quant: float = ref["quant"]) -> str:
            return "—" if acc is None or gap <= 0 else f"{100 * (acc - quant) / gap:.0f} %"

        lines.append(f"| {model} | {setting} | float | {pct(ref['float'])} | 100.00 % | | | |")
        lines.append(
            f"| {model} | {setting} | quant (per-tensor, not repaired) | {pct(ref['quant'])} | "
            f"{pct(ref['quant_agree'])} | {rec(ref['quant'])} | | |"
        )
        lines.append(
            f"| {model} | {setting} | ORT per-channel {setting} (not repaired) | {pct(ref['pc'])} | "
            f"{pct(ref['pc_agree'])} | {rec(ref['pc'])} | | |"
        )
        for r in rows:
            if (r.model, r.setting) != (model, setting):
                continue
            secs = "—" if r.seconds is None else f"{r.seconds:.1f}"
            note = r.note.replace("|", "\\|")
            lines.append(
                f"| {model} | {setting} | {r.method} | {pct(r.accuracy)} | {pct(r.agreement)} | "
                f"{rec(r.accuracy)} | {secs} | {note} |"
            )
    return lines


def gap_lines(rows: list[Row], groups: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    lines = []
    for (model, setting), ref in groups.items():
        gap = ref["float"] - ref["quant"]
        head = (
            f"- **{model} {setting}**: float {pct(ref['float'])}, quant {pct(ref['quant'])}, "
            f"gap {100 * gap:+.1f} points"
        )
        mine = [r for r in rows if (r.model, r.setting) == (model, setting) and r.accuracy is not None]
        if gap <= 0:
            lines.append(head + ": no gap to recover (the quantized model is as accurate as the float one).")
            continue
        if not mine:
            lines.append(head + ": no repair run produced a result.")
            continue
        best = max(mine, key=lambda r: r.accuracy or 0.0)
        parts = [
            f"best repair {best.method}: {pct(best.accuracy)}, gap recovered {100 * (best.gap_recovered or 0):.0f} %"
        ]
        parts.append(f"ORT per-channel: {100 * (ref['pc'] - ref['quant']) / gap:.0f} %")
        for s in (r for r in mine if r.method.startswith("guarded search")):
            ok = "≥" if (s.accuracy or 0) >= ref["quant"] - 1e-12 else "<"
            parts.append(
                f"{s.method} {pct(s.accuracy)} ({ok} quant, gap recovered {100 * (s.gap_recovered or 0):.0f} %)"
            )
        bc = [r for r in mine if r.method == "bias-correction"]
        if bc:
            parts.append(f"bias correction alone {100 * (bc[0].gap_recovered or 0):.0f} %")
        lines.append(head + "; " + "; ".join(parts) + ".")
    searches = [r for r in rows if r.method.startswith("guarded search")]
    if searches:
        worse = [
            f"{r.model} {r.setting} {r.method}"
            for r in searches
            if r.accuracy is None or r.accuracy < groups[(r.model, r.setting)]["quant"] - 1e-12
        ]
        lines.append(
            "- guarded search at least as accurate as the unrepaired quantized model on every row: "
            + ("yes" if not worse else "no (" + "; ".join(worse) + ")")
        )
    return lines


def layers_used(rows: list[Row]) -> dict[str, str]:
    """model -> the layer(s) its reports say were repaired."""
    out: dict[str, set[str]] = {}
    for r in rows:
        if r.method.startswith("guarded search, last 2"):
            continue
        rep = r.report or {}
        layers = rep.get("layers") if isinstance(rep.get("layers"), list) else [rep]
        for lay in layers:
            if isinstance(lay, dict) and lay.get("layer"):
                out.setdefault(r.model, set()).add(str(lay["layer"]))
    return {m: ", ".join(f"`{x}`" for x in sorted(v)) for m, v in out.items()}


def markdown_section(command, rows, groups, specs, args, started, elapsed, level: int) -> list[str]:
    h = "#" * level + " "
    settings_desc = {
        "int8": "per-tensor QInt8 weights",
        "int4": "per-tensor QInt4 weights (the bundled `models/quant.onnx` setting)",
    }
    layer_text = {
        None: "the default layer (the last dense layer)",
        "last": "the default layer (the last dense layer)",
        "penultimate": "`--layer` = the second-to-last dense layer of each model",
    }.get(args.layer, f"`--layer {args.layer}`")
    used = layers_used(rows)
    two = any(r.method.startswith("guarded search, last 2") for r in rows)
    return [
        "Produced by:",
        "",
        f"    {command}",
        "",
        f"- date: {started} (total {elapsed / 60:.1f} min for the whole command, runs one after the other)",
        f"- machine: {args.machine}",
        f"- versions: {args.versions}",
        "",
        f"{h}Setup",
        "",
        *[f"- `{m}`: {specs[m].description}" for m in args.models],
        "- quantization: `onnxruntime.quantization.quantize_static`, QDQ, QUInt8 activations, MinMax "
        f"calibration on the same {N_CALIB} Fashion-MNIST training images for both models, "
        "reduce_range off, ORT defaults otherwise (Relu removed, outputs quantized); settings: "
        + "; ".join(f"`{s}` = {settings_desc[s]}" for s in args.settings)
        + ". The `ORT per-channel` row is the same call with `per_channel=True`: what a user would try "
        "instead of repairing; measured, not repaired.",
        "- data: 1,000 repair images and 500 validation images (disjoint, class-stratified, from the "
        "Fashion-MNIST test set; the same images for both models). Every accuracy below is on the 500 "
        "validation images, which no method sees (the guarded search holds out part of the repair set).",
        f"- each method is one `onnxrepair fix` run with `--neurons {args.neurons}`, {layer_text}"
        + (" (" + "; ".join(f"{m}: {v}" for m, v in used.items()) + ")" if used else "")
        + (f", `--time-limit {args.time_limit:g}`" if args.time_limit is not None else "")
        + (f", `{args.fix_args}`" if args.fix_args else "")
        + "; `paper` rows use `--encoding paper --metric M` (the paper's L∞ encoding), the other encodings "
        "their defaults (metric euclid), the guarded search `--search --budget "
        f"{args.budget:g}`"
        + (" (on the same layer, and on the last two dense layers with `--layer last:2`)" if two else "")
        + "; the search scores candidates by agreement with the float model on a held-out quarter of the "
        "repair set, then re-applies the kept methods on 4 folds of the whole repair set and writes a model only "
        "if the out-of-fold gain passes a sign test at 0.95 (otherwise exit 1 and the row shows QUANT).",
        "- columns: top-1 accuracy on the validation set in a default ONNX Runtime CPU session; agreement = "
        "share of validation images whose top-1 class equals the float model's; gap recovered = "
        "(repaired - quant) / (float - quant) accuracy; repair seconds = the report's `total_seconds` "
        "(inference, solving, rewriting, evaluation; not the interpreter start).",
        "",
        f"{h}Results",
        "",
        *markdown_table(rows, groups),
        "",
        f"{h}Gap recovered",
        "",
        *gap_lines(rows, groups),
        "",
    ]


MARKER = "<!-- end of tools/bench_quality.py output: text below this line is kept when it reruns -->"


def write_markdown(path: Path, command: str, rows, groups, specs, args, started: str, elapsed: float) -> None:
    """Write (or with --append, extend) the bench's part of `path`; whatever follows MARKER in an existing
    file is kept, so hand-written sections can live below it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    ours, _, kept = old.partition(MARKER)
    if not _:
        ours, kept = old, ""
    if args.append and ours.strip():
        title = args.title or "More results"
        body = (
            ours.rstrip("\n")
            + "\n\n"
            + "\n".join([f"## {title}", "", *markdown_section(command, rows, groups, specs, args, started, elapsed, 3)])
        )
    else:
        head = [
            "# Repair quality benchmark",
            "",
            "Generated by `tools/bench_quality.py`; rerun it rather than editing the numbers by hand.",
            "",
        ]
        if args.title:
            head += [f"## {args.title}", ""]
        level = 3 if args.title else 2
        body = "\n".join([*head, *markdown_section(command, rows, groups, specs, args, started, elapsed, level)])
    path.write_text(body.rstrip("\n") + "\n\n" + MARKER + "\n" + kept.lstrip("\n"))


# --------------------------------------------------------------------------- main
def parse_methods(text: str) -> list[str]:
    out: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in METHOD_GROUPS:
            out += METHOD_GROUPS[item]
        elif item in METRICS:
            out.append(f"paper-{item}")
        elif item in ALL_METHODS:
            out.append(item)
        else:
            raise SystemExit(
                f"unknown method {item!r}; choose from {', '.join(ALL_METHODS)}, the metric names, or groups "
                f"{', '.join(METHOD_GROUPS)}"
            )
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,mlp", help="comma list of cnn, mlp (default: both)")
    ap.add_argument("--settings", default="int8,int4", help="comma list of int8, int4 (default: both)")
    ap.add_argument(
        "--methods",
        default="all",
        help="comma list of: " + ", ".join(ALL_METHODS) + "; a bare metric name means paper-<metric>; "
        "groups: paper (the seven metrics), new (the four new encodings), all (default)",
    )
    ap.add_argument("--neurons", type=int, default=10, help="--neurons for every repair (default: 10)")
    ap.add_argument(
        "--layer",
        help="--layer for every repair: a node name, `penultimate` (each model's second-to-last dense layer), "
        "or per model `cnn=/fc1/Gemm,mlp=MatMul1` (default: onnxrepair's default, the last dense layer)",
    )
    ap.add_argument("--time-limit", type=float, help="--time-limit passed to every repair (default: onnxrepair's)")
    ap.add_argument("--budget", type=float, default=120.0, help="--budget of the guarded search (default: 120)")
    ap.add_argument("--fix-args", default="", help="extra arguments for every `onnxrepair fix` run (one string)")
    ap.add_argument("--timeout", type=float, default=900.0, help="kill a single repair run after this many seconds")
    ap.add_argument("--cache", type=Path, default=ROOT / "cache", help="cache folder (default: cache/)")
    ap.add_argument("--out", type=Path, help="also write the results as Markdown here (e.g. docs/BENCHMARKS.md)")
    ap.add_argument("--append", action="store_true", help="append a section to --out instead of replacing it")
    ap.add_argument("--title", help="heading of this run's section in --out")
    ap.add_argument("--json", type=Path, help="also write every row, command and report as JSON here")
    args = ap.parse_args(argv)

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    methods = parse_methods(args.methods)
    specs = model_specs(args.cache)
    for m in args.models:
        if m not in specs:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(specs)}")
    for s in args.settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    args.machine, args.versions = machine(), versions()  # at the start: what the runs below used
    t_start = time.time()
    command = "python tools/bench_quality.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    rows: list[Row] = []
    groups: dict[tuple[str, str], dict[str, float]] = {}
    for model in args.models:
        spec = specs[model]
        ensure_model(spec, log)
        x_val, y_val = spec.load("val")
        f_val = top1(spec.float_path, x_val)
        for setting in args.settings:
            quant = ensure_quantized(spec, setting, False, args.cache, log)
            pc = ensure_quantized(spec, setting, True, args.cache, log)
            q_val, pc_val = top1(quant, x_val), top1(pc, x_val)
            ref = {
                "float": float((f_val == y_val).mean()),
                "quant": float((q_val == y_val).mean()),
                "quant_agree": float((q_val == f_val).mean()),
                "pc": float((pc_val == y_val).mean()),
                "pc_agree": float((pc_val == f_val).mean()),
            }
            groups[(model, setting)] = ref
            log(
                f"{model} {setting}: float {pct(ref['float'])}, quant {pct(ref['quant'])}, per-channel {pct(ref['pc'])}"
            )
            for method in methods:
                row = run_method(spec, setting, quant, method, args, args.cache, ref, (x_val, y_val, f_val))
                rows.append(row)
                log(
                    f"  {row.method:34s} acc {pct(row.accuracy):>9s}  agree {pct(row.agreement):>9s}  "
                    f"{(row.wall_seconds or 0):6.1f}s wall  {row.note}"
                )

    elapsed = time.time() - t_start
    print()
    print("\n".join(markdown_table(rows, groups)))
    print()
    print("\n".join(gap_lines(rows, groups)))
    print(f"\ntotal {elapsed / 60:.1f} min")
    if args.out:
        write_markdown(args.out, command, rows, groups, specs, args, started, elapsed)
        log(f"wrote {args.out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "date": started,
                    "machine": args.machine,
                    "versions": args.versions,
                    "seconds": elapsed,
                    "reference": {f"{m}/{s}": v for (m, s), v in groups.items()},
                    "rows": [r.__dict__ for r in rows],
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
