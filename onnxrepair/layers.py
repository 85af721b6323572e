"""What a repairable layer is, in every form an exporter or ONNX Runtime's quantizer writes, and why a node is not one.

A layer is a linear map from *rows* to *channels* (DESIGN.md). A dense layer
is ``y = x @ W^T + b`` with x of shape [N, in] and y of shape [N, out]: one row
per input. A 2-D convolution is the same map applied to every patch (kernel
window x the input channels of a group) of its input: one row per (input,
output position), one channel per output channel. Dense layers are written as
one of:

    Gemm(x, W, b)                      (transB=1: W stored [out, in]; transB=0: [in, out])
    Add(MatMul(x, W), b)               (W stored [in, out]; skl2onnx, dynamo exports)

In the float model W and b are float initializers. In an ONNX Runtime QDQ model
each is ``DequantizeLinear(q, scale, zero_point)`` over an integer initializer,
and the MatMul output passes through a QuantizeLinear/DequantizeLinear pair
before the Add:

    x_q -> DQ --\\
    W_q -> DQ ---> Gemm -> [Q -> DQ] -> ...        MatMul -> Q -> DQ -> Add <- DQ <- b_q
    b_q -> DQ --/

Convolutions are ``Conv(x, W, b)`` with W stored [out, in / group, kh, kw]
(any kernel, strides, pads or auto_pad, dilations and group; `ConvGeometry`),
read as the matrix [out, in / group * kh * kw]. The integer-operator formats
ONNX Runtime writes, whose activations are integers between layers
(QOperator) or quantized on the fly (dynamic), are layers too:

    QGemm / QLinearMatMul [-> QLinearAdd(b)] / QLinearConv     x_q, y_q: integer tensors with their scale and zero point
    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q) -> Cast -> Mul(scale_x * scale_W) [-> Add(b)]
    DynamicQuantizeLinear(x) -> ConvInteger(x_q, W_q) -> Cast -> Mul(scale_x * scale_W) [-> Add(Reshape(b))]

For those the layer records how x and y are encoded (`IntegerTensor`;
graph.tap_layer reads them as real numbers). Every node of a layer-like op
that is not repairable gets a reason (`rejected_layers`).

Reading only: nothing here changes a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

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
        quantize_node: set when `quantized` is a float initializer that this
            QuantizeLinear quantizes at run time with the same scale and zero
            point (AIMET-ONNX's default export): the integers are
            round(w / scale) + zero_point, and a repair writes s * (q - zp) back.
    """

    quantized: str
    scale: str
    zero_point: str | None
    axis: int
    dequantize_node: str
    scale_factor: str | None = None
    quantize_node: str | None = None


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
class ConvGeometry:
    """Where a 2-D convolution's output positions look in its input (ONNX Conv attributes, 2-D).

    Attributes:
        kernel: (kh, kw).
        strides, dilations: (along H, along W).
        pads: (top, left, bottom, right), used when auto_pad is NOTSET.
        auto_pad: NOTSET, VALID, SAME_UPPER or SAME_LOWER (resolved for an input size by `padding`).
        group: input and output channels are split into this many groups; output
            channel j reads only the input channels of group j // (out / group).
        in_channels: the input's channels (all groups).
    """

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    in_channels: int = 1
    auto_pad: str = "NOTSET"

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) zero padding for an input of height x width."""
        if self.auto_pad in ("NOTSET", ""):
            return self.pads
        if self.auto_pad == "VALID":
            return (0, 0, 0, 0)
        begin_end = []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations, strict=True):
            out = -(-size // s)  # ceil
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin_end.append((small, large) if self.auto_pad == "SAME_UPPER" else (large, small))
        (top, bottom), (left, right) = begin_end
        return (top, left, bottom, right)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.padding(height, width)
        sizes = []
        for size, before, after, k, s, d in zip(
            (height, width), (top, left), (bottom, right), self.kernel, self.strides, self.dilations, strict=True
        ):
            sizes.append((size + before + after - (k - 1) * d - 1) // s + 1)
        return sizes[0], sizes[1]

    def describe(self) -> str:
        """E.g. "3x3/2 g32" (kernel, stride when not 1, groups when more than one)."""
        text = f"{self.kernel[0]}x{self.kernel[1]}"
        if self.strides != (1, 1):
            text += f"/{self.strides[0]}" if self.strides[0] == self.strides[1] else f"/{self.strides}"
        if self.dilations != (1, 1):
            text += f" d{self.dilations[0]}" if self.dilations[0] == self.dilations[1] else f" d{self.dilations}"
        if self.group > 1:
            text += " dw" if self.group == self.in_channels else f" g{self.group}"
        return text


@dataclass(frozen=True)
class ResidualAdd:
    """The Add right after a layer that sums its output with another branch (a skip connection).

    Attributes:
        output: the Add's output (in this model).
        other: the other branch it adds to the layer's output.
    """

    output: str
    other: str


@dataclass(frozen=True)
class Layer:
    """One repairable layer of a model: dense, or a 2-D convolution.

    Attributes:
        name: the node name of the Gemm, MatMul or Conv (what ``--layer`` takes).
        op: "Gemm", "MatMul+Add", "MatMul", "Conv", or the integer operator
            ("QGemm", "QLinearMatMul+QLinearAdd", "QLinearConv", "MatMulInteger+Add", "ConvInteger+Add"...).
        input_tensor: the layer input x, [N, in] (a convolution's [N, C, H, W]).
        output_tensor: the pre-activation output y, [N, out] ([N, out, H', W']).
        weight: where W is stored.
        weight_transposed: True when W is stored [in, out] rather than [out, in]
            (a convolution's [out, in / group, kh, kw] counts as [out, n_in]).
        bias: where b is stored, or None for a layer without bias.
        n_in: the fan-in of one channel (a convolution's in / group * kh * kw).
        n_out: the layer's neurons (output channels).
        input_encoding, output_encoding: how x and y are stored when they are
            integer tensors (integer-operator formats); None for float tensors.
        conv: the convolution's geometry; None for a dense layer.
        clip: the range a Relu or Clip right after the layer clips its output to, or the range of the
            QuantizeLinear right after it (QDQ: the activation's 8-bit range); None without either.
        residual: the Add right after the layer that sums it with a skip connection; None without one.
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
    conv: ConvGeometry | None = None
    clip: tuple[float, float] | None = None
    residual: ResidualAdd | None = None

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, QuantizedTensor)

    @property
    def groups(self) -> int:
        return 1 if self.conv is None else self.conv.group

    @property
    def row_width(self) -> int:
        """Values in one row: every group's inputs (a convolution's in * kh * kw)."""
        return self.n_in * self.groups

    def columns(self, channel: int) -> slice:
        """The columns of a row that `channel` reads: its group's (all of them for a dense layer)."""
        group = channel // (self.n_out // self.groups)
        return slice(group * self.n_in, (group + 1) * self.n_in)

    @property
    def kind(self) -> str:
        """What --list-layers shows: "dense", or the kernel, stride and groups of a convolution."""
        return "dense" if self.conv is None else f"conv {self.conv.describe()}"


@dataclass(frozen=True)
class RejectedLayer:
    """A node that computes x @ W in some form but is not a repairable layer, and why."""

    name: str
    op: str
    reason: str

    def describe(self) -> str:
        return f"{self.op} '{self.name}': {self.reason}"


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """All repairable layers (dense and convolutions), in graph order."""
    index = _GraphIndex(model)
    found = (index.layer(node) for node in model.graph.node)
    return [layer for layer in found if isinstance(layer, Layer)]


def rejected_layers(model: onnx.ModelProto) -> list[RejectedLayer]:
    """Nodes of a layer-like op (Gemm, MatMul, Conv, their integer forms) that are not repairable, with the reason."""
    index = _GraphIndex(model)
    found = (index.layer(node) for node in model.graph.node)
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

    def layer(self, node: onnx.NodeProto) -> Layer | RejectedLayer | None:
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
            layer = read(node)
        except _Reject as reject:
            return RejectedLayer(node.name, node.op_type, str(reject))
        except (ValueError, IndexError, KeyError, TypeError) as exc:  # a form no reader expects: one node, not all
            return RejectedLayer(node.name, node.op_type, f"not a form onnxrepair reads ({type(exc).__name__}: {exc})")
        return dataclasses.replace(
            layer, clip=self.clip_after(layer.output_tensor), residual=self.residual_after(layer.output_tensor)
        )

    def _quantized_range(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        """The real range a per-tensor QuantizeLinear with constant scale and zero point can represent."""
        scale = self.inits.get(node.input[1]) if len(node.input) > 1 else None
        zero = self.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or (len(node.input) > 2 and node.input[2] and zero is None):
            return None
        scale_value, zero_value = numpy_helper.to_array(scale), numpy_helper.to_array(zero) if zero else np.uint8(0)
        if scale_value.size != 1 or np.asarray(zero_value).size != 1:
            return None
        info = ml_dtypes.iinfo(np.asarray(zero_value).dtype)
        step, offset = float(scale_value.reshape(-1)[0]), float(np.asarray(zero_value).reshape(-1)[0])
        return ((info.min - offset) * step, (info.max - offset) * step)

    def residual_after(self, tensor: str) -> ResidualAdd | None:
        """The Add that alone reads `tensor` (through one QuantizeLinear -> DequantizeLinear pair), with the
        other branch it adds; None when no such Add follows or its other input is a constant."""
        add, side = self._next_add(tensor)
        if add is None or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            return None
        other = add.input[1 - side]
        if other in self.inits or self.parameter(other) is not None:
            return None  # a bias, not a branch
        return ResidualAdd(add.output[0], other)

    def clip_after(self, tensor: str) -> tuple[float, float] | None:
        """The range a Relu, Clip or QuantizeLinear that alone reads `tensor` clips it to; None without one."""
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.graph_outputs:
            return None
        user = users[0]
        if user.op_type == "Relu":
            return (0.0, math.inf)
        if user.op_type in QUANTIZE_OPS:  # the range the output is quantized to clips it as well
            return self._quantized_range(user)
        if user.op_type != "Clip":
            return None
        bounds = [-math.inf, math.inf]
        attrs = _attributes(user)
        if "min" in attrs or "max" in attrs:  # opset < 11
            bounds = [float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))]
        for position in (1, 2):
            if _has(user, position):
                if user.input[position] not in self.inits:
                    return None
                bounds[position - 1] = float(numpy_helper.to_array(self.inits[user.input[position]]))
        return (bounds[0], bounds[1])

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
        weight = self.constant(node.input[1], "W", matrix=False)
        geometry, n_in, n_out = _conv_geometry(node, self.shape(weight))
        bias = self.constant(node.input[2], "B", matrix=False) if len(node.input) > 2 and node.input[2] else None
        return Layer(node.name, "Conv", node.input[0], node.output[0], weight, False, bias, n_in, n_out, conv=geometry)

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
        geometry, n_in, n_out = _conv_geometry(node, self.integer_shape(node.input[3], "w"))
        weight = self.operand(node, 3, axis=0)
        bias = self.int32_bias(node, 8, node.input[4], node.input[1]) if _has(node, 8) else None
        return Layer(
            node.name, "QLinearConv", node.input[0], node.output[0], weight, False, bias, n_in, n_out,
            self.encoding(node.input[0], node, 1, 2), self.encoding(node.output[0], node, 6, 7), geometry,
        )  # fmt: skip

    def _matmul_integer(self, node: onnx.NodeProto) -> Layer:
        """DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul(x_scale * W_scale) -> Add?"""
        n_in, n_out = _matrix(self.integer_shape(node.input[1], "B"), "B")
        return self._dynamic(node, "MatMulInteger", n_in, n_out, transposed=True, channel_axis=1)

    def _conv_integer(self, node: onnx.NodeProto) -> Layer:
        """DynamicQuantizeLinear(x) -> ConvInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul -> Add(Reshape(b))?."""
        geometry, n_in, n_out = _conv_geometry(node, self.integer_shape(node.input[1], "w"))
        return self._dynamic(node, "ConvInteger", n_in, n_out, transposed=False, channel_axis=0, conv=geometry)

    def _dynamic(
        self,
        node: onnx.NodeProto,
        op: str,
        n_in: int,
        n_out: int,
        transposed: bool,
        channel_axis: int,
        conv: ConvGeometry | None = None,
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
            output, bias = mul.output[0], None
        else:
            output, op = add.output[0], f"{op}+Add"
        return Layer(node.name, op, node.input[0], output, weight, transposed, bias, n_in, n_out, x_encoding, conv=conv)

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
        if node is None or node.op_type not in DEQUANTIZE_OPS:
            return None
        quantizer = self._runtime_quantizer(node)
        if node.input[0] not in self.inits and quantizer is None:
            return None
        attrs = _attributes(node)
        if attrs.get("block_size", 0):
            raise _Reject(
                f"its weights come from '{node.name}', which uses blocked quantization "
                f"(block_size={attrs['block_size']}), which onnxrepair does not rewrite yet"
            )
        stored = node.input[0] if quantizer is None else quantizer.input[0]
        axis = int(attrs.get("axis", 1))
        if axis < 0:
            axis += len(self.inits[stored].dims)
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return QuantizedTensor(
            stored,
            node.input[1],
            zero_point,
            axis,
            node.name,
            quantize_node=None if quantizer is None else quantizer.name,
        )

    def _runtime_quantizer(self, dequantize: onnx.NodeProto) -> onnx.NodeProto | None:
        """The QuantizeLinear that quantizes a float initializer into this DequantizeLinear at run time, with
        the same scale and zero point (so the pair only rounds the float weights); None otherwise."""
        node = self.producer.get(dequantize.input[0])
        if node is None or node.op_type not in QUANTIZE_OPS or node.input[0] not in self.inits:
            return None
        if not _is_float(self.inits[node.input[0]]) or list(node.input[1:3]) != list(dequantize.input[1:3]):
            return None
        if _attributes(node).get("axis", 1) != _attributes(dequantize).get("axis", 1) or not node.name:
            return None
        return node

    def shape(self, param: Parameter) -> tuple[int, ...]:
        name = param.initializer if isinstance(param, FloatTensor) else param.quantized
        return tuple(self.inits[name].dims)


class _Reject(Exception):
    """Why a layer-like node is not a repairable layer (internal: becomes a RejectedLayer)."""


def _conv_geometry(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[ConvGeometry, int, int]:
    """(geometry, fan-in of one channel, output channels) of a Conv-like node with weight `shape`."""
    if len(shape) != 4:
        raise _Reject(
            f"a {len(shape) - 2}-D convolution (weight shape {list(shape)}); only 2-D convolutions are layers"
        )
    attrs = _attributes(node)
    n_out, in_per_group, kh, kw = shape
    group = int(attrs.get("group", 1))
    if group < 1 or n_out % group:
        raise _Reject(f"group={group} does not divide its {n_out} output channels")
    kernel = tuple(attrs.get("kernel_shape", (kh, kw)))
    if kernel != (kh, kw):
        raise _Reject(f"kernel_shape {list(kernel)} differs from its weight's {kh}x{kw}")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    geometry = ConvGeometry(
        kernel=(kh, kw),
        strides=tuple(attrs.get("strides", (1, 1))),  # type: ignore[arg-type]
        pads=(pads[0], pads[1], pads[2], pads[3]),
        dilations=tuple(attrs.get("dilations", (1, 1))),  # type: ignore[arg-type]
        group=group,
        in_channels=in_per_group * group,
        auto_pad=auto_pad or "NOTSET",
    )
    return geometry, in_per_group * kh * kw, n_out


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
