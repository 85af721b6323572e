"""Run a model one segment at a time over kept boundary tensors: whole-network repair's inference.

Repairing layers in graph order changes, at every step, everything after the
layer and nothing before it. ONNX Runtime computes every node on the way to
what is asked for, so reading each layer's input from the model input costs
about a pass per layer (measured on EfficientNet-Lite0: reading the input of
its fifth layer costs 40 % of a full pass, of its fifteenth 50 %). Instead
the tensors that cross the cut before a layer (its input, skip connections)
are kept for every image, and only the segment between two cuts runs again
once the layer is patched.

Cuts are put before the DequantizeLinear nodes that feed a layer, so what
crosses them is mostly the 8-bit output of a QuantizeLinear: a quarter of the
float tensor. DequantizeLinear nodes are placed right before their first
consumer for that, and QuantizeLinear nodes right after what they quantize
(the graph stays topological; ONNX Runtime sees the same nodes). The patched
models keep QUANT's nodes in QUANT's order (rewrite.py), so a plan made once
serves every patched model.

This module knows ONNX and ONNX Runtime; it returns plain arrays.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from onnxrepair.graph import Layer, initializers, input_spec
from onnxrepair.parallel import Executor
from onnxrepair.runtime import stream_on

# Kept tensors above this many bytes (all images together) make `Segments.plan` give up: the caller
# reads each layer from the model input instead (slower; memory bounded by the batch).
MAX_KEPT_BYTES = 3 * 2**30

Kept = dict[str, NDArray]
_KEPT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.BOOL,
}


@dataclass(frozen=True, eq=False)
class LayerInput:
    """How a layer's input is read from the kept tensors: `tensor`, dequantized when `scale` is set
    (per tensor, or per channel along `axis` as NNCF quantizes some activations)."""

    tensor: str
    scale: float | NDArray[np.float32] | None = None
    zero_point: float | NDArray[np.float32] = 0.0
    axis: int = 1

    def read(self, kept: Kept, start: int, stop: int) -> NDArray[np.float32]:
        """Images start:stop of the layer's input, as the real numbers the quantized model computes with."""
        values = kept[self.tensor][start:stop]
        if self.scale is None:
            return np.asarray(values, np.float32)
        scale, zero = self._along(self.scale, values.ndim), self._along(self.zero_point, values.ndim)
        return (values.astype(np.float32) - zero) * scale

    def _along(self, value: float | NDArray[np.float32], ndim: int) -> np.float32 | NDArray[np.float32]:
        if np.ndim(value) == 0:
            return np.float32(value)
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        return np.asarray(value, np.float32).reshape(shape)


