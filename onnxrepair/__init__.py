"""onnxrepair: repair quantized ONNX models with fault localisation and LP/MILP solving.

The Python API is `fix`, `quantize`, `inspect` and `evaluate` (api.py; the
command line is a thin layer over them). The pipeline, one module per stage,
data flowing one way: data -> runtime/graph -> activity/rows -> spectrum ->
localize -> solve/reconstruct -> rewrite -> evaluation -> report.
"""

__version__ = "0.1.0"  # before the imports below: report.py reads it

from onnxrepair.api import RepairResult, evaluate, fix, inspect, quantize
from onnxrepair.config import Encoding, Metric, RepairConfig, SolverBackend
from onnxrepair.data import ImageSet, PreprocessingOptions
from onnxrepair.errors import (
    DataError,
    ModelLoadError,
    ModelPairingError,
    OnnxRepairError,
    OutputError,
    UnsupportedModelError,
)

__all__ = [
    "DataError",
    "Encoding",
    "ImageSet",
    "PreprocessingOptions",
    "RepairResult",
    "evaluate",
    "fix",
    "inspect",
    "quantize",
    "Metric",
    "ModelLoadError",
    "ModelPairingError",
    "OnnxRepairError",
    "OutputError",
    "RepairConfig",
    "SolverBackend",
    "UnsupportedModelError",
    "__version__",
]
