"""Which python-mip backend solves the repair LPs better: HiGHS or CBC.

Builds the real per-neuron problems of one layer (the paper encoding, every
repair image a sign constraint) and solves each with both backends, side by
side in one run. Prints a Markdown table: per-neuron seconds (median, p90,
max), statuses, and how far each backend's optimum is from the better of the
two.

    python tools/bench_solvers.py models/float.onnx models/quant.onnx models/repair --neurons 64
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from onnxrepair.activity import read_layer_activity
from onnxrepair.config import Encoding, SolveConfig, SolverBackend
from onnxrepair.data import load_image_folder, preprocessing_for_input
from onnxrepair.graph import input_spec, layer_parameters, load_model, pair_layer
from onnxrepair.repair import NoProgress
from onnxrepair.solve import NeuronProblem, solve_neuron


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("float_model", type=Path)
    parser.add_argument("quant_model", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--layer")
    parser.add_argument("--neurons", type=int, default=0, help="first N neurons of the layer (0: all)")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument(
        "--row-generation", action="store_true", help="solve with row generation (default: the full program)"
    )
    args = parser.parse_args()
    logging.getLogger("mip").setLevel(logging.ERROR)

    float_model = load_model(args.float_model, "FLOAT")
    quant_model = load_model(args.quant_model, "QUANT")
    spec = input_spec(float_model)
    images = load_image_folder(args.images, preprocessing_for_input(spec.name, spec.shape))
    pair = pair_layer(float_model, quant_model, args.layer)
    activity = read_layer_activity(float_model, quant_model, pair, images.x, 256, NoProgress())
    weights, bias = layer_parameters(quant_model, pair.quant_layer)
    n = pair.quant_layer.n_out if args.neurons == 0 else min(args.neurons, pair.quant_layer.n_out)
    problems = [
        NeuronProblem(
            j, weights[j], float(bias[j]), activity.quant_inputs.astype(np.float64), activity.float_pre[:, j] > 0
        )
        for j in range(n)
    ]
    configs = {
        backend: SolveConfig(
            encoding=Encoding.PAPER, backend=backend, time_limit=args.time_limit, structured=args.row_generation
        )
        for backend in SolverBackend
    }
    results = {backend: [solve_neuron(p, config) for p in problems] for backend, config in configs.items()}
    best = [
        min((r[i].objective for r in results.values() if r[i].objective is not None), default=None) for i in range(n)
    ]
    print(
        f"Layer {pair.float_layer.name} ({pair.float_layer.n_in} inputs), {len(images)} repair images, "
        f"{n} neurons, paper encoding, {'row generation' if args.row_generation else 'full program'}\n"
    )
    print("| backend | median s | p90 s | max s | optimal | infeasible | other | worst gap to best optimum |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, solutions in results.items():
        seconds = np.array([s.seconds for s in solutions])
        statuses = [s.status.value for s in solutions]
        gaps = [
            (s.objective - b) / max(abs(b), 1e-12)
            for s, b in zip(solutions, best, strict=True)
            if s.objective is not None and b is not None
        ]
        other = len(statuses) - statuses.count("optimal") - statuses.count("infeasible")
        print(
            f"| {backend.value} | {np.median(seconds):.3f} | {np.percentile(seconds, 90):.3f} | {seconds.max():.3f} "
            f"| {statuses.count('optimal')} | {statuses.count('infeasible')} | {other} "
            f"| {100 * max(gaps, default=0.0):.3f} % |"
        )
    disagree = [i for i in range(n) if results[SolverBackend.HIGHS][i].status != results[SolverBackend.CBC][i].status]
    print(f"\nneurons where the two backends' statuses differ: {disagree}")


if __name__ == "__main__":
    main()
