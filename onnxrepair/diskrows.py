"""Model inputs kept in a file and read batch by batch, so that a large image set never sits in memory whole.

10,000 ImageNet crops are 6 GB of float32. A decoded image folder is written
row by row into an unnamed temporary file (`RowWriter`): the operating system
removes it when the run ends, however it ends, so a killed run leaves no half
file behind for a later one to trust. `DiskRows` reads rows back with plain
reads into arrays of the caller's: pages are never mapped into the process,
so its resident set grows with the batch read, not with the set (a memory map
read through once would hold every page it touched, counted in the peak).

Decoded images are not kept for the next run: decoding costs 5 ms an
ImageNet-size JPEG (2 cores), a sixth of a cheap head repair and a few
percent of a whole-network one, while a kept copy would take 6 GB of disk
per 10,000 images and per preprocessing, and need a key (paths, sizes,
modification times, preprocessing) that a file edited within its time stamp's
resolution would fool.

Inference code only takes ``len(x)`` and slices ``x[start:stop]``: a slice of
`DiskRows` is an ordinary array read from disk, and so is ``x[indices]``, as
with numpy. `DiskRows.select` selects rows lazily instead, as another
`DiskRows` over the same file: ``ImageSet.subset`` splits a set in parts
without copying it, and a memory-mapped ``.npy`` is split the same way
(`rows_of`). ``np.asarray`` reads every row (correct, not bounded).
"""

from __future__ import annotations

import io
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from onnxrepair.errors import DataError

_ITER_ROWS = 64  # rows read at a time when iterating


