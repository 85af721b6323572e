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
    """How a layer is repaired (DESIGN.md, "Encodings")."""

    PAPER = "paper"  # hard sign constraints with a margin, minimise max |delta| (the paper)
    SOFT = "soft"  # sign constraints with slack: always feasible
    INTEGER = "integer"  # soft, in whole quantization steps: what is solved is what is written
    LOGIT = "logit"  # output layer only: class scores, jointly over the selected neurons
    BIAS_CORRECTION = "bias-correction"  # no solver: shift each bias by the mean float-minus-quant gap
    RECONSTRUCT = "reconstruct"  # least squares to the float pre-activation, rounded, checked on held-out rows
    RECONSTRUCT_LP = "reconstruct-lp"  # the same target, L1 over the rows + an L1 norm term: an LP (row generation)
    RECONSTRUCT_INTEGER = "reconstruct-integer"  # reconstruct-lp in whole quantization steps: a MILP

    @property
    def reconstructs(self) -> bool:
        """Fits the float pre-activation (rather than its sign or the class scores)."""
        return self in (Encoding.RECONSTRUCT, Encoding.RECONSTRUCT_LP, Encoding.RECONSTRUCT_INTEGER)

    @property
    def soft(self) -> bool:
        return self in (Encoding.SOFT, Encoding.INTEGER, Encoding.LOGIT)


class Objective(str, enum.Enum):
    """The size of a change: sum of |delta| (few weights move) or max |delta| (the paper)."""

    L1 = "l1"
    LINF = "linf"


SIGN_MARGIN = 1e-3
LOGIT_MARGIN = 0.1


class SolverBackend(str, enum.Enum):
    """python-mip backends. HiGHS needs the `highsbox` package; CBC ships with mip."""

    HIGHS = "highs"
    CBC = "cbc"


@dataclass(frozen=True)
class SolveConfig:
    """Options of the solve; None means "the encoding's default" (see the properties).

    Attributes:
        encoding: how constraints and objective are written; `soft` by default
            (measured: far better than the paper's encoding on unseen images).
        objective: how the size of a change is measured; default L-infinity for
            `paper`, L1 for the others.
        repair_bias: whether each selected neuron's bias is a variable too;
            default off for `paper`, on for the others.
        margin: each constraint must hold by at least this much (pre-activation
            or class-score units); default 1e-3 for sign constraints and
            LOGIT_MARGIN for class scores.
        norm_weight: soft encodings minimise mean slack + norm_weight * |change|.
        time_limit: seconds allowed for one problem; a problem that runs out is
            reported as timed out and left unchanged.
        backend: the python-mip solver.
        structured: solve each neuron's program the fast way, with the same
            optimum: the L1 norm as a sum of split variables instead of rows,
            the paper's L-infinity program in ratio form (its norm rows as
            bounds, `solve.paper_ratio_program`), and row generation (the rows that can matter first, then every row
            the solution breaks, until it breaks none). False solves the
            textbook full program, for benchmarks.
        highs_options: extra HiGHS options as (name, value) pairs, applied
            last (e.g. (("solver", "ipm"),) to compare LP methods).
    """

    encoding: Encoding = Encoding.SOFT
    objective: Objective | None = None
    repair_bias: bool | None = None
    margin: float | None = None
    norm_weight: float = 0.01
    time_limit: float = 60.0
    backend: SolverBackend = SolverBackend.HIGHS
    structured: bool = True
    highs_options: tuple[tuple[str, str | float | int | bool], ...] = ()

    @property
    def resolved_objective(self) -> Objective:
        if self.objective is not None:
            return self.objective
        return Objective.LINF if self.encoding is Encoding.PAPER else Objective.L1

    @property
    def resolved_repair_bias(self) -> bool:
        return self.encoding is not Encoding.PAPER if self.repair_bias is None else self.repair_bias

    @property
    def resolved_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return LOGIT_MARGIN if self.encoding is Encoding.LOGIT else SIGN_MARGIN


