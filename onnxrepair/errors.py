"""The exceptions onnxrepair raises for problems a user can fix.

Each message is one sentence that names the file, node or tensor at fault and,
where there is one, the next step. The CLI prints the message and exits 2;
anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxRepairError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ModelLoadError(OnnxRepairError):
    """A model file is missing, unreadable, or not a valid ONNX model."""


class UnsupportedModelError(OnnxRepairError):
    """A model is valid ONNX but its graph has a form onnxrepair cannot repair."""


class ModelPairingError(OnnxRepairError):
    """The float and quantized models do not correspond to each other."""


class DataError(OnnxRepairError):
    """An image folder or data file cannot be used."""


class OutputError(OnnxRepairError):
    """The output cannot be written where the user asked."""


class ResourceError(OnnxRepairError):
    """The machine ran short of something the run needs (memory, a worker process)."""


class WorkerDiedError(ResourceError):
    """A worker process died on every try of one item of an `Executor.map` (`index`: which item)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class MissingExtraError(OnnxRepairError):
    """An option needs an optional package that is not installed (the message says which extra to install)."""
