"""ONNX graph reading and surgery: find dense layers, pair float and QDQ layers, tap tensors.

A dense layer is ``y = x @ W^T + b`` with x of shape [N, in] and y of shape
[N, out], written as one of:

    Gemm(x, W, b)                      (transB=1: W stored [out, in]; transB=0: [in, out])
    Add(MatMul(x, W), b)               (W stored [in, out]; skl2onnx, dynamo exports)

In the float model W and b are float initializers. In an ONNX Runtime QDQ model
each is ``DequantizeLinear(q, scale, zero_point)`` over an integer initializer,
and the MatMul output passes through a QuantizeLinear/DequantizeLinear pair
before the Add:

    x_q -> DQ --\\
    W_q -> DQ ---> Gemm -> [Q -> DQ] -> ...        MatMul -> Q -> DQ -> Add <- DQ <- b_q
    b_q -> DQ --/

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

logger = logging.getLogger(__name__)

DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})
QUANTIZE_OPS = frozenset({"QuantizeLinear"})


@dataclass(frozen=True)
class FloatTensor:
    """A parameter stored as a plain float initializer."""

    initializer: str


@dataclass(frozen=True)
class QuantizedTensor:
    """A parameter stored as ``DequantizeLinear(quantized, scale, zero_point)``.

    Attributes:
        quantized: name of the integer initializer.
        scale: name of the scale initializer (scalar or one per channel).
        zero_point: name of the zero-point initializer, or None (zero).
        axis: the channel axis of per-channel scales, normalised to be >= 0.
        dequantize_node: name of the DequantizeLinear node.
    """

    quantized: str
    scale: str
    zero_point: str | None
    axis: int
    dequantize_node: str


Parameter = FloatTensor | QuantizedTensor


@dataclass(frozen=True)
class DenseLayer:
    """One repairable dense layer of a model.

    Attributes:
        name: the node name of the Gemm or MatMul (what ``--layer`` takes).
        op: "Gemm" or "MatMul+Add".
        input_tensor: the layer input x, [N, in].
        output_tensor: the pre-activation output y, [N, out].
        weight: where W is stored.
        weight_transposed: True when W is stored [in, out] rather than [out, in].
        bias: where b is stored, or None for a layer without bias.
        n_in, n_out: the layer's fan-in and number of neurons.
    """

    name: str
    op: str
    input_tensor: str
    output_tensor: str
    weight: Parameter
    weight_transposed: bool
    bias: Parameter | None
    n_in: int
    n_out: int

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, QuantizedTensor)


@dataclass(frozen=True)
class LayerPair:
    """A float layer and its QDQ counterpart, and how they were matched."""

    float_layer: DenseLayer
    quant_layer: DenseLayer
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
    if not any(n.op_type in DEQUANTIZE_OPS for n in quant_model.graph.node):
        raise ModelPairingError(
            "QUANT has no DequantizeLinear node, so it is not a QDQ model; pass the model "
            "written by onnxruntime.quantization.quantize_static (QuantFormat.QDQ)"
        )


def find_dense_layers(model: onnx.ModelProto) -> list[DenseLayer]:
    """All repairable dense layers, in graph order."""
    index = _GraphIndex(model)
    layers = []
    for node in model.graph.node:
        layer = index.dense_layer(node)
        if layer is not None:
            layers.append(layer)
    return layers


def pair_layer(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, name: str | None) -> LayerPair:
    """Find the float layer called `name` (default: the last dense layer) and its QDQ twin.

    Pairs by node name first; when the quantizer renamed nodes, by position among
    the dense layers, provided the weight shapes agree.

    Raises:
        ModelPairingError: no such layer, or no matching layer in QUANT.
        UnsupportedModelError: the QUANT layer's weights are not quantized.
    """
    float_layers = find_dense_layers(float_model)
    quant_layers = find_dense_layers(quant_model)
    if not float_layers:
        raise UnsupportedModelError("FLOAT has no dense layer (Gemm, or MatMul followed by Add, with constant weights)")
    if name is None:
        position = len(float_layers) - 1
    else:
        names = [layer.name for layer in float_layers]
        if name not in names:
            raise ModelPairingError(f"FLOAT has no dense layer named '{name}'; its dense layers are {names}")
        position = names.index(name)
    float_layer = float_layers[position]
    by_name = [q for q in quant_layers if q.name == float_layer.name]
    if by_name:
        quant_layer, paired_by = by_name[0], "name"
    elif len(quant_layers) == len(float_layers):
        quant_layer, paired_by = quant_layers[position], "position"
    else:
        raise ModelPairingError(
            f"QUANT has no dense layer named '{float_layer.name}', and its {len(quant_layers)} dense "
            f"layer(s) cannot be matched by position with FLOAT's {len(float_layers)}"
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


def dense_parameters(model: onnx.ModelProto, layer: DenseLayer) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The layer's effective (dequantized) W as [out, in] and b as [out]."""
    inits = initializers(model)
    weight = parameter_value(inits, layer.weight)
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


