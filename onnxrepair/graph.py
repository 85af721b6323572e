"""ONNX graph surgery: load and check models, pair float and quantized layers, read parameters, tap tensors.

What a layer is (dense or convolution), in each exporter's and quantizer's form, is layers.py;
this module pairs a FLOAT layer with its QUANT twin (by node name, by ONNX
Runtime's derived names '<name>_quant', or by position), reads parameters as
arrays (dequantized; a 1x1 Conv's [out, in, 1, 1] as [out, in]), gives their
integer grid, and makes tapped copies that output a layer's x and
pre-activation: for integer-operator layers (QOperator, dynamic) `tap_layer`
adds DequantizeLinear nodes to the copy so that both are read as the real
numbers Q computes with.

This module knows ONNX and nothing of solvers; it returns plain arrays.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from onnxrepair.errors import ModelLoadError, ModelPairingError, UnsupportedModelError
from onnxrepair.layers import (
    DEQUANTIZE_OPS,
    LAYER_OPS,
    QUANTIZE_OPS,
    QUANTIZED_OPS,
    FloatTensor,
    IntegerTensor,
    Layer,
    Parameter,
    QuantizedTensor,
    RejectedLayer,
    find_layers,
    initializers,
    rejected_layers,
)

__all__ = [
    "DEQUANTIZE_OPS",
    "LAYER_OPS",
    "QUANTIZED_OPS",
    "QUANTIZE_OPS",
    "Layer",
    "FloatTensor",
    "InputSpec",
    "IntegerTensor",
    "LayerGrid",
    "LayerPair",
    "Parameter",
    "QuantizedTensor",
    "RejectedLayer",
    "as_matrix",
    "channel_view",
    "check_models_match",
    "clips_negatives",
    "layer_parameters",
    "describe_parameter",
    "find_layers",
    "initializers",
    "input_spec",
    "integer_bounds",
    "integer_dtype",
    "layer_grid",
    "load_model",
    "pair_layer",
    "parameter_scale",
    "parameter_value",
    "rejected_layers",
    "stored_integers",
    "stored_tensor",
    "tap_layer",
    "with_outputs",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPair:
    """A float layer and its QDQ counterpart, and how they were matched."""

    float_layer: Layer
    quant_layer: Layer
    paired_by: str  # "name" or "position"


@dataclass(frozen=True)
class InputSpec:
    """The model's (single) input: its name and shape, None for a dynamic dimension."""

    name: str
    shape: tuple[int | None, ...]

    @property
    def shown(self) -> str:
        """The shape as messages show it: [?, 3, 224, 224]."""
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def load_model(path: Path, role: str) -> onnx.ModelProto:
    """Read and check an ONNX file.

    Args:
        path: the file.
        role: what the file is for ("FLOAT" or "QUANT"), used in messages.

    Raises:
        ModelLoadError: missing, unreadable, not ONNX, truncated or invalid.
    """
    if not path.exists():
        raise ModelLoadError(f"{role} model {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{role} model {path} is not a file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{role} model {path} cannot be read (permission denied)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelLoadError(f"{role} model {path} is not a readable ONNX file ({type(exc).__name__})") from exc
    if not model.graph.node:
        raise ModelLoadError(f"{role} model {path} is not an ONNX model (its graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ModelLoadError(f"{role} model {path} is not a valid ONNX model: {first_line}") from exc
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    logger.info("%s model %s: %d nodes, opsets %s", role, path, len(model.graph.node), opsets)
    return model


PREPROCESSING_KEY = "onnxrepair.preprocessing"


def saved_preprocessing(model: onnx.ModelProto) -> str | None:
    """The preprocessing options onnxrepair saved in a model it wrote, or None."""
    return next((p.value for p in model.metadata_props if p.key == PREPROCESSING_KEY), None)


def save_preprocessing(model: onnx.ModelProto, options: str) -> None:
    """Record how images were read in `model` (an output, never an input), so later runs read them alike."""
    for prop in model.metadata_props:
        if prop.key == PREPROCESSING_KEY:
            prop.value = options
            return
    model.metadata_props.add(key=PREPROCESSING_KEY, value=options)


def input_spec(model: onnx.ModelProto) -> InputSpec:
    """The model's single data input (initializers listed as inputs are ignored).

    Raises:
        UnsupportedModelError: the model has no input or several.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise UnsupportedModelError(f"the model has {len(inputs)} inputs {names}; onnxrepair needs exactly one")
    value = inputs[0]
    dims = value.type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
    return InputSpec(value.name, shape)


def check_models_match(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """Check that both models take the same input and give the same number of outputs.

    Raises:
        ModelPairingError: naming the first difference.
    """
    f_in, q_in = input_spec(float_model), input_spec(quant_model)
    if f_in.shape[1:] != q_in.shape[1:]:
        raise ModelPairingError(
            f"the models take different inputs: FLOAT '{f_in.name}' {f_in.shown}, QUANT '{q_in.name}' {q_in.shown}"
        )
    f_out, q_out = len(float_model.graph.output), len(quant_model.graph.output)
    if f_out != q_out:
        raise ModelPairingError(f"FLOAT has {f_out} output(s) but QUANT has {q_out}")
    if not any(n.op_type in QUANTIZED_OPS for n in quant_model.graph.node):
        raise ModelPairingError(
            "QUANT has no quantized node (DequantizeLinear, QGemm, QLinearMatMul, QLinearConv, MatMulInteger): "
            "it is not a QDQ model, nor a QOperator or dynamically quantized one; pass the model written by "
            "onnxruntime.quantization (quantize_static or quantize_dynamic)"
        )


def _quantizer_bases(name: str) -> tuple[str, ...]:
    """The float node names ONNX Runtime derives an integer node's name from.

    QOperator: '/fc1/Gemm' -> '/fc1/Gemm_quant'; dynamic: '/fc1/Gemm' -> '/fc1/Gemm_MatMul_quant'.
    """
    if not name.endswith("_quant"):
        return ()
    base = name.removesuffix("_quant")
    return (base, base.removesuffix("_MatMul")) if base.endswith("_MatMul") else (base,)


def _rejections_text(rejected: list[RejectedLayer], limit: int = 4) -> str:
    shown = "; ".join(r.describe() for r in rejected[:limit])
    more = f"; and {len(rejected) - limit} more" if len(rejected) > limit else ""
    return shown + more


def names_text(names: list[str], limit: int = 8) -> str:
    """Layer names for a message: all of a few, or the first and last ones of many."""
    if len(names) <= limit:
        return str(names)
    half = limit // 2
    shown = ", ".join(repr(n) for n in (*names[:half], "...", *names[-half:]))
    return f"[{shown}] ({len(names)} in all; fix --list-layers shows them)".replace("'...'", "...")


def pair_layer(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, name: str | None) -> LayerPair:
    """Find the float layer called `name` (default: the last layer) and its QDQ twin.

    Pairs by node name first; when the quantizer renamed nodes, by position among
    the layers, provided the weight shapes agree.

    Raises:
        ModelPairingError: no such layer, or no matching layer in QUANT.
        UnsupportedModelError: the QUANT layer's weights are not quantized.
    """
    float_layers = find_layers(float_model)
    quant_layers = find_layers(quant_model)
    if not float_layers:
        rejected = rejected_layers(float_model)
        why = f"; not repairable: {_rejections_text(rejected)}" if rejected else ""
        raise UnsupportedModelError(
            "FLOAT has no repairable layer (Gemm, MatMul [+ Add] or a 2-D Conv, with constant weights)" + why
        )
    if name is None:
        position = len(float_layers) - 1
    else:
        names = [layer.name for layer in float_layers]
        if name not in names:
            rejected = [r for r in rejected_layers(float_model) if r.name == name]
            if rejected:
                raise UnsupportedModelError(f"FLOAT layer {rejected[0].describe()}; the layers are {names_text(names)}")
            raise ModelPairingError(f"FLOAT has no layer named '{name}'; its layers are {names_text(names)}")
        position = names.index(name)
    float_layer = float_layers[position]
    by_name = [q for q in quant_layers if q.name == float_layer.name] or [
        q for q in quant_layers if float_layer.name in _quantizer_bases(q.name)
    ]
    if by_name:
        quant_layer, paired_by = by_name[0], "name"
    elif len(quant_layers) == len(float_layers):
        quant_layer, paired_by = quant_layers[position], "position"
    else:
        rejected = rejected_layers(quant_model)
        # ONNX Runtime names the integer node after the float one: '/fc2/Gemm' -> '/fc2/Gemm_quant'
        twins = [r for r in rejected if float_layer.name in (r.name, *_quantizer_bases(r.name))]
        if twins:
            twin = twins[0]
            raise UnsupportedModelError(
                f"QUANT node {twin.op} '{twin.name}' (the quantized '{float_layer.name}') cannot be repaired: "
                f"{twin.reason}"
            )
        why = f"; QUANT nodes onnxrepair cannot read: {_rejections_text(rejected, 2)}" if rejected else ""
        error = UnsupportedModelError if rejected else ModelPairingError
        raise error(
            f"QUANT has no layer named '{float_layer.name}', and its {len(quant_layers)} "
            f"layer(s) cannot be matched by position with FLOAT's {len(float_layers)}{why}"
        )
    if quant_layer.conv != float_layer.conv:
        raise ModelPairingError(
            f"layer '{float_layer.name}' is {float_layer.kind} in FLOAT but '{quant_layer.name}' is "
            f"{quant_layer.kind} in QUANT"
        )
    if (quant_layer.n_in, quant_layer.n_out) != (float_layer.n_in, float_layer.n_out):
        raise ModelPairingError(
            f"layer '{float_layer.name}' is {float_layer.n_in}->{float_layer.n_out} in FLOAT but "
            f"'{quant_layer.name}' is {quant_layer.n_in}->{quant_layer.n_out} in QUANT"
        )
    if not quant_layer.quantized:
        raise UnsupportedModelError(
            f"the weights of layer '{quant_layer.name}' in QUANT are not quantized (a float "
            "initializer, not DequantizeLinear of an integer one); was it excluded from quantization?"
        )
    return LayerPair(float_layer, quant_layer, paired_by)


def layer_parameters(model: onnx.ModelProto, layer: Layer) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The layer's effective (dequantized) W as [out, in] and b as [out]."""
    inits = initializers(model)
    weight = as_matrix(parameter_value(inits, layer.weight))
    w = weight.T if layer.weight_transposed else weight
    if layer.bias is None:
        b = np.zeros(layer.n_out)
    else:
        b = np.broadcast_to(parameter_value(inits, layer.bias).reshape(-1), (layer.n_out,)).copy()
    return w.astype(np.float64), b.astype(np.float64)


@dataclass(frozen=True)
class LayerGrid:
    """Where a quantized layer's parameters can move without leaving their integer encoding.

    Steps are real-valued sizes of one integer step; `low`/`high` are the most
    negative / positive whole number of steps that keep each stored integer in
    its type's range. A float-stored parameter has step 0 (move freely).

    Attributes:
        weight_step, weight_low, weight_high: [out, in], in the layer's [out, in] view.
        bias_step, bias_low, bias_high: [out]; None when the layer has no bias.
    """

    weight_step: NDArray[np.float64]
    weight_low: NDArray[np.float64]
    weight_high: NDArray[np.float64]
    bias_step: NDArray[np.float64] | None
    bias_low: NDArray[np.float64] | None
    bias_high: NDArray[np.float64] | None


def layer_grid(model: onnx.ModelProto, layer: Layer) -> LayerGrid:
    """The integer grid of a layer's weights and bias (see LayerGrid)."""
    inits = initializers(model)
    w_step, w_low, w_high = (as_matrix(a) for a in _parameter_grid(inits, layer.weight))
    if layer.weight_transposed:
        w_step, w_low, w_high = w_step.T, w_low.T, w_high.T
    if layer.bias is None:
        return LayerGrid(w_step, w_low, w_high, None, None, None)
    b_step, b_low, b_high = (
        np.broadcast_to(a.reshape(-1), (layer.n_out,)).copy() for a in _parameter_grid(inits, layer.bias)
    )
    return LayerGrid(w_step, w_low, w_high, b_step, b_low, b_high)


def _parameter_grid(
    inits: dict[str, onnx.TensorProto], param: Parameter
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    if isinstance(param, FloatTensor):
        shape = tuple(inits[param.initializer].dims)
        return np.zeros(shape), np.full(shape, -np.inf), np.full(shape, np.inf)
    q = stored_integers(inits, param)
    scale = channel_view(parameter_scale(inits, param), q.ndim, param.axis)
    low, high = integer_bounds(q, parameter_zero_point(inits, param, q.ndim), weight=param.scale_factor is None)
    q64 = q.astype(np.float64)
    return np.broadcast_to(scale, q.shape).copy(), low - q64, high - q64


def integer_dtype(inits: dict[str, onnx.TensorProto], param: QuantizedTensor) -> np.dtype:
    """The integer type of a quantized parameter: its initializer's, or for one quantized at run time the zero
    point's (QuantizeLinear's output type; uint8 without a zero point)."""
    if param.quantize_node is None:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inits[param.quantized].data_type))
    if param.zero_point is None:
        return np.dtype(np.uint8)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inits[param.zero_point].data_type))


