"""files.py: output checks before the work, atomic writes after it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_matmul_add

from onnxrepair.errors import OutputError
from onnxrepair.files import check_output_path, save_json, save_model, write_bytes_atomically


def test_check_output_path(tmp_path: Path) -> None:
    source = tmp_path / "quant.onnx"
    source.write_bytes(b"x")
    check_output_path(tmp_path / "new.onnx", False, [source], "output model")  # fine: nothing raised
    with pytest.raises(OutputError, match="one of the inputs"):
        check_output_path(tmp_path / "." / "quant.onnx", True, [source], "output model")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        check_output_path(source, False, [], "output model")
    check_output_path(source, True, [], "output model")  # --force
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path, True, [], "report")
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.onnx", False, [], "report")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_path_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(locked / "out.onnx", False, [], "output model")
    finally:
        locked.chmod(0o700)


def test_write_bytes_atomically_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    write_bytes_atomically(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_bytes_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_save_model_and_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = build_matmul_add(rng.normal(size=(3, 2)), rng.normal(size=2))
    save_model(model, tmp_path / "m.onnx")
    assert onnx.load(str(tmp_path / "m.onnx")) == model
    save_json({"a": 1, "b": [1.5, None]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "b": [1.5, None]}


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_bytes_atomically(tmp_path / "out.bin", b"data")
        with open(tmp_path / "plain.bin", "wb") as handle:  # what a plain write gives under this umask
            handle.write(b"data")
    finally:
        os.umask(umask)
    assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
