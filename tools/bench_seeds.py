#!/usr/bin/env python
"""How much whole-network repair of the small models moves with the seed (issue 11's targets).

One validation set of 500 images makes a 1-image difference 0.2 points, and the
seed chooses which repair images the guard holds out, which rows each layer's
channel check holds out and which convolution positions are sampled. A single
run can therefore land a point either side of the method's typical result; this
bench runs `onnxrepair.fix(..., layers="all", seed=s)` for several seeds on the
bench_quality models (the bundled CNN and the MLP, int4 per-tensor weights) and
prints each seed's figures with their mean, so a change is judged on the mean,
not on one draw. `imagenet` runs the same on the EfficientNet-Lite0 example
(tools/build_imagenet_example.py; unlabelled, so agreement only; about 2.5-4.5
minutes a seed on 2 cores). Run from the repository root:

    python tools/bench_seeds.py --models cnn,mlp --seeds 0-7
    python tools/bench_seeds.py --models imagenet --imagenet-quant quant.onnx --seeds 0-2

Besides agreement, each row says how many of the images still disagreeing are
among the tenth of the validation images on which FLOAT is least decided (the
smallest gap between its two top class scores): a disagreement there flips on
an error far below the layer errors the repair works with, so when most of what
is left sits there, the rest of the gap is FLOAT's near-ties, not a layer the
repair missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import numpy as np  # noqa: E402
from bench_quality import ModelSpec, ensure_model, ensure_quantized, machine, model_specs  # noqa: E402

NEAR_TIE_SHARE = 0.1  # the least-decided tenth of the validation images, by FLOAT's top-2 gap


def parse_seeds(text: str) -> list[int]:
    """'0-7' or '0,3,5'."""
    if "-" in text:
        low, high = text.split("-", 1)
        return list(range(int(low), int(high) + 1))
    return [int(part) for part in text.split(",") if part.strip()]


def near_ties(float_scores: np.ndarray) -> np.ndarray:
    """[n] True for the NEAR_TIE_SHARE of images with the smallest gap between FLOAT's two top scores."""
    top2 = np.sort(float_scores, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    return gap <= np.quantile(gap, NEAR_TIE_SHARE)


def imagenet_spec(cache: Path) -> ModelSpec:
    return ModelSpec(
        "imagenet",
        "EfficientNet-Lite0 (tools/build_imagenet_example.py), repair.npy / val.npy photo crops, unlabelled",
        cache / "float.onnx",
        cache / "repair.npy",
        cache / "val.npy",
    )


def val_images(spec: ModelSpec) -> np.ndarray:
    if spec.val.suffix == ".npy":
        return np.load(spec.val)
    return spec.load("val")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--setting", default="int4", choices=["int4", "int8"])
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--jobs", type=int, default=1, help="fix's --jobs (the ImageNet figures use 2)")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache")
    parser.add_argument("--imagenet-quant", default="quant.onnx", help="QUANT of `imagenet`, a file in cache/imagenet")
    args = parser.parse_args(argv)

    import onnx

    import onnxrepair
    from onnxrepair.search import class_scores

    specs = model_specs(args.cache)
    seeds = parse_seeds(args.seeds)
    print(
        f"machine: {machine()}; seeds {seeds}; "
        f"`onnxrepair.fix(FLOAT, QUANT, repair, val=val, layers='all', seed=s, jobs={args.jobs})`"
    )
    print()
    columns = ["model", "QUANT", "seed", "agreement QUANT -> repaired", "accuracy QUANT -> repaired (float)"]
    left = f"left among FLOAT's closest {100 * NEAR_TIE_SHARE:.0f} %"
    print("| " + " | ".join([*columns, "gap recovered", left, "written", "s"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "imagenet":
            spec = imagenet_spec(args.cache / "imagenet")
            quant = spec.float_path.parent / args.imagenet_quant
            missing = [p for p in (spec.float_path, quant, spec.repair, spec.val) if not p.exists()]
            if missing:
                raise SystemExit(f"missing {missing[0]}: build it with tools/build_imagenet_example.py")
            setting = quant.stem
        else:
            spec = specs[name]
            ensure_model(spec, print)
            quant = ensure_quantized(spec, args.setting, False, args.cache, print)
            setting = f"{args.setting} per-tensor"
        x_val = val_images(spec)
        float_scores = class_scores(onnx.load(spec.float_path), x_val, 64, "FLOAT")
        close = near_ties(float_scores)
        agreements, gaps = [], []
        for seed in seeds:
            started = time.perf_counter()
            result = onnxrepair.fix(
                spec.float_path, quant, spec.repair, val=spec.val, layers="all", seed=seed, jobs=args.jobs
            )
            seconds = time.perf_counter() - started
            report = result.report
            written = result.model is not None
            agreement = report["repaired_agreement"] if written else report["quant_agreement"]
            agreements.append(agreement)
            kept = result.model if written else onnx.load(quant)
            disagreeing = np.argmax(class_scores(kept, x_val, 64, "repaired"), 1) != np.argmax(float_scores, 1)
            if report["float_accuracy"] is None:
                accuracy_cell = gap_cell = "—"
            else:
                accuracy = report["repaired_accuracy"] if written else report["quant_accuracy"]
                gap = (accuracy - report["quant_accuracy"]) / (report["float_accuracy"] - report["quant_accuracy"])
                gaps.append(gap)
                accuracy_cell = (
                    f"{100 * report['quant_accuracy']:.2f} % -> {100 * accuracy:.2f} % "
                    f"({100 * report['float_accuracy']:.2f} %)"
                )
                gap_cell = f"{100 * gap:.0f} %"
            print(
                f"| {name} | {setting} | {seed} | {100 * report['quant_agreement']:.2f} % -> "
                f"{100 * agreement:.2f} % | {accuracy_cell} | {gap_cell} | "
                f"{int((disagreeing & close).sum())} of {int(disagreeing.sum())} | "
                f"{'yes' if written else 'no (QUANT)'} | {seconds:.1f} |",
                flush=True,
            )
        gap_summary = (
            f"{100 * statistics.mean(gaps):.0f} % (min {100 * min(gaps):.0f}, max {100 * max(gaps):.0f})"
            if gaps
            else "—"
        )
        print(
            f"| {name} | mean of {len(seeds)} | | {100 * statistics.mean(agreements):.2f} % "
            f"(min {100 * min(agreements):.2f}, max {100 * max(agreements):.2f}) | | {gap_summary} | | | |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
