"""Issue 13.5: image folders are decoded row by row into a file on disk and read back in batches, split uncopied."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import DigitsExample
from PIL import Image

import onnxrepair
from onnxrepair.data import ImageSet, load_array_file, load_image, load_image_folder, preprocessing_for_input
from onnxrepair.diskrows import DiskRows, RowWriter, rows_of

SIDE = 48  # the model input of the folder tests: 3 x 48 x 48 float32, 27 KB an image


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Decoded images go to tmp_path/cache/onnxrepair."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnxrepair"


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """120 tiny RGB PNGs (16 x 16, stretched to SIDE x SIDE on loading) in three class folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(120):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _prep():
    return preprocessing_for_input("x", [None, 3, SIDE, SIDE], preset="imagenet")


def _stacked(folder: Path) -> np.ndarray:
    """What loading did before rows went to disk: every file decoded, stacked in memory."""
    files = sorted(p for sub in sorted(folder.iterdir()) for p in sorted(sub.iterdir()))
    return np.stack([load_image(p, _prep()) for p in files]).astype(np.float32)


def test_a_folder_is_decoded_to_disk_with_the_same_bytes(colour_folder: Path, cache_home: Path) -> None:
    images = load_image_folder(colour_folder, _prep())
    assert isinstance(images.x, DiskRows)
    assert images.x.shape == (120, 3, SIDE, SIDE) and images.x.dtype == np.float32 and len(images.x) == 120
    expected = _stacked(colour_folder)
    assert np.asarray(images.x).tobytes() == expected.tobytes()
    assert images.x[5:17].tobytes() == expected[5:17].tobytes()
    assert list(cache_home.iterdir()) == []  # the file has no name: nothing to clean, nothing to reuse


def test_decoding_never_holds_the_whole_set(colour_folder: Path, cache_home: Path) -> None:
    _prep()  # imports and caches warmed before measuring
    load_image_folder(colour_folder, _prep())
    set_bytes = 120 * 3 * SIDE * SIDE * 4
    tracemalloc.start()
    try:
        images = load_image_folder(colour_folder, _prep())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        parts = images.subset(np.arange(0, 120, 2)), images.subset(np.arange(1, 120, 2))
        _, split_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < set_bytes / 4, f"decoding peaked at {peak} bytes for a {set_bytes}-byte set"
    assert split_peak < set_bytes / 10, f"splitting peaked at {split_peak} bytes"
    assert all(isinstance(part.x, DiskRows) and len(part) == 60 for part in parts)


def test_an_interrupted_decode_leaves_nothing_behind(colour_folder: Path, cache_home: Path) -> None:
    """A run killed while decoding leaves no file that a later run could take for a finished one."""
    seen = []

    def advance(count: int) -> None:
        seen.append(count)
        if len(seen) == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_image_folder(colour_folder, _prep(), advance)
    assert list(cache_home.iterdir()) == []
    again = load_image_folder(colour_folder, _prep())
    assert np.asarray(again.x).tobytes() == _stacked(colour_folder).tobytes()


def test_undecodable_files_are_skipped_as_before(colour_folder: Path, cache_home: Path) -> None:
    (colour_folder / "c1" / "broken.png").write_bytes(b"not a png")
    images = load_image_folder(colour_folder, _prep())
    assert len(images) == 120 and len(images.x) == 120 and images.skipped == (str(colour_folder / "c1" / "broken.png"),)
    assert np.asarray(images.x).tobytes() == _stacked_without(colour_folder, "broken.png").tobytes()


def _stacked_without(folder: Path, name: str) -> np.ndarray:
    files = sorted(p for sub in sorted(folder.iterdir()) for p in sorted(sub.iterdir()) if p.name != name)
    return np.stack([load_image(p, _prep()) for p in files])


def test_rows_index_like_an_array(tmp_path: Path) -> None:
    data = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)
    writer = RowWriter((2, 3), np.dtype(np.float32), tmp_path)
    for row in data:
        writer.append(row)
    rows = writer.rows()
    for key in (slice(None), slice(2, 5), slice(None, None, -2), slice(10, 20), 3, -1):
        np.testing.assert_array_equal(rows[key], data[key])
    for key in ([4, 0, 0, 6], np.array([True, False] * 3 + [True]), np.array([], np.int64), [-2]):
        np.testing.assert_array_equal(rows[key], data[key])  # an array, as numpy's fancy indexing gives
        picked = rows.select(key)
        assert isinstance(picked, DiskRows)
        np.testing.assert_array_equal(np.asarray(picked), data[key])
    nested = rows.select([6, 5, 4, 3, 1]).select([0, 2, 4])[1:]
    np.testing.assert_array_equal(nested, data[[6, 5, 4, 3, 1]][[0, 2, 4]][1:])
    np.testing.assert_array_equal(rows[1:3, 1], data[1:3, 1])
    np.testing.assert_array_equal(rows[2, 0], data[2, 0])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(rows.select([1, 2]))), data[[1, 2]])
    np.testing.assert_array_equal(np.stack(list(rows)), data)
    with pytest.raises(IndexError):
        rows[7]
    with pytest.raises(IndexError):
        rows.select([0, 9])


def test_a_npy_stays_memory_mapped_and_its_parts_are_not_copied(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(40, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    images = load_array_file(tmp_path / "x.npy", [None, 3, 4, 4])
    assert isinstance(images.x, np.memmap)
    part = images.subset(np.arange(3, 40, 3))
    assert isinstance(part.x, DiskRows)
    np.testing.assert_array_equal(np.asarray(part.x), x[3::3])
    assert rows_of(images.x[1:]) is not None and not isinstance(rows_of(images.x[1:]), DiskRows)  # a view: as it is
    in_memory = ImageSet(x=x, labels=None, class_names=(), paths=tuple(map(str, range(40))))
    np.testing.assert_array_equal(in_memory.subset(np.array([2, 1])).x, x[[2, 1]])


def test_fix_from_a_folder_writes_what_it_wrote_from_memory(digits: DigitsExample, cache_home: Path) -> None:
    """The model fix writes from a folder (rows on disk, split without copies) is the one it wrote when the
    decoded folder sat in memory: the held-out guard (`--layers all`) splits the repair part once more."""
    prep = preprocessing_for_input("input", [None, 1, 8, 8])
    folder = load_image_folder(digits.images, prep)
    in_memory = ImageSet(np.asarray(folder.x), folder.labels, folder.class_names, folder.paths)
    from_disk = onnxrepair.fix(digits.float_path, digits.quant_path, digits.images, layers="all")
    from_memory = onnxrepair.fix(digits.float_path, digits.quant_path, in_memory, layers="all")
    assert (from_disk.model is None) == (from_memory.model is None)
    if from_disk.model is not None and from_memory.model is not None:
        assert from_disk.model.graph.SerializeToString() == from_memory.model.graph.SerializeToString()
    for key in ("repaired_agreement", "quant_agreement", "repair_size", "validation_size", "fixed", "broken"):
        assert from_disk.report[key] == from_memory.report[key]
    assert _untimed(from_disk.report["guard"]) == _untimed(from_memory.report["guard"])


def _untimed(value: object) -> object:
    """`value` without its timings (the keys ending in seconds)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not str(k).endswith("seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value
