"""`onnxrepair inspect FLOAT QUANT IMAGES` (issue 5, item 3): checked against independent ONNX Runtime runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DigitsExample
from helpers_issue3 import image_set, one_line
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper
from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

from onnxrepair.cli import main
from onnxrepair.data import load_image_folder, preprocessing_for_input
from onnxrepair.inspection import LayerInspection, _recommend, inspect_models, sqnr_db

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(arrays(np.float32, st.integers(1, 40), elements=FLOATS), st.floats(0, 2), st.integers(0, 2**16))
def test_sqnr_is_onnxruntimes(reference: np.ndarray, noise_scale: float, seed: int) -> None:
    noisy = reference + noise_scale * np.random.default_rng(seed).standard_normal(reference.shape).astype(np.float32)
    expected = compute_signal_to_quantization_noice_ratio(reference, noisy)  # in float32; ours in float64
    assert sqnr_db(reference, noisy) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def run_with_taps(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Plain ONNX Runtime, default options, the given tensors added as outputs."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    for name in names:
        if name not in {o.name for o in tapped.graph.output}:
            tapped.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v).reshape(len(x), -1) for v in session.run(names, {session.get_inputs()[0].name: x})]


def test_flips_sqnr_agreement_and_suggestion_match_an_independent_count(digits: DigitsExample) -> None:
    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    images = load_image_folder(digits.validation, preprocessing_for_input("input", (1, 1, 8, 8)))
    found = inspect_models(float_model, quant_model, images, batch_size=64, top=3)

    x = np.asarray(images.x)  # a folder's rows are read from disk
    f_logits, f_h = run_with_taps(float_model, x, ["logits", "h"])
    q_producers = {n.name: n.output[0] for n in quant_model.graph.node}
    q_h_name, q_logits_name = q_producers["/fc1/Gemm"], q_producers["/fc2/Gemm"]
    q_out = quant_model.graph.output[0].name
    q_scores, q_h, q_logits = run_with_taps(quant_model, x, [q_out, q_h_name, q_logits_name])
    failing = f_logits.argmax(1) != q_scores.argmax(1)
    assert found.images == len(images) and found.failing == failing.sum() > 0
    assert found.agreement == pytest.approx(1 - failing.mean())
    assert found.float_accuracy == pytest.approx(np.mean(f_logits.argmax(1) == images.labels))

    by_name = {layer.name: layer for layer in found.layers}
    assert list(by_name) == ["/fc1/Gemm", "/fc2/Gemm"]
    for name, f_pre, q_pre in (("/fc1/Gemm", f_h, q_h), ("/fc2/Gemm", f_logits, q_logits)):
        flips = (f_pre > 0) != (q_pre > 0)
        layer = by_name[name]
        assert layer.flip_share == pytest.approx(flips.mean())
        assert layer.flip_share_failing == pytest.approx(flips[failing].mean())
        expected_sqnr = 20 * np.log10(np.linalg.norm(f_pre) / np.linalg.norm(f_pre - q_pre))
        assert layer.sqnr_db == pytest.approx(expected_sqnr, rel=1e-5)  # norms in float32 here
        assert layer.top_neurons is not None and set(layer.top_neurons) >= {"ochiai", "euclid", "tarantula"}
        assert all(len(top) == 3 and len(set(top)) == 3 for top in layer.top_neurons.values())
        # Ochiai's top 3, recounted: af / sqrt((af + as)(af + nf)), ties to the lower index
        af, as_ = flips[failing].sum(0).astype(float), flips[~failing].sum(0).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            ochiai = np.nan_to_num(af / np.sqrt((af + as_) * failing.sum()))
        assert layer.top_neurons["ochiai"] == np.argsort(-ochiai, kind="stable")[:3].tolist()
    # the suggestion: the last repairable layer, N = its neurons that flip on at least one failing image
    last = (f_logits > 0) != (q_logits > 0)
    flipping = int(np.sum(last[failing].any(axis=0)))
    assert found.recommended_layer == "/fc2/Gemm"
    assert found.recommended_neurons == max(1, flipping)
    assert by_name["/fc1/Gemm"].neurons_flipping_on_failing == int(np.sum(((f_h > 0) != (q_h > 0))[failing].any(0)))
    assert "/fc2/Gemm" in found.recommendation


def test_suggestion_edge_cases() -> None:
    def layer(name: str, sqnr: float | None, biased: int | None = 3) -> LayerInspection:
        return LayerInspection(name, "Gemm", 4, 8, name if sqnr is not None else "", "int8", "", sqnr_db=sqnr,
                               neurons_flipping_on_failing=biased)  # fmt: skip

    assert _recommend([layer("a", None)], 5)[0] is None  # nothing repairable
    assert _recommend([layer("a", 3.0), layer("b", 9.0)], 0)[:2] == (None, None)  # nothing fails
    name, neurons, why = _recommend([layer("a", 3.0), layer("b", 9.0, biased=0)], 5)
    assert (name, neurons) == ("b", 1) and "noisiest layer is a" in why
    assert "noisiest" not in _recommend([layer("a", 9.0), layer("b", 3.0)], 5)[2]


def test_cli_table_and_json(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "inspect.json"
    args = ["inspect", str(digits.float_path), str(digits.quant_path), str(digits.validation)]
    assert main([*args, "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    findings = json.loads(out_file.read_text())
    assert findings["recommended_layer"] == "/fc2/Gemm" and len(findings["layers"]) == 2
    assert f"--layer /fc2/Gemm --neurons {findings['recommended_neurons']}" in " ".join(out.split())
    assert "SQNR" in out and "ochiai" in out and f"{100 * findings['agreement']:.2f} %" in out

    # --json - prints the JSON alone, nothing else on stdout
    assert main([*args, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == {**findings}

    # an existing --json file is kept without --force
    out_file.write_text("keep")
    assert main([*args, "--json", str(out_file)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "--force" in err and out_file.read_text() == "keep"


def test_cli_bad_inputs(digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ([str(digits.float_path), str(digits.float_path), str(digits.validation)], "not a QDQ model"),
        ([str(digits.float_path), str(tmp_path / "none.onnx"), str(digits.validation)], "none.onnx"),
        ([str(digits.float_path), str(digits.quant_path), str(tmp_path / "nothing")], "nothing"),
    ]
    for args, words in cases:
        assert main(["inspect", *args]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and words in " ".join(err.split())


def test_unlabelled_arrays_report_agreement_only(digits: DigitsExample, tmp_path: Path) -> None:
    float_model, quant_model = onnx.load(str(digits.float_path)), onnx.load(str(digits.quant_path))
    found = inspect_models(float_model, quant_model, image_set(digits.x[:100], None), batch_size=32)
    assert found.float_accuracy is None and found.quant_accuracy is None and 0 < found.agreement <= 1


FIXTURES = Path(__file__).parent / "fixtures"
FLAVOURS = sorted({p.name.split(".")[1] for p in FIXTURES.glob("torchscript.*.onnx")} - {"float"})


@pytest.mark.parametrize("exporter", ["torchscript", "convhead", "skl2onnx_zipmap"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_exporter_and_flavour_is_inspected(exporter: str, flavour: str) -> None:
    float_model = onnx.load(str(FIXTURES / f"{exporter}.float.onnx"))
    quant_model = onnx.load(str(FIXTURES / f"{exporter}.{flavour}.onnx"))
    with np.load(FIXTURES / ("digits_flat.npz" if exporter.startswith("skl2onnx") else "digits.npz")) as arrays:
        images = image_set(arrays["x"][:120].astype(np.float32), arrays["y"][:120])
    found = inspect_models(float_model, quant_model, images, batch_size=64)
    repairable = [layer for layer in found.layers if not layer.reason]
    if not repairable:  # convhead's only dense layer is its head: left float, nothing to repair
        assert (exporter, flavour) == ("convhead", "qdq_head_excluded")
        assert found.recommended_layer is None and "nothing can be repaired" in found.recommendation
        return
    for layer in repairable:
        assert layer.sqnr_db is not None and np.isfinite(layer.sqnr_db) and layer.sqnr_db > 0  # q tracks f
        assert layer.flip_share is not None and 0 <= layer.flip_share < 0.5
    if flavour == "qdq_head_excluded":  # the last layer stays float: named, with its reason, and not suggested
        assert found.layers[-1].reason and "not quantized" in found.layers[-1].reason
    if found.failing:  # a CNN gets whole-network repair, an MLP its last layer
        convolutions = any(layer.kind != "dense" for layer in repairable)
        assert found.recommended_layer == ("all" if convolutions else repairable[-1].name)
    else:
        assert found.recommended_layer is None and "agree on every image" in found.recommendation


def test_a_layer_over_tokens_is_reported_and_the_others_still_measured(tmp_path: Path) -> None:
    """x [N, 4, 8] -> MatMul+Add (per token) -> Relu -> Flatten -> Gemm: the first layer is not [N, features]."""
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.normal(size=(10, 64)) * 0.3).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], name="gemm2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        weights,
    )
    x = rng.normal(size=(200, 4, 8)).astype(np.float32)
    float_path, quant_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), float_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x[i : i + 50]} for i in range(0, 200, 50)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(str(float_path), str(quant_path), Reader(), quant_format=QuantFormat.QDQ)
    found = inspect_models(onnx.load(str(float_path)), onnx.load(str(quant_path)), image_set(x, None), 64)
    first, last = found.layers
    assert first.name == "mm1" and first.sqnr_db is None and "64 values per input" in first.reason
    assert last.name == "gemm2" and last.sqnr_db is not None and not last.reason


def test_suggested_command_keeps_the_image_options_and_quotes_paths(
    digits: DigitsExample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shlex
    import shutil

    folder = tmp_path / "my images"
    shutil.copytree(digits.validation, folder)
    args = [str(digits.float_path), str(digits.quant_path), str(folder), "--mean", "0.1", "--std", "0.9"]
    assert main(["inspect", *args, "--resize", "crop", "--batch-size", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    suggested = shlex.split(next(line for line in lines if line.strip().startswith("onnxrepair fix")))
    assert suggested[2:5] == [str(digits.float_path), str(digits.quant_path), str(folder)]
    for option in (["--mean", "0.1"], ["--std", "0.9"], ["--resize", "crop"], ["--batch-size", "16"]):
        index = suggested.index(option[0])
        assert suggested[index : index + 2] == option
    # and the suggestion runs as it is
    out = tmp_path / "r.onnx"
    assert main([*suggested[1:], "-o", str(out), "-q", "--jobs", "1"]) == 0 and out.exists()


def test_layer_names_with_markup_are_shown_as_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    float_model = onnx.load(str(FIXTURES / "torchscript.float.onnx"))
    quant_model = onnx.load(str(FIXTURES / "torchscript.qdq_s8_tensor.onnx"))
    for model in (float_model, quant_model):
        for node in model.graph.node:
            if node.name == "/fc2/Gemm":
                node.name = "blk[/x]/Gemm"
    onnx.save(float_model, tmp_path / "f.onnx")
    onnx.save(quant_model, tmp_path / "q.onnx")
    assert main(["inspect", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), str(FIXTURES / "digits.npz")]) == 0
    assert "blk[/x]/Gemm" in capsys.readouterr().out
