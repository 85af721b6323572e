"""Weight and bias deltas -> the quantized model's integer initializers.

For a parameter stored as DequantizeLinear(q, scale, zero_point) (QDQ), or
read as (q, scale, zero_point) by an integer operator (QGemm, QLinearMatMul,
QLinearConv, QLinearAdd, MatMulInteger), the repaired integer value of each
changed entry is

    q' = clip(round((scale * (q - zero_point) + delta) / scale + zero_point), qmin, qmax)

with the entry's own scale and zero point (per-tensor or per-channel), and
[qmin, qmax] the range of the initializer's integer type: values that do not
fit are clamped, never wrapped. One exception: a per-tensor bias (int8/uint8,
as skl2onnx MatMul + Add graphs have) whose corrected values do not fit is
re-encoded with a new scale and zero point that cover them, under new
initializer names so that nothing else sharing the old ones changes (the old
ones are removed once nothing reads them; an int32
bias whose scale is fixed at scale_x * scale_W by QGemm / QLinearConv is
clamped instead; its range is wide enough). A 1x1 Conv's [out, in, 1, 1]
weight is edited as its [out, in] matrix and keeps its shape. Only the
selected neurons' entries move; every other initializer and every node stays
as it is, so the model keeps its opset, domains and node order.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import (
    FloatTensor,
    Layer,
    QuantizedTensor,
    as_matrix,
    channel_view,
    initializers,
    integer_bounds,
    parameter_scale,
    stored_integers,
    stored_tensor,
)


@dataclass(frozen=True)
class RewriteStats:
    """What the rewrite did to the stored parameters.

    Attributes:
        changed: per neuron, how many of its integer weights changed.
        clamped: per neuron, how many would have left the integer range and were clamped.
        largest_step: per neuron, the largest requested change in units of the
            weight's quantization step (below 0.5 rounding erases it).
        bias_changed: neurons whose stored bias changed.
        bias_reencoded: True when the bias initializer got a new scale and zero point.
    """

    changed: dict[int, int]
    clamped: dict[int, int]
    largest_step: dict[int, float]
    bias_changed: list[int] = field(default_factory=list)
    bias_reencoded: bool = False


def apply_deltas(
    quant_model: onnx.ModelProto,
    layer: Layer,
    deltas: Mapping[int, NDArray[np.float64]],
    bias_deltas: Mapping[int, float] | None = None,
) -> tuple[onnx.ModelProto, RewriteStats]:
    """A copy of `quant_model` with the neurons' weight and bias changes written in.

    Args:
        quant_model: the QDQ model; not modified.
        layer: the layer in `quant_model` (from graph.find_layers / pair_layer).
        deltas: neuron index -> [n_in] change of its dequantized weights.
        bias_deltas: neuron index -> change of its dequantized bias.

    Raises:
        UnsupportedModelError: the weights are not quantized, an integer
            initializer is shared with other nodes (patching it would change them
            too), or a bias change is asked of a layer without bias.
    """
    weight = layer.weight
    if not isinstance(weight, QuantizedTensor):
        raise UnsupportedModelError(f"the weights of layer '{layer.name}' are not quantized; nothing to rewrite")
    repaired = copy.deepcopy(quant_model)
    inits = initializers(repaired)
    _check_unshared(repaired, weight, layer)
    stored = stored_integers(inits, weight)
    q = as_matrix(stored)
    scale_full, zero_full = _scale_and_zero(inits, weight, q)
    bound_low, bound_high = integer_bounds(q, zero_full)  # the type's range, and the one the quantizer used
    q_new = q.astype(np.int64)  # a copy, wide enough for any intermediate value
    changed, clamped, largest_step = {}, {}, {}
    for neuron, delta in deltas.items():
        where = (slice(None), neuron) if layer.weight_transposed else (neuron, slice(None))
        delta = np.asarray(delta, np.float64)
        real = scale_full[where] * (q_new[where] - zero_full[where]) + delta
        wanted = np.round(real / scale_full[where] + zero_full[where]).astype(np.int64)
        fitted = np.clip(wanted, bound_low[where], bound_high[where]).astype(np.int64)
        changed[neuron] = int(np.count_nonzero(fitted != q_new[where]))
        clamped[neuron] = int(np.count_nonzero(fitted != wanted))
        largest_step[neuron] = float(np.max(np.abs(delta) / scale_full[where], initial=0.0))
        q_new[where] = fitted
    inits[weight.quantized].CopyFrom(stored_tensor(inits, weight, q_new.reshape(stored.shape).astype(q.dtype)))

    bias_changed: list[int] = []
    reencoded = False
    moves = {n: float(d) for n, d in (bias_deltas or {}).items() if d != 0.0}
    if moves:
        if layer.bias is None:
            raise UnsupportedModelError(f"layer '{layer.name}' has no bias to change")
        bias_changed, reencoded = _apply_bias(repaired, inits, layer, moves)
    return repaired, RewriteStats(changed, clamped, largest_step, bias_changed, reencoded)


def _apply_bias(
    model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], layer: Layer, moves: dict[int, float]
) -> tuple[list[int], bool]:
    """Write bias changes; returns (neurons whose stored bias changed, whether it was re-encoded)."""
    bias = layer.bias
    if isinstance(bias, FloatTensor):
        users = [n.name or n.op_type for n in model.graph.node if bias.initializer in n.input]
        if len(users) != 1:
            raise UnsupportedModelError(
                f"bias initializer '{bias.initializer}' of layer '{layer.name}' is used by {users}; "
                "changing it would change those nodes too"
            )
        stored = numpy_helper.to_array(inits[bias.initializer])
        flat = np.broadcast_to(stored.astype(np.float64).reshape(-1), (layer.n_out,)).copy()
        for neuron, move in moves.items():
            flat[neuron] += move
        # the stored dtype, never float64; the stored shape (float32 [1, out] in skl2onnx / dynamic graphs), or,
        # for one value broadcast to every neuron, that shape widened to one value per neuron (Add broadcasts it)
        shape = stored.shape if stored.size == layer.n_out else (*stored.shape[:-1], layer.n_out)
        if stored.ndim == 0:
            shape = (layer.n_out,)
        widened = flat.reshape(shape).astype(stored.dtype)
        inits[bias.initializer].CopyFrom(numpy_helper.from_array(widened, bias.initializer))
        return sorted(moves), False
    assert isinstance(bias, QuantizedTensor)
    _check_unshared(model, bias, layer)
    q = numpy_helper.to_array(inits[bias.quantized])
    if q.size != layer.n_out:
        raise UnsupportedModelError(
            f"the bias '{bias.quantized}' of layer '{layer.name}' has {q.size} values for {layer.n_out} neurons"
        )
    scale_full, zero_full = _scale_and_zero(inits, bias, q)
    info = ml_dtypes.iinfo(q.dtype)
    real = (scale_full * (q.astype(np.float64) - zero_full)).reshape(-1)
    target = real.copy()
    for neuron, move in moves.items():
        target[neuron] += move
    flat_scale, flat_zero = scale_full.reshape(-1), zero_full.reshape(-1)
    wanted = np.round(target / flat_scale + flat_zero).astype(np.int64)
    per_tensor = np.unique(flat_scale).size == 1 and np.unique(flat_zero).size == 1
    fixed_scale = bias.scale_factor is not None  # QGemm / QLinearConv define the bias scale themselves
    if np.all((wanted >= info.min) & (wanted <= info.max)) or not per_tensor or fixed_scale:
        q_new = np.clip(wanted, info.min, info.max)
        inits[bias.quantized].CopyFrom(numpy_helper.from_array(q_new.reshape(q.shape).astype(q.dtype), bias.quantized))
        return [int(i) for i in np.flatnonzero(q_new != q.reshape(-1))], False
    # Re-encode: a scale and zero point whose range covers every corrected value (and 0).
    low, high = min(float(target.min()), 0.0), max(float(target.max()), 0.0)
    new_scale = (high - low) / (info.max - info.min) or 1.0
    new_zero = int(np.clip(np.round(info.min - low / new_scale), info.min, info.max))
    q_new = np.clip(np.round(target / new_scale + new_zero), info.min, info.max).astype(np.int64)
    node = next(n for n in model.graph.node if n.name == bias.dequantize_node and bias.quantized in n.input)
    taken = set(inits) | {name for n in model.graph.node for name in (*n.input, *n.output)}
    scale_name = _fresh_name(taken, f"{bias.quantized}_repaired_scale")
    zero_name = _fresh_name(taken | {scale_name}, f"{bias.quantized}_repaired_zero_point")
    scale_dtype = numpy_helper.to_array(inits[bias.scale]).dtype
    scale_shape = tuple(inits[bias.scale].dims)
    model.graph.initializer.append(
        numpy_helper.from_array(np.full(scale_shape, new_scale, dtype=scale_dtype), scale_name)
    )
    model.graph.initializer.append(numpy_helper.from_array(np.full(scale_shape, new_zero, dtype=q.dtype), zero_name))
    position = list(node.input).index(bias.quantized)  # DequantizeLinear: 0; QLinearAdd: 0 or 3
    while len(node.input) < position + 3:
        node.input.append("")
    node.input[position + 1], node.input[position + 2] = scale_name, zero_name
    inits[bias.quantized].CopyFrom(numpy_helper.from_array(q_new.reshape(q.shape).astype(q.dtype), bias.quantized))
    _drop_unused(model, [bias.scale, *([bias.zero_point] if bias.zero_point else [])])
    return sorted(moves), True


def _drop_unused(model: onnx.ModelProto, names: list[str]) -> None:
    """Remove these initializers where no node reads them any more (ONNX Runtime warns of each on every load);
    one that another node still reads stays."""
    read = {name for node in model.graph.node for name in node.input}
    outputs = {o.name for o in model.graph.output}
    unused = {name for name in names if name not in read and name not in outputs}
    kept = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _scale_and_zero(
    inits: dict[str, onnx.TensorProto], param: QuantizedTensor, q: NDArray
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Scale and zero point broadcast to the shape of the integer tensor `q`."""
    scale = channel_view(parameter_scale(inits, param), q.ndim, param.axis)
    zero = (
        channel_view(numpy_helper.to_array(inits[param.zero_point]).astype(np.float64), q.ndim, param.axis)
        if param.zero_point
        else np.zeros(())
    )
    return np.broadcast_to(scale, q.shape), np.broadcast_to(zero, q.shape)


def _check_unshared(model: onnx.ModelProto, param: QuantizedTensor, layer: Layer) -> None:
    users = [n for n in model.graph.node if param.quantized in n.input]
    if len(users) != 1 or users[0].name != (param.quantize_node or param.dequantize_node):
        raise UnsupportedModelError(
            f"initializer '{param.quantized}' of layer '{layer.name}' is used by "
            f"{[n.name or n.op_type for n in users]}; patching it would change those nodes too"
        )


def _fresh_name(taken: set[str], base: str) -> str:
    """`base`, or `base_2`, `base_3`... whichever no tensor of the model uses yet."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