def stored_integers(inits: dict[str, onnx.TensorProto], param: QuantizedTensor) -> NDArray:
    """The integers a quantized parameter holds: its initializer, or what QuantizeLinear makes of its float one
    (saturate(round_half_to_even(w / scale) + zero_point), as ONNX defines it)."""
    values = numpy_helper.to_array(inits[param.quantized])
    if param.quantize_node is None:
        return values
    dtype = integer_dtype(inits, param)
    info = ml_dtypes.iinfo(dtype)
    scale = channel_view(parameter_scale(inits, param), values.ndim, param.axis)
    zero = parameter_zero_point(inits, param, values.ndim)
    q = np.clip(np.round(values.astype(np.float64) / scale) + zero, info.min, info.max)
    return q.astype(dtype)


def stored_tensor(inits: dict[str, onnx.TensorProto], param: QuantizedTensor, q: NDArray) -> onnx.TensorProto:
    """The initializer that holds integers `q` for `param`: the integers themselves, or for a parameter quantized
    at run time the float values scale * (q - zero point) it quantizes back to `q` exactly."""
    if param.quantize_node is None:
        return numpy_helper.from_array(q.astype(integer_dtype(inits, param)), param.quantized)
    original = numpy_helper.to_array(inits[param.quantized])
    scale = channel_view(parameter_scale(inits, param), q.ndim, param.axis)
    zero = parameter_zero_point(inits, param, q.ndim)
    values = (q.astype(np.float64) - zero) * scale
    return numpy_helper.from_array(values.astype(original.dtype), param.quantized)