def layer_grid(model: onnx.ModelProto, layer: DenseLayer) -> LayerGrid:
    """The integer grid of a layer's weights and bias (see LayerGrid)."""
    inits = initializers(model)
    w_step, w_low, w_high = _parameter_grid(inits, layer.weight)
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
    q = numpy_helper.to_array(inits[param.quantized])
    info = ml_dtypes.iinfo(q.dtype)
    scale = channel_view(numpy_helper.to_array(inits[param.scale]).astype(np.float64), q.ndim, param.axis)
    q64 = q.astype(np.float64)
    return np.broadcast_to(scale, q.shape).copy(), info.min - q64, info.max - q64


def parameter_value(inits: dict[str, onnx.TensorProto], param: Parameter) -> NDArray[np.float64]:
    """The float value of a parameter, dequantized when it is quantized."""
    if isinstance(param, FloatTensor):
        return numpy_helper.to_array(inits[param.initializer]).astype(np.float64)
    q = numpy_helper.to_array(inits[param.quantized]).astype(np.float64)
    scale = numpy_helper.to_array(inits[param.scale]).astype(np.float64)
    zero = (
        numpy_helper.to_array(inits[param.zero_point]).astype(np.float64) if param.zero_point else np.zeros_like(scale)
    )
    return (q - channel_view(zero, q.ndim, param.axis)) * channel_view(scale, q.ndim, param.axis)


def describe_parameter(model: onnx.ModelProto, param: Parameter) -> str:
    """E.g. "int8 per-channel (axis 0)" or "float"."""
    if isinstance(param, FloatTensor):
        return "float"
    inits = initializers(model)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[param.quantized].data_type)
    n_scales = int(np.prod(inits[param.scale].dims))
    granularity = f"per-channel (axis {param.axis})" if n_scales > 1 else "per-tensor"
    return f"{np.dtype(dtype).name} {granularity}"


def channel_view(values: NDArray, ndim: int, axis: int) -> NDArray:
    """Reshape a scalar or per-channel vector so it broadcasts along `axis` of an ndim array."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


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


class _GraphIndex:
    """Producer/consumer lookups over one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = initializers(model)
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}

    def dense_layer(self, node: onnx.NodeProto) -> DenseLayer | None:
        if node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
            return self._gemm(node)
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            return self._matmul_add(node)
        return None

    def _gemm(self, node: onnx.NodeProto) -> DenseLayer | None:
        weight = self.parameter(node.input[1])
        if weight is None:
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None  # not of the form x @ W + b; left out of the list rather than mis-repaired
        transposed = not attrs.get("transB", 0)
        shape = self.shape(weight)
        if len(shape) != 2:
            return None
        n_out, n_in = (shape[1], shape[0]) if transposed else shape
        bias = self.parameter(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return DenseLayer(node.name, "Gemm", node.input[0], node.output[0], weight, transposed, bias, n_in, n_out)

    def _matmul_add(self, node: onnx.NodeProto) -> DenseLayer | None:
        weight = self.parameter(node.input[1])
        if weight is None or len(self.shape(weight)) != 2:
            return None
        n_in, n_out = self.shape(weight)
        add, matmul_side = self._next_add(node.output[0])
        if add is None:
            return None
        bias = self.parameter(add.input[1 - matmul_side])
        if bias is None or int(np.prod(self.shape(bias))) not in (1, n_out):
            return None
        return DenseLayer(node.name, "MatMul+Add", node.input[0], add.output[0], weight, True, bias, n_in, n_out)

    def _next_add(self, tensor: str) -> tuple[onnx.NodeProto | None, int]:
        """The Add that consumes `tensor`, looking through one Q -> DQ pair."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type in QUANTIZE_OPS and tensor not in self.graph_outputs:
            dq_users = self.consumers.get(users[0].output[0], [])
            if len(dq_users) == 1 and dq_users[0].op_type in DEQUANTIZE_OPS:
                tensor = dq_users[0].output[0]
                users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == "Add" and tensor not in self.graph_outputs:
            return users[0], list(users[0].input).index(tensor)
        return None, 0

    def parameter(self, tensor: str) -> Parameter | None:
        """How `tensor` is stored, when it is a constant parameter."""
        if tensor in self.inits:
            return FloatTensor(tensor) if _is_float(self.inits[tensor]) else None
        node = self.producer.get(tensor)
        if node is None or node.op_type not in DEQUANTIZE_OPS or node.input[0] not in self.inits:
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size", 0):
            raise UnsupportedModelError(
                f"node '{node.name}' uses blocked quantization (block_size={attrs['block_size']}), "
                "which onnxrepair does not rewrite yet"
            )
        quantized = self.inits[node.input[0]]
        axis = int(attrs.get("axis", 1))
        if axis < 0:
            axis += len(quantized.dims)
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return QuantizedTensor(node.input[0], node.input[1], zero_point, axis, node.name)

    def shape(self, param: Parameter) -> tuple[int, ...]:
        name = param.initializer if isinstance(param, FloatTensor) else param.quantized
        return tuple(self.inits[name].dims)


def _is_float(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    )
