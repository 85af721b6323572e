"""spectrum.py on hand-made arrays, and repair.read_layer_activity on the digits models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DigitsExample, run_model

from onnxrepair.activity import read_layer_activity
from onnxrepair.graph import initializers, layer_parameters, pair_layer
from onnxrepair.progress import NoProgress
from onnxrepair.spectrum import activation_flips, collect_spectrum, failing_mask


def test_failing_mask_compares_top1() -> None:
    float_scores = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.5, 0.7], [5.0, 4.0, 3.0]])
    quant_scores = np.array([[2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.8, 0.7], [5.0, 4.0, 3.0]])
    # top-1: float 1, 0, 2, 0; quant 0, 0, 1, 0
    np.testing.assert_array_equal(failing_mask(float_scores, quant_scores), [True, False, True, False])


def test_failing_mask_tie_takes_first_class() -> None:
    # Quantized scores can tie; argmax then picks the lowest class, as numpy does.
    float_scores = np.array([[0.1, 0.9], [0.9, 0.1]])
    quant_scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_array_equal(failing_mask(float_scores, quant_scores), [True, False])


def test_activation_flips_compares_on_off_status() -> None:
    float_pre = np.array([[1.0, -1.0, 0.0, 0.0, 2.0]])
    quant_pre = np.array([[0.5, 0.5, 0.0, 1e-6, -3.0]])
    # on/on, off/on, off/off (0 is off), off/on, on/off
    np.testing.assert_array_equal(activation_flips(float_pre, quant_pre), [[False, True, False, True, True]])


def test_activation_flips_ignores_magnitude() -> None:
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(20, 7))
    assert not activation_flips(pre, pre * 3.0 + np.sign(pre)).any()
    assert activation_flips(pre, -pre).all()


def test_collect_spectrum_by_hand() -> None:
    failing = np.array([True, False, True, True, False])
    flips = np.array(
        [
            [1, 0, 1],  # failing
            [1, 1, 0],  # passing
            [0, 0, 1],  # failing
            [1, 0, 1],  # failing
            [0, 1, 0],  # passing
        ],
        dtype=bool,
    )
    s = collect_spectrum(failing, flips)
    # failing inputs 0, 2, 3: flips per neuron 1+0+1=2, 0+0+0=0, 1+1+1=3
    # passing inputs 1, 4:    flips per neuron 1+0=1,   1+1=2,   0+0=0
    assert (s.n_failing, s.n_passing) == (3, 2)
    np.testing.assert_array_equal(s.af, [2, 0, 3])
    np.testing.assert_array_equal(s.nf, [1, 3, 0])
    np.testing.assert_array_equal(s.as_, [1, 2, 0])
    np.testing.assert_array_equal(s.ns, [1, 0, 2])
    for counts in (s.af, s.nf, s.as_, s.ns):
        assert counts.dtype == np.int64


def test_collect_spectrum_without_failures() -> None:
    s = collect_spectrum(np.zeros(4, bool), np.ones((4, 2), bool))
    assert (s.n_failing, s.n_passing) == (0, 4)
    np.testing.assert_array_equal(s.af, [0, 0])
    np.testing.assert_array_equal(s.nf, [0, 0])
    np.testing.assert_array_equal(s.as_, [4, 4])
    np.testing.assert_array_equal(s.ns, [0, 0])


def test_spectrum_of_a_tiny_layer_by_hand() -> None:
    # Two inputs, one dense layer of three neurons, float W and a "quantized" W that rounds to 0.5 steps.
    #   x0 = (1, 0), x1 = (0, 1)
    #   W_float = [[0.2, -0.3], [-0.1, 0.4], [0.3, 0.3]]  -> pre x0 = ( 0.2, -0.1, 0.3), x1 = (-0.3, 0.4, 0.3)
    #   W_quant = [[0.0, -0.5], [ 0.0, 0.5], [0.5, 0.5]]  -> pre x0 = ( 0.0,  0.0, 0.5), x1 = (-0.5, 0.5, 0.5)
    # on/off:  float x0 (on, off, on), quant x0 (off, off, on): neuron 0 flips on x0
    #          float x1 (off, on, on), quant x1 (off, on, on): no flip on x1
    # With x0 failing and x1 passing: af = (1, 0, 0), as = (0, 0, 0).
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    w_float = np.array([[0.2, -0.3], [-0.1, 0.4], [0.3, 0.3]])
    w_quant = np.array([[0.0, -0.5], [0.0, 0.5], [0.5, 0.5]])
    flips = activation_flips(x @ w_float.T, x @ w_quant.T)
    s = collect_spectrum(np.array([True, False]), flips)
    np.testing.assert_array_equal(s.af, [1, 0, 0])
    np.testing.assert_array_equal(s.nf, [0, 1, 1])
    np.testing.assert_array_equal(s.as_, [0, 0, 0])
    np.testing.assert_array_equal(s.ns, [1, 1, 1])


def _float_forward(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The digits MLP in numpy from its initializers: (fc1 pre-activation, logits)."""
    inits = {k: onnx.numpy_helper.to_array(v).astype(np.float64) for k, v in initializers(model).items()}
    flat = x.reshape(len(x), -1).astype(np.float64)
    h = flat @ inits["fc1.weight"].T + inits["fc1.bias"]
    logits = np.maximum(h, 0) @ inits["fc2.weight"].T + inits["fc2.bias"]
    return h, logits


