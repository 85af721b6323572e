#!/usr/bin/env python
"""Build the exporter x quantized-flavour fixtures of tests/fixtures/ (issue 6).

Run from the repository root (needs torch==2.13.0, onnxscript, skl2onnx)::

    python tools/build_fixtures.py               # writes tests/fixtures/
    python tools/build_fixtures.py --out DIR

The test suite reads the committed files and needs none of those packages.

Float models (one MLP function, 64 -> 24 -> Relu -> 10, from a scikit-learn
``MLPClassifier`` trained on ``load_digits``; its weights are copied into the
torch modules so every exporter writes the same function):

    torchscript.float.onnx   torch.onnx.export(dynamo=False): Flatten, Gemm transB=1, /fc1/Gemm names
    dynamo.float.onnx        torch.onnx.export(dynamo=True): Reshape, Gemm, node_linear names
    dynamo_matmul.float.onnx dynamo, the layers written as x @ W + b: MatMul + Add, renamed nodes
    skl2onnx.float.onnx      skl2onnx, zipmap=False: Cast, MatMul + Add, Softmax, ai.onnx.ml label
    skl2onnx_zipmap.float.onnx  skl2onnx with its ZipMap output (probabilities as a sequence of maps)
    gemm_variants.float.onnx onnx.helper: Gemm transB=0 with bias, then Gemm transB=1 without bias
    convhead.float.onnx      torch (dynamo=False): Conv 3x3 -> Relu -> GlobalAveragePool ->
                             1x1 Conv classifier over the 1x1 map -> Flatten (MobileNetV2-style head)

Quantized flavours (ONNX Runtime, calibrated on the first 64 images of digits.npz):

    qdq_s8_tensor     QDQ, int8 weights per tensor (symmetric), Relu kept
    qdq_s8_channel    QDQ, int8 per channel (axis 0 Gemm/Conv, axis 1 MatMul)
    qdq_s8_asym       QDQ, int8 per tensor with a non-zero zero point (WeightSymmetric=False)
    qdq_u8_channel    QDQ, uint8 weights per channel (non-zero zero points)
    qdq_s4_channel    QDQ, 4-bit weights per channel (QInt4)
    qdq_relu_removed  QDQ, int8 per tensor, the quantizer's default: Relu removed
    qdq_float_out     QDQ, int8 per tensor, layer outputs left float (OpTypesToExcludeOutputQuantization)
    qdq_head_excluded QDQ, int8 per tensor, the last dense layer left float (nodes_to_exclude)
    qop_s8            QOperator format (QLinearMatMul / QGemm / QLinearConv), int8 per tensor
    qop_s8_channel    QOperator, int8 per channel
    dynamic_s8        quantize_dynamic: DynamicQuantizeLinear + MatMulInteger / ConvInteger, int8 per tensor
    dynamic_u8_channel  quantize_dynamic, uint8 weights per channel (non-zero zero points)

``digits.npz`` holds ``x`` [N,1,8,8] and ``y``: the 597 digits the MLP did not
train on. ``digits_flat.npz`` is the same as [N,64] for the skl2onnx models.
``build.json`` records versions, the MLP's accuracy, the flavours (the list the
tests and tools/exporter_matrix.py read) and any flavour ONNX Runtime could not make.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
N_TRAIN = 1200
N_CALIBRATE = 64

FLAVOURS = (
    "qdq_s8_tensor",
    "qdq_s8_channel",
    "qdq_s8_asym",
    "qdq_u8_channel",
    "qdq_s4_channel",
    "qdq_relu_removed",
    "qdq_float_out",
    "qdq_head_excluded",
    "qop_s8",
    "qop_s8_channel",
    "dynamic_s8",
    "dynamic_u8_channel",
)


def train_mlp(x: np.ndarray, y: np.ndarray):
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MLPClassifier((24,), max_iter=300, random_state=SEED).fit(x, y)


def torch_mlp(mlp, matmul: bool = False):
    """The sklearn MLP as a torch module; `matmul` writes the layers as x @ W + b (MatMul + Add on export)."""
    import torch

    class Linear(torch.nn.Module):
        def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))  # [in, out]
            self.bias = torch.nn.Parameter(torch.tensor(b, dtype=torch.float32))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t @ self.weight + self.bias

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if matmul:
                self.fc1 = Linear(mlp.coefs_[0], mlp.intercepts_[0])
                self.fc2 = Linear(mlp.coefs_[1], mlp.intercepts_[1])
            else:
                self.fc1 = torch.nn.Linear(64, 24)
                self.fc2 = torch.nn.Linear(24, 10)
                with torch.no_grad():
                    for i, layer in enumerate((self.fc1, self.fc2)):
                        w, b = mlp_layer(mlp, i)
                        layer.weight.copy_(torch.tensor(w))
                        layer.bias.copy_(torch.tensor(b))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(torch.flatten(t, 1))))

    return Net().eval()


def mlp_layer(mlp, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer i of the sklearn MLP in torch layout: W [out, in], b [out]."""
    return mlp.coefs_[i].T.astype(np.float32), mlp.intercepts_[i].astype(np.float32)


def train_conv_head(x: np.ndarray, y: np.ndarray):
    """A small CNN whose classifier is a 1x1 Conv over the pooled 1x1 map, trained with torch (seeded)."""
    import torch

    torch.manual_seed(SEED)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Conv2d(24, 10, 1),  # the classifier: 1x1 Conv on a 1x1 feature map
        torch.nn.Flatten(1),
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        optimiser.step()
    return net.eval()


