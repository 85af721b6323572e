#!/usr/bin/env python
"""Build the bundled onnxrepair example under ``models/``.

Run from the repository root::

    python tools/build_example.py            # writes models/
    python tools/build_example.py --out DIR  # writes DIR/
    python tools/build_example.py --quick    # skip the candidate table

What it does (deterministic: fixed seeds, single data order, no DataLoader
workers):

1. Trains a small CNN on the Fashion-MNIST training set (60k images, read from
   the Debian ``dataset-fashion-mnist`` IDX files). Input N x 1 x 28 x 28
   float32, pixels / 255 in [0, 1], no mean/std normalisation.
2. Exports it with the TorchScript exporter (``dynamo=False``), opset 17, input
   ``input``, output ``logits``, dynamic batch axis -> ``float.onnx``. Node
   names follow the module names: ``/conv1/Conv``, ``/relu1/Relu``, ...,
   ``/fc1/Gemm``, ``/relu3/Relu``, ``/fc2/Gemm``.
3. Picks disjoint, class-stratified images from the Fashion-MNIST *test* set:
   ``repair/<label>/<t10k index>.png`` (100 per class) and
   ``val/<label>/<t10k index>.png`` (50 per class), 8-bit grayscale PNGs of the
   raw pixels. Calibration images for quantization come from the *training*
   set and are not written out.
4. Measures a list of ``onnxruntime.quantization.quantize_static`` settings
   (QDQ format) and writes the chosen one as ``quant.onnx``. See CHOSEN below
   for which and why.
5. Writes ``README.md`` and prints accuracies and the dense-layer pairing.

torch is a build tool only; onnxrepair itself never imports it. Timings and the
last digit of the accuracies can differ on other CPUs (oneDNN picks different
kernels), the procedure does not.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEED = 0
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
N_REPAIR_PER_CLASS = 100
N_VAL_PER_CLASS = 50
N_CALIB = 32  # "few calibration images", drawn from the training set
EPOCHS = 8
BATCH = 64
LR = 2e-3  # Adam, cosine-annealed to 0 over EPOCHS
OPSET = 17


# --------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims).copy()


def load_split(kind: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(DATA_DIR / f"{kind}-images-idx3-ubyte.gz")
    labels = read_idx(DATA_DIR / f"{kind}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def to_input(images_u8: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28 in [0, 1]."""
    return (images_u8.astype(np.float32) / 255.0)[:, None, :, :]


def stratified_disjoint(labels: np.ndarray, counts: list[int], seed: int) -> list[np.ndarray]:
    """For each class draw sum(counts) distinct indices and split them into
    len(counts) disjoint sets of counts[i] per class. Returns sorted index arrays."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in counts]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, n in enumerate(counts):
            out[k].extend(idx[start : start + n].tolist())
            start += n
    return [np.array(sorted(o), dtype=np.int64) for o in out]


def write_pngs(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    from PIL import Image

    if root.exists():
        shutil.rmtree(root)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(root / str(int(labels[i])) / f"{int(i):05d}.png")


def read_png_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read back <root>/<label>/*.png exactly as a user would (sorted)."""
    from PIL import Image

    xs, ys = [], []
    for label_dir in sorted(root.iterdir(), key=lambda p: int(p.name)):
        for png in sorted(label_dir.glob("*.png")):
            xs.append(np.asarray(Image.open(png).convert("L"), dtype=np.uint8))
            ys.append(int(label_dir.name))
    return to_input(np.stack(xs)), np.array(ys, dtype=np.int64)


# --------------------------------------------------------------------------- model
def build_net():
    import torch.nn as nn

    class FashionCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3)  # 28 -> 26
            self.relu1 = nn.ReLU()
            self.pool1 = nn.MaxPool2d(2)  # 26 -> 13
            self.conv2 = nn.Conv2d(16, 32, 3)  # 13 -> 11
            self.relu2 = nn.ReLU()
            self.pool2 = nn.MaxPool2d(2)  # 11 -> 5
            self.flatten = nn.Flatten()  # 32*5*5 = 800
            self.fc1 = nn.Linear(800, 64)
            self.relu3 = nn.ReLU()
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = self.pool1(self.relu1(self.conv1(x)))
            x = self.pool2(self.relu2(self.conv2(x)))
            x = self.relu3(self.fc1(self.flatten(x)))
            return self.fc2(x)

    return FashionCNN()


