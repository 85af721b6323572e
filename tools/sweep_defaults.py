"""How the defaults of --norm-weight and --margin were chosen.

Runs `onnxrepair fix` on the bundled example for each (encoding, norm weight,
margin) and prints validation figures on 30 % of models/repair held out by
--val-fraction: models/val is never used here, it stays for the final
figures in README.md and docs/BENCHMARKS.md.

    python tools/sweep_defaults.py
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ENCODINGS = ("soft", "logit")
NORM_WEIGHTS = ("0.001", "0.01", "0.1")
MARGINS = ("0.001", "0.1", "1")


def main() -> None:
    print("| encoding | norm weight | margin | quant acc | repaired acc | quant agree | repaired agree | s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for encoding, norm_weight, margin in itertools.product(ENCODINGS, NORM_WEIGHTS, MARGINS):
            report = Path(tmp) / f"{encoding}-{norm_weight}-{margin}.json"
            command = [
                *(sys.executable, "-m", "onnxrepair.cli", "fix"),
                *("models/float.onnx", "models/quant.onnx", "models/repair", "--val-fraction", "0.3"),
                *("-o", str(Path(tmp) / "out.onnx"), "--report", str(report), "--force", "-q"),
                *("--encoding", encoding, "--norm-weight", norm_weight, "--margin", margin),
            ]
            subprocess.run(command, check=True)
            r = json.loads(report.read_text())
            print(
                f"| {encoding} | {norm_weight} | {margin} | {r['quant_accuracy']:.3f} | {r['repaired_accuracy']:.3f} "
                f"| {r['quant_agreement']:.3f} | {r['repaired_agreement']:.3f} | {r['total_seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
