#!/usr/bin/env python
"""onnxrepair against the quantizers a user could use instead: ONNX Runtime, NNCF, AIMET-ONNX.

One command, run from the repository root::

    python tools/bench_peers.py                                   # everything, prints Markdown
    python tools/bench_peers.py --models cnn,mlp --out /tmp/bench_peers.md --json /tmp/bench_peers.json
    python tools/bench_peers.py --models imagenet --peers ort,nncf,aimet-ptq --repair-on ort-pt,nncf
    python tools/bench_peers.py --skip-aimet --bits int8

For each benchmark model and one shared set of images (the model's repair set, of which a seeded
`--calib` subset calibrates every quantizer, and its validation set, which nothing sees before
the measurement):

* ``cnn``: the bundled example (``models/float.onnx``, PNG folders ``models/repair`` and
  ``models/val``, labelled by folder), int4 and int8 weights;
* ``mlp``: the scikit-learn MLP (``cache/mlp/``, ``.npz`` with labels), int4 and int8 weights;
* ``imagenet``: EfficientNet-Lite0 (``cache/imagenet/``, ``.npy`` crops, no labels), int8 weights.

the quantized models (``--peers``, all by default):

* ``ort-pt`` / ``ort-pc``: ``onnxruntime.quantization.quantize_static``, QDQ, QUInt8 activations,
  QInt4/QInt8 weights per tensor / per channel, MinMax, reduce_range off (in this interpreter);
* ``nncf`` / ``nncf-fullbc``: ``nncf.quantize`` on the ONNX float model, defaults, and
  ``fast_bias_correction=False`` (NNCF's ONNX backend refuses 4-bit weights: the row says so);
* ``aimet-ptq`` / ``aimet-adaround`` / ``aimet-seqmse``: AIMET-ONNX ``QuantizationSimModel``
  (min_max, its default per-channel config), then nothing / ``apply_adaround`` /
  ``apply_seq_mse``, from the float model;
* ``aimet-ort`` / ``aimet-adaround-ort``: the sim built from the float model with ONNX Runtime's
  per-tensor scales and zero points (``ort-pt``'s) loaded and frozen, exported as is (a check: it
  should score as ``ort-pt``) / after AdaRound, which then only chooses the rounding on ORT's grid:
  the peer of "improve an existing QDQ model";

every AIMET model exported with ``to_onnx_qdq(prequantize_constants=True, export_int32_bias=True)``
(integer weights, as ORT writes them). NNCF and AIMET run in another interpreter
(``--peers-python``, default ``cache/peers-venv/bin/python``) through ``tools/peers/peer_quant.py``;
a peer that does not import there is one line and its rows are skipped.

Then ``onnxrepair fix`` (``--repairs``: ``whole`` = ``--layers all``, ``search`` = ``--search
--budget 60``) on each quantized model of ``--repair-on`` (default all but ``aimet-ort``), as a user
runs it: one subprocess, ``--val`` and ``--report``; its numbers are the report's
``repaired_agreement`` / ``repaired_accuracy`` (cross-checked by running the written model here);
exit 1 (the guard or the search kept the input model) shows the input model's numbers.

Every model file is scored here in a default ONNX Runtime CPU session on the validation inputs
as onnxrepair reads them: top-1 accuracy (when labelled) and agreement with the float model.

Peer models go to ``cache/peers-bench/<model>/<bits>/`` with a JSON of the facts of their run and
are reused while their inputs and settings are the same (``--force`` rebuilds); repair runs are
reused too while the input model, the command and onnxrepair's source are the same. Reused rows
show the seconds of the run that made them and say "cached".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
PEER_SCRIPT = TOOLS / "peers" / "peer_quant.py"
sys.path.insert(0, str(TOOLS))

from bench_quality import machine, pct  # noqa: E402

START = "<!-- tools/bench_peers.py section {}: rewritten when it runs again with --out and these --models -->"
END = "<!-- end of tools/bench_peers.py section {} -->"


# --------------------------------------------------------------------------- models
@dataclass
class ModelDef:
    name: str
    description: str
    float_path: Path
    repair: Path
    val: Path
    bits: list[str]
    batch: int  # AIMET batch
    adaround_iterations: int
    adaround_images: int


def model_defs() -> dict[str, ModelDef]:
    cache = ROOT / "cache"
    return {
        "cnn": ModelDef(
            "cnn",
            "bundled CNN (Conv16-Pool-Conv32-Pool-Gemm 800->64-Relu-Gemm 64->10, TorchScript exporter); "
            "PNG folders `models/repair` (1,000) and `models/val` (500), Fashion-MNIST, labelled",
            ROOT / "models" / "float.onnx",
            ROOT / "models" / "repair",
            ROOT / "models" / "val",
            ["int4", "int8"],
            32,
            1000,
            256,
        ),
        "mlp": ModelDef(
            "mlp",
            "scikit-learn MLPClassifier 784-128-64-10 through skl2onnx (MatMul + Add); "
            "`cache/mlp/repair.npz` (1,000) and `val.npz` (500), the CNN's images, labelled",
            cache / "mlp" / "float.onnx",
            cache / "mlp" / "repair.npz",
            cache / "mlp" / "val.npz",
            ["int4", "int8"],
            32,
            1000,
            256,
        ),
        "imagenet": ModelDef(
            "imagenet",
            "EfficientNet-Lite0 (49 Conv + Gemm 1280->1000, TorchScript exporter); `cache/imagenet/repair.npy` "
            "(1,000 photo crops) and `val.npy` (500 crops of other photos), unlabelled",
            cache / "imagenet" / "float.onnx",
            cache / "imagenet" / "repair.npy",
            cache / "imagenet" / "val.npy",
            ["int8"],
            16,
            # measured on the 2-core machine, 64 images: 30 iterations took 526 s for the 50 layers, a
            # further iteration about 5.5 s (timed on 6 layers, scaled by activation size): 120 -> ~17 min
            120,
            64,
        ),
    }


PEERS = ["ort-pt", "ort-pc", "nncf", "nncf-fullbc", "aimet-ptq", "aimet-adaround", "aimet-seqmse", "aimet-ort",
         "aimet-adaround-ort"]  # fmt: skip
PEER_LABEL = {
    "ort-pt": "ORT quantize_static, per-tensor",
    "ort-pc": "ORT quantize_static, per-channel",
    "nncf": "NNCF quantize, default",
    "nncf-fullbc": "NNCF quantize, fast_bias_correction=False",
    "aimet-ptq": "AIMET QuantSim PTQ",
    "aimet-adaround": "AIMET AdaRound",
    "aimet-seqmse": "AIMET sequential MSE",
    "aimet-ort": "AIMET sim with ORT's encodings frozen (no AdaRound)",
    "aimet-adaround-ort": "AIMET AdaRound on ORT's grid (ORT's encodings frozen)",
}
REPAIRS = {"whole": ["--layers", "all"], "search": ["--search", "--budget", "60"]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def data_id(path: Path) -> str:
    """Identity of an image set: the file's hash, or a folder's file names and sizes."""
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
        return "dir:" + h.hexdigest()
    st = path.stat()
    return f"file:{st.st_size}:{sha256_file(path) if st.st_size < 50 << 20 else int(st.st_mtime)}"


# --------------------------------------------------------------------------- data
def load_set(float_path: Path, images: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Model inputs and labels of an image set, read as onnxrepair reads them."""
    import onnx

    from onnxrepair.api import read_images, resolve_preprocessing
    from onnxrepair.graph import input_spec
    from onnxrepair.progress import NoProgress

    proto = onnx.load(str(float_path), load_external_data=False)
    spec = input_spec(proto)
    prep, _ = resolve_preprocessing(None, spec, [(str(float_path), proto)], [str(images)])
    s = read_images(str(images), spec, prep, None, NoProgress())
    return np.asarray(s.x, dtype=np.float32), None if s.labels is None else np.asarray(s.labels)


