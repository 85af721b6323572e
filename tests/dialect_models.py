"""QDQ models in the forms NNCF and AIMET-ONNX write, made by hand with onnx.helper (neither tool needed).

What each form looks like was read off models the tools wrote (NNCF 3.4, AIMET-ONNX 2.42, Nov 2026):

    nncf          weights: INT8 initializer -> DequantizeLinear, symmetric per channel (zero points 0, axis 0 for
                  Conv, axis -2 for Gemm), [-127, 127], the first Conv [-64, 64]; biases float, straight into the
                  Conv/Gemm; Relu kept; activations quantized after the activation (uint8 after a Relu, int8
                  elsewhere), per tensor.
    aimet         weights: a FLOAT initializer already on the grid -> QuantizeLinear -> DequantizeLinear (axis 0,
                  quantized at run time); biases float; a QuantizeLinear -> DequantizeLinear pair (uint8,
                  asymmetric) after every Conv/Gemm and every activation, the logits included.
    aimet_preq    the same with weights as INT8 (INT4 at opset 21) initializers -> DequantizeLinear, and biases
                  INT32 -> DequantizeLinear with per-channel scale = input scale x weight scale.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DIALECTS = ("nncf", "aimet", "aimet_preq", "aimet_preq_int4")


def activation_ranges(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """Min and max of every node output on `x` (the calibration the tools do)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    names = [out for node in model.graph.node for out in node.output]
    present = {o.name for o in tapped.graph.output}
    tapped.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in present
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(tapped.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(names, {model.graph.input[0].name: x})
    ranges = {name: (float(v.min()), float(v.max())) for name, v in zip(names, values, strict=True)}
    ranges[model.graph.input[0].name] = (float(x.min()), float(x.max()))
    return ranges


def quantize_like(float_model: onnx.ModelProto, calibration: np.ndarray, dialect: str) -> onnx.ModelProto:
    """`float_model` quantized the way `dialect` (one of DIALECTS) writes it."""
    assert dialect in DIALECTS, dialect
    ranges = activation_ranges(float_model, calibration)
    inits = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    graph_input = float_model.graph.input[0].name
    int4 = dialect == "aimet_preq_int4"
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    renamed: dict[str, str] = {}  # a float tensor -> its dequantized twin, for the nodes after it
    activation_scales: dict[str, float] = {}

    def quantize_activation(tensor: str, unsigned: bool, dequantized: str | None = None) -> None:
        low, high = ranges[tensor]
        if unsigned:
            low = min(low, 0.0)
            scale = max(high - low, 1e-6) / 255
            zero, dtype = int(np.clip(round(-low / scale), 0, 255)), np.uint8
        else:
            scale = max(abs(low), abs(high), 1e-6) / 127
            zero, dtype = 0, np.int8
        new_inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"))
        new_inits.append(numpy_helper.from_array(np.array(zero, dtype), f"{tensor}_zero_point"))
        q_args = [tensor, f"{tensor}_scale", f"{tensor}_zero_point"]
        nodes.append(helper.make_node("QuantizeLinear", q_args, [f"{tensor}_q"], name=f"{tensor}_QuantizeLinear"))
        dq_args = [f"{tensor}_q", f"{tensor}_scale", f"{tensor}_zero_point"]
        out = dequantized or f"{tensor}_dq"
        nodes.append(helper.make_node("DequantizeLinear", dq_args, [out], name=f"{tensor}_DequantizeLinear"))
        renamed[tensor] = out
        activation_scales[tensor] = scale

    def quantize_weight(name: str, first: bool, axis: int) -> str:
        w = inits[name].astype(np.float64)
        qmax = 7 if int4 else 64 if dialect == "nncf" and first else 127
        flat = np.abs(w).reshape(w.shape[0], -1) if axis == 0 else np.abs(w).T
        scale = np.maximum(flat.max(axis=1), 1e-8) / qmax
        view = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if axis == 0 else scale.reshape(1, -1)
        q = np.clip(np.round(w / view), -qmax - (1 if dialect.startswith("aimet") else 0), qmax)
        zero_dtype = TensorProto.INT4 if int4 else TensorProto.INT8
        new_inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        new_inits.append(helper.make_tensor(f"{name}_zero_point", zero_dtype, [len(scale)], [0] * len(scale)))
        attr_axis = -2 if dialect == "nncf" and w.ndim == 2 else axis
        dq_args = [f"{name}_q", f"{name}_scale", f"{name}_zero_point"]
        if dialect == "aimet":  # on the grid, as float, quantized at run time
            new_inits.append(numpy_helper.from_array((q * view).astype(np.float32), name))
            q_args = [name, f"{name}_scale", f"{name}_zero_point"]
            nodes.append(helper.make_node("QuantizeLinear", q_args, [f"{name}_q"], name=f"{name}_qdq_q", axis=axis))
        elif int4:
            new_inits.append(
                helper.make_tensor(f"{name}_q", TensorProto.INT4, list(w.shape), q.astype(np.int8).ravel())
            )
        else:
            new_inits.append(numpy_helper.from_array(q.astype(np.int8), f"{name}_q"))
        nodes.append(
            helper.make_node("DequantizeLinear", dq_args, [f"{name}_dq"], name=f"{name}_qdq_dq", axis=attr_axis)
        )
        return f"{name}_dq"

    def quantize_bias(name: str, input_tensor: str, weight: str) -> str:
        if dialect not in ("aimet_preq", "aimet_preq_int4"):
            new_inits.append(numpy_helper.from_array(inits[name], name))
            return name
        weight_scale = numpy_helper.to_array(next(t for t in new_inits if t.name == f"{weight}_scale"))
        scale = (weight_scale.astype(np.float64) * activation_scales[input_tensor]).astype(np.float32)
        q = np.round(inits[name] / scale).astype(np.int32)
        new_inits.append(numpy_helper.from_array(q, f"{name}_q"))
        new_inits.append(numpy_helper.from_array(scale, f"{name}_scale"))
        new_inits.append(numpy_helper.from_array(np.zeros(len(q), np.int32), f"{name}_zero_point"))
        dq_args = [f"{name}_q", f"{name}_scale", f"{name}_zero_point"]
        nodes.append(helper.make_node("DequantizeLinear", dq_args, [f"{name}_dq"], name=f"{name}_qdq_dq", axis=0))
        return f"{name}_dq"

    quantize_activation(graph_input, unsigned=True)
    graph_outputs = {o.name for o in float_model.graph.output}
    first_layer = True
    for node in float_model.graph.node:
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        for i, name in enumerate(copied.input):
            copied.input[i] = renamed.get(name, name)
        if node.op_type in ("Conv", "Gemm"):
            copied.input[1] = quantize_weight(node.input[1], first_layer, axis=0)
            if len(node.input) > 2:
                copied.input[2] = quantize_bias(node.input[2], node.input[0], node.input[1])
            first_layer = False
        output = node.output[0]
        quantized = (dialect.startswith("aimet") and node.op_type in ("Conv", "Gemm", "Relu", "Add", "Flatten")) or (
            dialect == "nncf" and node.op_type in ("Relu", "Add")
        )
        if quantized and output in graph_outputs:  # the logits: the last DequantizeLinear writes the graph output
            copied.output[0] = f"{output}_raw"
            ranges[copied.output[0]] = ranges[output]
        nodes.append(copied)
        if quantized:
            unsigned = dialect.startswith("aimet") or node.op_type == "Relu"
            quantize_activation(copied.output[0], unsigned, output if output in graph_outputs else None)
    graph = helper.make_graph(
        nodes, "quantized", list(float_model.graph.input), list(float_model.graph.output), new_inits
    )
    opset = 21 if int4 else 17
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if int4 else 9)
    onnx.checker.check_model(model, full_check=True)
    return model
