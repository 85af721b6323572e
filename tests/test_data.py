"""data.py: preprocessing from the input shape, image folders, and the stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from onnxrepair.data import (
    ImageSet,
    Preprocessing,
    list_class_images,
    load_image_folder,
    preprocessing_for_input,
    stratified_split,
)
from onnxrepair.errors import DataError

GREY = Preprocessing("NCHW", 1, 4, 4)


@pytest.mark.parametrize(
    ("shape", "layout", "channels", "height", "width"),
    [
        ((None, 1, 28, 28), "NCHW", 1, 28, 28),
        ((None, 3, 224, 200), "NCHW", 3, 224, 200),
        ((1, 3, 32, 32), "NCHW", 3, 32, 32),
        ((None, 28, 28, 1), "NHWC", 1, 28, 28),
        ((None, 224, 200, 3), "NHWC", 3, 224, 200),
    ],
)
def test_preprocessing_layouts(shape: tuple, layout: str, channels: int, height: int, width: int) -> None:
    prep = preprocessing_for_input("input", shape)
    assert (prep.layout, prep.channels, prep.height, prep.width) == (layout, channels, height, width)
    assert prep.mean == (0.0,) * channels and prep.std == (1.0,) * channels


def test_preprocessing_mean_std() -> None:
    prep = preprocessing_for_input("input", (None, 3, 8, 8), mean=[0.5], std=[0.1, 0.2, 0.3])
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.1, 0.2, 0.3)
    with pytest.raises(DataError, match="--mean"):
        preprocessing_for_input("input", (None, 3, 8, 8), mean=[0.1, 0.2])
    with pytest.raises(DataError, match="--std"):
        preprocessing_for_input("input", (None, 1, 8, 8), std=[0.0])


@pytest.mark.parametrize(
    "shape", [(None, 1, None, None), (None, 3, None, 32), (None, None, None, 3), (None, 28, None, 1)]
)
def test_preprocessing_refuses_dynamic_height_width(shape: tuple) -> None:
    with pytest.raises(DataError, match="height and width") as info:
        preprocessing_for_input("pixels", shape)
    assert "'pixels'" in str(info.value) and "?" in str(info.value)


@pytest.mark.parametrize("shape", [(None, 64), (None, 8, 8), (None, 1, 8, 8, 1)])
def test_preprocessing_refuses_non_image_inputs(shape: tuple) -> None:
    with pytest.raises(DataError, match="4-D"):
        preprocessing_for_input("input", shape)


def test_preprocessing_refuses_unknown_channel_axis() -> None:
    with pytest.raises(DataError, match="colour channels"):
        preprocessing_for_input("input", (None, 5, 8, 8))


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def grey(value: int, size: tuple[int, int] = (4, 4)) -> Image.Image:
    return Image.new("L", size, value)


def test_classes_in_sorted_order(tmp_path: Path) -> None:
    # Created in another order; the labels follow the sorted folder names: cat=0, dog=1, zebra=2.
    for cls, value in (("zebra", 200), ("cat", 0), ("dog", 100)):
        for i in range(2):
            save(tmp_path / cls / f"{i}.png", grey(value))
    images = load_image_folder(tmp_path, GREY)
    assert images.class_names == ("cat", "dog", "zebra")
    assert images.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # The pixel values prove which file went with which label.
    np.testing.assert_allclose(images.x[:, 0, 0, 0], [0, 0, 100 / 255, 100 / 255, 200 / 255, 200 / 255], atol=1e-7)
    assert images.x.shape == (6, 1, 4, 4) and images.x.dtype == np.float32
    assert [Path(p).parent.name for p in images.paths] == ["cat", "cat", "dog", "dog", "zebra", "zebra"]
    assert images.skipped == ()


def test_numeric_class_folders_sort_as_text(tmp_path: Path) -> None:
    # ImageFolder semantics: '10' sorts before '2'.
    for cls in ("2", "10", "1"):
        save(tmp_path / cls / "a.png", grey(0))
    assert load_image_folder(tmp_path, GREY).class_names == ("1", "10", "2")


def test_rgb_and_palette_pngs_become_greyscale(tmp_path: Path) -> None:
    save(tmp_path / "a" / "rgb.png", Image.new("RGB", (4, 4), (255, 0, 0)))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 1 = pure blue
    save(tmp_path / "a" / "palette.png", palette)
    save(tmp_path / "b" / "rgba.png", Image.new("RGBA", (4, 4), (0, 255, 0, 255)))
    images = load_image_folder(tmp_path, GREY)
    assert Image.open(tmp_path / "a" / "palette.png").mode == "P"
    # ITU-R 601 luma: L = 0.299 R + 0.587 G + 0.114 B, to within one 8-bit step
    by_name = {Path(p).name: x for p, x in zip(images.paths, images.x, strict=True)}
    assert by_name["rgb.png"].shape == (1, 4, 4)
    np.testing.assert_allclose(by_name["rgb.png"], 0.299, atol=1 / 255)
    np.testing.assert_allclose(by_name["palette.png"], 0.114, atol=1 / 255)
    np.testing.assert_allclose(by_name["rgba.png"], 0.587, atol=1 / 255)


def test_greyscale_for_rgb_model_nhwc_and_resize(tmp_path: Path) -> None:
    save(tmp_path / "a" / "g.png", grey(51, size=(16, 12)))  # 51/255 = 0.2, any size is resized
    prep = Preprocessing("NHWC", 3, 6, 5, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    images = load_image_folder(tmp_path, prep)
    assert images.x.shape == (1, 6, 5, 3)
    # (0.2 - mean) / std per channel
    np.testing.assert_allclose(images.x[0, 2, 2], [(0.2 - 0.1) / 0.5, 0.0, (0.2 - 0.3) / 0.5], atol=1e-6)


def test_nchw_channel_order(tmp_path: Path) -> None:
    save(tmp_path / "a" / "c.png", Image.new("RGB", (3, 2), (255, 0, 51)))
    images = load_image_folder(tmp_path, Preprocessing("NCHW", 3, 2, 3))
    assert images.x.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(images.x[0, :, 1, 2], [1.0, 0.0, 0.2], atol=1e-6)


def test_corrupt_file_is_skipped(tmp_path: Path) -> None:
    save(tmp_path / "a" / "good.png", grey(10))
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png at all")
    save(tmp_path / "b" / "good.png", grey(20))
    truncated = tmp_path / "b" / "truncated.png"
    save(tmp_path / "b" / "full.png", grey(30, size=(64, 64)))
    truncated.write_bytes((tmp_path / "b" / "full.png").read_bytes()[:40])
    (tmp_path / "b" / "full.png").unlink()
    calls = []
    images = load_image_folder(tmp_path, GREY, advance=calls.append)
    assert sorted(Path(p).name for p in images.skipped) == ["bad.png", "truncated.png"]
    assert str(tmp_path / "a" / "bad.png") in images.skipped
    assert len(images) == 2 and images.labels.tolist() == [0, 1]
    assert all("good" in p for p in images.paths)
    assert sum(calls) == 4  # progress counts every file, decoded or not


def test_many_corrupt_files_are_counted_and_only_the_first_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(tmp_path / "a" / "good.png", grey(10))
    for i in range(8):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"not a png at all")
    with caplog.at_level("WARNING"):
        images = load_image_folder(tmp_path, GREY)
    assert len(images) == 1 and len(images.skipped) == 8
    named = [r for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(named) == 5 and any("skipped 8 file(s)" in r.getMessage() for r in caplog.records)


def test_only_corrupt_files_raise(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="none of its 2 image files"):
        load_image_folder(tmp_path, GREY)


def test_non_image_files_are_ignored(tmp_path: Path) -> None:
    save(tmp_path / "a" / "x.PNG", grey(0))
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "README.md").write_text("top level")
    images = load_image_folder(tmp_path, GREY)
    assert [Path(p).name for p in images.paths] == ["x.PNG"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_class_images(tmp_path / "missing")
    file = tmp_path / "file.png"
    save(file, grey(0))
    with pytest.raises(DataError, match="not a folder"):
        list_class_images(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no images"):
        list_class_images(empty)
    loose = tmp_path / "loose"
    save(loose / "a.png", grey(0))
    with pytest.raises(DataError, match="subfolder per class"):
        list_class_images(loose)


def test_validation_folder_uses_repair_class_names(tmp_path: Path) -> None:
    save(tmp_path / "val" / "b" / "x.png", grey(0))
    images = load_image_folder(tmp_path / "val", GREY, class_names=("a", "b", "c"))
    assert images.labels.tolist() == [1] and images.class_names == ("a", "b", "c")
    save(tmp_path / "val" / "d" / "x.png", grey(0))
    with pytest.raises(DataError, match="'d'"):
        load_image_folder(tmp_path / "val", GREY, class_names=("a", "b", "c"))


def test_subset_keeps_order(tmp_path: Path) -> None:
    for i in range(4):
        save(tmp_path / "a" / f"{i}.png", grey(i * 50))
    images = load_image_folder(tmp_path, GREY)
    part = images.subset(np.array([3, 1]))
    assert isinstance(part, ImageSet) and len(part) == 2
    np.testing.assert_array_equal(part.x, images.x[[3, 1]])
    assert part.paths == (images.paths[3], images.paths[1])


def test_16_bit_png_is_scaled(tmp_path: Path) -> None:
    pixels = np.full((4, 4), 32768, dtype=np.uint16)  # half of the 16-bit range
    save(tmp_path / "a" / "deep.png", Image.fromarray(pixels))
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I;16")
    images = load_image_folder(tmp_path, GREY)
    np.testing.assert_allclose(images.x, 0.5, atol=1 / 255)


def labels_10_classes() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 10, size=500)


def test_stratified_split_is_a_partition() -> None:
    labels = labels_10_classes()
    repair, val = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(repair, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([repair, val])), np.arange(len(labels)))
    assert repair.dtype == val.dtype == np.int64
    assert np.all(np.diff(repair) > 0) and np.all(np.diff(val) > 0)


def test_stratified_split_is_stratified() -> None:
    labels = labels_10_classes()
    _, val = stratified_split(labels, 0.2, seed=0)
    for cls in range(10):
        members = int(np.sum(labels == cls))
        held = int(np.sum(labels[val] == cls))
        assert held == round(0.2 * members), cls


def test_stratified_split_seeded() -> None:
    labels = labels_10_classes()
    a = stratified_split(labels, 0.3, seed=1)
    b = stratified_split(labels, 0.3, seed=1)
    c = stratified_split(labels, 0.3, seed=2)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_stratified_split_keeps_small_classes_in_both_parts() -> None:
    # Class 1 has 2 members: 0.1 of 2 rounds to 0, but both parts get one. Class 2 has 1: repair only.
    labels = np.array([0] * 20 + [1, 1] + [2])
    repair, val = stratified_split(labels, 0.1, seed=0)
    assert set(labels[val]) == {0, 1} and set(labels[repair]) == {0, 1, 2}
    assert np.sum(labels[val] == 0) == 2


def test_stratified_split_errors() -> None:
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DataError, match="--val-fraction"):
            stratified_split(np.array([0, 1, 0, 1]), fraction, seed=0)
    with pytest.raises(DataError, match="too few"):
        stratified_split(np.array([0, 1, 2]), 0.2, seed=0)


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=80),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_property(labels: list[int], fraction: float, seed: int) -> None:
    y = np.array(labels)
    try:
        repair, val = stratified_split(y, fraction, seed)
    except DataError:
        assert all(np.sum(y == c) < 2 for c in np.unique(y))  # only when no class can be split
        return
    assert np.intersect1d(repair, val).size == 0
    assert len(repair) + len(val) == len(y)
    for c in np.unique(y):
        n = int(np.sum(y == c))
        held = int(np.sum(y[val] == c))
        if n >= 2:
            assert 1 <= held <= n - 1
    again = stratified_split(y, fraction, seed)
    np.testing.assert_array_equal(again[1], val)