@dataclass(frozen=True)
class Segments:
    """A model's nodes in run order, cut before each repaired layer.

    Attributes:
        order: indices into the graph's nodes, each DequantizeLinear right before its first consumer.
        cuts: for each layer, the position in `order` where its segment starts.
        inputs: for each layer, how its input is read from the tensors crossing its cut.
        skips: for a layer followed by a residual Add, how the Add's other branch is read there.
        types: the type and shape (batch left free) of every tensor that crosses a cut or is an output.
        constants: the nodes computed from initializers alone (Constant nodes, a weight's Q), by output:
            never kept per image, each segment that reads one computes it itself (NNCF's graphs share
            one Constant as the bound of every Clip).
    """

    order: list[int]
    cuts: list[int]
    inputs: list[LayerInput]
    skips: list[LayerInput | None]
    graph_input: str
    outputs: list[str]
    types: dict[str, onnx.ValueInfoProto]
    constants: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def plan(
        cls, model: onnx.ModelProto, layers: Sequence[Layer], images: int, skips: Sequence[str | None] = ()
    ) -> Segments | None:
        """The segments of `model` before each of `layers` (in graph order); None where this does not work.

        `skips`: per layer, a tensor to read at its cut as well (the other branch of a residual Add after it).

        It does not where a layer's input is neither a kept tensor nor a DequantizeLinear of one with a
        constant scale (dynamic quantization computes the scale from each batch), where a tensor that
        crosses a cut has no known type, or where what crosses a cut for `images` images would exceed
        MAX_KEPT_BYTES.
        """
        nodes = list(model.graph.node)
        order, deferred, constant = _deferred_order(nodes, input_spec(model).name)
        position = {index: at for at, index in enumerate(order)}
        by_name = {node.name: i for i, node in enumerate(nodes) if node.name}
        producer = {out: i for i, node in enumerate(nodes) for out in node.output}
        inits = {**initializers(model), **_constant_values(model)}  # NNCF's scales are Constant nodes
        types = _value_infos(model)
        constants = {name: producer[name] for name in constant if name in producer}
        outputs = [o.name for o in model.graph.output]
        plan = cls(order, [], [], [], input_spec(model).name, outputs, types, constants)
        for layer, skip_tensor in zip(layers, [*skips, *[None] * (len(layers) - len(skips))], strict=True):
            if layer.name not in by_name:
                return None
            group = [nodes[by_name[layer.name]]]  # the layer and what dequantizes (or quantizes) its inputs
            cut = position[by_name[layer.name]]
            while cut > 0 and order[cut - 1] in deferred and any(_feeds(nodes[order[cut - 1]], n) for n in group):
                cut -= 1
                group.append(nodes[order[cut]])
            source = _layer_input(layer, nodes, producer, position, inits, cut)
            skip = None
            if skip_tensor is not None:
                skip = _readable(skip_tensor, nodes, producer, position, inits, cut)
                if skip is None:
                    return None
            if source is None or (plan.cuts and cut <= plan.cuts[-1]):
                return None
            plan.cuts.append(cut)
            plan.inputs.append(source)
            plan.skips.append(skip)
        for cut in plan.cuts:
            crossing = plan.crossing(model, cut)
            if any(name not in types or types[name].type.tensor_type.elem_type not in _KEPT_TYPES for name in crossing):
                return None  # no type known, or one numpy cannot hold (ONNX Runtime returns no int4 array)
            if plan.kept_bytes(crossing) * images > MAX_KEPT_BYTES:
                return None
        return plan

    def crossing(self, model: onnx.ModelProto, cut: int) -> list[str]:
        """The tensors computed before `cut` (or the graph input) that nodes from `cut` on, or outputs, read."""
        nodes = model.graph.node
        produced = {self.graph_input}
        for index in self.order[:cut]:
            produced.update(nodes[index].output)
        needed = {name for index in self.order[cut:] for name in nodes[index].input} | set(self.outputs)
        return sorted((produced & needed) - self.constants.keys())

    def kept_bytes(self, names: Sequence[str]) -> int:
        """Bytes per image of these tensors (their batch dimension left out)."""
        total = 0
        for name in names:
            tensor_type = self.types[name].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim[1:]]
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
            total += math.prod(dims) * itemsize
        return total

    def segment(self, model: onnx.ModelProto, start: int, end: int | None, outputs: Sequence[str]) -> onnx.ModelProto:
        """`model`'s nodes order[start:end] as a model from the tensors crossing `start` to `outputs`."""
        nodes = [model.graph.node[index] for index in self._with_constants(model, self.order[start:end])]
        produced = {out for node in nodes for out in node.output}
        consumed = {name for node in nodes for name in node.input if name}
        inits = {t.name: t for t in model.graph.initializer}
        crossing = set(self.crossing(model, start))
        inputs = sorted((consumed | set(outputs)) & (crossing - set(inits)))
        graph = onnx.helper.make_graph(
            nodes,
            "segment",
            [self.types[name] for name in inputs],
            [self.types[name] for name in outputs if name in produced],
            [inits[name] for name in sorted(consumed & set(inits))],
        )
        return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)

    def _with_constants(self, model: onnx.ModelProto, indices: Sequence[int]) -> list[int]:
        """`indices` after the constant nodes they read that they do not compute, producers first."""
        inside = set(indices)
        added: list[int] = []

        def add_producers(index: int) -> None:
            for name in model.graph.node[index].input:
                producer = self.constants.get(name)
                if producer is not None and producer not in inside:
                    inside.add(producer)
                    add_producers(producer)
                    added.append(producer)

        for index in indices:
            add_producers(index)
        return [*added, *indices]

    def advance(
        self,
        model: onnx.ModelProto,
        kept: Kept,
        start: int,
        end: int | None,
        batch_size: int,
        providers: Sequence[str] | None,
        extra: Sequence[str] = (),
        executor: Executor | None = None,
    ) -> tuple[Kept, dict[str, NDArray]]:
        """Run order[start:end] of `model` over `kept` (the tensors crossing `start`).

        Returns the tensors crossing `end` (the outputs when `end` is None), and the `extra` outputs.
        """
        crossing_end = self.crossing(model, end) if end is not None else list(self.outputs)
        segment = self.segment(model, start, end, [*crossing_end, *extra])
        produced = {o.name for o in segment.graph.output}
        wanted = [name for name in dict.fromkeys([*crossing_end, *extra]) if name in produced]
        count = len(next(iter(kept.values())))
        computed: dict[str, NDArray] = {}
        filled = 0
        for values in _run(segment, kept, wanted, batch_size, providers, executor):
            for name in wanted:  # one array per tensor, sized by the first batch: never a second copy
                if name not in computed:
                    computed[name] = np.empty((count, *values[name].shape[1:]), values[name].dtype)
                computed[name][filled : filled + len(values[name])] = values[name]
            filled += len(values[wanted[0]]) if wanted else 0
        following = {name: computed[name] if name in computed else kept[name] for name in crossing_end}
        return following, {name: computed[name] for name in extra if name in computed}

    def start(
        self,
        model: onnx.ModelProto,
        x: NDArray[np.float32],
        batch_size: int,
        providers: Sequence[str] | None,
        executor: Executor | None = None,
    ) -> Kept:
        """The tensors crossing the first cut, for images `x`."""
        kept, _ = self.advance(model, {self.graph_input: x}, 0, self.cuts[0], batch_size, providers, (), executor)
        return kept


