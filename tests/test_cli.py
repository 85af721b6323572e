"""cli.py end to end on the digits models: `main([...])`, the console script, and bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample, check_full, run_model, write_pngs
from PIL import Image

from onnxrepair.cli import main

REPORT_KEYS = {
    "float_accuracy",
    "quant_accuracy",
    "repaired_accuracy",
    "quant_agreement",
    "repaired_agreement",
    "validation_size",
    "repair_size",
    "layer",
    "metric",
    "neurons",
    "unsolved",
    "solve_seconds",
    "total_seconds",
}


def words(text: str) -> str:
    """`text` with every run of whitespace, line breaks included, as one space.

    Messages are checked this way because rich wraps long ones (see test_bad_input_error_is_one_line).
    """
    return " ".join(text.split())


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.png"))


def digest(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under `paths` (files or folders)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def read_pngs(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The PNGs of a digits folder as model inputs, read with PIL alone (not with onnxrepair.data)."""
    files = pngs(folder)
    x = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) / 255 for f in files]).reshape(-1, 1, 8, 8)
    return x, np.array([int(f.parent.name) for f in files])


@dataclass(frozen=True)
class FixRun:
    code: int
    output: Path
    report: dict
    stdout: str
    stderr: str


def fix(digits: DigitsExample, tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> FixRun:
    output, report = tmp / "repaired.onnx", tmp / "report.json"
    models = [str(digits.float_path), str(digits.quant_path), str(digits.images)]
    code = main(["fix", *models, "-o", str(output), "--report", str(report), *extra])
    captured = capsys.readouterr()
    data = json.loads(report.read_text()) if report.exists() else {}
    return FixRun(code, output, data, captured.out, captured.err)


def test_fix_end_to_end(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs_before = digest([digits.float_path, digits.quant_path, digits.images])
    run = fix(digits, tmp_path, capsys)
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert digest([digits.float_path, digits.quant_path, digits.images]) == inputs_before

    repaired = onnx.load(str(run.output))
    check_full(repaired)
    (scores,) = run_model(repaired, digits.x[:32])
    assert scores.shape == (32, 10)

    assert REPORT_KEYS <= run.report.keys()
    assert run.report["validation_size"] + run.report["repair_size"] == len(pngs(digits.images))
    assert run.report["validation_size"] == pytest.approx(0.2 * len(pngs(digits.images)), abs=10)
    assert run.report["layer"] == "/fc2/Gemm"  # the default: the last dense layer
    assert run.report["metric"] == "euclid"
    handled = run.report["neurons"] + run.report["unsolved"]
    assert len(handled) == len(set(handled)) == 10  # --neurons 10 of fc2's 10 neurons
    assert set(handled) == set(range(10))
    for key in ("float_accuracy", "quant_accuracy", "repaired_accuracy", "quant_agreement", "repaired_agreement"):
        assert 0.0 <= run.report[key] <= 1.0, key
    assert run.report["float_accuracy"] > 0.85  # the MLP learned the digits
    assert 0.0 <= run.report["solve_seconds"] <= run.report["total_seconds"]

    # Only fc2's integer weights may differ from QUANT.
    quant = onnx.load(str(digits.quant_path))
    before = {t.name: t for t in quant.graph.initializer}
    after = {t.name: t for t in repaired.graph.initializer}
    assert before.keys() == after.keys()
    assert [name for name in before if before[name] != after[name]] in ([], ["fc2.weight_quantized"])
    assert list(quant.graph.node) == list(repaired.graph.node)


def test_fix_with_val_folder(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fix(digits, tmp_path, capsys, "--val", str(digits.validation), "--layer", "/fc1/Gemm", "--neurons", "4")
    assert run.code == 0, run.stderr
    assert run.report["repair_size"] == len(pngs(digits.images))
    assert run.report["validation_size"] == len(pngs(digits.validation))
    assert run.report["layer"] == "/fc1/Gemm"
    assert len(run.report["neurons"]) + len(run.report["unsolved"]) == 4

    # The report's figures, recomputed here from the val PNGs and the three models.
    x, labels = read_pngs(digits.validation)
    top1 = {}
    for name, path in (("float", digits.float_path), ("quant", digits.quant_path), ("repaired", run.output)):
        (scores,) = run_model(onnx.load(str(path)), x)
        top1[name] = np.argmax(scores, axis=1)
    tolerance = 1.5 / len(x)  # batch sizes may differ from the CLI's: allow one image's difference
    assert run.report["float_accuracy"] == pytest.approx(np.mean(top1["float"] == labels), abs=tolerance)
    assert run.report["quant_accuracy"] == pytest.approx(np.mean(top1["quant"] == labels), abs=tolerance)
    assert run.report["repaired_accuracy"] == pytest.approx(np.mean(top1["repaired"] == labels), abs=tolerance)
    assert run.report["quant_agreement"] == pytest.approx(np.mean(top1["quant"] == top1["float"]), abs=tolerance)
    assert run.report["repaired_agreement"] == pytest.approx(np.mean(top1["repaired"] == top1["float"]), abs=tolerance)


def test_list_layers(digits: DigitsExample, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fix", "--list-layers", str(digits.float_path), str(digits.quant_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "/fc1/Gemm" in out and "/fc2/Gemm" in out
    assert "64 -> 24" in out and "24 -> 10" in out


def test_layer_rows_stay_on_one_line_in_a_log(
    digits: DigitsExample, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captured output is not a terminal (a CI log, a pipe): rich's 80 columns folded every cell into pieces."""
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["fix", "--list-layers", str(digits.float_path), str(digits.quant_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for layer in ("/fc1/Gemm", "/fc2/Gemm"):
        row = [line for line in lines if line.lstrip("│ ").startswith(layer)]
        assert len(row) == 1, lines
        assert "per-tensor" in row[0] and "(by name)" in row[0] and "yes" in row[0]


def test_list_layers_shows_long_names_in_full(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    names = {}
    for role, source in (("float", digits.float_path), ("quant", digits.quant_path)):
        model = onnx.load(str(source))
        for node in model.graph.node:
            if node.op_type == "Gemm":
                # torch-style names of this length are common: /classifier/classifier.1/Gemm
                node.name = names.setdefault(node.name, f"/model/classifier/head_block{node.name}")
        onnx.save(model, tmp_path / f"{role}.onnx")
    code = main(["fix", "--list-layers", str(tmp_path / "float.onnx"), str(tmp_path / "quant.onnx")])
    out = capsys.readouterr().out
    assert code == 0
    for name in names.values():
        assert name in out


def test_existing_output_needs_force(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "repaired.onnx"
    output.write_bytes(b"keep me")
    args = ["fix", str(digits.float_path), str(digits.quant_path), str(digits.images), "-o", str(output)]
    assert main(args) == 2
    err = words(capsys.readouterr().err)
    assert "--force" in err and "already exists" in err
    assert output.read_bytes() == b"keep me"
    assert main([*args, "--force", "-q"]) == 0
    check_full(onnx.load(str(output)))


def test_output_may_not_overwrite_an_input(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quant = tmp_path / "quant.onnx"
    shutil.copy(digits.quant_path, quant)
    before = quant.read_bytes()
    code = main(["fix", str(digits.float_path), str(quant), str(digits.images), "-o", str(quant), "--force"])
    assert code == 2 and "one of the inputs" in words(capsys.readouterr().err)
    assert quant.read_bytes() == before


def test_default_output_name(digits: DigitsExample, tmp_path: Path) -> None:
    quant = tmp_path / "quant.onnx"
    shutil.copy(digits.quant_path, quant)
    assert main(["fix", str(digits.float_path), str(quant), str(digits.images), "-q"]) == 0
    check_full(onnx.load(str(tmp_path / "quant.repaired.onnx")))


def test_random_metric_is_seeded(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orders = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        folder = tmp_path / name
        folder.mkdir()
        options = ["--metric", "random", "--seed", seed, "--layer", "/fc1/Gemm", "--neurons", "6", "-q"]
        run = fix(digits, folder, capsys, *options)
        assert run.code == 0, run.stderr
        assert run.report["metric"] == "random"
        orders[name] = [entry["neuron"] for entry in run.report["layers"][0]["per_neuron"]]
        assert len(orders[name]) == 6 and all(0 <= n < 24 for n in orders[name])
    assert orders["a"] == orders["b"]
    assert orders["a"] != orders["c"]


def test_console_script(digits: DigitsExample, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "onnxrepair"
    if not script.exists():
        found = shutil.which("onnxrepair")
        assert found, "the onnxrepair console script is not installed"
        script = Path(found)
    output = tmp_path / "out.onnx"
    result = subprocess.run(
        [str(script), "fix", str(digits.float_path), str(digits.quant_path), str(digits.images), "-o", str(output)]
        + ["-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    check_full(onnx.load(str(output)))
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "onnxrepair" in version.stdout


def test_images_argument_required(digits: DigitsExample, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fix", str(digits.float_path), str(digits.quant_path)]) == 2
    assert "IMAGES is missing" in words(capsys.readouterr().err)


@pytest.mark.parametrize("bad", [["--neurons", "0"], ["--metric", "nope"], ["--val", "x", "--val-fraction", "0.5"]])
def test_usage_errors_exit_2(digits: DigitsExample, bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fix", str(digits.float_path), str(digits.quant_path), str(digits.images), *bad])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


# --- bad inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    """Arguments after `fix`, run inside a folder prepared by `prepare_bad_inputs`, and words the error must hold."""

    args: list[str]
    keywords: tuple[str, ...]
    command: str = "fix"


BAD_INPUTS = {
    "missing-float": BadInput(["missing.onnx", "quant.onnx", "imgs"], ("FLOAT", "missing.onnx", "does not exist")),
    "corrupt-onnx": BadInput(["float.onnx", "random.onnx", "imgs"], ("QUANT", "random.onnx")),
    "truncated-onnx": BadInput(["float.onnx", "half.onnx", "imgs"], ("QUANT", "half.onnx")),
    "float-as-quant": BadInput(["float.onnx", "float.onnx", "imgs"], ("QUANT", "not a QDQ model")),
    "empty-folder": BadInput(["float.onnx", "quant.onnx", "nothing_here"], ("nothing_here", "has no images")),
    "labels-name-a-missing-file": BadInput(
        ["float.onnx", "quant.onnx", "loose", "--labels", "missing.csv"], ("missing.csv", "line 3", "9.png")
    ),
    "labels-not-integer": BadInput(
        ["float.onnx", "quant.onnx", "loose", "--labels", "words.csv"], ("words.csv", "'cat'")
    ),
    "labels-file-missing": BadInput(["float.onnx", "quant.onnx", "loose", "--labels", "nope.csv"], ("nope.csv",)),
    "unknown-layer": BadInput(["float.onnx", "quant.onnx", "imgs", "--layer", "nope"], ("'nope'", "/fc2/Gemm")),
    "models-do-not-match": BadInput(["flat.onnx", "quant.onnx", "imgs"], ("different inputs", "[?, 64]")),
    "no-readable-image": BadInput(["float.onnx", "quant.onnx", "broken"], ("broken", "none of its 2 image files")),
    "input-size-unresolved": BadInput(
        ["dynamic_float.onnx", "dynamic_quant.onnx", "imgs"], ("height and width must be fixed", "[?, 1, ?, ?]", ".npz")
    ),
    "saved-preprocessing-unreadable": BadInput(["float.onnx", "odd_quant.onnx", "imgs"], ("odd_quant.onnx",)),
    "crop-smaller-than-model": BadInput(["float.onnx", "quant.onnx", "imgs", "--resize", "4"], ("at least 8",)),
    "bgr-on-greyscale": BadInput(["float.onnx", "quant.onnx", "imgs", "--bgr"], ("--bgr", "3 colour channels")),
    "eval-missing-model": BadInput(["missing.onnx", "imgs"], ("missing.onnx", "does not exist"), command="eval"),
    "eval-against-mismatch": BadInput(
        ["quant.onnx", "imgs", "--against", "flat.onnx"], ("different inputs",), command="eval"
    ),
    "inspect-float-as-quant": BadInput(["float.onnx", "float.onnx", "imgs"], ("not a QDQ model",), command="inspect"),
    "inspect-empty-folder": BadInput(["float.onnx", "quant.onnx", "nothing_here"], ("has no images",), "inspect"),
    "quantize-corrupt-model": BadInput(["random.onnx", "imgs", "-o", "q.onnx"], ("random.onnx",), "quantize"),
    "quantize-output-exists": BadInput(
        ["float.onnx", "imgs", "-o", "quant.onnx"], ("quant.onnx", "already exists", "--force"), "quantize"
    ),
}


def prepare_bad_inputs(digits: DigitsExample, root: Path) -> list[Path]:
    """Write every input the BAD_INPUTS cases refer to into `root`; returns them."""
    shutil.copy(digits.float_path, root / "float.onnx")
    shutil.copy(digits.quant_path, root / "quant.onnx")
    (root / "random.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = digits.quant_path.read_bytes()
    (root / "half.onnx").write_bytes(data[: len(data) // 2])
    # The float model without its Flatten: it takes [N, 64], QUANT takes [N, 1, 8, 8].
    flat = onnx.load(str(digits.float_path))
    del flat.graph.node[0]
    flat.graph.node[0].input[0] = "input"
    flat.graph.input[0].CopyFrom(onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 64]))
    check_full(flat)
    onnx.save(flat, root / "flat.onnx")
    write_pngs(root / "imgs", digits.x[:20], digits.y[:20])
    (root / "nothing_here").mkdir()
    (root / "loose").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "loose" / f"{i}.png")
    (root / "missing.csv").write_text("filename,label\n0.png,1\n9.png,2\n")
    (root / "words.csv").write_text("0.png,cat\n")
    (root / "broken" / "3").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (root / "broken" / "3" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    for role in ("float", "quant"):  # the image size left open: cannot resize images to it
        model = onnx.load(str(root / f"{role}.onnx"))
        for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_param = "size"
        onnx.save(model, root / f"dynamic_{role}.onnx")
    odd = onnx.load(str(root / "quant.onnx"))
    odd.metadata_props.add(key="onnxrepair.preprocessing", value="{not json")
    onnx.save(odd, root / "odd_quant.onnx")
    names = ("float.onnx", "quant.onnx", "random.onnx", "half.onnx", "flat.onnx", "imgs", "loose", "missing.csv")
    names += ("broken", "dynamic_float.onnx", "dynamic_quant.onnx", "odd_quant.onnx")
    return [root / name for name in names]


@pytest.fixture
def bad_input_dir(
    digits: DigitsExample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Callable[[], dict]]:
    inputs = prepare_bad_inputs(digits, tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path, lambda: digest(inputs)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(
    case: str, bad_input_dir: tuple[Path, Callable[[], dict]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, hashes = bad_input_dir
    bad = BAD_INPUTS[case]
    before = hashes()
    code = main([bad.command, *bad.args])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    assert err.startswith("error:") and err.count("error:") == 1
    for keyword in bad.keywords:
        assert keyword in words(err), err
    assert hashes() == before, "an input file changed"
    assert not (root / "quant.repaired.onnx").exists() and not (root / "float.repaired.onnx").exists()
    assert not (root / "q.onnx").exists()


# Rich wraps at the console width (80 columns when stderr is not a terminal) and reads `[...]` as markup:
# every message must still come out as one line.
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_error_is_one_line(
    case: str,
    bad_input_dir: tuple[Path, Callable[[], dict]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # what rich assumes for a pipe or a log file
    assert main([BAD_INPUTS[case].command, *BAD_INPUTS[case].args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("folder", ["images[v2]", "images[/x]"])
def test_error_message_with_brackets(
    folder: str, bad_input_dir: tuple[Path, Callable[[], dict]], capsys: pytest.CaptureFixture[str]
) -> None:
    (bad_input_dir[0] / folder).mkdir(parents=True)  # exists but holds no images ("[/x]" makes two levels)
    assert main(["fix", "float.onnx", "quant.onnx", folder]) == 2
    assert folder in capsys.readouterr().err


def test_missing_float_file_with_long_path_names_the_file(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Whatever the wrapping, the message names the file: read it with the line breaks removed.
    missing = tmp_path / ("a_rather_long_folder_name_" * 3) / "model.onnx"
    assert main(["fix", str(missing), str(digits.quant_path), str(digits.images)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in "".join(err.splitlines())
    assert "FLOAT" in err and "does not exist" in words(err)


def test_quiet_prints_nothing_on_success(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [str(digits.float_path), str(digits.quant_path), str(digits.images)]
    code = main(["fix", *models, "-o", str(tmp_path / "o.onnx"), "-q"])
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and err == ""
    assert os.path.getsize(tmp_path / "o.onnx") > 0


def test_output_path_with_brackets(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs[").mkdir()
    output = tmp_path / "runs[" / "x].onnx"  # the path text holds "[/x]"
    assert main(["fix", str(digits.float_path), str(digits.quant_path), str(digits.images), "-o", str(output)]) == 0
    assert str(output) in words(capsys.readouterr().out)


@pytest.mark.parametrize("command", ["quantize", "inspect", "fix", "eval"])
def test_every_command_documents_examples_exit_codes_and_verbosity(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0
    assert "examples:" in text and f"onnxrepair {command}" in text.split("examples:")[1]
    assert "exit codes:" in text and "2 bad input" in text
    for flag in ("--quiet", "--verbose", "--debug", "--preprocess", "--resize", "--bgr"):
        assert flag in text


def test_quiet_and_verbose_for_every_command(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models, images = [str(digits.float_path), str(digits.quant_path)], str(digits.validation)
    runs = {
        "quantize": [str(digits.float_path), images, "-o", str(tmp_path / "q.onnx"), "--calibration-size", "16"],
        "inspect": [*models, images],
        "eval": [str(digits.quant_path), images, "--against", str(digits.float_path)],
    }
    for command, args in runs.items():
        assert main([command, *args, "-q", "--force"] if command == "quantize" else [command, *args, "-q"]) == 0
        out, err = capsys.readouterr()
        assert out == "" and err == "", command
        assert main([command, *args, "--force"] if command == "quantize" else [command, *args]) == 0
        out, err = capsys.readouterr()
        assert "preprocessing:" in out and "INFO" not in err, command
        assert main([command, *args, "--force", "-v"] if command == "quantize" else [command, *args, "-v"]) == 0
        out, err = capsys.readouterr()
        assert "preprocessing:" in out and "images decoded" in words(err) and "nodes, opsets" in words(err), command


def test_an_undecodable_image_is_skipped_warned_and_counted(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    shutil.copytree(digits.images, images)
    (images / "3" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"half a file")
    run = fix(digits, tmp_path, capsys, "--neurons", "2", "--jobs", "1")
    assert run.code == 0  # the run used digits.images: nothing skipped
    assert run.report["skipped_images"] == [] and "skipped" not in run.stdout
    models = [str(digits.float_path), str(digits.quant_path), str(images)]
    report = tmp_path / "skipped.json"
    assert main(["fix", *models, "-o", str(tmp_path / "s.onnx"), "--report", str(report), "--neurons", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(report.read_text())["skipped_images"] == [str(images / "3" / "cut.png")]
    assert "(1 undecodable file(s) skipped)" in words(out)
    assert "cut.png" in words(err) and "skipped 1 file(s)" in words(err)


@pytest.mark.parametrize("where", ["during the repair", "while the output is renamed into place"])
def test_ctrl_c_exits_130_and_leaves_no_file(
    digits: DigitsExample,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    import onnxrepair.api
    import onnxrepair.files

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if where == "during the repair":
        monkeypatch.setattr(onnxrepair.api, "repair", interrupt)
    else:
        monkeypatch.setattr(onnxrepair.files.os, "replace", interrupt)
    output = tmp_path / "out" / "repaired.onnx"
    output.parent.mkdir()
    models = [str(digits.float_path), str(digits.quant_path), str(digits.images)]
    before = digest([digits.float_path, digits.quant_path, digits.images])
    assert main(["fix", *models, "-o", str(output), "--neurons", "2", "--jobs", "1"]) == 130
    assert "interrupted; no output was written" in capsys.readouterr().err
    assert list(output.parent.iterdir()) == []  # neither the model nor a temporary file
    assert digest([digits.float_path, digits.quant_path, digits.images]) == before
