#!/usr/bin/env python
"""Build the scikit-learn MLP example used by ``tools/bench_quality.py``.

Run from the repository root::

    python tools/build_mlp_example.py              # writes cache/mlp/
    python tools/build_mlp_example.py --out DIR    # writes DIR/

What it does (deterministic: fixed seeds):

1. Trains ``sklearn.neural_network.MLPClassifier(hidden_layer_sizes=(128, 64),
   activation="relu", random_state=0)``, 30 epochs of Adam, on the
   Fashion-MNIST *training* set (all 60k images; ``--train-per-class`` takes a
   class-stratified subset) (read from the Debian ``dataset-fashion-mnist``
   IDX files), flattened to 784 float32 values = pixels / 255 in [0, 1].
2. Converts it with skl2onnx (``zipmap=False``, input ``input`` of type
   ``FloatTensorType([None, 784])``) -> ``float.onnx``: MatMul + Add layers,
   Relu, Softmax, and an ai.onnx.ml label output. skl2onnx's default target
   opset is used, as a user would get it.
3. Writes the repair and validation data as ``repair.npz`` and ``val.npz``,
   arrays ``x`` (float32, N x 784) and ``y`` (int64), taken from the SAME
   Fashion-MNIST *test*-set indices as the bundled CNN example's
   ``models/repair/<label>/<index>.png`` and ``models/val/...`` (the PNG file
   names are t10k indices), so both models are measured on the same images.

Quantization is not done here: ``tools/bench_quality.py`` quantizes both
models with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_example import load_split, read_idx  # noqa: E402,F401  (shared IDX reader)

SEED = 0
N_TRAIN_PER_CLASS = 6000  # all 60k training images: ~40 s on 2 idle cores
HIDDEN = (128, 64)
MAX_ITER = 30  # epochs; sklearn warns that it has not converged, which is fine here


def indices_from_png_folder(root: Path) -> np.ndarray:
    """t10k indices of the bundled PNGs, ``<root>/<label>/<index>.png``, sorted."""
    idx = sorted(int(p.stem) for p in root.glob("*/*.png"))
    if not idx:
        raise SystemExit(f"{root}: no <label>/<index>.png files (build models/ with tools/build_example.py)")
    return np.array(idx, dtype=np.int64)


def flatten(images_u8: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 784 in [0, 1] (the same values as the PNG pixels / 255)."""
    return (images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0).astype(np.float32)


def train_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]
    return np.sort(np.concatenate(idx))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "cache" / "mlp", help="output folder (default: cache/mlp)")
    ap.add_argument(
        "--models", type=Path, default=ROOT / "models", help="bundled CNN example, for the repair/val indices"
    )
    ap.add_argument("--train-per-class", type=int, default=N_TRAIN_PER_CLASS)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    train_img, train_lab = load_split("train")
    test_img, test_lab = load_split("t10k")

    sel = train_subset(train_lab, args.train_per_class, SEED)
    x_tr, y_tr = flatten(train_img[sel]), train_lab[sel]
    print(f"training MLPClassifier{HIDDEN} on {len(sel)} training images ...", flush=True)
    clf = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        activation="relu",
        solver="adam",
        batch_size=128,
        learning_rate_init=1e-3,
        max_iter=MAX_ITER,
        random_state=SEED,
        shuffle=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_tr, y_tr)
    t_train = time.time() - t0
    print(f"  {clf.n_iter_} epochs, final loss {clf.loss_:.4f} ({t_train:.0f}s)", flush=True)

    onx = convert_sklearn(
        clf,
        "fashion_mlp",
        initial_types=[("input", FloatTensorType([None, 784]))],
        options={id(clf): {"zipmap": False}},
    )
    onnx.checker.check_model(onx)
    float_path = out / "float.onnx"
    float_path.write_bytes(onx.SerializeToString())

    data = {}
    for split in ("repair", "val"):
        idx = indices_from_png_folder(args.models / split)
        x, y = flatten(test_img[idx]), test_lab[idx].astype(np.int64)
        np.savez(out / f"{split}.npz", x=x, y=y)
        data[split] = (x, y)

    sess = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    acc = {}
    for split, (x, y) in data.items():
        label = sess.run([outputs[0]], {"input": x})[0]
        acc[split] = float((np.asarray(label) == y).mean())
        sk = float((clf.predict(x) == y).mean())
        print(f"  {split}: {len(y)} images, onnx acc {acc[split]:.2%} (sklearn {sk:.2%})")
    full = float((sess.run([outputs[0]], {"input": flatten(test_img)})[0] == test_lab).mean())
    print(f"  full t10k: {full:.2%}")

    ops = [f"{n.domain + ':' if n.domain else ''}{n.op_type}" for n in onx.graph.node]
    opsets = {o.domain or "ai.onnx": o.version for o in onx.opset_import}
    meta = {
        "hidden": list(HIDDEN),
        "train_images": len(sel),
        "epochs": int(clf.n_iter_),
        "train_seconds": round(t_train, 1),
        "opsets": opsets,
        "nodes": ops,
        "outputs": outputs,
        "accuracy": acc,
        "t10k_accuracy": full,
    }
    (out / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  graph: {' -> '.join(ops)}\n  opsets {opsets}, outputs {outputs}")
    print(f"wrote {float_path}, {out / 'repair.npz'}, {out / 'val.npz'} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
