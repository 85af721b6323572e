"""Statistical fault localisation: score every neuron, most suspicious first.

The formulas of the QNNRepair paper (Table 1; Wong3 as Wong et al. define it),
over the counts of spectrum.py:

    Tarantula = (af/(af+nf)) / (af/(af+nf) + as/(as+ns))
    Ochiai    = af / sqrt((af+as)(af+nf))
    DStar     = af^2 / (as+nf)                          (star = 2)
    Jaccard   = af / (af+nf+as)
    Ample     = |af/(af+nf) - as/(as+ns)|
    Euclid    = sqrt(af + ns)
    Wong3     = af - h,  h = as                      if as <= 2
                         2 + 0.1 (as - 2)            if 2 < as <= 10
                         2.8 + 0.001 (as - 10)       if as > 10

Zero denominators: a ratio whose denominator is 0 counts as 0 (its numerator
is then 0 as well in every formula but DStar). DStar with af > 0 and
as + nf = 0 is the most suspicious neuron there can be: it scores +inf, so it
ranks first.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from onnxrepair.config import Metric
from onnxrepair.spectrum import Spectrum


def suspiciousness(spectrum: Spectrum, metric: Metric, seed: int = 0) -> NDArray[np.float64]:
    """One score per neuron; higher is more suspicious."""
    af, nf = spectrum.af.astype(np.float64), spectrum.nf.astype(np.float64)
    as_, ns = spectrum.as_.astype(np.float64), spectrum.ns.astype(np.float64)
    if metric is Metric.TARANTULA:
        fail_rate, pass_rate = _ratio(af, af + nf), _ratio(as_, as_ + ns)
        return _ratio(fail_rate, fail_rate + pass_rate)
    if metric is Metric.OCHIAI:
        return _ratio(af, np.sqrt((af + as_) * (af + nf)))
    if metric is Metric.DSTAR:
        denominator = as_ + nf
        return np.where((denominator == 0) & (af > 0), np.inf, _ratio(af**2, denominator))
    if metric is Metric.JACCARD:
        return _ratio(af, af + nf + as_)
    if metric is Metric.AMPLE:
        return np.abs(_ratio(af, af + nf) - _ratio(as_, as_ + ns))
    if metric is Metric.EUCLID:
        return np.sqrt(af + ns)
    if metric is Metric.WONG3:
        h = np.where(as_ <= 2, as_, np.where(as_ <= 10, 2 + 0.1 * (as_ - 2), 2.8 + 0.001 * (as_ - 10)))
        return af - h
    if metric is Metric.RANDOM:
        return np.random.default_rng(seed).random(len(af))
    raise ValueError(f"unknown metric {metric!r}")


def rank_neurons(scores: NDArray[np.float64]) -> NDArray[np.int64]:
    """Neuron indices, highest score first; ties keep the lower index first."""
    return np.argsort(-scores, kind="stable").astype(np.int64)


def _ratio(numerator: NDArray[np.float64], denominator: NDArray[np.float64]) -> NDArray[np.float64]:
    """numerator / denominator, 0 where the denominator is 0."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out