@dataclass
class Data:
    x_val: np.ndarray
    y_val: np.ndarray | None
    f_val: np.ndarray  # float model's top-1 on val
    calib: Path  # .npy of the calibration inputs (a seeded subset of the repair set)
    n_calib: int


def prepare_data(m: ModelDef, args, work: Path) -> Data:
    x_rep, _ = load_set(m.float_path, m.repair)
    n = min(args.calib, len(x_rep))
    idx = np.sort(np.random.default_rng(args.seed).permutation(len(x_rep))[:n])
    # a seeded subset in a seeded order (the repair folders are sorted by class)
    idx = np.random.default_rng(args.seed + 1).permutation(idx)
    calib = work / f"calib-{n}-seed{args.seed}.npy"
    x_cal = np.ascontiguousarray(x_rep[idx], dtype=np.float32)
    if not calib.exists() or not np.array_equal(np.load(calib, mmap_mode="r"), x_cal):
        tmp = calib.with_suffix(".tmp.npy")
        np.save(tmp, x_cal)
        tmp.replace(calib)
    del x_rep
    x_val, y_val = load_set(m.float_path, m.val)
    return Data(x_val, y_val, top1(m.float_path, x_val), calib, n)


def top1(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 classes from the first float output (the class scores), default session options."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = next(o.name for o in sess.get_outputs() if o.type == "tensor(float)")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run([out], {name: x[i : i + 100]})[0] for i in range(0, len(x), 100)]).argmax(1)


def score(path: Path, d: Data) -> tuple[float | None, float]:
    pred = top1(path, d.x_val)
    acc = None if d.y_val is None else float((pred == d.y_val).mean())
    return acc, float((pred == d.f_val).mean())


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    model: str
    bits: str
    method: str
    settings: str = ""
    accuracy: float | None = None
    agreement: float | None = None
    seconds: float | None = None
    note: str = ""
    kind: str = "quant"  # float | quant | repair
    key: str = ""
    path: str | None = None
    cached: bool = False
    command: list[str] = field(default_factory=list)
    exit_code: int | None = None
    info: dict[str, Any] | None = None


# --------------------------------------------------------------------------- ORT
class Reader:
    def __init__(self, x: np.ndarray, name: str, batch: int = 1) -> None:
        self.x, self.name, self.batch, self.i = x, name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        item = {self.name: np.ascontiguousarray(self.x[self.i : self.i + self.batch])}
        self.i += self.batch
        return item

    def rewind(self) -> None:
        self.i = 0


def input_name(path: Path) -> str:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits)


