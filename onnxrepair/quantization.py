"""`onnxrepair quantize`: ONNX Runtime static QDQ quantization from a folder of images.

Users often arrive with a float model only. This wraps
`onnxruntime.quantization.quantize_static` with the same image loading and
preprocessing as `fix`, keeps the Relu nodes the quantizer would remove (so a
later repair reads clean pre-activations), and measures float vs quantized
agreement on held-out images that calibration never saw.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.data import ImageSet, stratified_split
from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import input_spec
from onnxrepair.repair import ModelScore, score_model

logger = logging.getLogger(__name__)

WEIGHT_TYPES = ("int8", "uint8", "int4")
CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `onnxrepair quantize`.

    Attributes:
        per_channel: one scale per output channel instead of per tensor.
        weights: the integer type of the weights (activations are uint8).
        calibration: how activation ranges are chosen from the calibration images.
        calibration_size: at most this many images calibrate.
        holdout_fraction: share of the images kept out of calibration to measure agreement.
        seed: seeds the split.
        batch_size: images per calibration and inference run.
        providers: ONNX Runtime execution providers that score the result (empty: the default).
    """

    per_channel: bool = False
    weights: str = "int8"
    calibration: str = "minmax"
    calibration_size: int = 256
    holdout_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 64
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model and how it compares with the float one on held-out images."""

    model: onnx.ModelProto
    calibration_size: int
    holdout: ModelScore  # the quantized model, agreement measured against the float model
    float_holdout: ModelScore  # the float model's own accuracy there


def quantize_model(float_path: Path, images: ImageSet, config: QuantizeConfig) -> QuantizeResult:
    """Quantize the model at `float_path` to QDQ, calibrated on part of `images`.

    Raises:
        UnsupportedModelError: ONNX Runtime's quantizer refuses the model.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_idx, holdout_idx = stratified_split(images.strata, config.holdout_fraction, config.seed)
    calibrate_idx = calibrate_idx[: config.calibration_size]
    float_model = onnx.load(str(float_path))
    name = input_spec(float_model).name
    reader = _Reader(name, images.x[calibrate_idx], config.batch_size)
    weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int4": QuantType.QInt4}[config.weights]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.calibration]
    logger.info(
        "quantize_static: QDQ, %s weights %s, uint8 activations, %s calibration on %d images, %d held out",
        config.weights,
        "per channel" if config.per_channel else "per tensor",
        config.calibration,
        len(calibrate_idx),
        len(holdout_idx),
    )
    with tempfile.TemporaryDirectory(prefix="onnxrepair-quantize-") as folder:
        output = Path(folder) / "quant.onnx"
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # ORT's "please run pre-processing" hint
        try:
            quantize_static(
                str(float_path),
                str(output),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=weight_type,
                calibrate_method=method,
                extra_options={"QDQKeepRemovableActivations": True},  # Relu stays: spectra read pre-activations
            )
        except Exception as exc:  # ORT raises many kinds; the user gets one sentence
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"ONNX Runtime cannot quantize {float_path}: {message}") from exc
        finally:
            logging.getLogger().setLevel(quiet)
        quant_model = onnx.load(str(output))
    try:
        onnx.checker.check_model(quant_model)  # what is written must be a valid model (ORT runs it below)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise UnsupportedModelError(f"ONNX Runtime's quantizer made an invalid model of {float_path}: {first}") from exc
    holdout = images.subset(holdout_idx)
    providers = config.providers or None
    scored = score_model(quant_model, holdout, config.batch_size, float_model, providers)
    float_scored = score_model(float_model, holdout, config.batch_size, providers=providers)
    return QuantizeResult(quant_model, len(calibrate_idx), scored, float_scored)


class _Reader:
    """The CalibrationDataReader protocol over an array, in batches."""

    def __init__(self, input_name: str, x: NDArray[np.float32], batch_size: int) -> None:
        self._batches: Iterator[dict[str, NDArray[np.float32]]] = (
            {input_name: np.ascontiguousarray(x[start : start + batch_size])} for start in range(0, len(x), batch_size)
        )

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        return next(self._batches, None)
