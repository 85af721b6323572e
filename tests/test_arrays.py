""".npz / .npy inputs: data.load_array_file and the CLI with array files instead of image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample
from helpers_issue3 import one_line, run_fix, top1

from onnxrepair.cli import main
from onnxrepair.data import is_array_file, load_array_file, stratified_split
from onnxrepair.errors import DataError

SHAPE = (None, 1, 8, 8)  # the digits models' input


def test_is_array_file() -> None:
    assert is_array_file(Path("a.npz")) and is_array_file(Path("b.NPY"))
    assert not is_array_file(Path("images")) and not is_array_file(Path("a.npz.png"))


def test_npz_with_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 8, 8)).astype(np.float64)
    y = np.arange(12) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    images = load_array_file(tmp_path / "d.npz", SHAPE)
    assert images.x.dtype == np.float32 and images.x.shape == (12, 1, 8, 8)
    np.testing.assert_array_equal(images.x, x.astype(np.float32))  # used as they are: no scaling
    assert images.labels is not None and images.labels.dtype == np.int64
    np.testing.assert_array_equal(images.labels, y)
    assert images.class_names == ("0", "1", "2")
    assert len(images) == 12 and len(set(images.paths)) == 12


def test_compressed_npz_and_integer_pixels(tmp_path: Path) -> None:
    x = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.array([1, 0], np.int32))
    images = load_array_file(tmp_path / "d.npz", SHAPE)
    assert images.x.dtype == np.float32
    assert images.x.max() == 127.0  # not divided by 255
    np.testing.assert_array_equal(images.labels, [1, 0])


def test_npz_without_labels_and_npy(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    np.save(tmp_path / "d.npy", x)
    for name in ("d.npz", "d.npy"):
        images = load_array_file(tmp_path / name, SHAPE)
        assert images.labels is None
        assert images.x.shape == (4, 1, 8, 8)
        np.testing.assert_array_equal(images.strata, np.zeros(4))  # one stratum for the splits


def test_float32_npy_is_memory_mapped_read_only(tmp_path: Path) -> None:
    """Large sets are read batch by batch from disk, and the file can never be written through the set."""
    x = np.random.default_rng(0).random((5, 1, 4, 4), dtype=np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    before = path.read_bytes()
    images = load_array_file(path, [None, 1, 4, 4])
    assert isinstance(images.x, np.memmap) and not images.x.flags.writeable
    np.testing.assert_array_equal(images.x, x)
    assert path.read_bytes() == before
    doubles = tmp_path / "x64.npy"
    np.save(doubles, x.astype(np.float64))
    converted = load_array_file(doubles, [None, 1, 4, 4]).x
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, x)


def test_dynamic_dimensions_accept_any_size(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((3, 1, 5, 7), np.float32))
    assert load_array_file(tmp_path / "d.npy", (None, 1, None, None)).x.shape == (3, 1, 5, 7)


@pytest.mark.parametrize(
    ("shape", "shown"),
    [((5, 64), "[5, 64]"), ((5, 1, 8, 9), "[5, 1, 8, 9]"), ((5, 8, 8, 1), "[5, 8, 8, 1]"), ((64,), "[64]")],
)
def test_wrong_shape_names_both_shapes(tmp_path: Path, shape: tuple[int, ...], shown: str) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros(shape, np.float32), y=np.zeros(shape[0], np.int64))
    with pytest.raises(DataError) as exc:
        load_array_file(tmp_path / "d.npz", SHAPE)
    message = str(exc.value)
    assert shown in message and "[N, 1, 8, 8]" in message and "d.npz" in message


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"inputs": np.zeros((2, 1, 8, 8))}, "no array named 'x'"),
        ({"x": np.zeros((2, 1, 8, 8)), "y": np.zeros(3, np.int64)}, "one integer label per row"),
        ({"x": np.zeros((2, 1, 8, 8)), "y": np.zeros(2, np.float32)}, "one integer label per row"),
        ({"x": np.zeros((2, 1, 8, 8)), "y": np.zeros((2, 1), np.int64)}, "one integer label per row"),
        ({"x": np.zeros((0, 1, 8, 8))}, "holds no inputs"),
    ],
)
def test_bad_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], words: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=words):
        load_array_file(tmp_path / "d.npz", SHAPE)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_array_file(tmp_path / "nope.npz", SHAPE)


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable"):
        load_array_file(tmp_path / "d.npy", SHAPE)


def good_npz_bytes(tmp_path: Path) -> bytes:
    np.savez(tmp_path / "good.npz", x=np.zeros((5, 1, 8, 8), np.float32), y=np.arange(5))
    return (tmp_path / "good.npz").read_bytes()


def corrupt(kind: str, tmp_path: Path) -> Path:
    raw = good_npz_bytes(tmp_path)
    data = {
        "garbage": b"this is not a numpy file at all",
        "empty": b"",
        "truncated-npy": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (5, 1, 8, 8), }",
        "truncated-zip": raw[: len(raw) // 2],
        "bad-crc": raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:],
    }[kind]
    path = tmp_path / ("d.npy" if kind.endswith("npy") else "d.npz")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated-npy"])
def test_corrupt_files_raise_data_error(tmp_path: Path, kind: str) -> None:
    with pytest.raises(DataError, match="not a readable"):
        load_array_file(corrupt(kind, tmp_path), SHAPE)


@pytest.mark.parametrize("kind", ["truncated-zip", "bad-crc"])
def test_damaged_zip_raises_data_error(tmp_path: Path, kind: str) -> None:
    """A .npz is a zip: a truncated or damaged one raises zipfile.BadZipFile inside numpy (was a traceback)."""
    with pytest.raises(DataError, match="not a readable"):
        load_array_file(corrupt(kind, tmp_path), SHAPE)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_with_npz_images_and_npz_val(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    np.savez(tmp_path / "repair.npz", x=digits.x[:200], y=digits.y[:200])
    np.savez(tmp_path / "val.npz", x=digits.x[200:300], y=digits.y[200:300])
    run = run_fix(
        capsys,
        digits.float_path,
        digits.quant_path,
        tmp_path / "repair.npz",
        "--val",
        tmp_path / "val.npz",
        "-o",
        tmp_path / "r.onnx",
        "--encoding",
        "bias-correction",
        "-q",
        report=tmp_path / "report.json",
    )
    assert run.code == 0, run.err
    report = run.report
    assert report["repair_size"] == 200 and report["validation_size"] == 100
    assert report["preprocessing"] == "arrays from .npz/.npy used as they are"
    float_model = onnx.load(str(digits.float_path))
    quant_model = onnx.load(str(digits.quant_path))
    x_val, y_val = digits.x[200:300], digits.y[200:300]
    assert report["float_accuracy"] == pytest.approx(np.mean(top1(float_model, x_val) == y_val), abs=0.015)
    assert report["quant_agreement"] == pytest.approx(
        np.mean(top1(quant_model, x_val) == top1(float_model, x_val)), abs=0.015
    )


def test_cli_npy_without_labels_reports_agreement_only(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    x = digits.x[:250]
    np.save(tmp_path / "repair.npy", x)
    run = run_fix(
        capsys,
        digits.float_path,
        digits.quant_path,
        tmp_path / "repair.npy",
        "-o",
        tmp_path / "r.onnx",
        "--encoding",
        "soft",
        "--neurons",
        "3",
        "-q",
        report=tmp_path / "report.json",
    )
    assert run.code == 0, run.err
    report = run.report
    for key in ("float_accuracy", "quant_accuracy", "repaired_accuracy"):
        assert report[key] is None, key
    for key in ("quant_agreement", "repaired_agreement"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, key
    # the validation part, recomputed: one stratum, 20 %, seed 0
    _, val_idx = stratified_split(np.zeros(len(x), np.int64), 0.2, 0)
    assert report["validation_size"] == len(val_idx) and report["repair_size"] == len(x) - len(val_idx)
    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    expected = np.mean(top1(quant_model, x[val_idx]) == top1(float_model, x[val_idx]))
    assert report["quant_agreement"] == pytest.approx(expected, abs=1.5 / len(val_idx))


@pytest.mark.parametrize("kind", ["garbage", "empty"])
def test_cli_corrupt_npz_exits_2_with_one_line(
    digits: DigitsExample,
    tmp_path: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    run = run_fix(capsys, digits.float_path, digits.quant_path, corrupt(kind, tmp_path), "-o", tmp_path / "r.onnx")
    assert run.code == 2
    assert one_line(run.err), run.err
    assert not (tmp_path / "r.onnx").exists()


def test_cli_truncated_npz_exits_2_with_one_line(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_fix(
        capsys, digits.float_path, digits.quant_path, corrupt("truncated-zip", tmp_path), "-o", tmp_path / "r.onnx"
    )
    assert run.code == 2 and one_line(run.err)


def test_cli_wrong_shape_exits_2_naming_it(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    np.savez(tmp_path / "flat.npz", x=digits.x[:20].reshape(20, 64), y=digits.y[:20])
    run = run_fix(capsys, digits.float_path, digits.quant_path, tmp_path / "flat.npz", "-o", tmp_path / "r.onnx")
    assert run.code == 2
    assert one_line(run.err), run.err
    assert "[20, 64]" in run.err and "[N, 1, 8, 8]" in run.err


def test_image_options_with_arrays_warn_that_they_do_nothing(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "val.npz", x=digits.x[:40], y=digits.y[:40])
    assert main(["eval", str(digits.quant_path), str(tmp_path / "val.npz"), "--resize", "crop", "--bgr"]) == 0
    out, err = capsys.readouterr()
    assert "arrays from .npz/.npy used as they are" in out
    assert "--resize, --bgr apply to image files" in " ".join(err.split())
    assert main(["eval", str(digits.quant_path), str(tmp_path / "val.npz")]) == 0
    assert "apply to image files" not in capsys.readouterr().err
