#!/usr/bin/env python
"""What Ray costs per task on this machine, for the scale-out estimate in docs/BENCHMARKS.md (issue 13).

Run from the repository root (needs the ray extra)::

    python tools/bench_ray.py                       # prints Markdown
    python tools/bench_ray.py --cpus 2 --tasks 2000

On a local Ray instance with --cpus CPUs, one process, the median of --repeats:

* start: `ray.init` of a local instance, to the first task's result;
* per task: N tasks that return their argument, one item each, as
  `RayExecutor` would submit them unchunked (wall / N);
* per item, chunked: the same N items through `RayExecutor.map`, which sends
  a few chunks per CPU (wall / N; after one warm-up map, in which each worker
  imports onnxrepair);
* per solve, local: the same N items in this process (the floor).

These are the overheads the estimate adds to measured solve times; they do not
depend on the model. With ``--solve-widths``, also the seconds of one channel's
`reconstruct-lp` program (the per-channel LP `--executor ray` fans out) at each
width (weights per channel: 576, 1152, 2304, 4608 are a ResNet-50's 3x3 convs),
on `--solve-rows` synthetic rows (ReLU'd normal inputs, a target from float
weights, the weights rounded to an int8 grid): median of `--solve-channels`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def identity(k: int) -> int:
    return k


def solve_seconds(width: int, rows: int, channels: int, seed: int = 0) -> list[float]:
    """Seconds of `channels` reconstruct-lp solves of one channel with `width` weights over `rows` rows."""
    import numpy as np

    from onnxrepair.config import Encoding, SolveConfig
    from onnxrepair.solve import FitProblem, NeuronGrid, solve_fit

    rng = np.random.default_rng(seed)
    inputs = np.maximum(rng.normal(size=(rows, width)), 0.0)
    seconds = []
    for channel in range(channels):
        exact = rng.normal(scale=1 / np.sqrt(width), size=width)
        step = np.full(width, np.abs(exact).max() / 127)
        stored = np.clip(np.round(exact / step), -128, 127) * step
        target = inputs @ exact + rng.normal(scale=0.01, size=rows)
        grid = NeuronGrid(step, -128 - stored / step, 127 - stored / step, 0.0)
        problem = FitProblem(channel, stored, 0.0, inputs, target, grid)
        began = time.perf_counter()
        solve_fit(problem, SolveConfig(encoding=Encoding.RECONSTRUCT_LP))
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solve-widths", default="", help="e.g. 576,1152,2304,4608 (default: skip)")
    parser.add_argument("--solve-rows", type=int, default=4096)
    parser.add_argument("--solve-channels", type=int, default=5)
    args = parser.parse_args()

    import ray

    from onnxrepair.ray_executor import RayExecutor

    starts, per_task, per_item = [], [], []
    for _ in range(args.repeats):
        began = time.perf_counter()
        executor = RayExecutor(jobs=args.cpus)
        single = ray.remote(num_cpus=1)(identity)
        ray.get(single.remote(0))
        starts.append(time.perf_counter() - began)

        began = time.perf_counter()
        refs = [single.remote(k) for k in range(args.tasks)]
        assert ray.get(refs) == list(range(args.tasks))
        per_task.append((time.perf_counter() - began) / args.tasks)

        list(executor.map(identity, list(range(4 * args.cpus))))  # warm: the workers import onnxrepair once
        began = time.perf_counter()
        assert list(executor.map(identity, list(range(args.tasks)))) == list(range(args.tasks))
        per_item.append((time.perf_counter() - began) / args.tasks)
        executor.close()

    began = time.perf_counter()
    assert [identity(k) for k in range(args.tasks)] == list(range(args.tasks))
    local = (time.perf_counter() - began) / args.tasks

    print("### Ray's own cost per task (`tools/bench_ray.py`)")
    print()
    print(f"    python tools/bench_ray.py --cpus {args.cpus} --tasks {args.tasks} --repeats {args.repeats}")
    print()
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.platform()}, "
          f"Python {platform.python_version()}, ray {ray.__version__}; local instance, {args.cpus} CPUs")  # fmt: skip
    print(f"- medians of {args.repeats} repeats, {args.tasks} trivial items each")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| local instance start, to the first result | {statistics.median(starts):.2f} s |")
    print(f"| one task per item (submit + get), per item | {1e3 * statistics.median(per_task):.2f} ms |")
    print(f"| `RayExecutor.map` (chunked), per item | {1e3 * statistics.median(per_item):.3f} ms |")
    print(f"| in this process, per item | {1e6 * local:.2f} µs |")
    widths = [int(w) for w in args.solve_widths.split(",") if w.strip()]
    if widths:
        print()
        print(f"One channel's `reconstruct-lp` solve, {args.solve_rows} synthetic rows, this process, "
              f"median (max) of {args.solve_channels} channels:")  # fmt: skip
        print()
        print("| weights per channel | seconds |")
        print("|---|---|")
        for width in widths:
            times = solve_seconds(width, args.solve_rows, args.solve_channels)
            print(f"| {width} | {statistics.median(times):.2f} ({max(times):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
