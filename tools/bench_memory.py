#!/usr/bin/env python
"""Peak memory of ``onnxrepair fix`` on image folders of 1,000 to 10,000 ImageNet-size photos (issue 13.5).

The images are JPEG files built once under ``cache/bench-images/<N>/`` from
the 1,000 repair crops of ``cache/imagenet/repair.npy``
(``tools/build_imagenet_example.py``): each crop, scaled to 256 x 256, and
its variants (mirrored, shifted by a few pixels) until there are N files; the
folders share their files through hard links. Each row is one ``fix``
subprocess on a folder, repairing the head cheaply (``--layer /_fc/Gemm
--neurons 10``) so that a run takes minutes, not hours: what grows with N is
the images, which is what this bench measures. Run from the repository root::

    python tools/bench_memory.py                              # 1000,5000,10000
    python tools/bench_memory.py --sizes 1000,5000 --source ../other-checkout

``--source`` runs the ``onnxrepair`` package of another checkout (the same
bench, before and after a change). Peak memory is the report's
``peak_memory_mb`` (the largest resident set of the run and its workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from bench_quality import machine, versions  # noqa: E402

SIDE = 256  # pixels of each written image (the model takes 224 x 224: fix resizes them)
SHIFTS = ((0, 0), (8, 0), (0, 8), (-8, 0), (0, -8))  # with and without mirroring: ten variants per crop


@dataclass
class MemoryRun:
    images: int
    wall_seconds: float
    exit_code: int
    report: dict[str, Any] | None
    error: str = ""


def variant(crop: np.ndarray, k: int) -> np.ndarray:
    """Crop `crop` ([3, 224, 224] in [-1, 1]) as 256 x 256 uint8 RGB, variant k (mirrored, shifted)."""
    from PIL import Image

    rgb = np.clip(np.round((crop.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(rgb).resize((SIDE + 16, SIDE + 16), Image.Resampling.BILINEAR))
    dx, dy = SHIFTS[k % len(SHIFTS)]
    out = big[8 + dy : 8 + dy + SIDE, 8 + dx : 8 + dx + SIDE]
    return out[:, ::-1] if (k // len(SHIFTS)) % 2 else out


def build_folders(cache: Path, source: Path, sizes: list[int]) -> dict[int, Path]:
    """cache/<N>/ for every N, made once; every file is written once under cache/all/ and hard-linked."""
    from PIL import Image

    crops = np.load(source, mmap_mode="r")
    largest = max(sizes)
    every = cache / "all"
    every.mkdir(parents=True, exist_ok=True)
    for i in range(largest):
        path = every / f"img{i:05d}.jpg"
        if not path.exists():
            part = path.with_suffix(".part")
            Image.fromarray(variant(np.asarray(crops[i % len(crops)]), i // len(crops))).save(
                part, format="JPEG", quality=90
            )
            part.rename(path)
    folders = {}
    for n in sizes:
        folder = cache / str(n)
        folder.mkdir(exist_ok=True)
        for i in range(n):
            link = folder / f"img{i:05d}.jpg"
            if not link.exists():
                os.link(every / link.name, link)
        folders[n] = folder
    return folders


def run_fix(imagenet: Path, folder: Path, n: int, args: argparse.Namespace) -> MemoryRun:
    out = args.cache / "runs"
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{args.tag}-{n}.json"
    report.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "onnxrepair.cli",
        "fix",
        str(imagenet / "float.onnx"),
        str(imagenet / "quant.onnx"),
        str(folder),
        "--preprocess",
        "inception",
        "--layer",
        "/_fc/Gemm",
        "--neurons",
        "10",
        "-o",
        str(out / f"{args.tag}-{n}.onnx"),
        "--report",
        str(report),
        "--force",
        "-q",
        "--jobs",
        str(args.jobs),
        *args.fix_args.split(),
    ]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(args.source)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=args.source, env=env)
    wall = time.perf_counter() - started
    loaded = json.loads(report.read_text()) if report.exists() else None
    error = "" if proc.returncode in (0, 1) else (proc.stderr.strip().splitlines() or ["?"])[-1]
    return MemoryRun(n, wall, proc.returncode, loaded, error)


def markdown(runs: list[MemoryRun], args: argparse.Namespace) -> list[str]:
    lines = [
        f"- machine: {machine()}",
        f"- versions: {versions()}; onnxrepair from `{args.source}` at git {source_commit(args.source)}",
        "- each row: `python -m onnxrepair.cli fix cache/imagenet/float.onnx cache/imagenet/quant.onnx "
        "cache/bench-images/N --preprocess inception --layer /_fc/Gemm --neurons 10 --force -q "
        f"--jobs {args.jobs} {args.fix_args}".rstrip()
        + "` (a fifth held out for validation); wall = the subprocess; peak memory = the report's `peak_memory_mb`",
        "",
        "| images | wall s | inference s | peak memory MB | MB per 1,000 images over the smallest |",
        "|---|---|---|---|---|",
    ]
    first = next((r for r in runs if r.report), None)
    for run in runs:
        if run.report is None or run.exit_code not in (0, 1):
            lines.append(f"| {run.images} | {run.wall_seconds:.1f} | error: {run.error} |||")
            continue
        peak = run.report.get("peak_memory_mb") or 0.0
        growth = ""
        if first is not None and first.report is not None and run.images > first.images:
            base = first.report.get("peak_memory_mb") or 0.0
            growth = f"{(peak - base) / (run.images - first.images) * 1000:.0f}"
        lines.append(
            f"| {run.images} | {run.wall_seconds:.1f} | {run.report.get('inference_seconds', 0.0):.1f} | "
            f"{peak:.0f} | {growth} |"
        )
    return lines


def source_commit(source: Path) -> str:
    """The short commit of `source` (+ if its onnxrepair/ has uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxrepair"], cwd=source, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" + uncommitted changes" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", type=Path, default=ROOT / "cache" / "imagenet", help="float/quant/repair.npy")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "bench-images", help="where folders are built")
    parser.add_argument("--sizes", default="1000,5000,10000", help="images per folder (default: %(default)s)")
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose onnxrepair runs (default: this one)")
    parser.add_argument("--tag", default="run", help="name of this bench's reports under CACHE/runs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--fix-args", default="", help="extra options for every fix run")
    parser.add_argument("--build-only", action="store_true", help="build the folders and stop")
    args = parser.parse_args()
    args.source = args.source.resolve()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    started = time.perf_counter()
    folders = build_folders(args.cache, args.imagenet / "repair.npy", sizes)
    print(f"folders ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.build_only:
        return 0
    runs = [run_fix(args.imagenet, folders[n], n, args) for n in sizes]
    print("\n".join(markdown(runs, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