def _run(
    segment: onnx.ModelProto,
    kept: Kept,
    outputs: Sequence[str],
    batch_size: int,
    providers: Sequence[str] | None,
    executor: Executor | None,
) -> Iterator[dict[str, NDArray]]:
    inits = {init.name for init in segment.graph.initializer}
    feeds = {i.name: kept[i.name] for i in segment.graph.input if i.name not in inits}
    for _, values in stream_on(executor, segment, "QUANT", feeds, outputs, batch_size, providers):
        yield values


def _feeds(node: onnx.NodeProto, consumer: onnx.NodeProto) -> bool:
    return any(out in consumer.input for out in node.output)


def _layer_input(
    layer: Layer,
    nodes: list[onnx.NodeProto],
    producer: dict[str, int],
    position: dict[int, int],
    inits: dict[str, onnx.TensorProto],
    cut: int,
) -> LayerInput | None:
    """How the layer's input is read from what crosses its cut: directly, or dequantized with a constant scale."""
    if layer.input_encoding is not None:  # QOperator: x is an integer tensor with its scale and zero point
        encoding = layer.input_encoding
        return _dequantized(encoding.tensor, encoding.scale, encoding.zero_point, inits)
    return _readable(layer.input_tensor, nodes, producer, position, inits, cut)


def _readable(
    tensor: str,
    nodes: list[onnx.NodeProto],
    producer: dict[str, int],
    position: dict[int, int],
    inits: dict[str, onnx.TensorProto],
    cut: int,
) -> LayerInput | None:
    """How `tensor` is read from what crosses `cut`: it crosses, or it dequantizes (constant scale) one that does."""
    index = producer.get(tensor)
    if index is None or position[index] < cut:  # the graph input, or a tensor computed before the cut
        return LayerInput(tensor)
    node = nodes[index]
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    producer_of_data = producer.get(node.input[0])
    if producer_of_data is not None and position[producer_of_data] >= cut:
        return None
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
    return _dequantized(node.input[0], node.input[1], zero, inits, axis)


def _dequantized(
    tensor: str, scale: str, zero: str | None, inits: dict[str, onnx.TensorProto], axis: int = 1
) -> LayerInput | None:
    """A dequantization with constant scale and zero point, per tensor or per channel along `axis`; None
    otherwise (dynamic quantization computes the scale from each batch)."""
    if scale not in inits or (zero is not None and zero not in inits):
        return None
    scale_value = numpy_helper.to_array(inits[scale]).astype(np.float32).reshape(-1)
    zero_value = numpy_helper.to_array(inits[zero]).astype(np.float32).reshape(-1) if zero else np.zeros(1, np.float32)
    if scale_value.size == 1 and zero_value.size == 1:
        return LayerInput(tensor, float(scale_value[0]), float(zero_value[0]))
    if zero_value.size == 1:
        zero_value = np.full_like(scale_value, zero_value[0])
    if zero_value.size != scale_value.size:
        return None
    return LayerInput(tensor, scale_value, zero_value, axis)


def _constant_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The tensors of the graph's Constant nodes (those holding a tensor `value`), by output name."""
    values = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = attribute.t
    return values