@pytest.mark.parametrize("layer", ["/fc1/Gemm", "/fc2/Gemm"])
def test_read_layer_activity_matches_numpy(digits: DigitsExample, layer: str) -> None:
    float_model = onnx.load(str(digits.float_path))
    quant_model = onnx.load(str(digits.quant_path))
    pair = pair_layer(float_model, quant_model, layer)
    x = digits.x[:400]
    activity = read_layer_activity(float_model, quant_model, pair, x, 64, NoProgress())
    n_in, n_out = pair.float_layer.n_in, pair.float_layer.n_out

    assert activity.float_pre.shape == (400, n_out)
    assert activity.quant_pre.shape == (400, n_out)
    assert activity.quant_inputs.shape == (400, n_in)
    assert activity.float_scores.shape == activity.quant_scores.shape == (400, 10)

    # Float model: recomputed from its initializers.
    h, logits = _float_forward(float_model, x)
    np.testing.assert_allclose(activity.float_pre, h if layer == "/fc1/Gemm" else logits, atol=1e-4)
    np.testing.assert_allclose(activity.float_scores, logits, atol=1e-4)

    # Quantized model: the tapped pre-activation is the layer applied to the tapped input
    # with the dequantized weights and bias that graph.layer_parameters reads.
    w, b = layer_parameters(quant_model, pair.quant_layer)
    assert w.shape == (n_out, n_in)
    np.testing.assert_allclose(activity.quant_pre, activity.quant_inputs @ w.T + b, atol=1e-4)
    # ... and those are not simply the float values (the 4-bit model really differs).
    assert np.max(np.abs(activity.quant_pre - activity.float_pre)) > 1e-2

    if layer == "/fc1/Gemm":
        # The input of fc1 in QUANT is the image through a uint8 Q/DQ pair: within half a step of it.
        scale = float(onnx.numpy_helper.to_array(initializers(quant_model)["flat_scale"]))
        assert np.max(np.abs(activity.quant_inputs - x.reshape(400, -1))) <= scale / 2 + 1e-6
    else:
        # The input of fc2 in QUANT is the quantized ReLU output: never negative.
        assert activity.quant_inputs.min() >= 0.0

    # Tapping blocks some fusions, so the scores may differ a little from the untapped model.
    (untapped,) = run_model(quant_model, x)
    agreement = np.mean(np.argmax(activity.quant_scores, 1) == np.argmax(untapped, 1))
    assert agreement >= 0.97


def test_read_layer_activity_does_not_modify_the_models(digits: DigitsExample) -> None:
    float_model = onnx.load(str(digits.float_path))
    quant_model = onnx.load(str(digits.quant_path))
    before = (float_model.SerializeToString(), quant_model.SerializeToString())
    pair = pair_layer(float_model, quant_model, None)
    read_layer_activity(float_model, quant_model, pair, digits.x[:10], 4, NoProgress())
    assert (float_model.SerializeToString(), quant_model.SerializeToString()) == before


def test_spectrum_of_digits_is_consistent(digits: DigitsExample) -> None:
    float_model = onnx.load(str(digits.float_path))
    quant_model = onnx.load(str(digits.quant_path))
    pair = pair_layer(float_model, quant_model, "/fc1/Gemm")
    activity = read_layer_activity(float_model, quant_model, pair, digits.x[:400], 128, NoProgress())
    failing = failing_mask(activity.float_scores, activity.quant_scores)
    s = collect_spectrum(failing, activation_flips(activity.float_pre, activity.quant_pre))
    assert s.n_failing == int(failing.sum()) and s.n_failing + s.n_passing == 400
    np.testing.assert_array_equal(s.af + s.nf, s.n_failing)
    np.testing.assert_array_equal(s.as_ + s.ns, s.n_passing)
    # A 4-bit model flips some neurons somewhere.
    assert (s.af + s.as_).sum() > 0