def train(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray):
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    net = build_net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    for epoch in range(EPOCHS):
        t0 = time.time()
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for b in range(0, len(xt), BATCH):
            sel = perm[b : b + BATCH]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[sel]), yt[sel])
            loss.backward()
            opt.step()
            total += loss.item() * len(sel)
        sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
        print(
            f"  epoch {epoch + 1}/{EPOCHS}: loss {total / len(xt):.4f}  t10k acc {acc:.4f}  ({time.time() - t0:.1f}s)",
            flush=True,
        )
    return net


def export(net, path: Path) -> None:
    import torch

    net.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(
        net,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)


# --------------------------------------------------------------------------- ORT
def session(path: Path):
    """A plain CPU session with DEFAULT options: what users deploy (QDQ fused)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predict(path: Path, x: np.ndarray, batch: int = 500, optimize: bool = True) -> np.ndarray:
    """Top-1 classes. optimize=False disables graph optimisations (no QDQ fusion:
    exact QDQ arithmetic, as a tapped copy would compute)."""
    import onnxruntime as ort

    if optimize:
        sess = session(path)
    else:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]).argmax(1)


class ArrayReader:
    """onnxruntime CalibrationDataReader over a fixed array, one image per batch."""

    def __init__(self, x: np.ndarray) -> None:
        self._x = x
        self._i = 0

    def get_next(self):
        if self._i >= len(self._x):
            return None
        item = {"input": self._x[self._i : self._i + 1]}
        self._i += 1
        return item

    def rewind(self) -> None:
        self._i = 0


@dataclass
class Candidate:
    name: str
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    per_channel: bool = False
    calibrate_method: str = "MinMax"
    n_calib: int = N_CALIB
    extra_options: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"QDQ, {'per-channel' if self.per_channel else 'per-tensor'}, "
            f"weights {self.weight_type}, activations {self.activation_type}, "
            f"{self.calibrate_method} calibration on {self.n_calib} training images, "
            f"reduce_range=False, Relu/Clip removed (ORT default), no quant_pre_process"
        )


# Measured in this order: settings users really use first. All are QDQ, all
# keep ORT's default of removing Relu/Clip in QDQ mode, none runs
# quant_pre_process (the TorchScript export is already shape-inferred and
# pre-processing would only risk renaming nodes; ORT logs a hint about it).
_INT8_CONVS = {"TensorQuantOverrides": {w: [{"quant_type": "QInt8"}] for w in ("conv1.weight", "conv2.weight")}}
CANDIDATES = [
    Candidate("int8-u8act-minmax"),
    Candidate("int8-s8act-minmax", activation_type="QInt8"),
    Candidate("int8-u8act-minmax-4calib", n_calib=4),
    Candidate("int8-u8act-percentile", calibrate_method="Percentile"),
    Candidate("int8-u8act-entropy", calibrate_method="Entropy"),
    Candidate("int8-u8act-minmax-perchannel", per_channel=True),
    Candidate("int4w-u8act-minmax", weight_type="QInt4"),
    Candidate("int4w-s8act-minmax", activation_type="QInt8", weight_type="QInt4"),
    Candidate("int4w-u8act-minmax-perchannel", weight_type="QInt4", per_channel=True),
    Candidate("int4w-fc-only-u8act-minmax", weight_type="QInt4", extra_options=_INT8_CONVS),
]

# The setting written to quant.onnx: per-tensor QInt4 weights, QUInt8
# activations, MinMax on 32 training images, Relu removed (ORT default).
#
# Why (measured on this machine, Nov 2026; the table is reprinted by every run):
# * plain per-tensor int8 (U8 or S8 activations; MinMax, Percentile or Entropy;
#   4 to 128 calibration images) loses < 1 point on val on this CNN: nothing
#   visible to repair. U8 and S8 activations give identical predictions (same
#   scale, shifted zero point).
# * per-channel int8 loses ~1 point, and only through ORT's fused U8S8 kernels
#   (without fusion it matches float): a kernel artefact, not a weight error.
# * per-tensor 4-bit weights (quantize_static(weight_type=QuantType.QInt4)),
#   the next setting in order of preference, loses 6-8 points on val and on
#   repair, stable across calibration sets and sizes (2-64 images) and across
#   training runs. It is what the example uses. At opset 17 ORT writes
#   com.microsoft QuantizeLinear/DequantizeLinear with INT4 weight
#   initializers; it does not fuse them, so the deployed (default session)
#   predictions equal exact QDQ arithmetic.
# * Most of that drop comes from conv1 (144 weights sharing one 4-bit scale);
#   4-bit fc layers alone lose ~2.5 points (candidate int4w-fc-only). A
#   least-squares refit of fc1 or fc2 alone, snapped back onto the 4-bit grid,
#   recovered about 5 of the ~8 points in a development check, so the
#   dense-layer repair has real room to work with.
CHOSEN = "int4w-u8act-minmax"
MIN_DROP_PP = 2.0


def quantize(float_path: Path, out_path: Path, cand: Candidate, x_calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(float_path),
        str(out_path),
        calibration_data_reader=ArrayReader(x_calib[: cand.n_calib]),
        quant_format=QuantFormat.QDQ,
        per_channel=cand.per_channel,
        reduce_range=False,
        activation_type=getattr(QuantType, cand.activation_type),
        weight_type=getattr(QuantType, cand.weight_type),
        calibrate_method=getattr(CalibrationMethod, cand.calibrate_method),
        extra_options=_extra_options(cand.extra_options) or None,
    )


def _extra_options(opts: dict) -> dict:
    """Fresh copy of extra_options with "quant_type" names turned into QuantType."""
    from onnxruntime.quantization import QuantType

    out = dict(opts)
    if "TensorQuantOverrides" in out:
        out["TensorQuantOverrides"] = {
            t: [{k: (getattr(QuantType, v) if k == "quant_type" else v) for k, v in o.items()} for o in lst]
            for t, lst in out["TensorQuantOverrides"].items()
        }
    return out


# --------------------------------------------------------------------------- report
def dense_layers(path: Path) -> list[dict]:
    """Gemm/MatMul nodes with their output tensor, and for QDQ models the
    DequantizeLinear inputs feeding their weight and bias."""
    import onnx

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def describe_tensor(name: str) -> str:
        if name in inits:
            t = inits[name]
            return f"{name} {onnx.TensorProto.DataType.Name(t.data_type)}{list(t.dims)}"
        n = producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear":
            parts = [describe_tensor(i) for i in n.input if i]
            dom = n.domain or "ai.onnx"
            axis = [a.i for a in n.attribute if a.name == "axis"]
            return f"DQ[{dom}{', axis=' + str(axis[0]) if axis else ''}]({'; '.join(parts)})"
        return name

    rows = []
    for n in m.graph.node:
        if n.op_type not in ("Gemm", "MatMul"):
            continue
        nxt = [c.op_type for c in consumers.get(n.output[0], [])]
        rows.append(
            {
                "name": n.name,
                "op": n.op_type,
                "output": n.output[0],
                "next": nxt,
                "inputs": [describe_tensor(i) for i in n.input[1:]],
            }
        )
    return rows


def relu_nodes(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]


def write_readme(out: Path, chosen: Candidate, table: list[dict], acc: dict, cmd: str) -> None:
    lines = [
        "# Example models and data",
        "",
        "Built by `tools/build_example.py` (torch is used only there). Rebuild with:",
        "",
        f"    {cmd}",
        "",
        "| path | what |",
        "|---|---|",
        "| `float.onnx` | small CNN trained on Fashion-MNIST (Conv16-Pool-Conv32-Pool-"
        "`/fc1/Gemm` 800->64-Relu-`/fc2/Gemm` 64->10), TorchScript exporter, opset 17; "
        "input `input` N x 1 x 28 x 28 float32 = pixels / 255 (no mean/std), output `logits` |",
        "| `quant.onnx` | `float.onnx` quantized by `onnxruntime.quantization.quantize_static` (setting below) |",
        f"| `repair/<label>/<index>.png` | {10 * N_REPAIR_PER_CLASS} Fashion-MNIST test images "
        f"({N_REPAIR_PER_CLASS} per class), repair set |",
        f"| `val/<label>/<index>.png` | {10 * N_VAL_PER_CLASS} Fashion-MNIST test images "
        f"({N_VAL_PER_CLASS} per class), held-out validation, disjoint from `repair/` |",
        "",
        "PNGs are 8-bit grayscale raw 28x28 pixels; `<label>` is the class 0-9 "
        "(" + ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES)) + "); "
        "`<index>` is the image's position in `t10k-images-idx3-ubyte`. "
        "Calibration used training-set images only.",
        "",
        "## Quantization setting",
        "",
        f"`{chosen.name}`: {chosen.describe()}.",
        "In code: `quantize_static(float.onnx, quant.onnx, reader, "
        f"quant_format=QuantFormat.QDQ, per_channel={chosen.per_channel}, "
        f"activation_type=QuantType.{chosen.activation_type}, "
        f"weight_type=QuantType.{chosen.weight_type}, "
        f"calibrate_method=CalibrationMethod.{chosen.calibrate_method})`.",
        "",
        "Why: per-tensor int8, whatever the calibration, loses under 1 point of top-1 "
        "accuracy on this CNN (table below), so there is nothing visible to repair. Per-tensor "
        "4-bit weights, the next setting in order of preference, loses several points "
        f"(the target was at least {MIN_DROP_PP:g}) in a default ONNX Runtime CPU session. "
        "Most of that loss comes from conv1 (144 weights sharing one 4-bit scale); "
        "`int4w-fc-only` shows what the 4-bit dense layers alone cost. "
        + (
            "At opset 17 the 4-bit weights use `com.microsoft` QuantizeLinear/DequantizeLinear "
            "with INT4 initializers; ORT does not fuse them, so deployed predictions equal "
            "exact QDQ arithmetic. "
            if "4" in chosen.weight_type
            else ""
        )
        + "ORT's default of removing Relu in QDQ mode is kept: `/fc1/Gemm` writes "
        "`/fc1/Gemm_output_0` in `float.onnx` but `/relu3/Relu_output_0` in `quant.onnx`, "
        "where that name holds the pre-activation; the QuantizeLinear after it (zero point at "
        "the bottom of the range, as calibrated on the Relu output) clips negatives and so "
        "acts as the Relu. The logits are quantized too (QuantizeLinear/DequantizeLinear on "
        "the graph output), so quantized scores can tie.",
        "",
        "## Measured (onnxruntime CPU, default session options)",
        "",
        "| set | float acc | quant acc | agreement float vs quant |",
        "|---|---|---|---|",
    ]
    for split in ("val", "repair"):
        a = acc[split]
        lines.append(f"| `{split}/` ({a['n']}) | {a['float']:.2%} | {a['quant']:.2%} | {a['agree']:.2%} |")
    lines += [
        "",
        "All candidates measured on `val/` (the chosen one is marked):",
        "",
        "| candidate | float acc | quant acc | drop (pp) | agreement | quant acc, no fusion |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        mark = " **(chosen)**" if r["name"] == chosen.name else ""
        lines.append(
            f"| `{r['name']}`{mark} | {r['float']:.2%} | {r['quant']:.2%} | "
            f"{100 * (r['float'] - r['quant']):.1f} | {r['agree']:.2%} | "
            f"{r['exact']:.2%} |"
        )
    lines += [
        "",
        "Numbers can move by a few images on other CPUs (oneDNN training kernels, ORT's fused int8 kernels).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models", help="output folder (default: models)")
    ap.add_argument(
        "--quick", action="store_true", help="only build the chosen quantization setting (skip the candidate table)"
    )
    args = ap.parse_args(argv)

    t_start = time.time()
    random.seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 -- seeds the global state that torch and the legacy code paths use
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("loading Fashion-MNIST ...", flush=True)
    train_img, train_lab = load_split("train")
    test_img, test_lab = load_split("t10k")
    x_train, x_test = to_input(train_img), to_input(test_img)

    print(f"training ({EPOCHS} epochs) ...", flush=True)
    net = train(x_train, train_lab, x_test, test_lab)
    float_path = out / "float.onnx"
    export(net, float_path)
    print(f"wrote {float_path}", flush=True)

    repair_idx, val_idx = stratified_disjoint(test_lab, [N_REPAIR_PER_CLASS, N_VAL_PER_CLASS], SEED)
    assert not set(repair_idx.tolist()) & set(val_idx.tolist())
    write_pngs(out / "repair", test_img, test_lab, repair_idx)
    write_pngs(out / "val", test_img, test_lab, val_idx)
    print(f"wrote {len(repair_idx)} repair and {len(val_idx)} val PNGs", flush=True)

    # calibration: a few training images, fixed seed, one image per calibration batch
    calib_idx = np.random.default_rng(SEED + 1).choice(len(train_img), size=256, replace=False)
    x_calib = x_train[calib_idx]

    x_val, y_val = read_png_folder(out / "val")
    x_rep, y_rep = read_png_folder(out / "repair")
    f_val = predict(float_path, x_val)
    f_rep = predict(float_path, x_rep)

    by_name = {c.name: c for c in CANDIDATES}
    chosen = by_name[CHOSEN]
    todo = [chosen] if args.quick else CANDIDATES
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for cand in todo:
            qpath = Path(tmp) / f"{cand.name}.onnx"
            quantize(float_path, qpath, cand, x_calib)
            q_val = predict(qpath, x_val)
            e_val = predict(qpath, x_val, optimize=False)
            table.append(
                {
                    "name": cand.name,
                    "float": float((f_val == y_val).mean()),
                    "quant": float((q_val == y_val).mean()),
                    "agree": float((q_val == f_val).mean()),
                    "exact": float((e_val == y_val).mean()),
                }
            )
            if cand.name == CHOSEN:
                shutil.copyfile(qpath, out / "quant.onnx")

    print("\ncandidates on val (ORT CPU, default session options):")
    print(f"  {'candidate':32s} {'float':>7s} {'quant':>7s} {'drop pp':>8s} {'agree':>7s} {'exactQDQ':>8s}")
    for r in table:
        mark = "  <- chosen" if r["name"] == CHOSEN else ""
        print(
            f"  {r['name']:32s} {r['float']:7.2%} {r['quant']:7.2%} "
            f"{100 * (r['float'] - r['quant']):8.1f} {r['agree']:7.2%} {r['exact']:8.2%}{mark}"
        )
    print(
        "  (quant/agree: default session = deployed; exactQDQ: quant acc with graph "
        "optimisations off, i.e. no QDQ fusion)"
    )

    quant_path = out / "quant.onnx"
    q_val = predict(quant_path, x_val)
    q_rep = predict(quant_path, x_rep)
    acc = {
        "val": {
            "n": len(y_val),
            "float": float((f_val == y_val).mean()),
            "quant": float((q_val == y_val).mean()),
            "agree": float((q_val == f_val).mean()),
        },
        "repair": {
            "n": len(y_rep),
            "float": float((f_rep == y_rep).mean()),
            "quant": float((q_rep == y_rep).mean()),
            "agree": float((q_rep == f_rep).mean()),
        },
    }
    drop = 100 * (acc["val"]["float"] - acc["val"]["quant"])
    if drop < MIN_DROP_PP:
        print(f"WARNING: chosen setting drops only {drop:.1f} pp on val (wanted >= {MIN_DROP_PP} pp)", file=sys.stderr)

    cmd = "python tools/build_example.py" + ("" if args.out == "models" else f" --out {args.out}")
    write_readme(out, chosen, table, acc, cmd)

    print(f"\nchosen: {chosen.name}: {chosen.describe()}")
    for split in ("val", "repair"):
        a = acc[split]
        print(
            f"  {split:6s} n={a['n']:4d}  float {a['float']:.2%}  quant {a['quant']:.2%}  "
            f"agreement {a['agree']:.2%}  failing inputs {round(a['n'] * (1 - a['agree']))}"
        )

    for path in (float_path, quant_path):
        print(f"\ndense layers in {path}:")
        for r in dense_layers(path):
            print(f"  {r['name']} ({r['op']}) -> {r['output']} -> {r['next'] or 'graph output'}")
            for s in r["inputs"]:
                print(f"      {s}")
        print(f"  Relu nodes: {relu_nodes(path)}")

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"\n{out}/ total {total / 1e6:.2f} MB; took {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
