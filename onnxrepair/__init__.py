"""onnxrepair: repair quantized ONNX models with fault localisation and LP/MILP solving.

The pipeline (one module per stage, data flowing one way):
data -> runtime/graph -> spectrum -> localize -> solve -> rewrite -> evaluate -> report.
"""

from onnxrepair.config import Encoding, Metric, RepairConfig, SolverBackend
from onnxrepair.errors import (
    DataError,
    ModelLoadError,
    ModelPairingError,
    OnnxRepairError,
    OutputError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "Encoding",
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
