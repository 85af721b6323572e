"""Issue 6, item 4: a graph onnxrepair cannot repair gets one message naming the node and what is unsupported.

`onnxrepair fix` exits 2 with that message, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_full, run_model
from onnx import TensorProto, helper, numpy_helper

from onnxrepair.cli import main
from onnxrepair.graph import find_layers, rejected_layers

FIXTURES = Path(__file__).parent / "fixtures"


def conv_model(kernel: int, size: int, pads: int = 0, group: int = 1, pool: bool = False) -> onnx.ModelProto:
    """input [N,4,size,size] -> Conv(10 out, kernel x kernel) named 'head' [-> GlobalAveragePool] -> Flatten."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 4 // group, kernel, kernel)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["y"], name="head", pads=[pads] * 4, group=group)]
    last = "y"
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", ["y"], ["pooled"], name="pool"))
        last = "pooled"
    nodes.append(helper.make_node("Flatten", [last], ["logits"], name="flatten"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(10, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    check_full(model)
    return model


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"kernel": 1, "size": 1}, None),  # the supported case: a 1x1 Conv over a 1x1 map
        ({"kernel": 3, "size": 4, "pool": True}, ("Conv 'head'", "kernel 3x3")),
        ({"kernel": 1, "size": 2}, ("Conv 'head'", "over a 2x2 feature map")),
        ({"kernel": 1, "size": 1, "pads": 1}, ("Conv 'head'", "padded")),
        ({"kernel": 1, "size": 1, "group": 2}, ("Conv 'head'", "group=2")),
    ],
)
def test_conv_heads(options: dict, words: tuple[str, ...] | None) -> None:
    model = conv_model(**options)
    if words is None:
        (layer,) = find_layers(model)
        assert (layer.op, layer.n_in, layer.n_out) == ("Conv1x1", 4, 10)
        x = np.random.default_rng(1).normal(size=(3, 4, 1, 1)).astype(np.float32)
        (y,) = run_model(model, x)
        w = numpy_helper.to_array(model.graph.initializer[0]).reshape(10, 4)
        np.testing.assert_allclose(y, x.reshape(3, 4) @ w.T, rtol=1e-5, atol=1e-5)
        return
    assert find_layers(model) == []
    (rejected,) = rejected_layers(model)
    for word in words:
        assert word in rejected.describe()


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


def test_layer_option_naming_a_3x3_conv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, _ = fix_exit(
        tmp_path,
        capsys,
        FIXTURES / "convhead.float.onnx",
        FIXTURES / "convhead.qdq_s8_tensor.onnx",
        "--layer",
        "/0/Conv",
    )
    assert code == 2
    assert "Conv '/0/Conv': kernel 3x3" in err and "'/5/Conv'" in err


def test_model_without_any_dense_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CNN whose classifier is a 3x3 Conv + GlobalAveragePool: the message lists the Conv and why."""
    model = conv_model(3, 8, pads=1, pool=True)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8]))
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.random.default_rng(0).normal(size=(10, 1, 3, 3)).astype(np.float32), "w")
    )
    check_full(model)
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    code, err, _ = fix_exit(tmp_path, capsys, path, FIXTURES / "convhead.qdq_s8_tensor.onnx")
    assert code == 2
    assert "FLOAT has no dense layer" in err and "Conv 'head': kernel 3x3" in err


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
    assert "not a dense layer: MatMul 'mm': weight B has shape [1, 1, 8, 4]" in listed
    code, err, _ = fix_exit(tmp_path, capsys, float_path, quant_path)
    assert code == 2 and "MatMul 'mm'" in err and "Traceback" not in err
