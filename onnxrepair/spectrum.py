"""Pass/fail split and activation spectra (the paper's C_af, C_nf, C_as, C_ns), and SQNR.

An input *fails* when the float and quantized models disagree on its top-1
class. A neuron is *activated* on an input when its on/off status
(pre-activation > 0) differs between the two models. For each neuron:

    af = activated on failing inputs      nf = failing inputs - af
    as = activated on passing inputs      ns = passing inputs - as
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Spectrum:
    """Per-neuron counts over a set of inputs; each array has one entry per neuron."""

    af: NDArray[np.int64]
    nf: NDArray[np.int64]
    as_: NDArray[np.int64]
    ns: NDArray[np.int64]
    n_failing: int
    n_passing: int


def failing_mask(float_scores: NDArray, quant_scores: NDArray) -> NDArray[np.bool_]:
    """True where the two models' top-1 classes differ. Scores are [N, classes]."""
    return np.argmax(float_scores, axis=1) != np.argmax(quant_scores, axis=1)


def activation_flips(float_pre: NDArray, quant_pre: NDArray) -> NDArray[np.bool_]:
    """[N, neurons]: True where a neuron is on (> 0) in one model and off in the other."""
    return (float_pre > 0) != (quant_pre > 0)


def collect_spectrum(failing: NDArray[np.bool_], flips: NDArray[np.bool_]) -> Spectrum:
    """Count activated / not-activated neurons on failing and passing inputs."""
    n_failing = int(failing.sum())
    n_passing = int(len(failing) - n_failing)
    af = flips[failing].sum(axis=0).astype(np.int64)
    as_ = flips[~failing].sum(axis=0).astype(np.int64)
    return Spectrum(af=af, nf=n_failing - af, as_=as_, ns=n_passing - as_, n_failing=n_failing, n_passing=n_passing)


def sqnr_db(reference: NDArray, noisy: NDArray) -> float:
    """20 log10(|reference| / |reference - noisy|), norms floored at float eps as ORT's qdq_loss_debug does."""
    eps = float(np.finfo(float).eps)
    reference64, noisy64 = np.asarray(reference, np.float64).ravel(), np.asarray(noisy, np.float64).ravel()
    signal = max(float(np.linalg.norm(reference64)), eps)
    noise = max(float(np.linalg.norm(reference64 - noisy64)), eps)
    return 20 * math.log10(signal / noise)