def build_ort(m: ModelDef, bits: str, per_channel: bool, d: Data, out: Path) -> dict:
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)
    x = np.load(d.calib)
    t = time.time()
    tmp = out.with_suffix(".tmp.onnx")
    quantize_static(
        str(m.float_path),
        str(tmp),
        calibration_data_reader=Reader(x, input_name(m.float_path)),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt4 if bits == "int4" else QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    tmp.replace(out)
    for extra in out.parent.glob("*.tmp.onnx.data"):
        extra.unlink(missing_ok=True)
    return {"seconds": {"total": time.time() - t}}


# --------------------------------------------------------------------------- peers
def peers_available(python: Path) -> dict[str, str]:
    """peer family -> "ok" or why not (one line)."""
    if not python.exists():
        why = f"{python} does not exist"
        return {"nncf": why, "aimet": why}
    try:
        proc = subprocess.run(
            [str(python), str(PEER_SCRIPT), "check"], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        why = f"`{python} {PEER_SCRIPT.name} check` failed: {exc}"
        return {"nncf": why, "aimet": why}
    return {"nncf": res.get("nncf") or "unknown", "aimet": res.get("aimet") or "unknown", "_versions": res}


def peer_command(peer: str, m: ModelDef, bits: str, d: Data, out: Path, info: Path, args, ort_pt: Path) -> list[str]:
    b = "4" if bits == "int4" else "8"
    common = ["--float", str(m.float_path), "--calib", str(d.calib), "--out", str(out), "--info", str(info)]
    if peer.startswith("nncf"):
        return ["nncf", *common, "--bits", b, *(["--full-bias-correction"] if peer == "nncf-fullbc" else [])]
    algo = {"aimet-ptq": "ptq", "aimet-ort": "ptq", "aimet-seqmse": "seqmse"}.get(peer, "adaround")
    cmd = ["aimet", *common, "--bits", b, "--algo", algo, "--batch", str(m.batch)]
    if algo == "adaround":
        cmd += ["--iterations", str(args.adaround_iterations or m.adaround_iterations)]
    if algo != "ptq":
        cmd += ["--images", str(min(args.adaround_images or m.adaround_images, d.n_calib))]
    if peer.endswith("-ort"):
        cmd += ["--per-tensor", "--from-ort", str(ort_pt)]
    return cmd


def last_line(text: str, prefixes=("error:", "missing:")) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    hits = [ln for ln in lines if ln.lower().startswith(prefixes)]
    line = (hits or lines or ["(no message)"])[-1]
    return line if len(line) <= 400 else line[:397] + "..."


def peer_settings(peer: str, bits: str, info: dict | None, m: ModelDef, d: Data, args) -> str:
    s = (info or {}).get("settings") or {}
    w = bits
    if peer.startswith("ort"):
        gran = "per-tensor" if peer == "ort-pt" else "per-channel"
        return f"{w} weights {gran}, u8 activations, MinMax, {d.n_calib} calib"
    if peer.startswith("nncf"):
        bc = "full BC" if peer == "nncf-fullbc" else "fast BC"
        return f"{w} weights per-channel (NNCF default), {d.n_calib} calib, {bc}"
    gran = "per-tensor, ORT's grid frozen" if peer.endswith("-ort") else "per-channel"
    text = f"{w} weights {gran}, 8-bit activations, min_max, {d.n_calib} calib"
    if "adaround" in peer:
        it = s.get("adaround_iterations", args.adaround_iterations or m.adaround_iterations)
        imgs = s.get("adaround_images", min(args.adaround_images or m.adaround_images, d.n_calib))
        text += f", AdaRound {it} it/layer on {imgs} images"
    if peer == "aimet-seqmse":
        images = s.get("seqmse_images", min(args.adaround_images or m.adaround_images, d.n_calib))
        text += f", 20 candidates on {images} images"
    return text


def run_peer(peer, m, bits, d, args, work, avail, ort_pt: Path | None) -> Row:
    row = Row(m.name, bits, PEER_LABEL[peer], key=peer)
    out = work / f"{peer}.onnx"
    info_path = work / f"{peer}.json"
    stamp = {
        "float": sha256_file(m.float_path),
        "calib": sha256_file(d.calib),
        "peer": peer,
        "bits": bits,
    }
    if peer.startswith("ort"):
        stamp["onnxruntime"] = _version("onnxruntime")
    else:
        stamp["script"] = sha256_file(PEER_SCRIPT)
        stamp["versions"] = (avail.get("_versions") or {}).get("versions")
    if peer.endswith("-ort"):
        stamp["ort_pt"] = sha256_file(ort_pt) if ort_pt and ort_pt.exists() else None
    if peer.startswith("aimet") and peer not in ("aimet-ptq", "aimet-ort"):
        stamp["iterations"] = args.adaround_iterations or m.adaround_iterations
        stamp["images"] = min(args.adaround_images or m.adaround_images, d.n_calib)
    cached = None
    if not args.force and info_path.exists():
        try:
            prev = json.loads(info_path.read_text())
            if prev.get("stamp") == stamp and (out.exists() or prev.get("error")):
                cached = prev
        except ValueError:
            pass
    if cached is not None:
        info = cached
        row.cached = True
    else:
        out.unlink(missing_ok=True)
        t0 = time.time()
        if peer.startswith("ort"):
            try:
                info = build_ort(m, bits, peer == "ort-pc", d, out)
            except Exception as exc:  # noqa: BLE001 - a row, not a crash
                info = {"error": f"{type(exc).__name__}: {exc}", "seconds": {}}
        else:
            if peer.endswith("-ort") and (ort_pt is None or not ort_pt.exists()):
                row.note = "skipped: needs the ORT per-tensor model (`ort-pt`), which was not built"
                return row
            peer_args = peer_command(peer, m, bits, d, out, info_path, args, ort_pt)
            cmd = [str(args.peers_python), str(PEER_SCRIPT), *peer_args]
            row.command = cmd
            log(f"  {m.name} {bits} {peer}: {shlex.join(cmd[2:])}")
            info_path.unlink(missing_ok=True)
            env = dict(os.environ)
            env.pop("PYTHONPATH", None)  # the peers' interpreter must not see this checkout's packages
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout, cwd=ROOT, env=env)
                rc, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired:
                rc, err = None, f"error: no result after {args.peer_timeout:g} s (killed)"
            info = json.loads(info_path.read_text()) if info_path.exists() else {}
            if rc == 3:
                info["error"] = "not installed: " + last_line(err)
            elif rc != 0:
                info["error"] = last_line(err).removeprefix("error: ")
                (work / f"{peer}.stderr.txt").write_text(err or "")
        info.setdefault("seconds", {})
        info["wall_seconds"] = time.time() - t0
        info["stamp"] = stamp
        info["date"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        if not (info.get("error") or "").startswith("not installed"):
            info_path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    row.info = info
    row.settings = peer_settings(peer, bits, info, m, d, args)
    row.seconds = (info.get("seconds") or {}).get("total") or info.get("wall_seconds")
    if info.get("error"):
        err = info["error"]
        if peer.startswith("nncf") and bits == "int4":
            row.note = f"NNCF's ONNX backend refuses 4-bit weights: {err}"
        else:
            row.note = f"error: {err}"
        row.seconds = None
        return row
    row.path = str(out)
    row.accuracy, row.agreement = score(out, d)
    notes = []
    enc = info.get("ort_encodings")
    if enc:
        notes.append(
            f"{enc['loaded_frozen']}/{enc['of_sim_quantizers_enabled']} sim quantizers loaded from ORT and frozen"
            + (f" (ORT's {', '.join(enc['ort_not_in_sim'])} not in the sim)" if enc.get("ort_not_in_sim") else "")
        )
    grid = info.get("grid_check")
    if grid:
        notes.append(
            f"weights on ORT's grid: {grid['weights_on_ort_grid']}/{grid['weights']}"
            + (f" (differ: {', '.join(grid['differ'][:5])})" if grid.get("differ") else "")
        )
    if info.get("label_branch"):
        notes.append("AIMET given the model without its label branch (ArgMax -> ArrayFeatureExtractor, no "
                     "weights; AdaRound/SeqMSE fail on it), re-attached after export")  # fmt: skip
    secs = info.get("seconds") or {}
    if "algorithm" in secs and "adaround" in peer or peer == "aimet-seqmse":
        notes.append(f"algorithm {secs.get('algorithm', 0):.0f} s")
    if row.cached:
        notes.append(f"cached ({info.get('date', '?')})")
    row.note = "; ".join(notes)
    return row


def _version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- repairs
def onnxrepair_source() -> tuple[str, str]:
    """(folder, hash) of the onnxrepair package the CLI imports (this environment's PYTHONPATH)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import onnxrepair, os; print(os.path.dirname(onnxrepair.__file__))"],
        capture_output=True,
        text=True,
        cwd="/",  # not the checkout: `python -c` puts the working directory first on sys.path
    )
    folder = Path(proc.stdout.strip())
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.py")):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return str(folder), h.hexdigest()


def fix_command() -> list[str]:
    script = Path(sys.executable).with_name("onnxrepair")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxrepair.cli"]


def run_repair(kind: str, src: Row, m: ModelDef, d: Data, args, work: Path, source_hash: str) -> Row:
    label = {"whole": "↳ onnxrepair fix, whole network", "search": "↳ onnxrepair fix, guarded search"}[kind]
    row = Row(m.name, src.bits, label, kind="repair", key=f"{src.key}+{kind}")
    row.settings = f"`{' '.join(REPAIRS[kind])}` on the model above"
    out = work / "repaired" / f"{src.key}.{kind}.onnx"
    report = out.with_suffix(".report.json")
    meta_path = out.with_suffix(".run.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    quant = Path(src.path)
    args_tail = [*REPAIRS[kind], *shlex.split(args.fix_args)]
    cmd = [*fix_command(), "fix", str(m.float_path), str(quant), str(m.repair), "--val", str(m.val),
           "-o", str(out), "--report", str(report), "--force", "-q", *args_tail]  # fmt: skip
    row.command = cmd
    stamp = {
        "float": sha256_file(m.float_path),
        "quant": sha256_file(quant),
        "repair": data_id(m.repair),
        "val": data_id(m.val),
        "args": args_tail,
        "onnxrepair": source_hash,
    }
    meta = None
    if not args.force and meta_path.exists() and report.exists():
        try:
            prev = json.loads(meta_path.read_text())
            if prev.get("stamp") == stamp and (prev.get("exit_code") != 0 or out.exists()):
                meta = prev
                row.cached = True
        except ValueError:
            pass
    if meta is None:
        for stale in (out, report, meta_path):
            stale.unlink(missing_ok=True)
        log(f"  {m.name} {src.bits} {row.key}: {shlex.join(cmd[1:])}")
        t0 = time.time()
        try:
            # run outside the checkout, so `python -m` (no console script) imports what PYTHONPATH says
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=work)
            rc, err = proc.returncode, (proc.stderr or proc.stdout)
        except subprocess.TimeoutExpired:
            rc, err = None, f"error: no result after {args.timeout:g} s (killed)"
        meta = {
            "stamp": stamp,
            "exit_code": rc,
            "wall_seconds": time.time() - t0,
            "stderr_tail": (err or "")[-3000:],
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        }
        if rc in (0, 1) and report.exists():
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    row.exit_code = meta["exit_code"]
    row.seconds = meta["wall_seconds"]
    rep = json.loads(report.read_text()) if report.exists() else None
    row.info = {"report": rep, "run": {k: v for k, v in meta.items() if k != "stamp"}}
    if row.exit_code not in (0, 1) or rep is None:
        msg = last_line(meta.get("stderr_tail", ""), ("error", "onnxrepair"))
        row.note = f"error (exit {row.exit_code}): {msg}"
        row.seconds = None
        return row
    notes = []
    # the report's view of the input model, against the bench's own scoring of the same file
    for key, mine in (("quant_agreement", src.agreement), ("quant_accuracy", src.accuracy)):
        theirs = rep.get(key)
        if isinstance(theirs, int | float) and mine is not None and abs(theirs - mine) > 1e-9:
            notes.append(f"report {key} {100 * theirs:.2f} % != bench's {100 * mine:.2f} %")
    if row.exit_code == 1 or not out.exists():
        row.accuracy, row.agreement = src.accuracy, src.agreement
        notes.insert(0, f"exit {row.exit_code}: kept the input model")
    else:
        row.path = str(out)
        row.accuracy, row.agreement = rep.get("repaired_accuracy"), rep.get("repaired_agreement")
        acc, agree = score(out, d)
        if (row.agreement is None or abs(agree - row.agreement) > 1e-9) or (
            acc is not None and (row.accuracy is None or abs(acc - row.accuracy) > 1e-9)
        ):
            notes.append(f"written model scores {pct(acc)} / {pct(agree)} in the bench")
    notes.append(summarize(rep, kind))
    if row.cached:
        notes.append(f"cached ({meta.get('date', '?')})")
    row.note = "; ".join(n for n in notes if n)
    return row


def summarize(rep: dict, kind: str) -> str:
    parts = []
    guard = rep.get("guard")
    if isinstance(guard, dict):
        steps = guard.get("layers") or []
        parts.append(f"{sum(bool(s.get('kept')) for s in steps)}/{len(steps)} layers kept by the guard")
        b, a = guard.get("holdout_before") or {}, guard.get("holdout_after") or {}
        if b and a:
            parts.append(f"held-out agreement {pct(b.get('agreement'))} -> {pct(a.get('agreement'))}")
    search = rep.get("search")
    if isinstance(search, dict):
        tried = search.get("tried") or []
        kept = [t for t in tried if isinstance(t, dict) and t.get("kept")]
        parts.append(f"{len(tried)} configs tried, {len(kept)} kept")
        b, a = search.get("holdout_before") or {}, search.get("holdout_after") or {}
        if b and a:
            parts.append(f"held-out agreement {pct(b.get('agreement'))} -> {pct(a.get('agreement'))}")
        c = search.get("confirmation")
        if isinstance(c, dict):
            parts.append(
                f"out-of-fold fixed/broken {c.get('fixed')}/{c.get('broken')}, p = {float(c.get('p_value') or 0):.2g}, "
                + ("confirmed" if c.get("confirmed") else "not confirmed")
            )
    if rep.get("fixed") is not None and rep.get("broken") is not None:
        parts.append(f"val fixed/broken {rep['fixed']}/{rep['broken']}")
    if rep.get("total_seconds") is not None:
        parts.append(f"report total {float(rep['total_seconds']):.0f} s")
    return "; ".join(p.replace(" %", "%") for p in parts)


# --------------------------------------------------------------------------- output


def versions(source: str, avail: dict) -> str:
    out = []
    for n in ("onnxrepair", "onnx", "onnxruntime", "numpy"):
        v = _version(n)
        if v:
            out.append(f"{n} {v}")
    try:
        src = Path(source).parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxrepair"], cwd=src, capture_output=True, text=True
        ).stdout.strip()
        where = "" if src.resolve() == ROOT.resolve() else f" (snapshot {src})"
        out.insert(1, f"git {head}{where}" + (" + uncommitted changes in onnxrepair/" if dirty else ""))
    except (OSError, subprocess.CalledProcessError):
        pass
    pv = (avail.get("_versions") or {}).get("versions") or {}
    peers = ", ".join(f"{k} {v}" for k, v in pv.items() if k in ("torch", "nncf", "aimet-onnx") and v)
    if peers:
        out.append(f"peers' interpreter: {peers}")
    return ", ".join(out)


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | bits | method | settings | val accuracy | agreement with float | wall s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        note = r.note.replace("|", "\\|")
        lines.append(
            f"| {r.model} | {r.bits} | {r.method} | {r.settings.replace('|', '/')} | "
            f"{pct(r.accuracy) if r.kind != 'float' or r.accuracy is not None else '—'} | {pct(r.agreement)} | "
            f"{secs} | {note} |"
        )
    return lines


def section(command: str, rows: list[Row], args, started: str, elapsed: float, defs, skipped: list[str]) -> list[str]:
    used = [defs[m] for m in args.models]
    iters = ", ".join(
        f"{m.name} {args.adaround_iterations or m.adaround_iterations} iterations per layer on "
        f"{min(args.adaround_images or m.adaround_images, args.calib)} images"
        for m in used
    )
    return [
        f"## Peer quantizers and onnxrepair: {', '.join(args.models)}",
        "",
        "Generated by `tools/bench_peers.py`; rerun it rather than editing the numbers by hand.",
        "",
        "Produced by:",
        "",
        f"    {command}",
        "",
        f"- date: {started} (total {elapsed / 60:.1f} min for the whole command; rows marked cached were "
        "measured by an earlier run with the same inputs, settings and onnxrepair source, their seconds are "
        "that run's)",
        f"- machine: {args.machine}",
        f"- versions: {args.versions}",
        *[f"- `{m.name}`: {m.description}" for m in used],
        f"- images: each model's repair set calibrates every quantizer (a seeded subset of {args.calib}, the same "
        "for all of them) and is what `onnxrepair fix` repairs with (all of it; its guard holds out a tenth, "
        "its search a quarter); the validation set is only measured. Accuracy is top-1 on the validation set (— when "
        "unlabelled), agreement the share of validation inputs whose top-1 class is the float model's, both in "
        "a default ONNX Runtime CPU session.",
        "- quantizers: ORT `quantize_static` QDQ, QUInt8 activations, MinMax, reduce_range off; NNCF "
        "`nncf.quantize(model, dataset, subset_size=N)` on the ONNX float model; AIMET-ONNX "
        "`QuantizationSimModel(param_type=int4|int8, activation_type=int8, quant_scheme='min_max')` with its "
        "default (per-channel) config, or per-tensor with ONNX Runtime's scales and zero points loaded and frozen "
        "(`load_encodings_to_sim(..., allow_overwrite=False)`), exported with `to_onnx_qdq(prequantize_constants="
        f"True, export_int32_bias=True)`; AdaRound: {iters}.",
        "- repairs: `onnxrepair fix FLOAT QUANT REPAIR --val VAL --report R.json` with `--layers all` (every "
        "layer, reconstruct encoding, held-out guard) or `--search --budget 60` (guarded search on the last "
        "layer); exit 1 = the guard or the search kept the input model, whose numbers the row then repeats. Wall "
        "s = the subprocess, interpreter start included (the report's own total is in the notes); for "
        "quantizers, the quantization call(s) (AIMET: sim, algorithm, encodings, export).",
        *([f"- skipped: {s}" for s in skipped]),
        "",
        *table(rows),
        "",
    ]


def write_section(path: Path, lines: list[str], models: list[str]) -> None:
    """Replace this bench's section for these models in `path` (or append it), leaving the rest of the file
    (other sections included) as it is; atomic."""
    text = path.read_text() if path.exists() else ""
    start, end = START.format(",".join(models)), END.format(",".join(models))
    block = "\n".join([start, "", *lines, "", end])
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- main
def split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,mlp,imagenet", help="comma list of cnn, mlp, imagenet (default: all)")
    ap.add_argument("--bits", help="comma list of int4, int8 for every model (default: each model's own: "
                    "cnn and mlp int4,int8; imagenet int8)")  # fmt: skip
    ap.add_argument("--peers", default=",".join(PEERS), help="quantized models to build: " + ", ".join(PEERS))
    ap.add_argument("--skip-aimet", action="store_true", help="leave out every aimet-* model")
    ap.add_argument("--repair-on", help="quantized models to repair (default: all built but aimet-ort)")
    ap.add_argument("--repairs", default="whole,search", help="comma list of whole, search (default: both)")
    ap.add_argument("--peers-python", type=Path, default=ROOT / "cache" / "peers-venv" / "bin" / "python",
                    help="interpreter with nncf / aimet-onnx (default: cache/peers-venv/bin/python)")  # fmt: skip
    ap.add_argument("--calib", type=int, default=256, help="calibration images, a seeded subset of the repair set")
    ap.add_argument("--adaround-iterations", type=int, help="AdaRound iterations per layer (default: cnn, mlp "
                    "1000; imagenet 120, about 20 min for its 50 layers on 2 cores)")  # fmt: skip
    ap.add_argument("--adaround-images", type=int, help="images for AdaRound and SeqMSE (default: cnn, mlp 256; "
                    "imagenet 64)")  # fmt: skip
    ap.add_argument("--fix-args", default="", help="extra arguments for every `onnxrepair fix` run")
    ap.add_argument("--timeout", type=float, default=3600, help="kill one repair run after this many seconds")
    ap.add_argument("--peer-timeout", type=float, default=5400, help="kill one peer quantization after this")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    ap.add_argument("--cache", type=Path, default=ROOT / "cache" / "peers-bench")
    ap.add_argument("--force", action="store_true", help="rebuild peer models and rerun repairs even if cached")
    ap.add_argument("--out", type=Path, help="write the Markdown section into this file (between marker lines)")
    ap.add_argument("--json", type=Path, help="also write every row, command and fact as JSON here")
    args = ap.parse_args(argv)

    defs = model_defs()
    args.models = split(args.models)
    for name in args.models:
        if name not in defs:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(defs)}")
    bits_override = split(args.bits) if args.bits else None
    for b in bits_override or []:
        if b not in ("int4", "int8"):
            raise SystemExit(f"unknown bit width {b!r}; choose from int4, int8")
    peers = split(args.peers)
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
    if args.skip_aimet:
        peers = [p for p in peers if not p.startswith("aimet")]
    if any(p.endswith("-ort") for p in peers) and "ort-pt" not in peers:
        peers.insert(0, "ort-pt")  # the AIMET peers that start from ORT's model need it
    repairs = split(args.repairs)
    for r in repairs:
        if r not in REPAIRS:
            raise SystemExit(f"unknown repair {r!r}; choose from {', '.join(REPAIRS)}")
    repair_on = split(args.repair_on) if args.repair_on is not None else [p for p in peers if p != "aimet-ort"]

    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t_start = time.time()
    command = "python tools/bench_peers.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    skipped: list[str] = []
    avail: dict[str, Any] = {}
    if any(not p.startswith("ort") for p in peers):
        avail = peers_available(args.peers_python)
        for fam in ("nncf", "aimet"):
            mine = [p for p in peers if p.startswith(fam)]
            if mine and avail.get(fam) != "ok":
                reason = avail.get(fam)
                line = f"{fam} is not usable with {args.peers_python} ({reason}): rows {', '.join(mine)} skipped"
                log(line)
                skipped.append(line)
                peers = [p for p in peers if not p.startswith(fam)]
    source, source_hash = onnxrepair_source()
    args.machine, args.versions = machine(), versions(source, avail)
    log(f"onnxrepair from {source}; peers: {', '.join(peers)}; repairs: {', '.join(repairs)} on {', '.join(repair_on)}")

    rows: list[Row] = []
    for name in args.models:
        m = defs[name]
        missing = [p for p in (m.float_path, m.repair, m.val) if not p.exists()]
        if missing:
            line = f"{name}: missing {missing[0]} (build it first: see tools/bench_quality.py / build_*.py)"
            log(line)
            skipped.append(line)
            continue
        base = args.cache / name
        base.mkdir(parents=True, exist_ok=True)
        d = prepare_data(m, args, base)
        f_acc = None if d.y_val is None else float((d.f_val == d.y_val).mean())
        for bits in bits_override or m.bits:
            work = base / bits
            work.mkdir(parents=True, exist_ok=True)
            rows.append(Row(name, bits, "float", "float32", f_acc, 1.0, kind="float", key="float",
                            path=str(m.float_path)))  # fmt: skip
            log(f"{name} {bits}: float acc {pct(f_acc)}")
            built: dict[str, Row] = {}
            for peer in peers:
                ort_pt = work / "ort-pt.onnx" if built.get("ort-pt") and built["ort-pt"].path else None
                row = run_peer(peer, m, bits, d, args, work, avail, ort_pt)
                rows.append(row)
                built[peer] = row
                log(f"  {peer:20s} acc {pct(row.accuracy):>9s} agree {pct(row.agreement):>9s} "
                    f"{(row.seconds or 0):7.1f}s  {row.note}")  # fmt: skip
                if peer in repair_on and row.path:
                    for kind in repairs:
                        r = run_repair(kind, row, m, d, args, work, source_hash)
                        rows.append(r)
                        log(f"    {kind:18s} acc {pct(r.accuracy):>9s} agree {pct(r.agreement):>9s} "
                            f"{(r.seconds or 0):7.1f}s  {r.note}")  # fmt: skip
                if args.json:  # partial results survive an interrupted run
                    write_json(args.json, command, started, time.time() - t_start, args, rows, skipped)

    elapsed = time.time() - t_start
    lines = section(command, rows, args, started, elapsed, defs, skipped)
    print("\n".join(lines))
    if args.out:
        write_section(args.out, lines, args.models)
        log(f"wrote {args.out}")
    if args.json:
        write_json(args.json, command, started, elapsed, args, rows, skipped)
    return 0


def write_json(path: Path, command, started, elapsed, args, rows, skipped) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "command": command,
        "date": started,
        "seconds": elapsed,
        "machine": args.machine,
        "versions": args.versions,
        "skipped": skipped,
        "rows": [asdict(r) for r in rows],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