def _deferred_order(nodes: list[onnx.NodeProto], graph_input: str) -> tuple[list[int], set[int], set[str]]:
    """Node indices in a run order that keeps 8-bit tensors at the cuts (still topological), the deferred
    ones, and the tensors computed from initializers alone.

    Every DequantizeLinear, and every node of constants only (a weight's QuantizeLinear), moves to just
    before its first consumer, and every other QuantizeLinear to just after what it quantizes: between two
    layers the float tensors then live as briefly as possible, and constants never cross a cut.
    """
    outputs = {out for node in nodes for out in node.output}
    constant = {name for node in nodes for name in node.input} - outputs - {graph_input}  # the initializers
    deferred: set[int] = set()
    for i, node in enumerate(nodes):  # nodes of constants only (a weight's Q and DQ) and every DequantizeLinear
        if node.op_type == "DequantizeLinear" or all(not name or name in constant for name in node.input):
            deferred.add(i)
            if all(not name or name in constant for name in node.input):
                constant.update(node.output)
    waiting: dict[str, list[int]] = {}
    quantizers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if i in deferred:
            for out in node.output:
                waiting.setdefault(out, []).append(i)
        elif node.op_type == "QuantizeLinear":
            quantizers.setdefault(node.input[0], []).append(i)
    produced = {name for node in nodes for name in node.input} - outputs
    order: list[int] = []
    placed: set[int] = set()

    def place(i: int) -> None:
        if i in placed:
            return
        for name in nodes[i].input:
            for before in waiting.pop(name, []):
                place(before)
        placed.add(i)
        order.append(i)
        produced.update(nodes[i].output)
        for name in nodes[i].output:
            for q in quantizers.get(name, []):
                if all(not inp or inp in produced for inp in nodes[q].input):
                    place(q)

    for i in range(len(nodes)):
        if i not in deferred:
            place(i)
    for name in list(waiting):  # dequantized outputs nothing reads inside the graph
        for dq in waiting.pop(name):
            place(dq)
    return order, deferred, constant


# Which input's type an operator's output takes, for the quantized operators shape inference does not know
# (com.microsoft's): the output zero point (or, for DequantizeLinear, the scale).
_TYPED_BY = {
    "QuantizeLinear": 2,
    "DequantizeLinear": 1,
    "QLinearAdd": 7,
    "QLinearMul": 7,
    "QGemm": 8,
    "QLinearConcat": 1,
    "QLinearSigmoid": 4,
    "QLinearLeakyRelu": 4,
    "QLinearGlobalAveragePool": 4,
    "QLinearAveragePool": 4,
}


def _complete(
    model: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto], inits: dict[str, onnx.TensorProto]
) -> list[onnx.ValueInfoProto]:
    """Types of the outputs of `_TYPED_BY` operators that inference left unknown (added to `infos`)."""
    completed = []
    for node in model.graph.node:  # in topological order: an input's type is known before its consumers'
        if node.op_type not in _TYPED_BY or node.output[0] in infos:
            continue
        position = _TYPED_BY[node.op_type]
        typed_by = node.input[position] if len(node.input) > position else ""
        default = onnx.TensorProto.FLOAT if node.op_type in ("DequantizeLinear", "QGemm") else onnx.TensorProto.UINT8
        elem_type = inits[typed_by].data_type if typed_by in inits else default
        keeps_shape = node.op_type in ("QuantizeLinear", "DequantizeLinear")
        shape = infos[node.input[0]].type.tensor_type.shape if keeps_shape and node.input[0] in infos else None
        info = onnx.helper.make_tensor_value_info(node.output[0], elem_type, None)
        if shape is not None:
            info.type.tensor_type.shape.CopyFrom(shape)
        infos[node.output[0]] = info
        completed.append(info)
    return completed


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type (and shape where known) of every tensor of the model, the batch dimension left free.

    ONNX's shape inference does not know com.microsoft's operators: QuantizeLinear / DequantizeLinear
    (4-bit weights below opset 21 use them), whose outputs take the zero point's type (Q) or the
    scale's (DQ) and their input's shape, and QOperator's QLinearAdd, QGemm... (`_TYPED_BY`).
    """
    known = copy.deepcopy(model)
    infos: dict[str, onnx.ValueInfoProto] = {}
    inits = initializers(model)
    for _ in range(4):  # what completing one operator's type lets inference find after it (a Flatten...)
        inferred = onnx.shape_inference.infer_shapes(known)
        for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            if value.type.tensor_type.elem_type and value.name not in infos:
                infos[value.name] = value
        completed = _complete(model, infos, inits)
        if not completed:
            break
        known.graph.value_info.extend(completed)
    free = {}
    for name, value in infos.items():
        info = onnx.ValueInfoProto()
        info.CopyFrom(value)
        dims = info.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
        free[name] = info
    return free
