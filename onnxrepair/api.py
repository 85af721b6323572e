"""The Python API: `fix`, `quantize`, `inspect` and `evaluate`, for notebooks and pipelines.

The command line is a thin layer over these functions: the same options, the
same defaults, the same model bytes. Models are paths or `onnx.ModelProto`;
images are a folder (class subfolders, or flat with a labels CSV), a
.npz/.npy path, a numpy array of model inputs (labels as a second array), or
an `ImageSet`. Errors are `OnnxRepairError` subclasses, never `SystemExit`.

    import onnxrepair
    result = onnxrepair.fix("float.onnx", "quant.onnx", "images/", val="val/", layers="all")
    if result.model is not None:
        result.save("repaired.onnx")
    print(result.report["repaired_agreement"])

`plan_fix`, `read_fix_images` and `run_fix` are `fix` in three steps, for
callers that report between them (the command line prints the preprocessing
before reading images, and their count before repairing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.config import (
    ALL_NEURONS,
    DEFAULT_POSITIONS_PER_IMAGE,
    WHOLE_LAYER_ENCODINGS,
    Encoding,
    Metric,
    Objective,
    RepairConfig,
    SearchConfig,
    SolveConfig,
    SolverBackend,
)
from onnxrepair.data import (
    ImageSet,
    Preprocessing,
    PreprocessingOptions,
    count_images,
    is_array_file,
    load_array_file,
    load_image_folder,
    options_from_saved,
    preprocessing_from_options,
    stratified_split,
)
from onnxrepair.errors import DataError, ModelPairingError, OutputError
from onnxrepair.files import check_output_path, save_model
from onnxrepair.graph import (
    InputSpec,
    check_models_match,
    input_spec,
    load_model,
    pair_layer,
    save_preprocessing,
    saved_preprocessing,
)
from onnxrepair.inspection import Inspection, inspect_models
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.quantization import QuantizeConfig, QuantizeResult, quantize_model
from onnxrepair.repair import ModelScore, RepairRun, default_encoding, repair, resolve_layers, score_model
from onnxrepair.report import report_dict
from onnxrepair.runtime import default_batch_size, make_session, select_providers

ModelLike = str | os.PathLike[str] | onnx.ModelProto
ImagesLike = str | os.PathLike[str] | NDArray[Any] | ImageSet

DEFAULT_NEURONS = 10  # for the sign and class-score encodings; reconstruction and bias correction take all


@dataclass(frozen=True)
class RepairResult:
    """What `fix` returns.

    Attributes:
        run: everything the repair measured (layers, guard, search, validation, timings).
        report: the JSON report `fix --report` writes ("output" is null: `save` decides where).
        preprocessing: how image files were read, in words.
    """

    run: RepairRun
    report: dict[str, Any]
    preprocessing: str

    @property
    def model(self) -> onnx.ModelProto | None:
        """The repaired model; None when the guard or the search kept QUANT (nothing beat it)."""
        return self.run.model

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the repaired model atomically (after onnx.checker and an ONNX Runtime load); returns the path.

        Raises:
            OutputError: there is no repaired model, or `path` exists and `force` is off.
        """
        if self.model is None:
            raise OutputError("there is no repaired model to save: nothing beat the quantized model")
        target = Path(path)
        check_output_path(target, force, [], "output model")
        make_session(self.model, "repaired", None)
        save_model(self.model, target)
        return target


@dataclass(frozen=True)
class FixPlan:
    """A `fix` run checked and configured, its images not read yet (the command line prints in between)."""

    float_model: onnx.ModelProto
    quant_model: onnx.ModelProto
    inputs: dict[str, str]
    config: RepairConfig
    spec: InputSpec
    prep: Preprocessing | None
    prep_text: str


