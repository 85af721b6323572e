"""Flat image folders, with or without a labels CSV (issue 5, item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DigitsExample, write_pngs
from helpers_issue3 import run_fix

from onnxrepair.data import Preprocessing, load_image_folder, read_labels_file
from onnxrepair.errors import DataError

GREY = Preprocessing(layout="NCHW", channels=1, height=8, width=8, mean=(0.0,), std=(1.0,))


def flatten(classes: Path, flat: Path) -> dict[str, int]:
    """Copy class-folder PNGs into one folder as <class>_<name>; returns name -> label."""
    flat.mkdir()
    labels = {}
    for path in sorted(classes.glob("*/*.png")):
        name = f"{path.parent.name}_{path.name}"
        shutil.copy(path, flat / name)
        labels[name] = int(path.parent.name)
    return labels


def test_flat_folder_with_labels_matches_the_class_folders(digits: DigitsExample, tmp_path: Path) -> None:
    write_pngs(tmp_path / "classes", digits.x[:40], digits.y[:40])
    labels = flatten(tmp_path / "classes", tmp_path / "flat")
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\n" + "".join(f"{name},{label}\n" for name, label in labels.items()))
    flat = load_image_folder(tmp_path / "flat", GREY, labels_file=csv)
    by_class = load_image_folder(tmp_path / "classes", GREY)
    assert len(flat) == len(by_class) == 40
    got = {Path(p).name: (int(y), x.tobytes()) for p, y, x in zip(flat.paths, flat.labels, flat.x, strict=True)}
    for p, y, x in zip(by_class.paths, by_class.labels, by_class.x, strict=True):
        name = f"{Path(p).parent.name}_{Path(p).name}"
        assert got[name] == (int(by_class.class_names[y]), x.tobytes())


def test_flat_folder_without_labels_is_unlabelled(digits: DigitsExample, tmp_path: Path) -> None:
    write_pngs(tmp_path / "classes", digits.x[:12], digits.y[:12])
    flatten(tmp_path / "classes", tmp_path / "flat")
    images = load_image_folder(tmp_path / "flat", GREY)
    assert len(images) == 12 and images.labels is None


def test_images_without_a_row_are_left_out(digits: DigitsExample, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    write_pngs(tmp_path / "classes", digits.x[:6], digits.y[:6])
    labels = flatten(tmp_path / "classes", tmp_path / "flat")
    first = sorted(labels)[0]
    (tmp_path / "one.csv").write_text(f"{first},{labels[first]}\n")
    images = load_image_folder(tmp_path / "flat", GREY, labels_file=tmp_path / "one.csv")
    assert [Path(p).name for p in images.paths] == [first] and images.labels.tolist() == [labels[first]]
    assert "5 image(s) have no row" in caplog.text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a.png,1\nb.png,two\n", "line 2: label 'two' of b.png is not an integer"),
        ("a.png,1,extra\n", "expected 'filename,label'"),
        ("a.png,-1\n", "negative"),
        ("c.png,1\n", "c.png is not a file"),
        ("filename,label\n", "has no rows"),
    ],
)
def test_bad_labels_files(tmp_path: Path, text: str, words: str) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=words):
        read_labels_file(tmp_path / "labels.csv", tmp_path)


def test_cli_on_a_flat_unlabelled_folder(digits: DigitsExample, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    write_pngs(tmp_path / "classes", digits.x[:300], digits.y[:300])
    flatten(tmp_path / "classes", tmp_path / "flat")
    output = tmp_path / "out.onnx"
    run = run_fix(
        capsys, digits.float_path, digits.quant_path, tmp_path / "flat", "-o", output, "-q", report=tmp_path / "r.json"
    )
    assert run.code == 0, run.err
    report = run.report
    assert report["float_accuracy"] is None and report["repaired_accuracy"] is None
    assert 0.0 <= report["quant_agreement"] <= 1.0 and report["repaired_agreement"] is not None
    assert report["validation_size"] + report["repair_size"] == 300
    assert np.isfinite(report["total_seconds"])


# ---------------------------------------------------------------------------
# --preprocess presets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "black", "white_red"),
    [("unit", 0.0, 1.0), ("inception", -1.0, 1.0), ("raw", 0.0, 255.0), ("imagenet", -0.485 / 0.229, 0.515 / 0.229)],
)
def test_presets_map_pixels(tmp_path: Path, preset: str, black: float, white_red: float) -> None:
    from PIL import Image

    from onnxrepair.data import load_image, preprocessing_for_input

    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[0, 0] = 255
    Image.fromarray(pixels).save(tmp_path / "p.png")
    prep = preprocessing_for_input("input", [None, 3, 4, 4], preset=preset)
    x = load_image(tmp_path / "p.png", prep)
    assert x.shape == (3, 4, 4)
    assert x[0, 0, 0] == pytest.approx(white_red, rel=1e-5)
    assert x[0, 1, 1] == pytest.approx(black, rel=1e-5, abs=1e-6)


def test_mean_and_std_override_the_preset() -> None:
    from onnxrepair.data import preprocessing_for_input

    prep = preprocessing_for_input("input", [None, 3, 4, 4], mean=[0.1], std=None, preset="inception")
    assert prep.mean == (0.1, 0.1, 0.1) and prep.std == (0.5, 0.5, 0.5)


def test_cli_imagenet_preset_on_a_greyscale_model_exits_2(digits: DigitsExample, capsys) -> None:  # type: ignore[no-untyped-def]
    from helpers_issue3 import one_line

    run = run_fix(capsys, digits.float_path, digits.quant_path, digits.images, "--preprocess", "imagenet")
    assert run.code == 2 and one_line(run.err) and "greyscale" in run.err
