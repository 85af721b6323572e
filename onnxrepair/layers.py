"""What a dense layer is, in every form an exporter or ONNX Runtime's quantizer writes, and why a node is not one.

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

Two more forms are dense layers too:

    Conv(x, W, b) with a 1x1 kernel over a 1x1 feature map   (W stored [out, in, 1, 1]; MobileNetV2-style heads)

and the integer-operator formats ONNX Runtime writes, whose activations are
integers between layers (QOperator) or quantized on the fly (dynamic):

    QGemm / QLinearMatMul [-> QLinearAdd(b)] / QLinearConv     x_q, y_q: integer tensors with their scale and zero point
    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q) -> Cast -> Mul(scale_x * scale_W) [-> Add(b)]

For those the layer records how x and y are encoded (`IntegerTensor`;
graph.tap_layer reads them as real numbers). Every node of a layer-like op
that is not repairable gets a reason (`rejected_layers`).

Reading only: nothing here changes a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})
QUANTIZE_OPS = frozenset({"QuantizeLinear"})
# ops whose presence makes a model a quantized one onnxrepair may read
QUANTIZED_OPS = frozenset(
    {
        "DequantizeLinear",
        "QGemm",
        "QLinearMatMul",
        "QLinearConv",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
    }
)
# ops that compute x @ W (+ b) in some form: each is a layer or gets a reason why not
LAYER_OPS = frozenset(
    {"Gemm", "MatMul", "Conv", "QGemm", "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger"}
)


@dataclass(frozen=True)
class FloatTensor:
    """A parameter stored as a plain float initializer."""

    initializer: str


@dataclass(frozen=True)
class QuantizedTensor:
    """A parameter stored as ``DequantizeLinear(quantized, scale, zero_point)``.

    Or, in the integer-operator formats, the same triple read directly by
    QGemm / QLinearMatMul / QLinearConv / QLinearAdd / MatMulInteger.

    Attributes:
        quantized: name of the integer initializer.
        scale: name of the scale initializer (scalar or one per channel).
        zero_point: name of the zero-point initializer, or None (zero).
        axis: the channel axis of per-channel scales, normalised to be >= 0.
        dequantize_node: name of the one node that reads the integer
            initializer (the DequantizeLinear, or the integer operator).
        scale_factor: an initializer the scale is multiplied by, or None: the
            int32 bias of QGemm / QLinearConv has scale scale_x * scale_W.
    """

    quantized: str
    scale: str
    zero_point: str | None
    axis: int
    dequantize_node: str
    scale_factor: str | None = None


@dataclass(frozen=True)
class IntegerTensor:
    """An activation held as integers between integer operators: real = (tensor - zero_point) * scale.

    All three are tensor names (initializers, or DynamicQuantizeLinear outputs).
    """

    tensor: str
    scale: str
    zero_point: str | None


Parameter = FloatTensor | QuantizedTensor


@dataclass(frozen=True)
class Layer:
    """One repairable dense layer of a model.

    Attributes:
        name: the node name of the Gemm, MatMul or Conv (what ``--layer`` takes).
        op: "Gemm", "MatMul+Add", "MatMul", "Conv1x1", or the integer operator
            ("QGemm", "QLinearMatMul+QLinearAdd", "QLinearConv1x1", "MatMulInteger+Add"...).
        input_tensor: the layer input x, [N, in] (a 1x1 Conv's [N, in, 1, 1]).
        output_tensor: the pre-activation output y, [N, out].
        weight: where W is stored.
        weight_transposed: True when W is stored [in, out] rather than [out, in]
            (a Conv's [out, in, 1, 1] counts as [out, in]).
        bias: where b is stored, or None for a layer without bias.
        n_in, n_out: the layer's fan-in and number of neurons.
        input_encoding, output_encoding: how x and y are stored when they are
            integer tensors (integer-operator formats); None for float tensors.
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
    input_encoding: IntegerTensor | None = None
    output_encoding: IntegerTensor | None = None

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, QuantizedTensor)


@dataclass(frozen=True)
class RejectedLayer:
    """A node that computes x @ W in some form but is not a repairable layer, and why."""

    name: str
    op: str
    reason: str

    def describe(self) -> str:
        return f"{self.op} '{self.name}': {self.reason}"


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """All repairable dense layers, in graph order."""
    index = _GraphIndex(model)
    found = (index.dense_layer(node) for node in model.graph.node)
    return [layer for layer in found if isinstance(layer, Layer)]


def rejected_layers(model: onnx.ModelProto) -> list[RejectedLayer]:
    """Nodes of a layer-like op (Gemm, MatMul, Conv, their integer forms) that are not repairable, with the reason."""
    index = _GraphIndex(model)
    found = (index.dense_layer(node) for node in model.graph.node)
    return [layer for layer in found if isinstance(layer, RejectedLayer)]


def _matrix(shape: tuple[int, ...], operand: str) -> tuple[int, int]:
    """`shape` when it is a matrix's; a Gemm/MatMul weight of another rank is no dense layer."""
    if len(shape) != 2:
        raise _Reject(f"weight {operand} has shape {list(shape)}; a dense layer's weight is a matrix")
    return shape[0], shape[1]


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


class _GraphIndex:
    """Producer/consumer lookups over one graph, and the reading of each layer-like node."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = initializers(model)
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}
        self._shapes: dict[str, tuple[int | None, ...]] | None = None

    def dense_layer(self, node: onnx.NodeProto) -> Layer | RejectedLayer | None:
        """The layer `node` computes; a rejection with its reason; None for nodes of other ops."""
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            return None
        read = {
            "Gemm": self._gemm,
            "MatMul": self._matmul_add,
            "Conv": self._conv,
            "QGemm": self._qgemm,
            "QLinearMatMul": self._qlinear_matmul,
            "QLinearConv": self._qlinear_conv,
            "MatMulInteger": self._matmul_integer,
            "ConvInteger": self._conv_integer,
        }[node.op_type]
        try:
            return read(node)
        except _Reject as reject:
            return RejectedLayer(node.name, node.op_type, str(reject))
        except (ValueError, IndexError, KeyError, TypeError) as exc:  # a form no reader expects: one node, not all
            return RejectedLayer(node.name, node.op_type, f"not a form onnxrepair reads ({type(exc).__name__}: {exc})")

    # --- float and QDQ forms -------------------------------------------------------------------

    def _gemm(self, node: onnx.NodeProto) -> Layer:
        weight = self.constant(node.input[1], "B")
        attrs = _attributes(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise _Reject("transA=1, alpha != 1 or beta != 1 is not of the form x @ W + b")
        transposed = not attrs.get("transB", 0)
        shape = _matrix(self.shape(weight), "B")
        n_out, n_in = (shape[1], shape[0]) if transposed else shape
        bias = self.constant(node.input[2], "C", matrix=False) if len(node.input) > 2 and node.input[2] else None
        return Layer(node.name, "Gemm", node.input[0], node.output[0], weight, transposed, bias, n_in, n_out)

    def _matmul_add(self, node: onnx.NodeProto) -> Layer:
        weight = self.constant(node.input[1], "B")
        n_in, n_out = _matrix(self.shape(weight), "B")
        add, matmul_side = self._next_add(node.output[0])
        bias = self.parameter(add.input[1 - matmul_side], bias=True) if add is not None else None
        if add is None or bias is None or int(np.prod(self.shape(bias))) not in (1, n_out):
            return Layer(node.name, "MatMul", node.input[0], node.output[0], weight, True, None, n_in, n_out)
        return Layer(node.name, "MatMul+Add", node.input[0], add.output[0], weight, True, bias, n_in, n_out)

    def _conv(self, node: onnx.NodeProto) -> Layer:
        weight = self.constant(node.input[1], "W")
        n_out, n_in = self._check_conv_1x1(node, self.shape(weight))
        bias = self.constant(node.input[2], "B", matrix=False) if len(node.input) > 2 and node.input[2] else None
        return Layer(node.name, "Conv1x1", node.input[0], node.output[0], weight, False, bias, n_in, n_out)

    def _check_conv_1x1(self, node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, int]:
        """(out, in) of a Conv that is a dense layer: 1x1 kernel, one group, no padding, over a 1x1 map."""
        attrs = _attributes(node)
        if len(shape) != 4:
            raise _Reject(f"a {len(shape) - 2}-D convolution; only 2-D 1x1 Convs over a 1x1 map are dense layers")
        if tuple(shape[2:]) != (1, 1):
            raise _Reject(f"kernel {shape[2]}x{shape[3]}; only a 1x1 Conv over a 1x1 map is a dense layer")
        if attrs.get("group", 1) != 1:
            raise _Reject(f"group={attrs['group']}; only a Conv with one group is a dense layer")
        if any(attrs.get("pads", [])):
            raise _Reject("padded; only an unpadded 1x1 Conv over a 1x1 map is a dense layer")
        spatial = self.spatial(node.input[0])
        if spatial is not None and spatial != (1, 1):
            size = "x".join("?" if d is None else str(d) for d in spatial)
            raise _Reject(f"a 1x1 Conv over a {size} feature map; only one over a 1x1 map is a dense layer")
        return shape[0], shape[1]

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

    # --- integer-operator forms (QOperator, dynamic) -------------------------------------------

    def _qgemm(self, node: onnx.NodeProto) -> Layer:
        """QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C?, y_scale?, y_zp?): C is int32 with scale a_scale * b_scale."""
        attrs = _attributes(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            raise _Reject("transA=1 or alpha != 1 is not of the form x @ W + b")
        transposed = not attrs.get("transB", 0)
        shape = _matrix(self.integer_shape(node.input[3], "B"), "B")
        n_out, n_in = (shape[1], shape[0]) if transposed else shape
        weight = self.operand(node, 3, axis=1 if transposed else 0)
        bias = self.int32_bias(node, 6, node.input[4], node.input[1]) if _has(node, 6) else None
        output = self.encoding(node.output[0], node, 7, 8) if _has(node, 7) else None
        return Layer(
            node.name, "QGemm", node.input[0], node.output[0], weight, transposed, bias, n_in, n_out,
            self.encoding(node.input[0], node, 1, 2), output,
        )  # fmt: skip

    def _qlinear_matmul(self, node: onnx.NodeProto) -> Layer:
        """QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp) [-> QLinearAdd(y, bias)]."""
        n_in, n_out = _matrix(self.integer_shape(node.input[3], "b"), "b")
        weight = self.operand(node, 3, axis=1)
        output, bias, op = node.output[0], None, "QLinearMatMul"
        out_encoding = self.encoding(node.output[0], node, 6, 7)
        users = self.consumers.get(output, [])
        if len(users) == 1 and users[0].op_type == "QLinearAdd" and output not in self.graph_outputs:
            add = users[0]
            side = 3 if add.input[0] == output else 0
            if add.input[side] in self.inits and int(np.prod(self.inits[add.input[side]].dims)) in (1, n_out):
                bias = self.operand(add, side, axis=len(self.inits[add.input[side]].dims) - 1)
                output, op = add.output[0], "QLinearMatMul+QLinearAdd"
                out_encoding = self.encoding(add.output[0], add, 6, 7)
        return Layer(
            node.name, op, node.input[0], output, weight, True, bias, n_in, n_out,
            self.encoding(node.input[0], node, 1, 2), out_encoding,
        )  # fmt: skip

    def _qlinear_conv(self, node: onnx.NodeProto) -> Layer:
        """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B?): B int32, scale x_scale * w_scale."""
        n_out, n_in = self._check_conv_1x1(node, self.integer_shape(node.input[3], "w"))
        weight = self.operand(node, 3, axis=0)
        bias = self.int32_bias(node, 8, node.input[4], node.input[1]) if _has(node, 8) else None
        return Layer(
            node.name, "QLinearConv1x1", node.input[0], node.output[0], weight, False, bias, n_in, n_out,
            self.encoding(node.input[0], node, 1, 2), self.encoding(node.output[0], node, 6, 7),
        )  # fmt: skip

    def _matmul_integer(self, node: onnx.NodeProto) -> Layer:
        """DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul(x_scale * W_scale) -> Add?"""
        n_in, n_out = _matrix(self.integer_shape(node.input[1], "B"), "B")
        return self._dynamic(node, "MatMulInteger", n_in, n_out, transposed=True, channel_axis=1)

    def _conv_integer(self, node: onnx.NodeProto) -> Layer:
        """DynamicQuantizeLinear(x) -> ConvInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul -> Add(Reshape(b))?, 1x1."""
        n_out, n_in = self._check_conv_1x1(node, self.integer_shape(node.input[1], "w"))
        return self._dynamic(node, "ConvInteger1x1", n_in, n_out, transposed=False, channel_axis=0)

    def _dynamic(
        self, node: onnx.NodeProto, op: str, n_in: int, n_out: int, transposed: bool, channel_axis: int
    ) -> Layer:
        """The dynamic-quantization pattern around MatMulInteger / ConvInteger (ONNX Runtime's quantize_dynamic)."""
        source = self.producer.get(node.input[0])
        if source is None or source.op_type != "DynamicQuantizeLinear":
            raise _Reject("its input does not come from DynamicQuantizeLinear, so its scale is unknown")
        x_encoding = IntegerTensor(source.output[0], source.output[1], source.output[2])
        cast = self._only_user(node.output[0], "Cast")
        mul = self._only_user(cast.output[0], "Mul")
        factor = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        scales = self.producer.get(factor)
        if scales is None or scales.op_type != "Mul":
            raise _Reject("its output is not scaled by Mul(x_scale, W_scale)")
        w_scale = next((name for name in scales.input if name in self.inits), None)
        if w_scale is None or source.output[1] not in scales.input:
            raise _Reject("its output is not scaled by Mul(x_scale, W_scale) with W_scale an initializer")
        zero = node.input[3] if _has(node, 3) else None
        if zero is not None and zero not in self.inits:
            raise _Reject(f"the zero point '{zero}' of its weights is not an initializer")
        axis = channel_axis if int(np.prod(self.inits[w_scale].dims)) > 1 else 0
        weight = QuantizedTensor(node.input[1], w_scale, zero, axis, node.name)
        add, side = self._next_add(mul.output[0])
        bias = self.parameter(add.input[1 - side], bias=True) if add is not None else None
        if add is None or bias is None or int(np.prod(self.shape(bias))) not in (1, n_out):
            return Layer(node.name, op, node.input[0], mul.output[0], weight, transposed, None, n_in, n_out, x_encoding)
        return Layer(
            node.name, f"{op}+Add", node.input[0], add.output[0], weight, transposed, bias, n_in, n_out, x_encoding
        )

    def _only_user(self, tensor: str, op: str) -> onnx.NodeProto:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != op:
            found = [u.op_type for u in users]
            raise _Reject(f"'{tensor}' goes to {found or 'no node'}, expected one {op} (the dynamic pattern)")
        return users[0]

    def operand(self, node: onnx.NodeProto, position: int, axis: int) -> QuantizedTensor:
        """The (q, scale, zero point) inputs at `position`, +1, +2 of an integer operator, q an initializer."""
        quantized = node.input[position]
        if quantized not in self.inits:
            raise _Reject(f"its input '{quantized}' is not a constant initializer")
        if _is_float(self.inits[quantized]):
            raise _Reject(f"its input '{quantized}' is float, not integer")
        scale, zero = node.input[position + 1], node.input[position + 2] if _has(node, position + 2) else None
        for name in (scale, zero):
            if name is not None and name not in self.inits:
                raise _Reject(f"the scale or zero point '{name}' of '{quantized}' is not an initializer")
        if int(np.prod(self.inits[scale].dims)) == 1:
            axis = 0
        return QuantizedTensor(quantized, scale, zero, axis, node.name)

    def int32_bias(self, node: onnx.NodeProto, position: int, w_scale: str, x_scale: str) -> QuantizedTensor:
        name = node.input[position]
        if name not in self.inits or self.inits[name].data_type != onnx.TensorProto.INT32:
            raise _Reject(f"its bias '{name}' is not an int32 initializer")
        if x_scale not in self.inits or w_scale not in self.inits:
            raise _Reject("the scales of its input and weight are not initializers")
        return QuantizedTensor(name, w_scale, None, 0, node.name, scale_factor=x_scale)

    def encoding(self, tensor: str, node: onnx.NodeProto, scale: int, zero: int) -> IntegerTensor:
        if not _has(node, scale):
            raise _Reject(f"no scale for '{tensor}'")
        return IntegerTensor(tensor, node.input[scale], node.input[zero] if _has(node, zero) else None)

    def integer_shape(self, name: str, role: str) -> tuple[int, ...]:
        if name not in self.inits:
            raise _Reject(f"its weight input {role} '{name}' is not a constant initializer")
        shape = tuple(self.inits[name].dims)
        if len(shape) not in (2, 4):
            raise _Reject(f"its weight '{name}' has shape {list(shape)}")
        return shape

    # --- parameters ----------------------------------------------------------------------------

    def constant(self, tensor: str, role: str, matrix: bool = True) -> Parameter:
        """The parameter behind input `role` of a layer; a rejection when it is not a constant we can read."""
        param = self.parameter(tensor)
        if param is None:
            raise _Reject(
                f"its input {role} '{tensor}' is not a constant (float initializer or DequantizeLinear of one)"
            )
        if matrix and len(self.shape(param)) not in (2, 4):
            raise _Reject(f"its input {role} '{tensor}' has shape {list(self.shape(param))}, not a matrix")
        return param

    def parameter(self, tensor: str, bias: bool = False) -> Parameter | None:
        """How `tensor` is stored, when it is a constant parameter.

        `bias`: also look through a Reshape of a float initializer (callers check that its size is n_out;
        a reshaped weight matrix would be read in the wrong layout, so weights never do).
        """
        if tensor in self.inits:
            return FloatTensor(tensor) if _is_float(self.inits[tensor]) else None
        node = self.producer.get(tensor)
        if bias and node is not None and node.op_type == "Reshape" and node.input[0] in self.inits:
            # a bias reshaped to [1, out, 1, 1] for a Conv's Add (quantize_dynamic): the values are the initializer's
            return FloatTensor(node.input[0]) if _is_float(self.inits[node.input[0]]) else None
        if node is None or node.op_type not in DEQUANTIZE_OPS or node.input[0] not in self.inits:
            return None
        attrs = _attributes(node)
        if attrs.get("block_size", 0):
            raise _Reject(
                f"its weights come from '{node.name}', which uses blocked quantization "
                f"(block_size={attrs['block_size']}), which onnxrepair does not rewrite yet"
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

    def spatial(self, tensor: str) -> tuple[int | None, ...] | None:
        """The spatial dimensions of a 4-D activation from shape inference; None when unknown."""
        if self._shapes is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # inference is a hint here; unknown shapes are checked when the layer is read
                inferred = self.model
            self._shapes = {}
            for value in (*inferred.graph.value_info, *inferred.graph.input):
                if value.type.tensor_type.HasField("shape"):
                    dims = value.type.tensor_type.shape.dim
                    self._shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        shape = self._shapes.get(tensor)
        if shape is None or len(shape) != 4 or (shape[2] is None and shape[3] is None):
            return None
        return shape[2:]


class _Reject(Exception):
    """Why a layer-like node is not a repairable layer (internal: becomes a RejectedLayer)."""


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _has(node: onnx.NodeProto, position: int) -> bool:
    return len(node.input) > position and bool(node.input[position])


def _is_float(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    )
