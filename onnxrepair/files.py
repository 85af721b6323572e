"""Output files: checked before the work starts, written atomically at the end.

An output is written to a temporary file in its target folder and renamed into
place only when complete, so an interrupted run (Ctrl-C included) leaves the
old file or nothing, never half a file. Inputs are never written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx

from onnxrepair.errors import OutputError


def check_output_path(path: Path, force: bool, inputs: Iterable[Path], what: str) -> None:
    """Refuse an output that would overwrite an input, or an existing file without `force`.

    Raises:
        OutputError: naming the path and the way out.
    """
    resolved = path.resolve()
    for source in inputs:
        if source.exists() and resolved == source.resolve():
            raise OutputError(f"{what} {path} is one of the inputs; choose another path")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise OutputError(f"{what} {path} already exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise OutputError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write {what} {path}: folder {path.parent} is not writable")


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write an ONNX model atomically."""
    write_bytes_atomically(path, model.SerializeToString())


def save_json(data: dict[str, Any], path: Path) -> None:
    """Write a JSON report atomically."""
    write_bytes_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
