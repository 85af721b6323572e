"""Configuration of a repair run: one frozen dataclass, modes as enums.

Built once from the command line (cli.py) or by a library user; nothing changes
it afterwards.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Metric(str, enum.Enum):
    """Fault-localisation metrics of the QNNRepair paper (Table 1), plus a random baseline."""

    TARANTULA = "tarantula"
    OCHIAI = "ochiai"
    DSTAR = "dstar"
    JACCARD = "jaccard"
    AMPLE = "ample"
    EUCLID = "euclid"
    WONG3 = "wong3"
    RANDOM = "random"


class Encoding(str, enum.Enum):
    """How the per-neuron repair problem is written for the solver."""

    PAPER = "paper"  # hard sign constraints with a margin, minimise max |delta| (the paper)


class SolverBackend(str, enum.Enum):
    """python-mip backends. HiGHS needs the `highsbox` package; CBC ships with mip."""

    HIGHS = "highs"
    CBC = "cbc"


@dataclass(frozen=True)
class SolveConfig:
    """Options of the per-neuron solve.

    Attributes:
        encoding: how constraints and objective are written.
        margin: every sign constraint must hold by at least this much (in the
            units of the layer's pre-activation), so that a solution survives
            small numeric differences at deployment.
        time_limit: seconds allowed for one neuron; a neuron that runs out is
            reported as timed out and left unchanged.
        backend: the python-mip solver.
    """

    encoding: Encoding = Encoding.PAPER
    margin: float = 1e-3
    time_limit: float = 60.0
    backend: SolverBackend = SolverBackend.HIGHS


@dataclass(frozen=True)
class RepairConfig:
    """Options of one repair run that do not name files.

    Attributes:
        layer: float-model node name of the dense layer to repair; None picks
            the last dense layer.
        metric: how neurons are ranked.
        neurons: how many of the top-ranked neurons to repair.
        val_fraction: share of the images held out for validation when no
            separate validation folder is given (stratified by class).
        seed: seeds the split and the random metric.
        batch_size: images per ONNX Runtime run.
        solve: per-neuron solver options.
    """

    layer: str | None = None
    metric: Metric = Metric.EUCLID
    neurons: int = 10
    val_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 256
    solve: SolveConfig = SolveConfig()
