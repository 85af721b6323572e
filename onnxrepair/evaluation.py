"""Accuracy and agreement of the float, quantized and repaired models on held-out inputs.

Pure functions over score arrays: the inference itself happens in repair.py
with the untapped models and default session options, what a user deploys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Evaluation:
    """Top-1 figures on one set of inputs.

    Attributes:
        size: number of inputs.
        float_accuracy, quant_accuracy, repaired_accuracy: against the labels
            (None without labels).
        quant_agreement, repaired_agreement: share of inputs whose top-1 class
            equals the float model's.
        fixed: inputs where the quantized model disagreed with the float one
            and the repaired model agrees.
        broken: inputs where the quantized model agreed and the repaired one does not.
    """

    size: int
    float_accuracy: float | None
    quant_accuracy: float | None
    repaired_accuracy: float | None
    quant_agreement: float
    repaired_agreement: float
    fixed: int
    broken: int

    @property
    def worse_than_quant(self) -> bool:
        """The repaired model agrees with the float one less often, or is less accurate, than the quantized one."""
        less_accurate = (
            self.repaired_accuracy is not None
            and self.quant_accuracy is not None
            and self.repaired_accuracy < self.quant_accuracy
        )
        return self.repaired_agreement < self.quant_agreement or less_accurate


def evaluate_scores(
    float_scores: NDArray,
    quant_scores: NDArray,
    repaired_scores: NDArray,
    labels: NDArray[np.int64] | None,
) -> Evaluation:
    """Compare three models' [N, classes] scores (and the labels, when known)."""
    f, q, r = (np.argmax(s, axis=1) for s in (float_scores, quant_scores, repaired_scores))
    q_agrees, r_agrees = q == f, r == f

    def accuracy(pred: NDArray) -> float | None:
        return None if labels is None else float(np.mean(pred == labels))

    return Evaluation(
        size=len(f),
        float_accuracy=accuracy(f),
        quant_accuracy=accuracy(q),
        repaired_accuracy=accuracy(r),
        quant_agreement=float(np.mean(q_agrees)),
        repaired_agreement=float(np.mean(r_agrees)),
        fixed=int(np.count_nonzero(~q_agrees & r_agrees)),
        broken=int(np.count_nonzero(q_agrees & ~r_agrees)),
    )