def fix(
    float_model: ModelLike,
    quant_model: ModelLike,
    images: ImagesLike,
    *,
    labels: NDArray[Any] | str | os.PathLike[str] | None = None,
    val: ImagesLike | None = None,
    val_labels: NDArray[Any] | str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> RepairResult:
    """Repair `quant_model` against `float_model` on `images` (what `onnxrepair fix` does; see README).

    `options` are `plan_fix`'s: layers ("all", "first:K", "last:K", names), encoding, metric,
    neurons, search, budget, guard, seed, jobs, executor ("local" or "ray", with ray_address),
    preprocessing... Without `val`, a stratified
    `val_fraction` of `images` is held out for validation.

    Raises:
        OnnxRepairError: bad input (a missing or corrupt model or folder, models that do not match, a
            layer that does not exist...), with one sentence saying which.
    """
    plan = plan_fix(float_model, quant_model, images, val=val, **options)
    progress = progress or NoProgress()
    repair_set, validation = read_fix_images(plan, images, labels, val, val_labels, progress)
    return run_fix(plan, repair_set, validation, progress)


def _executor_kind(kind: str, ray_address: str | None) -> str:
    """`kind`, checked before any image is read: ray must be installed, an address needs ray.

    Raises:
        DataError: an unknown executor, or an address without --executor ray.
        MissingExtraError: ray asked for and not installed.
    """
    if kind not in ("local", "ray"):
        raise DataError(f"--executor must be local or ray, got {kind!r}")
    if ray_address is not None and kind != "ray":
        raise DataError("--ray-address is for --executor ray; add --executor ray or drop the address")
    if kind == "ray":
        from onnxrepair.ray_executor import require_ray

        require_ray()
    return kind


def plan_fix(
    float_model: ModelLike,
    quant_model: ModelLike,
    images: ImagesLike,
    *,
    val: ImagesLike | None = None,
    val_fraction: float = 0.2,
    layers: str | Sequence[str] | None = None,
    encoding: str | Encoding | None = None,
    metric: str | Metric = Metric.EUCLID,
    neurons: int | None = None,
    objective: str | Objective | None = None,
    repair_bias: bool | None = None,
    margin: float | None = None,
    norm_weight: float = SolveConfig.norm_weight,
    time_limit: float = SolveConfig.time_limit,
    solver: str | SolverBackend = SolverBackend.HIGHS,
    full_lp: bool = False,
    search: bool = False,
    budget: float = SearchConfig.budget,
    confirm_folds: int = SearchConfig.confirm_folds,
    confidence: float = SearchConfig.confidence,
    guard: bool | None = None,
    holdout_fraction: float | None = None,
    positions_per_image: int = DEFAULT_POSITIONS_PER_IMAGE,
    seed: int = 0,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    provider: str = "auto",
    batch_size: int | None = None,
    preprocessing: PreprocessingOptions | None = None,
) -> FixPlan:
    """Load and check both models, resolve the layers (a wrong one fails before any image is read), and
    choose the defaults: `encoding` soft for one dense layer and reconstruct for convolutions and several
    layers; `neurons` all with reconstruct and bias-correction, 10 otherwise."""
    float_proto, float_name = _model(float_model, "FLOAT")
    quant_proto, quant_name = _model(quant_model, "QUANT")
    check_models_match(float_proto, quant_proto)
    specs = _layer_specs(layers)
    pairs = [pair_layer(float_proto, quant_proto, name) for name in resolve_layers(float_proto, specs)]
    chosen = Encoding(encoding) if encoding is not None else default_encoding([p.float_layer for p in pairs])
    spec = input_spec(float_proto)
    config = RepairConfig(
        layers=specs,
        metric=Metric(metric),
        neurons=neurons or (ALL_NEURONS if chosen in WHOLE_LAYER_ENCODINGS else DEFAULT_NEURONS),
        val_fraction=val_fraction,
        seed=seed,
        batch_size=batch_size or default_batch_size(spec.shape),
        solve=SolveConfig(
            encoding=chosen,
            objective=Objective(objective) if objective is not None else None,
            repair_bias=repair_bias,
            margin=margin,
            norm_weight=norm_weight,
            time_limit=time_limit,
            backend=SolverBackend(solver),
            structured=not full_lp,
        ),
        jobs=jobs,
        executor=_executor_kind(executor, ray_address),
        ray_address=ray_address,
        providers=tuple(select_providers(provider)),
        holdout_fraction=holdout_fraction,
        guard=guard,
        positions_per_image=positions_per_image,
        search=SearchConfig(budget=budget, confirm_folds=confirm_folds, confidence=confidence) if search else None,
    )
    saved_in = [(quant_name, quant_proto), (float_name, float_proto)]
    prep, prep_text = resolve_preprocessing(
        preprocessing, spec, saved_in, [images, *([val] if val is not None else [])]
    )
    inputs = {
        "float_model": float_name,
        "quant_model": quant_name,
        "images": _described(images),
        **({"validation": _described(val)} if val is not None else {}),
    }
    return FixPlan(float_proto, quant_proto, inputs, config, spec, prep, prep_text)


def read_fix_images(
    plan: FixPlan,
    images: ImagesLike,
    labels: NDArray[Any] | str | os.PathLike[str] | None,
    val: ImagesLike | None,
    val_labels: NDArray[Any] | str | os.PathLike[str] | None,
    progress: Progress,
) -> tuple[ImageSet, ImageSet]:
    """The repair and validation images: a separate `val`, or a stratified split of `images`."""
    repair_set = read_images(images, plan.spec, plan.prep, labels, progress)
    if val is None:
        repair_idx, val_idx = stratified_split(repair_set.strata, plan.config.val_fraction, plan.config.seed)
        return repair_set.subset(repair_idx), repair_set.subset(val_idx)
    class_names = repair_set.class_names if val_labels is None and labels is None else None
    validation = read_images(val, plan.spec, plan.prep, val_labels, progress, "loading --val", class_names or None)
    return repair_set, validation


def run_fix(plan: FixPlan, repair_set: ImageSet, validation: ImageSet, progress: Progress) -> RepairResult:
    """Repair, save the preprocessing into the repaired model, and write the report's dict."""
    result = repair(plan.float_model, plan.quant_model, repair_set, validation, plan.config, progress)
    if result.model is not None and plan.prep is not None:
        save_preprocessing(result.model, plan.prep.saved_options())
    report = report_dict(result, plan.config, inputs=plan.inputs, preprocessing=plan.prep_text, output=None)
    skipped = sorted(set(repair_set.skipped) | set(validation.skipped))
    return RepairResult(result, {**report, "skipped_images": skipped}, plan.prep_text)


def quantize(
    float_model: str | os.PathLike[str],
    images: ImagesLike,
    *,
    labels: NDArray[Any] | str | os.PathLike[str] | None = None,
    per_channel: bool = False,
    weights: str = "int8",
    calibration: str = "minmax",
    calibration_size: int = 256,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int | None = None,
    provider: str = "auto",
    preprocessing: PreprocessingOptions | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """ONNX Runtime static QDQ quantization calibrated on `images` (what `onnxrepair quantize` does).

    The preprocessing used is saved in the returned model, so `fix`, `inspect` and `evaluate` read
    images alike. Save it with `onnxrepair.files.save_model` or `onnx.save`.
    """
    path = Path(float_model)
    proto = load_model(path, "FLOAT")
    spec = input_spec(proto)
    prep, _ = resolve_preprocessing(preprocessing, spec, [(str(path), proto)], [images])
    image_set = read_images(images, spec, prep, labels, progress or NoProgress())
    config = QuantizeConfig(
        per_channel=per_channel,
        weights=weights,
        calibration=calibration,
        calibration_size=calibration_size,
        holdout_fraction=holdout_fraction,
        seed=seed,
        batch_size=batch_size or default_batch_size(spec.shape),
        providers=tuple(select_providers(provider)),
    )
    result = quantize_model(path, image_set, config)
    if prep is not None:
        save_preprocessing(result.model, prep.saved_options())
    return result


def inspect(
    float_model: ModelLike,
    quant_model: ModelLike,
    images: ImagesLike,
    *,
    labels: NDArray[Any] | str | os.PathLike[str] | None = None,
    top: int = 5,
    seed: int = 0,
    batch_size: int | None = None,
    provider: str = "auto",
    preprocessing: PreprocessingOptions | None = None,
    progress: Progress | None = None,
) -> Inspection:
    """Where quantization hurts, layer by layer, and a suggested `fix` (what `onnxrepair inspect` does)."""
    float_proto, float_name = _model(float_model, "FLOAT")
    quant_proto, quant_name = _model(quant_model, "QUANT")
    check_models_match(float_proto, quant_proto)
    spec = input_spec(float_proto)
    saved_in = [(quant_name, quant_proto), (float_name, float_proto)]
    prep, _ = resolve_preprocessing(preprocessing, spec, saved_in, [images])
    progress = progress or NoProgress()
    image_set = read_images(images, spec, prep, labels, progress)
    providers = select_providers(provider)
    size = batch_size or default_batch_size(spec.shape)
    return inspect_models(float_proto, quant_proto, image_set, size, providers, progress, top=top, seed=seed)


def evaluate(
    model: ModelLike,
    images: ImagesLike,
    *,
    against: ModelLike | None = None,
    labels: NDArray[Any] | str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    provider: str = "auto",
    preprocessing: PreprocessingOptions | None = None,
    progress: Progress | None = None,
) -> ModelScore:
    """Top-1 accuracy of `model` (when labelled) and its agreement with `against` (what `onnxrepair eval` does)."""
    proto, name = _model(model, "evaluated")
    reference = _model(against, "--against") if against is not None else None
    spec = input_spec(proto)
    if reference is not None:
        theirs = input_spec(reference[0])
        if spec.shape[1:] != theirs.shape[1:]:
            raise ModelPairingError(
                f"the models take different inputs: MODEL '{spec.name}' {spec.shown}, "
                f"--against '{theirs.name}' {theirs.shown}"
            )
    saved_in = [(name, proto)] + ([reference] if reference is not None else [])
    prep, _ = resolve_preprocessing(preprocessing, spec, saved_in, [images])
    progress = progress or NoProgress()
    image_set = read_images(images, spec, prep, labels, progress)
    providers = select_providers(provider)
    size = batch_size or default_batch_size(spec.shape)
    return score_model(proto, image_set, size, reference[0] if reference else None, providers, progress)


# --- the pieces the command line shares -------------------------------------------------------------


def resolve_preprocessing(
    options: PreprocessingOptions | None,
    spec: InputSpec,
    saved_in: Sequence[tuple[str, onnx.ModelProto]],
    images: Sequence[ImagesLike],
) -> tuple[Preprocessing | None, str]:
    """The run's preprocessing (None when every input is already arrays), and the report's words for it.

    Given options win; without them, the first model in `saved_in` that onnxrepair wrote supplies
    the options it was written with; else the defaults (pixels/255, stretched).
    """
    if all(not _is_folder(item) for item in images):
        return None, "arrays from .npz/.npy used as they are"
    if options is not None:
        return preprocessing_from_options(spec.name, spec.shape, options), _described_prep(options, spec, None)
    for source, model in saved_in:
        text = saved_preprocessing(model)
        if text is not None:
            saved = options_from_saved(text, source)
            return preprocessing_from_options(spec.name, spec.shape, saved), _described_prep(saved, spec, source)
    defaults = PreprocessingOptions()
    return preprocessing_from_options(spec.name, spec.shape, defaults), _described_prep(defaults, spec, None)


def read_images(
    images: ImagesLike,
    spec: InputSpec,
    prep: Preprocessing | None,
    labels: NDArray[Any] | str | os.PathLike[str] | None,
    progress: Progress,
    description: str = "loading images",
    class_names: tuple[str, ...] | None = None,
) -> ImageSet:
    """An ImageSet from a folder (through `prep`), a .npz/.npy path, an array (and labels), or an ImageSet."""
    if isinstance(images, ImageSet):
        return images
    if isinstance(images, np.ndarray):
        return array_images(images, None if labels is None else np.asarray(labels), spec)
    path = Path(images)
    if is_array_file(path) or prep is None:
        return load_array_file(path, spec.shape)
    labels_file = Path(labels) if labels is not None and not isinstance(labels, np.ndarray) else None
    with progress.task(description, count_images(path)) as advance:
        return load_image_folder(path, prep, advance, class_names=class_names, labels_file=labels_file)


def array_images(x: NDArray[Any], labels: NDArray[Any] | None, spec: InputSpec) -> ImageSet:
    """Model inputs given as an array (and integer labels), checked against the model input like a .npz."""
    expected = list(spec.shape)[1:]
    if x.ndim != len(expected) + 1 or any(
        e is not None and e != d for e, d in zip(expected, x.shape[1:], strict=False)
    ):
        shown = ["N", *("?" if e is None else str(e) for e in expected)]
        raise DataError(f"the images array has shape {list(x.shape)} but the model takes [{', '.join(shown)}]")
    if len(x) == 0:
        raise DataError("the images array holds no inputs")
    if labels is not None and (labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"labels must hold one integer per image, got shape {list(labels.shape)} {labels.dtype}")
    names = tuple(str(i) for i in range(int(labels.max()) + 1)) if labels is not None else ()
    return ImageSet(
        x=np.asarray(x, np.float32),
        labels=None if labels is None else labels.astype(np.int64),
        class_names=names,
        paths=tuple(f"images[{i}]" for i in range(len(x))),
    )


def _model(model: ModelLike, role: str) -> tuple[onnx.ModelProto, str]:
    """The model, and what the report calls it (its path, or "<role> (in memory)")."""
    if isinstance(model, onnx.ModelProto):
        return model, f"{role} (in memory)"
    return load_model(Path(model), role), str(model)


def _layer_specs(layers: str | Sequence[str] | None) -> tuple[str, ...]:
    if layers is None:
        return ()
    items = [layers] if isinstance(layers, str) else list(layers)
    return tuple(part.strip() for item in items for part in item.split(",") if part.strip())


def _is_folder(images: ImagesLike) -> bool:
    return not isinstance(images, (np.ndarray, ImageSet)) and not is_array_file(Path(images))


def _described(images: ImagesLike) -> str:
    if isinstance(images, np.ndarray):
        return f"array {list(images.shape)}"
    if isinstance(images, ImageSet):
        return f"{len(images)} images (ImageSet)"
    return str(images)


def _described_prep(options: PreprocessingOptions, spec: InputSpec, source: str | None) -> str:
    text = preprocessing_from_options(spec.name, spec.shape, options).describe()
    return text if source is None else f"{text} (saved in {source})"


__all__ = [
    "FixPlan",
    "RepairResult",
    "evaluate",
    "fix",
    "inspect",
    "plan_fix",
    "quantize",
    "read_fix_images",
    "run_fix",
]
