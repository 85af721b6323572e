"""Weight deltas -> the QDQ model's integer weight initializers.

For a weight stored as DequantizeLinear(q, scale, zero_point) the repaired
integer value of each changed entry is

    q' = clip(round((scale * (q - zero_point) + delta) / scale + zero_point), qmin, qmax)

with the entry's own scale and zero point (per-tensor or per-channel), and
[qmin, qmax] the range of the initializer's integer type: values that do not
fit are clamped, never wrapped. Only the selected neurons' entries are written;
scales, zero points, every other initializer and every node stay as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import DenseLayer, QuantizedTensor, channel_view, initializers


@dataclass(frozen=True)
class RewriteStats:
    """What the rewrite did to the integer weights.

    Attributes:
        changed: per neuron, how many of its integer weights changed.
        clamped: per neuron, how many would have left the integer range and were clamped.
        largest_step: per neuron, the largest requested change in units of the
            weight's quantization step (below 0.5 rounding erases it).
    """

    changed: dict[int, int]
    clamped: dict[int, int]
    largest_step: dict[int, float]


def apply_weight_deltas(
    quant_model: onnx.ModelProto, layer: DenseLayer, deltas: Mapping[int, NDArray[np.float64]]
) -> tuple[onnx.ModelProto, RewriteStats]:
    """A copy of `quant_model` with `deltas[neuron]` added to that neuron's incoming weights.

    Args:
        quant_model: the QDQ model; not modified.
        layer: the layer in `quant_model` (from graph.find_dense_layers / pair_layer).
        deltas: neuron index -> [n_in] change of its dequantized weights.

    Raises:
        UnsupportedModelError: the weights are not quantized, or their integer
            initializer is shared with other nodes (patching it would change them too).
    """
    weight = layer.weight
    if not isinstance(weight, QuantizedTensor):
        raise UnsupportedModelError(f"the weights of layer '{layer.name}' are not quantized; nothing to rewrite")
    users = [n for n in quant_model.graph.node if weight.quantized in n.input]
    if len(users) != 1 or users[0].op_type != "DequantizeLinear" or users[0].name != weight.dequantize_node:
        raise UnsupportedModelError(
            f"weight initializer '{weight.quantized}' of layer '{layer.name}' is used by "
            f"{[n.name or n.op_type for n in users]}; "
            "patching it would change those nodes too"
        )
    repaired = copy.deepcopy(quant_model)
    inits = initializers(repaired)
    tensor = inits[weight.quantized]
    q = numpy_helper.to_array(tensor)
    scale = channel_view(numpy_helper.to_array(inits[weight.scale]).astype(np.float64), q.ndim, weight.axis)
    zero = (
        channel_view(numpy_helper.to_array(inits[weight.zero_point]).astype(np.float64), q.ndim, weight.axis)
        if weight.zero_point
        else np.zeros(())
    )
    scale_full = np.broadcast_to(scale, q.shape)
    zero_full = np.broadcast_to(zero, q.shape)
    info = ml_dtypes.iinfo(q.dtype)
    q_new = q.astype(np.int64)  # a copy, wide enough for any intermediate value
    changed, clamped, largest_step = {}, {}, {}
    for neuron, delta in deltas.items():
        where = (slice(None), neuron) if layer.weight_transposed else (neuron, slice(None))
        delta = np.asarray(delta, np.float64)
        real = scale_full[where] * (q_new[where] - zero_full[where]) + delta
        wanted = np.round(real / scale_full[where] + zero_full[where]).astype(np.int64)
        fitted = np.clip(wanted, info.min, info.max)
        changed[neuron] = int(np.count_nonzero(fitted != q_new[where]))
        clamped[neuron] = int(np.count_nonzero(fitted != wanted))
        largest_step[neuron] = float(np.max(np.abs(delta) / scale_full[where], initial=0.0))
        q_new[where] = fitted
    tensor.CopyFrom(numpy_helper.from_array(q_new.astype(q.dtype), weight.quantized))
    return repaired, RewriteStats(changed, clamped, largest_step)
