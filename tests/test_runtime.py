"""runtime.py: sessions from in-memory models and batched runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DigitsExample, run_model

from onnxrepair.errors import UnsupportedModelError
from onnxrepair.runtime import default_providers, make_session, output_name, run_batched


def test_default_providers_end_with_cpu() -> None:
    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert len(providers) == len(set(providers))


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_run_batched_matches_one_run(quant_model: onnx.ModelProto, digits: DigitsExample, batch_size: int) -> None:
    x = digits.x[:50]
    session = make_session(quant_model, "QUANT")
    seen = []
    out = run_batched(session, x, ["logits"], batch_size, seen.append)
    (expected,) = run_model(quant_model, x)
    assert out["logits"].shape == (50, 10)
    np.testing.assert_allclose(out["logits"], expected, atol=1e-5)
    assert sum(seen) == 50 and len(seen) == -(-50 // batch_size)


def test_run_batched_flattens_each_output(float_model: onnx.ModelProto, digits: DigitsExample) -> None:
    session = make_session(float_model, "FLOAT")
    out = run_batched(session, digits.x[:5], ["logits"], 2)
    assert out["logits"].shape == (5, 10)


def test_make_session_refuses_broken_model(float_model: onnx.ModelProto) -> None:
    float_model.graph.node[1].input[1] = "no_such_tensor"
    with pytest.raises(UnsupportedModelError, match="FLOAT"):
        make_session(float_model, "FLOAT")


def test_run_batched_wraps_shape_errors(float_model: onnx.ModelProto) -> None:
    session = make_session(float_model, "FLOAT")
    with pytest.raises(UnsupportedModelError, match="failed to run"):
        run_batched(session, np.zeros((2, 3, 8, 8), np.float32), ["logits"], 4)


def test_output_name(float_model: onnx.ModelProto) -> None:
    assert output_name(float_model) == "logits"
    del float_model.graph.output[:]
    with pytest.raises(UnsupportedModelError, match="no float output"):
        output_name(float_model)


def test_output_name_skips_integer_labels(float_model: onnx.ModelProto) -> None:
    # skl2onnx classifiers list an int64 label output before the float probabilities.
    label = onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"])
    float_model.graph.output.insert(0, label)
    assert output_name(float_model) == "logits"