class DiskRows:
    """Rows of a C-ordered array stored in a file from byte `offset` on, in the order of `index`.

    Attributes:
        shape: (rows, *row shape), as an array's.
        dtype: the stored element type.
    """

    def __init__(
        self,
        file: io.RawIOBase,
        offset: int,
        shape: Sequence[int],
        dtype: np.dtype[Any],
        index: NDArray[np.int64] | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self._file, self._offset, self._dtype = file, offset, np.dtype(dtype)
        self._row_shape = tuple(int(d) for d in shape[1:])
        self._stored = int(shape[0])  # rows in the file
        self._index = index  # which stored rows, in order; None: all of them
        self._lock = lock or threading.Lock()  # seek + read pairs on the file, shared with the views over it

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._row_shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def ndim(self) -> int:
        return 1 + len(self._row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self._row_bytes

    @property
    def _row_bytes(self) -> int:
        return int(np.prod(self._row_shape, dtype=np.int64)) * self._dtype.itemsize

    def __len__(self) -> int:
        return self._stored if self._index is None else len(self._index)

    def __repr__(self) -> str:
        return f"DiskRows(shape={self.shape}, dtype={self._dtype})"

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):  # x[rows, ...]: the rows first, then the rest on the array read
            head = self[key[0]]
            head = np.asarray(head)
            rest = key[1:]
            return head[rest] if isinstance(key[0], (int, np.integer)) else head[(slice(None), *rest)]
        if isinstance(key, slice):
            return self._read(self._positions(np.arange(len(self))[key]))
        if isinstance(key, (int, np.integer)):
            position = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= position < len(self):
                raise IndexError(f"index {key} is out of bounds for {len(self)} rows")
            return self._read(self._positions(np.asarray([position])))[0]
        return self._read(self._positions(self._checked(key)))

    def __iter__(self) -> Iterator[NDArray[Any]]:
        for start in range(0, len(self), _ITER_ROWS):
            yield from self[start : start + _ITER_ROWS]

    def select(self, key: Any) -> DiskRows:
        """The rows at `key` (integers or a boolean mask), in that order, as a view: nothing is read or copied."""
        stored = (self._stored, *self._row_shape)
        return DiskRows(self._file, self._offset, stored, self._dtype, self._positions(self._checked(key)), self._lock)

    def _checked(self, key: Any) -> NDArray[np.int64]:
        """Integer or boolean-mask `key` as non-negative row numbers of this view."""
        selected = np.asarray(key)
        if selected.dtype == np.bool_:
            if selected.shape != (len(self),):
                raise IndexError(f"a boolean mask of shape {selected.shape} does not fit {len(self)} rows")
            selected = np.flatnonzero(selected)
        if selected.ndim != 1 or not (np.issubdtype(selected.dtype, np.integer) or selected.size == 0):
            raise IndexError(
                f"rows are selected by a slice, an integer, or a 1-D integer or boolean array, not {key!r}"
            )
        selected = selected.astype(np.int64)
        if selected.size and (selected.min() < -len(self) or selected.max() >= len(self)):
            raise IndexError(f"row indices out of bounds for {len(self)} rows")
        return np.where(selected < 0, selected + len(self), selected)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> NDArray[Any]:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the array it reads (a temporary file cannot travel to another process)."""
        return (np.asarray, (self[:],))

    def _positions(self, selected: NDArray[np.int64]) -> NDArray[np.int64]:
        """Stored row numbers of the selected rows of this view."""
        return selected.astype(np.int64) if self._index is None else self._index[selected]

    def _read(self, rows: NDArray[np.int64]) -> NDArray[Any]:
        """The stored `rows`, one read per run of consecutive rows."""
        out = np.empty((len(rows), *self._row_shape), self._dtype)
        if len(rows) == 0:
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(rows)]
        with self._lock:
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                self._file.seek(self._offset + int(rows[start]) * self._row_bytes)
                view = memoryview(out[start:end]).cast("B")
                while len(view):
                    count = self._file.readinto(view)
                    if not count:
                        raise DataError(f"the stored images end early ({len(view)} bytes missing)")
                    view = view[count:]
        return out


class RowWriter:
    """Rows appended one by one to an unnamed temporary file in `directory`; `rows` reads them back."""

    def __init__(self, row_shape: Sequence[int], dtype: np.dtype[Any], directory: Path) -> None:
        self.directory = directory
        self._row_shape, self._dtype = tuple(row_shape), np.dtype(dtype)
        try:
            # unnamed: removed by the OS when closed or when the process dies, never found by a later run
            self._file: io.RawIOBase = tempfile.TemporaryFile(dir=directory, buffering=0)  # type: ignore[assignment]
        except OSError as exc:
            raise DataError(f"cannot create a file in {directory} to hold the decoded images ({exc})") from exc
        self.count = 0

    def append(self, row: NDArray[Any]) -> None:
        """Write one row (its shape must be the row shape).

        Raises:
            DataError: the disk is full or the file cannot be written.
        """
        data = np.ascontiguousarray(row, self._dtype)
        if data.shape != self._row_shape:
            raise ValueError(f"a row of shape {data.shape} in a set of rows of shape {self._row_shape}")
        view = memoryview(data).cast("B")
        try:
            while len(view):
                view = view[self._file.write(view) or 0 :]
        except OSError as exc:
            raise DataError(
                f"cannot write the decoded images into {self.directory} ({exc}); set XDG_CACHE_HOME to a folder "
                "with more space, or pass the images as a .npy array"
            ) from exc
        self.count += 1

    def rows(self) -> DiskRows:
        """What was written, read-only."""
        return DiskRows(self._file, 0, (self.count, *self._row_shape), self._dtype)


def rows_of(x: Any) -> Any:
    """`x` as `DiskRows` over its file when it is a whole memory-mapped .npy (so selecting rows copies nothing);
    anything else as it is."""
    if (
        isinstance(x, np.memmap)
        and isinstance(x.base, mmap.mmap)  # the map itself, not a view of it (whose offset would differ)
        and x.filename is not None
        and x.flags.c_contiguous
        and x.ndim >= 1
    ):
        return DiskRows(open(x.filename, "rb", buffering=0), int(x.offset), x.shape, x.dtype)  # noqa: SIM115
    return x


def decode_directory() -> Path:
    """Where decoded images are written: $XDG_CACHE_HOME/onnxrepair (~/.cache/onnxrepair), else the temp folder.

    Not the temporary folder first: on many systems /tmp is a RAM disk, which would hold the images in memory.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    directory = Path(base) / "onnxrepair"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.gettempdir())
    return directory if os.access(directory, os.W_OK) else Path(tempfile.gettempdir())
