"""The `onnxrepair` command line.

Commands: quantize, inspect, fix, eval. Exit codes, every command: 0 done
(for fix: a repaired model written), 1 fix --search found nothing better (no
model written), 2 bad input or usage (one sentence on stderr, no traceback
unless --debug), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from onnxrepair import __version__
from onnxrepair.api import plan_fix, read_fix_images, read_images, resolve_preprocessing, run_fix
from onnxrepair.config import (
    LOGIT_MARGIN,
    SIGN_MARGIN,
    Encoding,
    Metric,
    Objective,
    RepairConfig,
    SearchConfig,
    SolveConfig,
    SolverBackend,
)
from onnxrepair.data import (
    PRESETS,
    PreprocessingOptions,
    is_array_file,
)
from onnxrepair.errors import DataError, ModelPairingError, OnnxRepairError
from onnxrepair.files import check_output_path, save_json, save_model
from onnxrepair.graph import (
    check_models_match,
    input_spec,
    load_model,
    rejected_layers,
    save_preprocessing,
)
from onnxrepair.inspection import inspect_models
from onnxrepair.parallel import available_cores
from onnxrepair.plot import plot_importance
from onnxrepair.quantization import CALIBRATIONS, WEIGHT_TYPES, QuantizeConfig, quantize_model
from onnxrepair.repair import (
    list_layers,
    score_model,
)
from onnxrepair.report import (
    RichProgress,
    inspection_dict,
    nothing_better_reason,
    print_inspection,
    print_layers,
    print_model_score,
    print_summary,
)
from onnxrepair.runtime import default_batch_size, make_session, select_providers

logger = logging.getLogger(__name__)

_N = TypeVar("_N", int, float)

DEFAULT_NEURONS = 10

EXIT_OK = 0
EXIT_NOTHING_BETTER = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

FIX_EXAMPLES = """\
examples:
  onnxrepair fix float.onnx quant.onnx images/ -o repaired.onnx
  onnxrepair fix float.onnx quant.onnx images/ --val val/ --metric ochiai --neurons 20 --report report.json
  onnxrepair fix --list-layers float.onnx quant.onnx

