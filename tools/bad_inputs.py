"""Run the installed `onnxrepair` console script on bad inputs built from the bundled example; print a table.

Each row: the command, its exit code, what it printed on stderr, and whether
every input file kept its SHA-256. The same cases, on a small fixture, are
asserted in tests/test_cli.py; this shows what a user sees on the real models.

    python tools/bad_inputs.py > bad_inputs.md
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CASES: list[tuple[str, list[str]]] = [
    ("missing file", ["fix", "missing.onnx", "quant.onnx", "val"]),
    ("unreadable file (a folder)", ["fix", "float.onnx", "val", "val"]),
    ("not an ONNX file", ["fix", "float.onnx", "notes.onnx", "val"]),
    ("truncated ONNX", ["fix", "float.onnx", "half.onnx", "val"]),
    ("float model as QUANT", ["fix", "float.onnx", "float.onnx", "val"]),
    ("models do not match", ["fix", "float.onnx", "other_quant.onnx", "val"]),
    ("empty image folder", ["fix", "float.onnx", "quant.onnx", "empty"]),
    ("no readable image", ["fix", "float.onnx", "quant.onnx", "broken"]),
    ("one undecodable image among good ones (a warning)", ["eval", "quant.onnx", "val_plus_broken"]),
    ("labels name a missing file", ["fix", "float.onnx", "quant.onnx", "flat", "--labels", "missing.csv"]),
    ("non-integer label", ["fix", "float.onnx", "quant.onnx", "flat", "--labels", "words.csv"]),
    ("unknown layer", ["fix", "float.onnx", "quant.onnx", "val", "--layer", "/fc3/Gemm"]),
    ("input size unresolved", ["fix", "dynamic_float.onnx", "dynamic_quant.onnx", "val"]),
    ("existing output", ["fix", "float.onnx", "quant.onnx", "val", "-o", "taken.onnx"]),
    ("output is an input", ["fix", "float.onnx", "quant.onnx", "val", "-o", "quant.onnx", "--force"]),
    ("RGB preset, greyscale model", ["eval", "quant.onnx", "val", "--preprocess", "imagenet"]),
    ("--bgr on a greyscale model", ["inspect", "float.onnx", "quant.onnx", "val", "--bgr"]),
    ("crop smaller than the model", ["eval", "quant.onnx", "val", "--resize", "20"]),
    ("quantize a corrupt model", ["quantize", "notes.onnx", "val", "-o", "q.onnx"]),
    ("unknown option value", ["quantize", "float.onnx", "val", "-o", "q.onnx", "--weights", "int3"]),
]


def prepare(folder: Path) -> None:
    """The bad inputs, next to copies of the bundled models and validation images."""
    shutil.copy(ROOT / "models" / "float.onnx", folder / "float.onnx")
    shutil.copy(ROOT / "models" / "quant.onnx", folder / "quant.onnx")
    shutil.copytree(ROOT / "models" / "val", folder / "val")
    (folder / "notes.onnx").write_text("meeting notes, not a model\n")
    data = (folder / "quant.onnx").read_bytes()
    (folder / "half.onnx").write_bytes(data[: len(data) // 2])
    other = onnx.load(str(folder / "quant.onnx"))
    dims = other.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 32, 32
    onnx.save(other, folder / "other_quant.onnx")
    for role in ("float", "quant"):
        model = onnx.load(str(folder / f"{role}.onnx"))
        for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_param = "size"
        onnx.save(model, folder / f"dynamic_{role}.onnx")
    (folder / "empty").mkdir()
    (folder / "broken" / "0").mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (folder / "broken" / "0" / name).write_bytes(b"\xff\xd8\xff" + b"garbage" * 20)
    shutil.copytree(folder / "val", folder / "val_plus_broken")
    (folder / "val_plus_broken" / "0" / "cut.png").write_bytes((folder / "broken" / "0" / "a.png").read_bytes())
    (folder / "flat").mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(folder / "flat" / f"{i}.png")
    (folder / "missing.csv").write_text("filename,label\n0.png,1\n7.png,3\n")
    (folder / "words.csv").write_text("0.png,shirt\n")
    (folder / "taken.onnx").write_bytes(b"someone's earlier result")


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def main() -> int:
    script = shutil.which("onnxrepair") or str(Path(sys.executable).parent / "onnxrepair")
    rows = ["| case | command | exit | stderr | inputs unchanged |", "|---|---|---|---|---|"]
    all_unchanged = True
    with tempfile.TemporaryDirectory(prefix="onnxrepair-bad-") as name:
        folder = Path(name)
        prepare(folder)
        for case, args in CASES:
            before = digest(folder)
            env = {**os.environ, "COLUMNS": "400"}  # one line per message, however long
            run = subprocess.run([script, *args], cwd=folder, capture_output=True, text=True, env=env, check=False)
            unchanged = digest(folder) == before
            all_unchanged &= unchanged
            message = " / ".join(line.strip() for line in run.stderr.strip().splitlines()[-1:])
            assert "Traceback" not in run.stderr, run.stderr
            rows.append(
                f"| {case} | `onnxrepair {' '.join(args)}` | {run.returncode} | {message.replace('|', '/')} | "
                f"{'yes' if unchanged else 'NO'} |"
            )
    print("\n".join(rows))
    print(f"\nevery input unchanged (SHA-256 of every file before and after each run): {all_unchanged}")
    return 0 if all_unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