def export_torch(net, path: Path, dynamo: bool) -> None:
    import torch

    example = torch.zeros(2, 1, 8, 8)
    if dynamo:
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("N")},),
            verbose=False,
        )
        program.save(str(path))
        # the exporter records each node's Python stack trace (this file's path and line numbers): drop it,
        # so that the fixtures do not change when this script is edited or run from elsewhere
        import onnx

        model = onnx.load(str(path))
        for node in model.graph.node:
            del node.metadata_props[:]
        onnx.save(model, str(path))
    else:
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
        )


def export_skl2onnx(mlp, path: Path, zipmap: bool) -> None:
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {} if zipmap else {id(mlp): {"zipmap": False}}
    model = to_onnx(
        mlp,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options=options,
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onnx.save(model, str(path))


def gemm_variants(mlp, path: Path) -> None:
    """input [N,1,8,8] -> Flatten -> Gemm transB=0 (W [in,out], bias) -> Relu -> Gemm transB=1 (no bias) -> Add."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1 = mlp_layer(mlp, 0)
    w2, b2 = mlp_layer(mlp, 1)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="gemm_t0_bias"),  # transB=0
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("Gemm", ["h_relu", "w2"], ["z"], name="gemm_t1_nobias", transB=1),
        helper.make_node("Add", ["z", "b2"], ["logits"], name="add_logit_bias"),  # a bias the Gemm does not own
    ]
    inits = [
        numpy_helper.from_array(w1.T.copy(), "w1"),  # [in, out]
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),  # [out, in]
        numpy_helper.from_array(b2, "b2"),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_variants",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


class _Reader:
    def __init__(self, name: str, x: np.ndarray) -> None:
        self._batches = iter([{name: x[i : i + 16]} for i in range(0, len(x), 16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_flavour(float_path: Path, out_path: Path, flavour: str, calibration: np.ndarray) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if flavour == "dynamic_s8":
        quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QInt8)
        return
    if flavour == "dynamic_u8_channel":
        quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QUInt8, per_channel=True)
        return
    model = onnx.load(str(float_path))
    name = model.graph.input[0].name
    options: dict[str, object] = {"QDQKeepRemovableActivations": True}
    per_channel, weight_type, quant_format = False, QuantType.QInt8, QuantFormat.QDQ
    exclude: list[str] = []
    if flavour == "qdq_s8_channel":
        per_channel = True
    elif flavour == "qdq_s8_asym":
        options["WeightSymmetric"] = False
    elif flavour == "qdq_u8_channel":
        per_channel, weight_type = True, QuantType.QUInt8
    elif flavour == "qdq_s4_channel":
        per_channel, weight_type = True, QuantType.QInt4
    elif flavour == "qdq_relu_removed":
        options = {}
    elif flavour == "qdq_float_out":
        options["OpTypesToExcludeOutputQuantization"] = ["Gemm", "MatMul", "Add", "Conv"]
    elif flavour == "qdq_head_excluded":
        from onnxrepair.graph import find_layers

        exclude = [find_layers(model)[-1].name]
    elif flavour == "qop_s8":
        quant_format, options = QuantFormat.QOperator, {}
    elif flavour == "qop_s8_channel":
        quant_format, options, per_channel = QuantFormat.QOperator, {}, True
    elif flavour != "qdq_s8_tensor":
        raise ValueError(flavour)
    quantize_static(
        str(float_path),
        str(out_path),
        _Reader(name, calibration.reshape(len(calibration), *_input_dims(model))),
        quant_format=quant_format,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
        nodes_to_exclude=exclude,
        extra_options=options,
    )


def _input_dims(model) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's pre-processing hint; torch's exporter chatter
    warnings.simplefilter("ignore")

    import onnx
    import onnxruntime
    import skl2onnx
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x_all))
    train, rest = order[:N_TRAIN], np.sort(order[N_TRAIN:])
    mlp = train_mlp(x_all[train], y_all[train])
    conv = train_conv_head(x_all[train].reshape(-1, 1, 8, 8), y_all[train])

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    x = x_all[rest]
    np.savez_compressed(out / "digits.npz", x=x.reshape(-1, 1, 8, 8).astype(np.float32), y=y_all[rest])
    np.savez_compressed(out / "digits_flat.npz", x=x, y=y_all[rest])

    export_torch(torch_mlp(mlp), out / "torchscript.float.onnx", dynamo=False)
    export_torch(torch_mlp(mlp), out / "dynamo.float.onnx", dynamo=True)
    export_torch(torch_mlp(mlp, matmul=True), out / "dynamo_matmul.float.onnx", dynamo=True)
    export_torch(conv, out / "convhead.float.onnx", dynamo=False)
    export_skl2onnx(mlp, out / "skl2onnx.float.onnx", zipmap=False)
    export_skl2onnx(mlp, out / "skl2onnx_zipmap.float.onnx", zipmap=True)
    gemm_variants(mlp, out / "gemm_variants.float.onnx")

    record: dict[str, object] = {
        "versions": {
            "torch": torch.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "mlp_accuracy": float(mlp.score(x, y_all[rest])),
        "flavours": list(FLAVOURS),  # what the tests and tools/exporter_matrix.py read back
        "failed": {},
    }
    failed: dict[str, str] = {}
    for float_path in sorted(out.glob("*.float.onnx")):
        exporter = float_path.name.removesuffix(".float.onnx")
        for flavour in FLAVOURS:
            target = out / f"{exporter}.{flavour}.onnx"
            try:
                quantize_flavour(float_path, target, flavour, x[:N_CALIBRATE])
            except Exception as exc:  # recorded: a flavour ONNX Runtime cannot make for this exporter
                failed[target.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                target.unlink(missing_ok=True)
    record["failed"] = failed
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    for leftover in out.glob("*.onnx.data"):
        leftover.unlink()
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
