"""What the repair inputs show about one layer: tapped runs of both models, as rows.

Copies of FLOAT and QUANT that also output the layer's input and
pre-activation run over the images in batches. Each batch becomes rows
(rows.py): a dense layer's inputs as they are, a convolution's patches at
sampled output positions, with both models' pre-activations at the same
rows. `layer_row_batches` yields them one batch at a time (memory follows
the batch); `read_layer_activity` keeps them, within a memory budget, for the
methods that solve over rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.config import DEFAULT_POSITIONS_PER_IMAGE
from onnxrepair.errors import UnsupportedModelError
from onnxrepair.graph import (
    Layer,
    LayerPair,
    clips_negatives,
    input_spec,
    layer_parameters,
    prefix,
    tap_layer,
    with_outputs,
)
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.rows import grouped_linear, output_rows, patch_rows, sample_positions
from onnxrepair.runtime import make_session, output_name, stream_batched
from onnxrepair.spectrum import failing_mask

# The rows `read_layer_activity` keeps are capped at this many bytes (float32); a convolution
# with wide rows (a depthwise layer of 1,152 channels x 5 x 5) then keeps fewer positions per image.
MAX_ROW_BYTES = 512 * 2**20


@dataclass(frozen=True)
class LayerActivity:
    """One layer as the repair inputs show it, one row per (image, output position).

    For a dense layer the rows are the images. Attributes:
        float_scores, quant_scores: [n, classes] both models' class scores per image; None when
            they were not read (a method that changes every channel needs no spectrum).
        float_pre, quant_pre: [r, channels] pre-activations at each row.
        quant_inputs: [r, row width] the layer input as the quantized model computes it
            (a convolution's patches; `Layer.columns` says which a channel reads).
        row_image: [r] the image each row comes from (an index into the scores).
    """

    float_scores: NDArray[np.float32] | None
    quant_scores: NDArray[np.float32] | None
    float_pre: NDArray[np.float32]
    quant_pre: NDArray[np.float32]
    quant_inputs: NDArray[np.float32]
    row_image: NDArray[np.int64]

    def is_output_layer(self) -> bool:
        """The layer's outputs are the class scores (up to a monotone map such as Softmax), one row per image."""
        if self.float_scores is None or self.float_pre.shape != self.float_scores.shape:
            return False
        same = np.argmax(self.float_pre, axis=1) == np.argmax(self.float_scores, axis=1)
        return bool(np.mean(same) >= 0.99)

    def failing_rows(self) -> NDArray[np.bool_] | None:
        """[r] True for the rows of images on which the two models disagree; None without scores."""
        if self.float_scores is None or self.quant_scores is None:
            return None
        return failing_mask(self.float_scores, self.quant_scores)[self.row_image]


@dataclass(frozen=True)
class RowBatch:
    """The rows of one batch of images (see LayerActivity); `row_image` indexes the whole image set."""

    float_scores: NDArray[np.float32] | None
    quant_scores: NDArray[np.float32] | None
    float_pre: NDArray[np.float32]
    quant_pre: NDArray[np.float32]
    quant_inputs: NDArray[np.float32]
    row_image: NDArray[np.int64]


def positions_within(layer: Layer, images: int, per_image: int | None, budget_bytes: int = MAX_ROW_BYTES) -> int | None:
    """Positions per image such that all rows of `images` images fit in `budget_bytes` (None: all positions)."""
    if layer.conv is None:
        return per_image
    fitting = max(1, budget_bytes // max(1, 4 * images * layer.row_width))
    return fitting if per_image is None else min(per_image, fitting)


def layer_row_batches(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    x: NDArray[np.float32],
    batch_size: int,
    progress: Progress | None = None,
    *,
    providers: Sequence[str] | None = None,
    positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
    seed: int = 0,
    scores: bool = True,
) -> Iterator[RowBatch]:
    """Run tapped copies of both models over `x` and yield each batch's rows.

    A convolution's rows are taken at `positions_per_image` output positions
    per image (seeded by the image's index: the same rows for any batch size).
    Without `scores`, each model runs only as far as the layer (graph.prefix).

    Raises:
        UnsupportedModelError: a layer's tensors do not have the shapes its weights imply.
    """
    progress = progress or NoProgress()
    f_layer, q_layer = pair.float_layer, pair.quant_layer
    # integer-operator layers: x and y are read through DequantizeLinear nodes added to the tapped copy
    f_model, _, f_pre = tap_layer(float_model, f_layer)
    q_model, q_in, q_pre = tap_layer(quant_model, q_layer)
    f_out, q_out = (output_name(float_model), output_name(quant_model)) if scores else (None, None)
    f_names = [f_pre] + ([f_out] if f_out else [])
    q_names = [q_in, q_pre] + ([q_out] if q_out else [])
    f_session, f_outputs = _tapped_session(f_model, "FLOAT", f_names, providers, whole=scores)
    q_session, q_outputs = _tapped_session(q_model, "QUANT", q_names, providers, whole=scores)
    fused_relu = q_layer.output_encoding is not None and clips_negatives(quant_model, q_layer.output_encoding)
    if fused_relu:
        # A Relu fused into the integer output: y = max(pre, 0) hides how negative each neuron is (bias
        # correction needs it). The pre-activation is Q's exact integer accumulator, x @ W^T + b in reals.
        weights, bias = layer_parameters(quant_model, q_layer)
    batches = zip(
        stream_batched(f_session, x, f_outputs, batch_size),
        stream_batched(q_session, x, q_outputs, batch_size),
        strict=True,
    )
    with progress.task("reading spectra" if scores else "reading the layer", len(x)) as advance:
        for (start, f), (_, q) in batches:
            n = min(batch_size, len(x) - start)
            f_values = _with_graph_input(f, f_names, f_outputs, x[start : start + n])
            q_values = _with_graph_input(q, q_names, q_outputs, x[start : start + n])
            rows, f_rows, q_rows, image = _rows(
                q_layer, f_values[f_pre], q_values[q_in], q_values[q_pre], start, positions_per_image, seed
            )
            if fused_relu:
                q_rows = grouped_linear(rows, weights, bias, q_layer.groups).astype(np.float32)
            yield RowBatch(
                float_scores=f_values[f_out].reshape(n, -1) if f_out else None,
                quant_scores=q_values[q_out].reshape(n, -1) if q_out else None,
                float_pre=f_rows,
                quant_pre=q_rows,
                quant_inputs=rows,
                row_image=image,
            )
            advance(n)


def read_layer_activity(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pair: LayerPair,
    x: NDArray[np.float32],
    batch_size: int,
    progress: Progress | None = None,
    *,
    providers: Sequence[str] | None = None,
    positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
    seed: int = 0,
    scores: bool = True,
) -> LayerActivity:
    """Every row of `layer_row_batches`, kept (a convolution's positions per image cut to fit MAX_ROW_BYTES).

    `providers`: ONNX Runtime execution providers (default: CUDA when present, then CPU). Rows are
    written into arrays sized once from the first batch (every image gives as many rows), so the
    whole set is held once, not twice.
    """
    if len(x) == 0:
        raise UnsupportedModelError("there are no images to read the layer with")
    per_image = positions_within(pair.quant_layer, len(x), positions_per_image)
    batches = layer_row_batches(
        float_model,
        quant_model,
        pair,
        x,
        batch_size,
        progress,
        providers=providers,
        positions_per_image=per_image,
        seed=seed,
        scores=scores,
    )
    arrays: dict[str, NDArray] = {}
    rows_filled = images_filled = 0
    for batch in batches:
        n_images = len(np.unique(batch.row_image))
        n_rows = len(batch.row_image)
        if not arrays:
            rows_per_image = n_rows // max(n_images, 1)
            for field in _ROW_FIELDS:
                value = getattr(batch, field)
                arrays[field] = np.empty((rows_per_image * len(x), *value.shape[1:]), value.dtype)
            for field in _IMAGE_FIELDS:
                value = getattr(batch, field)
                if value is not None:
                    arrays[field] = np.empty((len(x), *value.shape[1:]), value.dtype)
        for field in _ROW_FIELDS:
            arrays[field][rows_filled : rows_filled + n_rows] = getattr(batch, field)
        for field in _IMAGE_FIELDS:
            if field in arrays:
                arrays[field][images_filled : images_filled + n_images] = getattr(batch, field)
        rows_filled += n_rows
        images_filled += n_images
    return LayerActivity(
        float_scores=arrays.get("float_scores"),
        quant_scores=arrays.get("quant_scores"),
        **{field: arrays[field][:rows_filled] for field in _ROW_FIELDS},
    )


_ROW_FIELDS = ("float_pre", "quant_pre", "quant_inputs", "row_image")
_IMAGE_FIELDS = ("float_scores", "quant_scores")


def _rows(
    layer: Layer,
    float_pre: NDArray[np.float32],
    quant_input: NDArray[np.float32],
    quant_pre: NDArray[np.float32],
    start: int,
    per_image: int | None,
    seed: int,
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """(patches, float pre, quant pre, image index) of one batch's rows."""
    n = len(float_pre)
    if layer.conv is None:
        flat_f, flat_q, flat_x = float_pre.reshape(n, -1), quant_pre.reshape(n, -1), quant_input.reshape(n, -1)
        _check_width(flat_f, layer, "FLOAT")
        _check_width(flat_q, layer, "QUANT")
        _check_width(flat_x, layer, "QUANT", side="input")
        return flat_x, flat_f, flat_q, start + np.arange(n)
    _check_conv_shapes(layer, float_pre, quant_input, quant_pre)
    positions = float_pre.shape[2] * float_pre.shape[3]
    image, position = sample_positions(start + np.arange(n), positions, per_image, seed)
    rows = patch_rows(quant_input, layer.conv, image, position)
    return rows, output_rows(float_pre, image, position), output_rows(quant_pre, image, position), start + image


def _tapped_session(
    model: onnx.ModelProto, role: str, names: list[str], providers: Sequence[str] | None, whole: bool
) -> tuple[object, list[str]]:
    """A session that outputs `names` (the graph input, when asked for, is not run: it is `x`).

    `whole`: the whole model with the names added as outputs; else only what computes them (graph.prefix).
    """
    input_name = input_spec(model).name
    outputs = [n for n in dict.fromkeys(names) if n != input_name]
    session_model = with_outputs(model, outputs) if whole else prefix(model, outputs)
    return make_session(session_model, role, providers), outputs


def _with_graph_input(
    values: dict[str, NDArray], names: list[str], outputs: list[str], batch: NDArray[np.float32]
) -> dict[str, NDArray]:
    """`values`, plus the batch itself under the graph input's name when the layer reads the graph input."""
    missing = [n for n in names if n not in outputs]
    return {**values, **{name: batch for name in missing}}


def _check_width(values: NDArray, layer: Layer, role: str, side: str = "output") -> None:
    """A dense layer over [batch, features] (or a 1x1 map) has n_out outputs and n_in inputs per input."""
    expected = layer.n_out if side == "output" else layer.n_in
    if values.shape[1] != expected:
        raise UnsupportedModelError(
            f"{role} layer '{layer.name}' ({layer.op}) {side} has {values.shape[1]} values per input, expected "
            f"{expected}; only dense layers over [batch, features] inputs can be repaired"
        )


def _check_conv_shapes(
    layer: Layer, float_pre: NDArray[np.float32], quant_input: NDArray[np.float32], quant_pre: NDArray[np.float32]
) -> None:
    """The tensors a 2-D convolution reads and writes have the shapes its weights and attributes imply."""
    assert layer.conv is not None
    if quant_input.ndim != 4 or quant_input.shape[1] != layer.conv.in_channels:
        raise UnsupportedModelError(
            f"QUANT layer '{layer.name}' ({layer.op}) reads a tensor of shape {list(quant_input.shape)}, "
            f"expected [N, {layer.conv.in_channels}, H, W]"
        )
    expected = (layer.n_out, *layer.conv.output_size(*quant_input.shape[2:]))
    for role, values in (("FLOAT", float_pre), ("QUANT", quant_pre)):
        if values.ndim != 4 or tuple(values.shape[1:]) != expected:
            raise UnsupportedModelError(
                f"{role} layer '{layer.name}' ({layer.op}) writes a tensor of shape {list(values.shape)}, "
                f"expected [N, {', '.join(map(str, expected))}]"
            )