@dataclass(frozen=True)
class SearchConfig:
    """The guarded search over repair configurations (Algorithm 1's "otherwise try other combinations").

    Attributes:
        budget: seconds for the candidates: none is started that could not be scored within
            it, and the search stops with the best model so far. The out-of-fold check comes
            after it: cut to fit a budget, it would be weakest on the large models where a
            wrong model costs most.
        neuron_counts: the values of N tried ("all neurons" is always tried).
        confirm_folds: before a model is written, the kept methods are
            cross-validated over the whole repair set with this many folds
            (0 skips the check and trusts the held-out part alone).
        confidence: the check passes when the sign test of images fixed
            against images broken gives p <= 1 - confidence.
    """

    budget: float = 300.0
    neuron_counts: tuple[int, ...] = (1, 5, 10, 20, 50, 100)
    confirm_folds: int = 4
    confidence: float = 0.95


# encodings that change every channel of a layer unless told otherwise
WHOLE_LAYER_ENCODINGS = frozenset(
    {Encoding.RECONSTRUCT, Encoding.RECONSTRUCT_LP, Encoding.RECONSTRUCT_INTEGER, Encoding.BIAS_CORRECTION}
)
ALL_NEURONS = 2**31 - 1  # `neurons` for "every neuron of the layer"
# Output positions of a convolution kept as rows per image (all of them on smaller maps). Measured in
# docs/BENCHMARKS.md ("Positions per image").
DEFAULT_POSITIONS_PER_IMAGE = 64


@dataclass(frozen=True)
class RepairConfig:
    """Options of one repair run that do not name files.

    Attributes:
        layers: float-model node names of the layers to repair, in order, or
            "all", "first:K", "last:K"; empty picks the last layer.
        metric: how neurons are ranked.
        neurons: how many of the top-ranked neurons (channels) to repair;
            ALL_NEURONS for every one.
        val_fraction: share of the images held out for validation when no
            separate validation folder is given (stratified by class).
        seed: seeds the splits, the sampled positions and the random metric.
        batch_size: images per ONNX Runtime run.
        solve: solver options.
        search: when set, search configurations instead of applying `solve` once.
        jobs: processes that solve neurons in parallel (1: all in this process);
            with the ray executor, the CPUs of the local instance it starts.
        executor: where solves and inference batches run: "local" (this
            machine, `jobs` processes) or "ray" (parallel.make_executor).
        ray_address: the Ray cluster to join ("auto", "ray://host:port");
            None starts a local instance.
        providers: ONNX Runtime execution providers, in order of preference;
            empty: CUDA when this onnxruntime has it, then CPU.
        holdout_fraction: share of the repair images kept aside to score
            candidates (--search) or to guard each layer (`guard`); never the
            validation set, never given to a solver. None: 0.25 for the search,
            0.1 for the guard (`resolved_holdout_fraction`).
        guard: score every repaired layer on the held-out images, roll back a
            layer that does not help there, and return no model unless the
            result beats QUANT there; None: on when several layers are repaired.
        positions_per_image: output positions of a convolution taken as rows per
            image (all of them on smaller maps).
    """

    layers: tuple[str, ...] = ()
    metric: Metric = Metric.EUCLID
    neurons: int = 10
    val_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 256
    solve: SolveConfig = SolveConfig()
    search: SearchConfig | None = None
    jobs: int = 1
    executor: str = "local"
    ray_address: str | None = None
    providers: tuple[str, ...] = ()
    holdout_fraction: float | None = None
    guard: bool | None = None
    positions_per_image: int = DEFAULT_POSITIONS_PER_IMAGE

    @property
    def resolved_holdout_fraction(self) -> float:
        """The guard scores a smooth measure (the divergence of class distributions) and needs fewer images
        than the search's top-1 comparisons; every image it holds out is one the fit does not see (measured
        in docs/BENCHMARKS.md: 0.1 fits as well as no guard on the bundled CNN, 0.25 lost half a point)."""
        if self.holdout_fraction is not None:
            return self.holdout_fraction
        return 0.25 if self.search is not None else 0.1

    def guarded(self, layers: int) -> bool:
        """Whether the held-out guard runs for a repair of `layers` layers (never with --search, which has its own)."""
        if self.search is not None:
            return False
        return layers > 1 if self.guard is None else self.guard
