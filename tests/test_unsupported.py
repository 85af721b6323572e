"""Issue 6, item 4: a graph onnxrepair cannot repair gets one message naming the node and what is unsupported.

`onnxrepair fix` exits 2 with that message, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_full
from onnx import TensorProto, helper, numpy_helper

from onnxrepair.cli import main
from onnxrepair.graph import find_layers, rejected_layers

FIXTURES = Path(__file__).parent / "fixtures"


def conv_model(
    kernel: int, size: int, pads: int = 0, group: int = 1, pool: bool = False, dims: int = 2
) -> onnx.ModelProto:
    """input [N,4,size(,size)] -> Conv(10 out, kernel^dims) named 'head' [-> GlobalAveragePool] -> Flatten."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 4 // group, *[kernel] * dims)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["y"], name="head", pads=[pads] * 2 * dims, group=group)]
    last = "y"
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", ["y"], ["pooled"], name="pool"))
        last = "pooled"
    nodes.append(helper.make_node("Flatten", [last], ["logits"], name="flatten"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, *[size] * dims])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(10, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    check_full(model)
    return model


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({"kernel": 1, "size": 1}, "conv 1x1"),  # a 1x1 Conv over a 1x1 map: one row per image, as a dense layer
        ({"kernel": 3, "size": 4, "pool": True}, "conv 3x3"),
        ({"kernel": 1, "size": 2}, "conv 1x1"),
        ({"kernel": 1, "size": 1, "pads": 1}, "conv 1x1"),
        ({"kernel": 1, "size": 1, "group": 2}, "conv 1x1 g2"),
    ],
)
def test_2d_convolutions_are_layers(options: dict, kind: str) -> None:
    (layer,) = find_layers(conv_model(**options))
    assert (layer.op, layer.kind, layer.n_out) == ("Conv", kind, 10)
    assert layer.n_in == 4 // options.get("group", 1) * options["kernel"] ** 2


@pytest.mark.parametrize(("dims", "words"), [(1, "a 1-D convolution"), (3, "a 3-D convolution")])
def test_other_convolutions_are_named_with_the_reason(dims: int, words: str) -> None:
    model = conv_model(3, 5, pads=1, pool=True, dims=dims)
    assert find_layers(model) == []
    (rejected,) = rejected_layers(model)
    assert "Conv 'head'" in rejected.describe() and words in rejected.reason


def fix_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], float_path: Path, quant_path: Path, *extra: str
) -> tuple[int, str, str]:
    """Exit code, stderr on one line, stdout of `onnxrepair fix FLOAT QUANT digits.npz`."""
    args = [str(float_path), str(quant_path), str(FIXTURES / "digits.npz"), "-o", str(tmp_path / "r.onnx")]
    code = main(["fix", *args, *extra])
    captured = capsys.readouterr()
    return code, " ".join(captured.err.split()), captured.out


def test_quant_layer_with_weights_behind_a_node_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """QGemm whose weights come through an Identity: not a constant initializer, so nothing to rewrite."""
    quant = onnx.load(str(FIXTURES / "torchscript.qop_s8.onnx"))
    qgemm = next(n for n in quant.graph.node if n.name == "/fc2/Gemm_quant")
    qgemm.input[3] = "fc2_weight_through_identity"
    quant.graph.node.insert(0, helper.make_node("Identity", ["fc2.weight_quantized"], [qgemm.input[3]], name="id"))
    onnx.save(quant, str(tmp_path / "q.onnx"))
    code, err, out = fix_exit(tmp_path, capsys, FIXTURES / "torchscript.float.onnx", tmp_path / "q.onnx")
    assert code == 2
    assert "Traceback" not in err + out
    assert err.startswith("error:") and err.count("error:") == 1
    assert "QGemm '/fc2/Gemm_quant' (the quantized '/fc2/Gemm') cannot be repaired" in err
    assert "'fc2_weight_through_identity' is not a constant initializer" in err
    assert not (tmp_path / "r.onnx").exists()