IMAGES holds one subfolder per class (IMAGES/<class>/*.png|jpg|jpeg|bmp|webp;
classes are the folder names in sorted order), or images directly, labelled by
--labels labels.csv (filename,label rows) or unlabelled (then only agreement
with FLOAT is measured), or a .npz/.npy of model inputs. Without --val, a
stratified --val-fraction of IMAGES is held out and never used to repair.

exit codes: 0 repaired model written, 1 --search found nothing better (no model
written), 2 bad input, 130 interrupted
"""

INSPECT_EXAMPLES = """\
examples:
  onnxrepair inspect float.onnx quant.onnx images/
  onnxrepair inspect float.onnx quant.onnx images/ --json inspect.json
  onnxrepair inspect float.onnx quant.onnx images/ --json - | jq .recommended_layer

Nothing is written but --json. For each dense layer: flips = share of (image,
neuron) pairs whose on/off status differs between FLOAT and QUANT, on all
images and on failing ones (the two models disagree); SQNR = 20 log10(|f| /
|f - q|) of the layer's pre-activation, as onnxruntime's qdq_loss_debug
computes it (lower = noisier); top = the most suspicious neurons.

exit codes: 0 done, 2 bad input, 130 interrupted
"""

QUANTIZE_EXAMPLES = """\
examples:
  onnxrepair quantize float.onnx calib/ -o quant.onnx
  onnxrepair quantize float.onnx calib/ -o quant.onnx --per-channel --weights int4 --calibration entropy

exit codes: 0 written, 2 bad input, 130 interrupted
"""

EVAL_EXAMPLES = """\
examples:
  onnxrepair eval repaired.onnx val/ --against float.onnx
  onnxrepair eval quant.onnx val.npz --report scores.json

IMAGES is a folder of class subfolders or a .npz/.npy file, as for fix;
without labels only the agreement with --against is reported.

exit codes: 0 done, 2 bad input, 130 interrupted
"""


@dataclass(frozen=True)
class FixPaths:
    """The files of one `fix` run."""

    float_model: Path
    quant_model: Path
    images: Path | None
    validation: Path | None
    output: Path
    report: Path | None
    plot: Path | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxrepair",
        description="Repair a quantized ONNX model so that it agrees with its float original again.",
    )
    parser.add_argument("--version", action="version", version=f"onnxrepair {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fix = commands.add_parser(
        "fix",
        help="repair a quantized model (QDQ, QOperator or dynamic) against its float original",
        description="Find the neurons of one dense layer that cause float/quant disagreement "
        "and correct their integer weights (QNNRepair).",
        epilog=FIX_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fix.add_argument("float_model", metavar="FLOAT", type=Path, help="the float ONNX model")
    fix.add_argument(
        "quant_model", metavar="QUANT", type=Path, help="its ONNX Runtime quantized model: QDQ, QOperator or dynamic"
    )
    fix.add_argument(
        "images",
        metavar="IMAGES",
        type=Path,
        nargs="?",
        help="images: class subfolders, a flat folder (labelled with --labels or not), or .npz/.npy",
    )
    fix.add_argument("-o", "--output", type=Path, help="repaired model (default: QUANT with .repaired.onnx)")
    fix.add_argument("--report", type=Path, help="write a JSON report here")
    fix.add_argument("--force", action="store_true", help="overwrite existing output files")
    fix.add_argument("--list-layers", action="store_true", help="list the repairable layers and exit")
    fix.add_argument(
        "--layer",
        action="append",
        default=[],
        help="float-model node name of a layer (dense or convolution) to repair; repeat it to repair several, "
        "or give all, first:K or last:K; layers are repaired in graph order (default: the last layer)",
    )
    fix.add_argument("--layers", help="comma-separated layer names, all, first:K or last:K; the same as --layer")
    fix.add_argument(
        "--metric",
        choices=[m.value for m in Metric],
        default=Metric.EUCLID.value,
        help="neuron ranking (default: euclid)",
    )
    fix.add_argument(
        "--neurons",
        type=_positive_int,
        help="how many neurons (channels) of each layer to repair (default: all with reconstruct and "
        f"bias-correction, {DEFAULT_NEURONS} otherwise)",
    )
    fix.add_argument(
        "--positions-per-image",
        type=_positive_int,
        default=RepairConfig.positions_per_image,
        help="output positions of a convolution sampled per image as rows (default: %(default)d; smaller maps "
        "give all theirs)",
    )
    split = fix.add_mutually_exclusive_group()
    split.add_argument("--val", type=Path, help="separate validation folder or .npz (default: hold out part of IMAGES)")
    split.add_argument("--val-fraction", type=_fraction, default=0.2, help="share of IMAGES held out (default: 0.2)")
    fix.add_argument("--seed", type=int, default=0, help="seed for the splits and the random metric (default: 0)")
    fix.add_argument("--labels", type=Path, help="CSV of filename,label rows for a flat IMAGES folder")
    fix.add_argument("--val-labels", type=Path, help="CSV of filename,label rows for a flat --val folder")
    _add_preprocessing_flags(fix)
    repair_group = fix.add_argument_group("repair method")
    repair_group.add_argument(
        "--encoding",
        choices=[e.value for e in Encoding],
        help="how the repair is solved (default: soft for one dense layer, reconstruct for convolutions and "
        "several layers); see README, 'Encodings'",
    )
    repair_group.add_argument(
        "--objective",
        choices=[o.value for o in Objective],
        help="size of a change: l1 (sum, few weights move) or linf (max, the paper); "
        "default linf for paper, l1 otherwise",
    )
    repair_group.add_argument(
        "--repair-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make each selected neuron's bias a variable too (default: off for paper, on otherwise)",
    )
    repair_group.add_argument(
        "--margin",
        type=_non_negative_float,
        help=f"constraint margin (default: {SIGN_MARGIN:g} for sign constraints, {LOGIT_MARGIN:g} for class scores)",
    )
    repair_group.add_argument(
        "--norm-weight",
        type=_non_negative_float,
        default=SolveConfig.norm_weight,
        help="soft encodings minimise mean slack + NORM_WEIGHT * |change| (default: %(default)g)",
    )
    repair_group.add_argument(
        "--time-limit",
        type=_positive_float,
        default=SolveConfig.time_limit,
        help="seconds per problem (default: %(default)g)",
    )
    repair_group.add_argument(
        "--solver",
        choices=[s.value for s in SolverBackend],
        default=SolveConfig.backend.value,
        help="python-mip backend (default: %(default)s)",
    )
    repair_group.add_argument(
        "--jobs",
        type=_positive_int,
        default=available_cores(),
        help="processes that solve neurons in parallel; results are the same for any value "
        "(default: the cores available, %(default)d)",
    )
    repair_group.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where solves and inference batches run: local (this machine, --jobs processes) or ray (a Ray "
        "instance: pip install 'onnxrepair[ray]'); the written model is the same (default: %(default)s)",
    )
    repair_group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --executor ray: the cluster to join (auto: the one `ray start` runs here; ray://host:10001: "
        "Ray Client); without it a local instance with --jobs CPUs is started and stopped",
    )
    repair_group.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="ONNX Runtime execution provider: auto uses CUDA when onnxruntime-gpu finds a GPU, else the CPU "
        "(default: %(default)s)",
    )
    repair_group.add_argument(
        "--full-lp",
        action="store_true",
        help="solve each neuron's textbook full program (every row, the L1 norm through auxiliary rows) instead "
        "of the structured one: the same optimum, slower; for benchmarks",
    )
    search_group = fix.add_argument_group("guarded search and held-out guard")
    search_group.add_argument(
        "--search",
        action="store_true",
        help="try encodings x metrics x N on a held-out part of IMAGES and write the best model only if it "
        "beats the quantized one there (exit 1 when nothing does)",
    )
    search_group.add_argument(
        "--budget",
        type=_positive_float,
        default=SearchConfig.budget,
        help="seconds for the search's candidates, each scored before it runs out (default: %(default)g); "
        "the out-of-fold check and the validation come after it",
    )
    search_group.add_argument(
        "--holdout-fraction",
        type=_fraction,
        help="share of the repair images the search or the guard scores on, never solved on (default: 0.25 "
        "with --search, 0.1 for the guard)",
    )
    search_group.add_argument(
        "--guard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score each repaired layer on the held-out images, roll back a layer that does not help there, and "
        "write a model only if it beats QUANT there (exit 1 otherwise) (default: on when several layers are repaired)",
    )
    search_group.add_argument(
        "--confirm-folds",
        type=_folds,
        default=SearchConfig.confirm_folds,
        help="before writing, re-apply the kept methods on this many folds of IMAGES and require a significant "
        "out-of-fold gain; 0 trusts the held-out part alone (default: %(default)d)",
    )
    search_group.add_argument(
        "--confidence",
        type=_confidence,
        default=SearchConfig.confidence,
        help="the out-of-fold sign test must pass at this level (default: %(default)g)",
    )
    fix.add_argument("--plot", type=Path, help="draw the layer's neuron importance to this PNG (needs matplotlib)")
    fix.add_argument(
        "--batch-size",
        type=_positive_int,
        help="images per inference run (default: up to 256, fewer so that a batch holds at most 32 MB of input)",
    )
    _add_output_flags(fix)

    evaluate = commands.add_parser(
        "eval",
        help="top-1 accuracy of a model, and its agreement with the float model",
        description="Score one model on images: top-1 accuracy (when labelled) and agreement with --against.",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("model", metavar="MODEL", type=Path, help="the ONNX model to score")
    evaluate.add_argument("images", metavar="IMAGES", type=Path, help="class subfolders of images, or .npz/.npy")
    evaluate.add_argument("--against", type=Path, help="the float model to compare top-1 classes with")
    evaluate.add_argument("--labels", type=Path, help="CSV of filename,label rows for a flat IMAGES folder")
    evaluate.add_argument("--report", type=Path, help="write the scores as JSON here")
    evaluate.add_argument("--force", action="store_true", help="overwrite an existing --report")
    _add_preprocessing_flags(evaluate)
    evaluate.add_argument("--batch-size", type=_positive_int, help="images per inference run")
    evaluate.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider")
    _add_output_flags(evaluate)

    inspect_parser = commands.add_parser(
        "inspect",
        help="where quantization hurts: per-layer flips, SQNR and suspicious neurons; suggests --layer and --neurons",
        description="Measure every dense layer of FLOAT against QUANT on images, without changing anything, and "
        "suggest a layer and a number of neurons for fix.",
        epilog=INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect_parser.add_argument("float_model", metavar="FLOAT", type=Path, help="the float ONNX model")
    inspect_parser.add_argument(
        "quant_model", metavar="QUANT", type=Path, help="its quantized model: QDQ, QOperator or dynamic"
    )
    inspect_parser.add_argument(
        "images", metavar="IMAGES", type=Path, help="class subfolders, a flat folder, or .npz/.npy"
    )
    inspect_parser.add_argument("--labels", type=Path, help="CSV of filename,label rows for a flat IMAGES folder")
    inspect_parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write the findings as JSON here; - prints only the JSON"
    )
    inspect_parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    inspect_parser.add_argument(
        "--top", type=_positive_int, default=5, help="suspicious neurons listed per metric (default: 5)"
    )
    inspect_parser.add_argument("--seed", type=int, default=0, help="seed of ties in the rankings (default: 0)")
    inspect_parser.add_argument("--batch-size", type=_positive_int, help="images per inference run")
    inspect_parser.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider"
    )
    _add_preprocessing_flags(inspect_parser)
    _add_output_flags(inspect_parser)

    quantize_parser = commands.add_parser(
        "quantize",
        help="quantize a float model to ONNX Runtime QDQ, calibrated on images",
        description="ONNX Runtime static QDQ quantization with the same image loading as fix; Relu nodes are kept. "
        "Prints float vs quantized agreement on images held out of calibration.",
        epilog=QUANTIZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quantize_parser.add_argument("float_model", metavar="FLOAT", type=Path, help="the float ONNX model")
    quantize_parser.add_argument(
        "images", metavar="CALIB_IMAGES", type=Path, help="class subfolders, a flat folder, or .npz/.npy"
    )
    quantize_parser.add_argument("-o", "--output", type=Path, required=True, help="the QDQ model to write")
    quantize_parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    quantize_parser.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    quantize_parser.add_argument("--weights", choices=WEIGHT_TYPES, default="int8", help="weight type (default: int8)")
    quantize_parser.add_argument(
        "--calibration", choices=CALIBRATIONS, default="minmax", help="activation ranges (default: minmax)"
    )
    quantize_parser.add_argument(
        "--calibration-size", type=_positive_int, default=256, help="images that calibrate, at most (default: 256)"
    )
    quantize_parser.add_argument(
        "--holdout-fraction", type=_fraction, default=0.2, help="share held out to measure agreement (default: 0.2)"
    )
    quantize_parser.add_argument("--labels", type=Path, help="CSV of filename,label rows for a flat folder")
    _add_preprocessing_flags(quantize_parser)
    quantize_parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out split (default: 0)")
    quantize_parser.add_argument("--batch-size", type=_positive_int, help="images per calibration and inference run")
    quantize_parser.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider of the scoring"
    )
    _add_output_flags(quantize_parser)
    return parser


# Rich lays output out for 80 columns when stdout is not a terminal (a CI log, a pipe, a file), and the
# layer tables then fold every cell into pieces; a log takes long lines. COLUMNS still wins.
LOG_WIDTH = 160


def _console_width(stream: TextIO) -> int | None:
    """None (rich decides) on a terminal or with COLUMNS set; LOG_WIDTH otherwise."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else LOG_WIDTH


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    console = Console(quiet=args.quiet, width=_console_width(sys.stdout))
    errors = Console(stderr=True, width=_console_width(sys.stderr))
    try:
        commands = {"eval": run_eval, "quantize": run_quantize, "fix": fix_command, "inspect": run_inspect}
        return commands[args.command](args, console)
    except OnnxRepairError as exc:
        if args.debug:
            raise
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        errors.print("interrupted; no output was written")
        return EXIT_INTERRUPTED


def fix_command(args: argparse.Namespace, console: Console) -> int:
    """`onnxrepair fix`: the API's plan_fix / read_fix_images / run_fix, with output files and printing."""
    if args.list_layers:
        float_model = load_model(args.float_model, "FLOAT")
        quant_model = load_model(args.quant_model, "QUANT")
        check_models_match(float_model, quant_model)
        print_layers(console, list_layers(float_model, quant_model), rejected_layers(float_model))
        return EXIT_OK
    layer_specs = [*args.layer, *((args.layers or "").split(","))]
    plan = plan_fix(
        args.float_model,
        args.quant_model,
        args.images if args.images is not None else args.float_model,  # checked below, after the layers
        val=args.val,
        val_fraction=args.val_fraction,
        layers=[name for name in layer_specs if name.strip()],
        encoding=args.encoding,
        metric=args.metric,
        neurons=args.neurons,
        objective=args.objective,
        repair_bias=args.repair_bias,
        margin=args.margin,
        norm_weight=args.norm_weight,
        time_limit=args.time_limit,
        solver=args.solver,
        full_lp=args.full_lp,
        search=args.search,
        budget=args.budget,
        confirm_folds=args.confirm_folds,
        confidence=args.confidence,
        guard=args.guard,
        holdout_fraction=args.holdout_fraction,
        positions_per_image=args.positions_per_image,
        seed=args.seed,
        jobs=args.jobs,
        executor=args.executor,
        ray_address=args.ray_address,
        provider=args.provider,
        batch_size=args.batch_size,
        preprocessing=preprocessing_options(args),
    )
    if args.images is None:
        raise DataError("IMAGES is missing: give a folder of class subfolders or a .npz file (or use --list-layers)")
    paths = FixPaths(
        float_model=args.float_model,
        quant_model=args.quant_model,
        images=args.images,
        validation=args.val,
        output=args.output or args.quant_model.with_suffix(".repaired.onnx"),
        report=args.report,
        plot=args.plot,
    )
    inputs = [paths.float_model, paths.quant_model]
    outputs = [
        (p, what) for p, what in ((paths.output, "output model"), (paths.report, "report"), (paths.plot, "plot")) if p
    ]
    for path, what in outputs:
        check_output_path(path, args.force, inputs, what)
    if len({p.resolve() for p, _ in outputs}) < len(outputs):
        raise DataError("-o, --report and --plot must name different files")
    print_preprocessing(args, console, plan.prep_text, [p for p in (args.images, args.val) if p is not None])
    with RichProgress(console, enabled=not args.quiet) as progress:
        sets = read_fix_images(plan, args.images, args.labels, args.val, args.val_labels, progress)
        repair_set, validation_set = sets
        skipped = sorted(set(repair_set.skipped) | set(validation_set.skipped))
        console.print(
            f"images: {len(repair_set)} for repair, {len(validation_set)} for validation"
            + (f" ({len(skipped)} undecodable file(s) skipped)" if skipped else ""),
            highlight=False,
        )
        fixed = run_fix(plan, repair_set, validation_set, progress)
    result = fixed.run
    if result.model is not None:
        make_session(result.model, "repaired", plan.config.providers)  # one more check that ORT loads what is written
        save_model(result.model, paths.output)
    if paths.report is not None:
        output = str(paths.output) if result.model is not None else None
        save_json({**fixed.report, "output": output}, paths.report)
    plotted = None
    if paths.plot is not None and result.layers:
        last = result.layers[-1]
        plot_importance(
            last.scores,
            paths.plot,
            metric=last.method.metric.value,
            layer=last.pair.float_layer.name,
            selected=last.selected,
        )
        plotted = paths.plot
    elif paths.plot is not None:
        logger.warning("no plot written: nothing was repaired, so there is no ranking to draw")
    print_summary(console, result, plan.config)
    extras = "".join(
        f", {what} to {escape(str(path))}" for path, what in ((paths.report, "report"), (plotted, "plot")) if path
    )
    if result.model is None:
        reason = escape(nothing_better_reason(result))
        console.print(f"[yellow]{reason}, so no model was written[/]{extras}", soft_wrap=True)
        return EXIT_NOTHING_BETTER
    console.print(f"repaired model written to [bold]{escape(str(paths.output))}[/]{extras}", soft_wrap=True)
    return EXIT_OK


def run_quantize(args: argparse.Namespace, console: Console) -> int:
    """`onnxrepair quantize`: QDQ-quantize FLOAT, calibrated on CALIB_IMAGES."""
    float_model = load_model(args.float_model, "FLOAT")
    check_output_path(args.output, args.force, [args.float_model], "output model")
    spec = input_spec(float_model)
    prep, prep_text = resolve_preprocessing(
        preprocessing_options(args), spec, [(str(args.float_model), float_model)], [args.images]
    )
    print_preprocessing(args, console, prep_text, [args.images])
    with RichProgress(console, enabled=not args.quiet) as progress:
        images = read_images(args.images, spec, prep, args.labels, progress)
    config = QuantizeConfig(
        per_channel=args.per_channel,
        weights=args.weights,
        calibration=args.calibration,
        calibration_size=args.calibration_size,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        batch_size=args.batch_size or default_batch_size(spec.shape),
        providers=tuple(select_providers(args.provider)),
    )
    console.print(f"quantizing on {min(args.calibration_size, len(images))} images at most ...", highlight=False)
    result = quantize_model(args.float_model, images, config)
    if prep is not None:
        save_preprocessing(result.model, prep.saved_options())
    save_model(result.model, args.output)
    held = result.holdout
    accuracy = (
        ""
        if held.accuracy is None
        else f"; top-1 accuracy float {100 * (result.float_holdout.accuracy or 0):.2f} %, "
        f"quantized {100 * held.accuracy:.2f} %"
    )
    console.print(
        f"quantized model written to [bold]{escape(str(args.output))}[/] "
        f"({result.calibration_size} calibration images); "
        f"on {held.size} held-out images it agrees with FLOAT on {100 * (held.agreement or 0):.2f} %{accuracy}",
        soft_wrap=True,
    )
    return EXIT_OK


def run_eval(args: argparse.Namespace, console: Console) -> int:
    """`onnxrepair eval`: score MODEL on IMAGES, against the float model when given."""
    model = load_model(args.model, "evaluated")
    reference = load_model(args.against, "--against") if args.against else None
    if reference is not None:
        mine, theirs = input_spec(model), input_spec(reference)
        if mine.shape[1:] != theirs.shape[1:]:
            raise ModelPairingError(
                f"the models take different inputs: MODEL '{mine.name}' {mine.shown}, "
                f"--against '{theirs.name}' {theirs.shown}"
            )
    if args.report:
        check_output_path(args.report, args.force, [p for p in (args.model, args.against) if p], "report")
    spec = input_spec(model)
    providers = select_providers(args.provider)
    saved_in = [(str(args.model), model)] + ([(str(args.against), reference)] if reference is not None else [])
    prep, prep_text = resolve_preprocessing(preprocessing_options(args), spec, saved_in, [args.images])
    print_preprocessing(args, console, prep_text, [args.images])
    with RichProgress(console, enabled=not args.quiet) as progress:
        images = read_images(args.images, spec, prep, args.labels, progress)
        batch_size = args.batch_size or default_batch_size(spec.shape)
        score = score_model(model, images, batch_size, reference, providers, progress)
    print_model_score(console, args.model, score, args.against)
    if args.report:
        scores = {
            "model": str(args.model),
            "against": str(args.against) if args.against else None,
            "images": str(args.images),
            "preprocessing": prep_text,
            "skipped_images": list(images.skipped),
            **dataclasses.asdict(score),
        }
        save_json(scores, args.report)
    return EXIT_OK


def run_inspect(args: argparse.Namespace, console: Console) -> int:
    """`onnxrepair inspect`: measure FLOAT's dense layers against QUANT, suggest --layer and --neurons."""
    to_stdout = args.json is not None and str(args.json) == "-"
    if to_stdout:
        console = Console(quiet=True)  # stdout carries the JSON alone
    float_model = load_model(args.float_model, "FLOAT")
    quant_model = load_model(args.quant_model, "QUANT")
    check_models_match(float_model, quant_model)
    if args.json is not None and not to_stdout:
        check_output_path(args.json, args.force, [args.float_model, args.quant_model, args.images], "--json file")
    spec = input_spec(float_model)
    saved_in = [(str(args.quant_model), quant_model), (str(args.float_model), float_model)]
    prep, prep_text = resolve_preprocessing(preprocessing_options(args), spec, saved_in, [args.images])
    print_preprocessing(args, console, prep_text, [args.images])
    with RichProgress(console, enabled=not (args.quiet or to_stdout)) as progress:
        images = read_images(args.images, spec, prep, args.labels, progress)
        inspection = inspect_models(
            float_model,
            quant_model,
            images,
            args.batch_size or default_batch_size(spec.shape),
            select_providers(args.provider),
            progress,
            top=args.top,
            seed=args.seed,
        )
    command = None
    if inspection.recommended_layer is not None:
        suggested = (
            ["--layers", "all"]
            if inspection.recommended_layer == "all"
            else ["--layer", inspection.recommended_layer, "--neurons", str(inspection.recommended_neurons)]
        )
        paths = [str(p) for p in (args.float_model, args.quant_model, args.images)]
        command = shlex.join(["onnxrepair", "fix", *paths, *_image_options_given(args), *suggested])
    print_inspection(console, inspection, command)
    if args.json is not None:
        inputs = {name: str(getattr(args, name)) for name in ("float_model", "quant_model", "images")}
        findings = {**inspection_dict(inspection, inputs, prep_text), "skipped_images": list(images.skipped)}
        if to_stdout:
            sys.stdout.write(json.dumps(findings, indent=2) + "\n")
        else:
            save_json(findings, args.json)
            console.print(f"findings written to [bold]{escape(str(args.json))}[/]", soft_wrap=True)
    return EXIT_OK


def _add_preprocessing_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "image preprocessing",
        "how image files become model inputs; without these options, what a model written by onnxrepair "
        "recorded is used, else --preprocess unit with stretching (arrays from .npz/.npy are used as they are)",
    )
    group.add_argument(
        "--preprocess",
        choices=list(PRESETS),
        help="pixel scaling: unit [0,1], imagenet mean/std, inception [-1,1], raw 0..255 (default: unit); "
        "--mean/--std override it",
    )
    group.add_argument("--mean", type=float, nargs="+", help="per-channel mean of normalised input, model's order")
    group.add_argument("--std", type=float, nargs="+", help="per-channel std of normalised input, model's order")
    group.add_argument(
        "--resize",
        type=_resize,
        metavar="stretch|crop|N",
        help="stretch to the model's size (default); crop: scale the shorter side to cover it and crop the centre; "
        "N: scale the shorter side to N, then crop the centre (torchvision's Resize(256) + CenterCrop(224))",
    )
    group.add_argument("--bgr", action="store_true", default=None, help="feed colour channels in BGR order")


PREPROCESSING_FLAGS = ("preprocess", "mean", "std", "resize", "bgr")


def preprocessing_options(args: argparse.Namespace) -> PreprocessingOptions | None:
    """The preprocessing options given on the command line, as a whole; None when none was given."""
    if all(getattr(args, flag) is None for flag in PREPROCESSING_FLAGS):
        return None
    resize, shorter_side = args.resize or ("stretch", None)
    return PreprocessingOptions(
        preset=args.preprocess or "unit",
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        resize=resize,
        shorter_side=shorter_side,
        bgr=bool(args.bgr),
    )


def print_preprocessing(args: argparse.Namespace, console: Console, text: str, image_paths: Sequence[Path]) -> None:
    """Say how images are read; warn when image options were given for arrays, which are used as they are."""
    if all(is_array_file(path) for path in image_paths):
        given = [f"--{flag}" for flag in PREPROCESSING_FLAGS if getattr(args, flag) is not None]
        if given:
            logger.warning("%s apply to image files; arrays from .npz/.npy are used as they are", ", ".join(given))
    console.print(f"preprocessing: {escape(text)}", highlight=False, soft_wrap=True)


def _image_options_given(args: argparse.Namespace) -> list[str]:
    """The options that decided how images were read, as given, so that a suggested command reads them alike."""
    given: list[str] = []
    if args.labels is not None:
        given += ["--labels", str(args.labels)]
    if args.preprocess is not None:
        given += ["--preprocess", args.preprocess]
    for flag in ("mean", "std"):
        if getattr(args, flag):
            given += [f"--{flag}", *(f"{v:g}" for v in getattr(args, flag))]
    if args.resize is not None:
        mode, side = args.resize
        given += ["--resize", str(side) if side else mode]
    if args.bgr:
        given.append("--bgr")
    if args.batch_size is not None:  # dynamic quantization scales x per batch
        given += ["--batch-size", str(args.batch_size)]
    return given


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print what each stage does")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("mip").setLevel(logging.ERROR)  # its HiGHS library lookup warns about highspy


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _folds(text: str) -> int:
    value = _number(text, int)
    if value != 0 and value < 2:
        raise argparse.ArgumentTypeError(f"must be 0 (no check) or at least 2, got {value}")
    return value


def _confidence(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _resize(text: str) -> tuple[str, int | None]:
    if text in ("stretch", "crop"):
        return text, None
    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be stretch, crop or a number of pixels, got {text!r}") from None
    if side < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {side}")
    return "crop", side


def _fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _number(text: str, kind: Callable[[str], _N]) -> _N:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def entry_point() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
