"""`onnxrepair inspect`: where quantization hurts, before anything is changed.

For every layer of FLOAT (dense or convolution) that has a quantized twin,
read as `fix` reads it (a convolution at sampled output positions; both
models' class scores once, then each model only as far as the layer):

- the flip share: how often a neuron's (channel's) on/off status
  (pre-activation > 0) differs between FLOAT and QUANT, over all rows and on
  rows of failing images;
- the SQNR of the layer's pre-activation output, 20 log10(|f| / |f - q|) dB,
  as onnxruntime.quantization.qdq_loss_debug computes it;
- the most suspicious neurons under each fault-localisation metric.

The recommendation is a starting point for `fix`, not a promise. A model with
convolutions gets whole-network repair (`--layers all`): there the error sits
in the convolutions, and repairing every layer in order gained most on both
CNNs measured (docs/BENCHMARKS.md). A model of dense layers only gets its last
repairable layer, whose neurons are (or are nearest to) the class scores, with
N = that layer's neurons that flip on at least one failing image: on the
bundled example quantized to int4 by `onnxrepair quantize`, 8 of the output
layer's 10 do; repairing 8 gave 88.00 % validation accuracy, all 10 88.40 %,
5 85.80 %, and 3 nothing (83.80 % before).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.activity import FloatTargets, LayerActivity, read_layer_activity
from onnxrepair.config import Metric
from onnxrepair.data import ImageSet
from onnxrepair.errors import UnsupportedModelError
from onnxrepair.localize import rank_neurons, suspiciousness
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.repair import LayerRow, list_layers
from onnxrepair.runtime import make_session, output_name, run_batched
from onnxrepair.spectrum import activation_flips, collect_spectrum, failing_mask, sqnr_db

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInspection:
    """One layer of FLOAT, measured against its quantized twin.

    Attributes:
        name: the float node name (what --layer takes).
        quant_layer: the paired QUANT node, empty when not repairable.
        weights: how QUANT stores the weights, e.g. "int8 per-tensor".
        reason: why the layer is not repairable; empty when it is.
        kind: "dense", or a convolution's kernel, stride and groups ("conv 3x3/2 dw").
        flip_share: share of (image, neuron) pairs whose on/off status differs.
        flip_share_failing: the same over failing images only (None when none fail).
        sqnr_db: signal-to-quantization-noise ratio of the pre-activation output.
        top_neurons: metric name -> the most suspicious neurons, most first.
        neurons_flipping_on_failing: neurons whose on/off status differs on at
            least one failing image (the suggested N).
    """

    name: str
    op: str
    n_in: int
    n_out: int
    quant_layer: str
    weights: str
    reason: str
    kind: str = "dense"
    flip_share: float | None = None
    flip_share_failing: float | None = None
    sqnr_db: float | None = None
    top_neurons: dict[str, list[int]] | None = None
    neurons_flipping_on_failing: int | None = None


@dataclass(frozen=True)
class Inspection:
    """What `inspect` found, and what it suggests for `fix`.

    Attributes:
        images: how many images were run.
        failing: images on which FLOAT and QUANT disagree on the top-1 class.
        agreement: 1 - failing / images.
        float_accuracy, quant_accuracy: top-1 accuracy, None without labels.
        layers: every layer of FLOAT, in graph order.
        recommended_layer, recommended_neurons: the suggestion (None when no
            layer is repairable or nothing fails); "all" and None: repair every layer.
        recommendation: one sentence saying why.
    """

    images: int
    failing: int
    agreement: float
    float_accuracy: float | None
    quant_accuracy: float | None
    layers: list[LayerInspection]
    recommended_layer: str | None
    recommended_neurons: int | None
    recommendation: str


def inspect_models(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    images: ImageSet,
    batch_size: int,
    providers: Sequence[str] | None = None,
    progress: Progress | None = None,
    top: int = 5,
    seed: int = 0,
) -> Inspection:
    """Measure every layer of FLOAT against QUANT on `images` (a convolution at sampled output positions)."""
    progress = progress or NoProgress()
    rows = list_layers(float_model, quant_model)
    paired = [row for row in rows if row.pair is not None]
    logger.info("reading %d layers of FLOAT and QUANT on %d images", len(paired), len(images))
    float_scores, quant_scores = _scores(float_model, quant_model, images, batch_size, providers, progress)
    failing = failing_mask(float_scores, quant_scores)
    # each layer is read as fix reads it (integer operators through added DequantizeLinear nodes, fused Relus
    # through Q's accumulator); FLOAT for several layers per pass, QUANT as far as each layer
    targets = FloatTargets(
        float_model, [row.layer for row in paired], images.x, batch_size, providers=providers, seed=seed,
        progress=progress,
    )  # fmt: skip
    layers: list[LayerInspection] = []
    for row in rows:
        activity = None
        if row.pair is not None:
            try:
                activity = read_layer_activity(
                    float_model, quant_model, row.pair, images.x, batch_size, progress, providers=providers,
                    seed=seed, scores=False, float_rows=targets.rows(row.layer.name),
                )  # fmt: skip
            except UnsupportedModelError as exc:  # e.g. a layer over [N, tokens, features]: that layer only
                row = dataclasses.replace(row, pair=None, reason=str(exc))
        layers.append(_inspect_layer(row, activity, failing, top, seed))
    accuracies = [
        None if images.labels is None else float(np.mean(np.argmax(s, axis=1) == images.labels))
        for s in (float_scores, quant_scores)
    ]
    layer, neurons, why = _recommend(layers, int(failing.sum()))
    return Inspection(
        images=len(images),
        failing=int(failing.sum()),
        agreement=float(1 - failing.mean()),
        float_accuracy=accuracies[0],
        quant_accuracy=accuracies[1],
        layers=layers,
        recommended_layer=layer,
        recommended_neurons=neurons,
        recommendation=why,
    )


def _scores(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    images: ImageSet,
    batch_size: int,
    providers: Sequence[str] | None,
    progress: Progress,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Both models' class scores, for a model pair with no repairable layer to read them with."""
    scores = []
    with progress.task("running models", 2 * len(images)) as advance:
        for model, role in ((float_model, "FLOAT"), (quant_model, "QUANT")):
            name = output_name(model)
            session = make_session(model, role, providers)
            scores.append(run_batched(session, images.x, [name], batch_size, advance)[name])
    return scores[0], scores[1]


