"""--resize, --bgr, image modes, and the preprocessing saved in the models onnxrepair writes (issue 5, item 1)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DigitsExample
from helpers_issue3 import one_line
from PIL import Image

from onnxrepair.cli import main
from onnxrepair.data import (
    PreprocessingOptions,
    load_image,
    options_from_saved,
    preprocessing_for_input,
    preprocessing_from_options,
)
from onnxrepair.errors import DataError
from onnxrepair.graph import PREPROCESSING_KEY, saved_preprocessing


def ramp(width: int, height: int) -> np.ndarray:
    """An RGB image whose red channel is the column index and green the row index (distinct, croppable)."""
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([columns, rows, np.full_like(rows, 200)], axis=-1).astype(np.uint8)


def test_crop_takes_the_centre_without_scaling_when_the_shorter_side_fits(tmp_path: Path) -> None:
    Image.fromarray(ramp(60, 20)).save(tmp_path / "wide.png")
    prep = preprocessing_for_input("x", (1, 3, 20, 20), resize="crop")
    x = load_image(tmp_path / "wide.png", prep)
    assert x.shape == (3, 20, 20)
    # columns 20..39 of 60 are the centre; red holds the column index
    np.testing.assert_allclose(x[0, 0] * 255, np.arange(20, 40), atol=1e-4)
    np.testing.assert_allclose(x[1, :, 0] * 255, np.arange(20), atol=1e-4)


def test_crop_scales_the_shorter_side_to_cover(tmp_path: Path) -> None:
    Image.fromarray(ramp(20, 10)).save(tmp_path / "small.png")
    prep = preprocessing_for_input("x", (1, 10, 10, 3), resize="crop")  # NHWC
    expected = np.asarray(Image.fromarray(ramp(20, 10)).resize((20, 10)))[:, 5:15]  # no scaling: 10 covers 10
    np.testing.assert_allclose(load_image(tmp_path / "small.png", prep) * 255, expected, atol=1e-3)
    prep = preprocessing_for_input("x", (1, 20, 20, 3), resize="crop")
    scaled = np.asarray(Image.fromarray(ramp(20, 10)).resize((40, 20), Image.Resampling.BILINEAR))[:, 10:30]
    np.testing.assert_allclose(load_image(tmp_path / "small.png", prep) * 255, scaled, atol=1e-3)


def test_shorter_side_then_centre_crop_like_torchvision(tmp_path: Path) -> None:
    Image.fromarray(ramp(64, 32)).save(tmp_path / "img.png")
    prep = preprocessing_for_input("x", (1, 3, 24, 24), resize="crop", shorter_side=32)
    expected = np.asarray(Image.fromarray(ramp(64, 32)))[4:28, 20:44].transpose(2, 0, 1) / 255
    np.testing.assert_allclose(load_image(tmp_path / "img.png", prep), expected, atol=1e-6)
    # torchvision's arithmetic where it differs from plain rounding: the longer side truncated (1000 * 256 / 746
    # = 343.16 -> 343), the crop offset int(round(margin / 2)) with an odd margin (343 - 224 = 119 -> 60)
    Image.fromarray(ramp(250, 250)).resize((1000, 746)).save(tmp_path / "photo.png")
    prep = preprocessing_for_input("x", (1, 3, 224, 224), resize="crop", shorter_side=256)
    scaled = Image.open(tmp_path / "photo.png").convert("RGB").resize((343, 256), Image.Resampling.BILINEAR)
    expected = np.asarray(scaled)[16:240, 60:284].transpose(2, 0, 1) / 255
    np.testing.assert_allclose(load_image(tmp_path / "photo.png", prep), expected, atol=1e-6)
    with pytest.raises(DataError, match="at least 24"):
        preprocessing_for_input("x", (1, 3, 24, 24), resize="crop", shorter_side=16)


def test_stretch_ignores_the_aspect_ratio(tmp_path: Path) -> None:
    Image.fromarray(ramp(60, 20)).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", preprocessing_for_input("x", (1, 3, 20, 20)))
    assert x[0, 0, 0] * 255 < 3 and x[0, 0, -1] * 255 > 56  # the whole width is squeezed in


def test_bgr_reverses_channels_and_the_presets_mean(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = 255, 51  # red 1.0, blue 0.2
    Image.fromarray(pixels).save(tmp_path / "red.png")
    rgb = preprocessing_for_input("x", (1, 3, 4, 4), preset="imagenet")
    bgr = preprocessing_for_input("x", (1, 3, 4, 4), preset="imagenet", bgr=True)
    assert bgr.mean == rgb.mean[::-1] and bgr.std == rgb.std[::-1]
    np.testing.assert_allclose(load_image(tmp_path / "red.png", bgr), load_image(tmp_path / "red.png", rgb)[::-1])
    # an explicit --mean is in the model's channel order: not reversed
    assert preprocessing_for_input("x", (1, 3, 4, 4), mean=[1, 2, 3], bgr=True).mean == (1, 2, 3)
    with pytest.raises(DataError, match="3 colour channels"):
        preprocessing_for_input("x", (1, 1, 4, 4), bgr=True)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("RGBA", ".png"), ("RGBA", ".webp"), ("LA", ".png"), ("P", ".png"), ("P", ".bmp"), ("CMYK", ".jpg")]
    + [("1", ".png"), ("I;16", ".png"), ("L", ".jpg"), ("RGB", ".bmp"), ("F", ".tiff")],
)
def test_every_common_mode_becomes_rgb_and_greyscale(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    Image.fromarray(ramp(8, 8)).convert(mode).save(path)
    for shape in ((1, 3, 8, 8), (1, 1, 8, 8)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. PIL's warning about dropping a palette's transparency
            x = load_image(path, preprocessing_for_input("x", shape))
        assert x.shape == shape[1:] and x.dtype == np.float32 and np.isfinite(x).all()
        assert 0 <= x.min() and x.max() <= 1


def test_palette_with_transparency_keeps_its_colours(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = load_image(tmp_path / "p.png", preprocessing_for_input("x", (1, 3, 4, 4)))
    np.testing.assert_allclose(x[:, 0, 0], [1, 0, 0])


def test_saved_options_round_trip() -> None:
    prep = preprocessing_for_input("x", (1, 3, 8, 8), preset="imagenet", resize="crop", shorter_side=10, bgr=True)
    again = preprocessing_from_options("x", (1, 3, 8, 8), options_from_saved(prep.saved_options(), "m.onnx"))
    assert again == prep
    with pytest.raises(DataError, match="m.onnx"):
        options_from_saved('{"mean": [0]}', "m.onnx")
    assert PreprocessingOptions() == PreprocessingOptions(preset="unit", resize="stretch", bgr=False)


def _prep_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("preprocessing:"))


def test_quantize_saves_the_preprocessing_and_eval_and_fix_reuse_it(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quant = tmp_path / "quant.onnx"
    chosen = ["--mean", "0.1", "--std", "0.9", "--resize", "crop"]
    code = main(["quantize", str(digits.float_path), str(digits.images), "-o", str(quant), *chosen, "-q"])
    assert code == 0
    saved = saved_preprocessing(onnx.load(str(quant)))
    assert saved is not None and '"mean": [0.1]' in saved and '"resize": "crop"' in saved
    assert saved_preprocessing(onnx.load(str(digits.float_path))) is None  # the input is not touched

    # eval of the quantized model without options: the saved ones, said so
    assert main(["eval", str(quant), str(digits.validation), "--report", str(tmp_path / "a.json")]) == 0
    line = _prep_line(capsys.readouterr().out)
    assert "mean=[0.1]" in line and "std=[0.9]" in line and f"saved in {quant}" in line
    # given options win over the saved ones
    assert main(["eval", str(quant), str(digits.validation), "--preprocess", "unit"]) == 0
    line = _prep_line(capsys.readouterr().out)
    assert "mean=[0.0]" in line and "saved" not in line
    # the eval scores really differ with the preprocessing: the saved one is used, not just printed
    code = main(["eval", str(quant), str(digits.validation), "--report", str(tmp_path / "b.json"), *chosen])
    assert code == 0
    capsys.readouterr()
    a, b = (onnx_json(tmp_path / n) for n in ("a.json", "b.json"))
    assert a["accuracy"] == b["accuracy"] and a["preprocessing"].startswith(b["preprocessing"])

    # fix on the quantized model reads images the same way and saves it in the repaired model
    repaired = tmp_path / "repaired.onnx"
    code = main(
        ["fix", str(digits.float_path), str(quant), str(digits.images), "-o", str(repaired), "--jobs", "1"]
        + ["--neurons", "2", "--val", str(digits.validation)]
    )
    assert code == 0
    assert f"saved in {quant}" in _prep_line(capsys.readouterr().out)
    assert saved_preprocessing(onnx.load(str(repaired))) == saved


def onnx_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_unreadable_saved_preprocessing_is_one_clear_error(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = onnx.load(str(digits.quant_path))
    model.metadata_props.add(key=PREPROCESSING_KEY, value="{not json")
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    code = main(["eval", str(path), str(digits.validation)])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and str(path) in err and "--preprocess" in err


@pytest.mark.parametrize("value", ["squash", "0", "-3"])
def test_bad_resize_values_exit_2(digits: DigitsExample, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(digits.quant_path), str(digits.validation), "--resize", value])
    assert stop.value.code == 2 and "--resize" in capsys.readouterr().err