def parameter_zero_point(inits: dict[str, onnx.TensorProto], param: QuantizedTensor, ndim: int) -> NDArray[np.float64]:
    """The zero point of a quantized parameter, shaped to broadcast against its integers (0 when absent)."""
    if not param.zero_point:
        return np.zeros(())
    return channel_view(numpy_helper.to_array(inits[param.zero_point]).astype(np.float64), ndim, param.axis)


def integer_bounds(
    q: NDArray, zero_point: NDArray[np.float64], weight: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The integers a stored parameter may take: its type's range, and for weights the range its quantizer used.

    Quantizers often keep weights narrower than the type: ONNX Runtime's reduce_range 7-bit weights
    ([-64, 63] in int8), symmetric [-127, 127], NNCF's 7-bit first layer. CPUs without VNNI add pairs of
    8-bit products in 16 bits, which those ranges keep from saturating; a repair must not leave them. So
    weights stay within zero point +- the largest distance from it that the tensor already has.
    """
    info = ml_dtypes.iinfo(q.dtype)
    low, high = np.full(q.shape, float(info.min)), np.full(q.shape, float(info.max))
    if weight and q.size:
        reach = float(np.max(np.abs(q.astype(np.float64) - zero_point)))
        low = np.maximum(low, zero_point - reach)
        high = np.minimum(high, zero_point + reach)
    return low, high


def parameter_scale(inits: dict[str, onnx.TensorProto], param: QuantizedTensor) -> NDArray[np.float64]:
    """The scale of a quantized parameter (scalar or one per channel), its scale factor included."""
    scale = numpy_helper.to_array(inits[param.scale]).astype(np.float64)
    if param.scale_factor is not None:
        scale = scale * numpy_helper.to_array(inits[param.scale_factor]).astype(np.float64)
    return scale


def parameter_value(inits: dict[str, onnx.TensorProto], param: Parameter) -> NDArray[np.float64]:
    """The float value of a parameter, dequantized when it is quantized."""
    if isinstance(param, FloatTensor):
        return numpy_helper.to_array(inits[param.initializer]).astype(np.float64)
    q = stored_integers(inits, param).astype(np.float64)
    scale = parameter_scale(inits, param)
    zero = (
        numpy_helper.to_array(inits[param.zero_point]).astype(np.float64) if param.zero_point else np.zeros_like(scale)
    )
    return (q - channel_view(zero, q.ndim, param.axis)) * channel_view(scale, q.ndim, param.axis)


def as_matrix(values: NDArray) -> NDArray:
    """A weight as its 2-D matrix: a convolution's [out, in / group, kh, kw] becomes [out, in / group * kh * kw].

    Columns follow the convolution's patch layout (input channel, then kernel row, then kernel column); 2-D
    stays as it is.
    """
    return values.reshape(values.shape[0], -1) if values.ndim > 2 else values


def describe_parameter(model: onnx.ModelProto, param: Parameter) -> str:
    """E.g. "int8 per-channel (axis 0)" or "float"."""
    if isinstance(param, FloatTensor):
        return "float"
    inits = initializers(model)
    dtype = integer_dtype(inits, param)
    n_scales = int(np.prod(inits[param.scale].dims))
    granularity = f"per-channel (axis {param.axis})" if n_scales > 1 else "per-tensor"
    at_run_time = ", quantized at run time" if param.quantize_node else ""
    return f"{np.dtype(dtype).name} {granularity}{at_run_time}"


def channel_view(values: NDArray, ndim: int, axis: int) -> NDArray:
    """Reshape a scalar or per-channel vector so it broadcasts along `axis` of an ndim array."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def clips_negatives(model: onnx.ModelProto, encoding: IntegerTensor) -> bool:
    """True when an integer activation cannot hold negative values: its zero point is its type's minimum.

    ONNX Runtime's QOperator format removes a Relu that follows a layer and
    quantizes the layer's output to [0, max] instead, so the output holds
    max(pre-activation, 0). False when the zero point is not a constant.
    """
    if encoding.zero_point is None:
        return True  # no zero point: uint8 zero, the bottom of its range
    inits = initializers(model)
    if encoding.zero_point not in inits:
        return False
    zero = numpy_helper.to_array(inits[encoding.zero_point])
    return bool(np.all(zero == ml_dtypes.iinfo(zero.dtype).min))


def tap_layer(model: onnx.ModelProto, layer: Layer) -> tuple[onnx.ModelProto, str, str]:
    """`model` (a copy where needed) and the float tensors holding the layer's x and pre-activation.

    A layer of an integer-operator format has integer x and y; the copy gets a
    DequantizeLinear for each (fresh tensor names), which is exactly the
    real value Q computes with: (q - zero_point) * scale. Tap the returned
    names with `with_outputs`; the model itself is never changed.
    """
    if layer.input_encoding is None and layer.output_encoding is None:
        return model, layer.input_tensor, layer.output_tensor
    tapped = copy.deepcopy(model)
    taken = {name for n in tapped.graph.node for name in (*n.input, *n.output)} | set(initializers(tapped))
    names = []
    for tensor, encoding in ((layer.input_tensor, layer.input_encoding), (layer.output_tensor, layer.output_encoding)):
        if encoding is None:
            names.append(tensor)
            continue
        name, i = f"{tensor}_onnxrepair_real", 1
        while name in taken:
            i += 1
            name = f"{tensor}_onnxrepair_real_{i}"
        taken.add(name)
        inputs = [encoding.tensor, encoding.scale] + ([encoding.zero_point] if encoding.zero_point else [])
        tapped.graph.node.append(onnx.helper.make_node("DequantizeLinear", inputs, [name], name=name))
        names.append(name)
    return tapped, names[0], names[1]


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns `tensors` (float) as graph outputs.

    Tensors that are already outputs or graph inputs are left as they are:
    ONNX forbids listing an output twice. Each new output takes its type and
    shape from shape inference, or [batch, features] where inference has none.
    """
    tapped = copy.deepcopy(model)
    present = {o.name for o in tapped.graph.output} | {i.name for i in tapped.graph.input}
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(tapped).graph.value_info}
    for name in tensors:
        if name in present:
            continue
        info = inferred.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None, None])
        tapped.graph.output.append(info)
        present.add(name)
    return tapped


def prefix(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that computes only `tensors`: its outputs, and just the nodes they need.

    ONNX Runtime runs every node of a graph whatever outputs are asked for (measured on
    EfficientNet-Lite0: its first convolution's output alone costs as much as the logits), so
    reading an early layer through the whole model wastes most of a pass.
    """
    wanted = list(dict.fromkeys(tensors))
    tapped = with_outputs(model, wanted)
    needed = set(wanted)
    kept = []
    for node in reversed(tapped.graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for attribute in node.attribute:  # a subgraph (If, Loop) reads outer names too
                for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    needed.update(name for n in graph.node for name in n.input if name)
    outputs = {o.name: o for o in tapped.graph.output}
    del tapped.graph.node[:]
    tapped.graph.node.extend(reversed(kept))
    del tapped.graph.output[:]
    tapped.graph.output.extend(outputs[name] for name in wanted if name in outputs)
    used = [t for t in tapped.graph.initializer if t.name in needed]
    del tapped.graph.initializer[:]
    tapped.graph.initializer.extend(used)
    del tapped.graph.value_info[:]
    return tapped