def _inspect_layer(
    row: LayerRow, activity: LayerActivity | None, failing_images: NDArray[np.bool_], top: int, seed: int
) -> LayerInspection:
    layer = row.layer
    base = LayerInspection(layer.name, layer.op, layer.n_in, layer.n_out, "", row.weights, row.reason, layer.kind)
    if row.pair is None or activity is None:
        return base
    float_pre, quant_pre = activity.float_pre, activity.quant_pre
    flips = activation_flips(float_pre, quant_pre)
    failing = failing_images[activity.row_image]
    spectrum = collect_spectrum(failing, flips)
    top_neurons = {
        metric.value: rank_neurons(suspiciousness(spectrum, metric, seed))[:top].tolist()
        for metric in Metric
        if metric is not Metric.RANDOM
    }
    return LayerInspection(
        layer.name,
        layer.op,
        layer.n_in,
        layer.n_out,
        row.pair.quant_layer.name,
        row.weights,
        "",
        layer.kind,
        flip_share=float(flips.mean()),
        flip_share_failing=float(flips[failing].mean()) if failing.any() else None,
        sqnr_db=sqnr_db(float_pre, quant_pre),
        top_neurons=top_neurons,
        neurons_flipping_on_failing=int(np.sum(spectrum.af > 0)),
    )


def _recommend(layers: list[LayerInspection], failing: int) -> tuple[str | None, int | None, str]:
    measured = [layer for layer in layers if layer.sqnr_db is not None]
    if not measured:
        return None, None, "no layer of FLOAT has a quantized twin in QUANT, so nothing can be repaired"
    if failing == 0:
        return None, None, "FLOAT and QUANT agree on every image: there is nothing to repair on these images"
    noisiest = min(measured, key=lambda layer: layer.sqnr_db if layer.sqnr_db is not None else math.inf)
    convolutions = [layer for layer in measured if layer.kind != "dense"]
    if convolutions:
        return (
            "all",
            None,
            (
                f"{len(convolutions)} of the {len(measured)} repairable layers are convolutions, where quantization "
                f"error builds up (the noisiest is {noisiest.name}, SQNR {noisiest.sqnr_db:.1f} dB): repair every "
                "layer in order, each on the inputs the layers before it give once repaired"
            ),
        )
    last = measured[-1]
    neurons = max(1, min(last.n_out, last.neurons_flipping_on_failing or 1))
    why = (
        f"{last.name} is the last repairable layer, nearest to the class scores, where a repair changes the "
        f"decision most directly; {last.neurons_flipping_on_failing} of its {last.n_out} neurons flip on at "
        "least one failing image"
    )
    if noisiest is not last:
        why += (
            f". The noisiest layer is {noisiest.name} (SQNR {noisiest.sqnr_db:.1f} dB against "
            f"{last.sqnr_db:.1f} dB): with --search, --layer {noisiest.name} --layer {last.name} tries both"
        )
    return last.name, neurons, why