def test_layer_option_naming_a_node_that_is_no_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, _ = fix_exit(
        tmp_path,
        capsys,
        FIXTURES / "convhead.float.onnx",
        FIXTURES / "convhead.qdq_s8_tensor.onnx",
        "--layer",
        "/1/Relu",
    )
    assert code == 2
    assert "FLOAT has no layer named '/1/Relu'" in err and "'/0/Conv', '/2/Conv', '/5/Conv'" in err


def test_model_without_any_repairable_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A classifier whose only Conv is 1-D: the message lists the Conv and why."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    model = conv_model(3, 8, pads=1, pool=True, dims=1)
    float_path, quant_path = tmp_path / "float.onnx", tmp_path / "quant.onnx"
    onnx.save(model, str(float_path))
    x = np.random.default_rng(0).normal(size=(8, 4, 8)).astype(np.float32)
    quantize_static(str(float_path), str(quant_path), ArrayReader(x), quant_format=QuantFormat.QDQ)
    code, err, _ = fix_exit(tmp_path, capsys, float_path, quant_path)
    assert code == 2
    assert "FLOAT has no repairable layer" in err and "Conv 'head': a 1-D convolution" in err


class ArrayReader:
    """An onnxruntime calibration reader over one array, one input at a time."""

    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"input": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def test_gemm_with_alpha_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx.load(str(FIXTURES / "torchscript.float.onnx"))
    quant = onnx.load(str(FIXTURES / "torchscript.qdq_s8_tensor.onnx"))
    for m in (model, quant):
        gemm = next(n for n in m.graph.node if n.name == "/fc2/Gemm")
        kept = [a for a in gemm.attribute if a.name != "alpha"]
        del gemm.attribute[:]
        gemm.attribute.extend([*kept, helper.make_attribute("alpha", 0.5)])
    assert [r.describe() for r in rejected_layers(model)] == [
        "Gemm '/fc2/Gemm': transA=1, alpha != 1 or beta != 1 is not of the form x @ W + b"
    ]
    onnx.save(model, str(tmp_path / "f.onnx"))
    onnx.save(quant, str(tmp_path / "q.onnx"))
    code, err, _ = fix_exit(tmp_path, capsys, tmp_path / "f.onnx", tmp_path / "q.onnx", "--layer", "/fc2/Gemm")
    assert code == 2
    assert "Gemm '/fc2/Gemm'" in err and "alpha" in err


def test_blocked_quantization_is_named() -> None:
    """DequantizeLinear with block_size (opset 21): the weights cannot be rewritten; the layer says why."""
    quant = onnx.load(str(FIXTURES / "torchscript.qdq_s8_tensor.onnx"))
    dq = next(n for n in quant.graph.node if n.name == "fc2.weight_DequantizeLinear")
    dq.attribute.append(helper.make_attribute("block_size", 8))
    (layer,) = find_layers(quant)  # fc1 only
    assert layer.name == "/fc1/Gemm"
    (rejected,) = rejected_layers(quant)
    assert rejected.name == "/fc2/Gemm" and "block_size=8" in rejected.reason


def test_a_matmul_with_a_4d_weight_is_named_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One odd node must not break every command: it is listed with its reason, and fix names it."""
    from onnxruntime.quantization import quantize_dynamic

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 1, 4])],
        [
            numpy_helper.from_array(rng.normal(size=(1, 1, 8, 4)).astype(np.float32), "W"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        ],
    )
    float_path, quant_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), float_path)
    quantize_dynamic(str(float_path), str(quant_path))
    assert main(["fix", "--list-layers", str(float_path), str(quant_path)]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert "not a layer: MatMul 'mm': weight B has shape [1, 1, 8, 4]" in listed
    code, err, _ = fix_exit(tmp_path, capsys, float_path, quant_path)
    assert code == 2 and "MatMul 'mm'" in err and "Traceback" not in err
