#!/usr/bin/env python
"""Run `onnxrepair fix` on every exporter x quantized-flavour fixture and print a markdown table.

Run from the repository root (no torch needed; the fixtures are committed)::

    python tools/exporter_matrix.py                      # tests/fixtures, default fix options
    python tools/exporter_matrix.py --compact            # flavours x exporters, agreement only
    python tools/exporter_matrix.py --fixtures DIR -- --neurons 5 --encoding soft

Each run is ``onnxrepair fix FLOAT QUANT digits[_flat].npz --report R.json``
(options after ``--`` are passed on). The table gives the exit code, the
layer repaired, how many stored values (integer weights, biases) the repair
changed, then the three models on the validation split that `fix` held out
(20 % of the fixture's 597 digits): top-1 accuracy (%) of float, quantized,
repaired, and the top-1 agreement (%) of the quantized and repaired models
with the float one. A run that fails shows its message instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAVOURS = tuple(json.loads((ROOT / "tests" / "fixtures" / "build.json").read_text())["flavours"])


def run_fix(float_path: Path, quant_path: Path, data: Path, extra: list[str]) -> tuple[int, dict | None, int, str]:
    """Exit code, the JSON report (None when there is none), integers changed, and stderr of one in-process run."""
    from onnxrepair.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        report, output = Path(tmp) / "report.json", Path(tmp) / "r.onnx"
        args = ["fix", str(float_path), str(quant_path), str(data), "-o", str(output)]
        args += ["--report", str(report), "-q", *extra]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        loaded = json.loads(report.read_text()) if report.exists() else None
        changed = changed_values(quant_path, output) if output.exists() else 0
    return code, loaded, changed, err.getvalue()


def changed_values(before: Path, after: Path) -> int:
    """How many stored values (integer weights and biases) differ between two models."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    old = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(before)).graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(after)).graph.initializer}
    return sum(int(np.count_nonzero(old[k] != new[k])) for k in old if k in new and old[k].shape == new[k].shape)


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures")
    ap.add_argument(
        "--compact",
        action="store_true",
        help="one row per flavour, one column per exporter; cells: quant -> repaired agreement (%%)",
    )
    args = ap.parse_args(argv)
    folder: Path = args.fixtures
    shown = folder.resolve().relative_to(ROOT) if folder.resolve().is_relative_to(ROOT) else folder
    command = " ".join(["onnxrepair fix FLOAT QUANT DATA", *extra])
    print(f"`{command}` on the fixtures in {shown}; figures on the validation split:")
    print()
    exporters = [p.name.removesuffix(".float.onnx") for p in sorted(folder.glob("*.float.onnx"))]
    cells: dict[tuple[str, str], str] = {}
    if not args.compact:
        print(
            "| exporter | flavour | fix | layer | values changed | float acc | quant acc | repaired acc "
            "| quant agree | repaired agree |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for exporter in exporters:
        float_path = folder / f"{exporter}.float.onnx"
        data = folder / ("digits_flat.npz" if exporter.startswith("skl2onnx") else "digits.npz")
        for flavour in FLAVOURS:
            quant_path = folder / f"{exporter}.{flavour}.onnx"
            if not quant_path.exists():
                cells[exporter, flavour] = "no fixture"
                if not args.compact:
                    print(f"| {exporter} | {flavour} | no fixture | | | | | | | |")
                continue
            code, report, changed, err = run_fix(float_path, quant_path, data, extra)
            if report is None:
                note = " ".join(err.split()).removeprefix("error: ").replace("|", "/")
                cells[exporter, flavour] = f"exit {code}"
                if not args.compact:
                    print(f"| {exporter} | {flavour} | exit {code}: {note} | | | | | | | |")
                continue
            r = report
            cells[exporter, flavour] = f"{pct(r['quant_agreement'])} → {pct(r['repaired_agreement'])}"
            if not args.compact:
                print(
                    f"| {exporter} | {flavour} | exit {code} | {r['layer']} | {changed} "
                    f"| {pct(r['float_accuracy'])} | {pct(r['quant_accuracy'])} | {pct(r['repaired_accuracy'])} "
                    f"| {pct(r['quant_agreement'])} | {pct(r['repaired_agreement'])} |"
                )
    if args.compact:
        print("| flavour | " + " | ".join(exporters) + " |")
        print("|---" * (len(exporters) + 1) + "|")
        for flavour in FLAVOURS:
            print(f"| {flavour} | " + " | ".join(cells[e, flavour] for e in exporters) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
