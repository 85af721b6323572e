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

from collections.abc import Callable, Iterator, Sequence
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
from onnxrepair.parallel import Executor
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.rows import grouped_linear, output_rows, patch_rows, sample_positions
from onnxrepair.runtime import output_name, stream_on
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

    def of_images(self, images: NDArray[np.int64]) -> LayerActivity:
        """The rows of these images (ascending indices), renumbered as if only they had been read.

        The out-of-fold check reads a layer over all repair images once and takes each fold's
        part from it, instead of running both models again per fold.
        """
        kept = np.isin(self.row_image, images)
        return LayerActivity(
            float_scores=None if self.float_scores is None else self.float_scores[images],
            quant_scores=None if self.quant_scores is None else self.quant_scores[images],
            float_pre=self.float_pre[kept],
            quant_pre=self.quant_pre[kept],
            quant_inputs=self.quant_inputs[kept],
            row_image=np.searchsorted(images, self.row_image[kept]).astype(np.int64),
        )

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
    float_rows: NDArray[np.float32] | None = None,
    float_scores: NDArray[np.float32] | None = None,
    skip: str | None = None,
    executor: Executor | None = None,
) -> Iterator[RowBatch]:
    """Run tapped copies of both models over `x` and yield each batch's rows.

    A convolution's rows are taken at `positions_per_image` output positions
    per image (seeded by the image's index: the same rows for any batch size).
    Without `scores`, each model runs only as far as the layer (graph.prefix).
    `float_rows`: FLOAT's pre-activation at these very rows, already read
    (FloatTargets); FLOAT is then not run, so `scores` needs `float_scores`,
    FLOAT's class scores of `x` (a layer read again after only its own
    weights changed: FLOAT's side is what it was)
    `skip`: QUANT's other branch of a residual Add after the layer; its rows
    are taken from `float_rows` (then FLOAT's sum): the target is what the
    layer must add to QUANT's skip so that the sum is FLOAT's.

    Raises:
        UnsupportedModelError: a layer's tensors do not have the shapes its weights imply.
    """
    progress = progress or NoProgress()
    f_layer, q_layer = pair.float_layer, pair.quant_layer
    if float_rows is not None and scores and float_scores is None:
        raise ValueError("FLOAT's rows given: its class scores cannot be read as well, pass them too")
    # integer-operator layers: x and y are read through DequantizeLinear nodes added to the tapped copy
    f_model, _, f_pre = tap_layer(float_model, f_layer)
    q_model, q_in, q_pre = tap_layer(quant_model, q_layer)
    q_out = output_name(quant_model) if scores else None
    f_out = output_name(float_model) if scores and float_rows is None else None
    f_names = [f_pre] + ([f_out] if f_out else [])
    q_names = [q_in, q_pre] + ([q_out] if q_out else []) + ([skip] if skip else [])
    q_tapped, q_outputs = _tapped_model(q_model, q_names, whole=scores)
    q_batches = stream_on(executor, q_tapped, "QUANT", _feed(q_tapped, x), q_outputs, batch_size, providers)
    if float_rows is None:
        f_tapped, f_outputs = _tapped_model(f_model, f_names, whole=scores)
        f_batches: Iterator[tuple[int, dict[str, NDArray]]] = stream_on(
            executor, f_tapped, "FLOAT", _feed(f_tapped, x), f_outputs, batch_size, providers
        )
    else:
        f_outputs, f_batches = [], ((start, {}) for start in range(0, len(x), batch_size))
    fused_relu = q_layer.output_encoding is not None and clips_negatives(quant_model, q_layer.output_encoding)
    if fused_relu:
        # A Relu fused into the integer output: y = max(pre, 0) hides how negative each neuron is (bias
        # correction needs it). The pre-activation is Q's exact integer accumulator, x @ W^T + b in reals.
        weights, bias = layer_parameters(quant_model, q_layer)
    filled = 0
    with progress.task("reading spectra" if scores else "reading the layer", len(x)) as advance:
        for (start, f), (_, q) in zip(f_batches, q_batches, strict=True):
            n = min(batch_size, len(x) - start)
            q_values = _with_graph_input(q, q_names, q_outputs, x[start : start + n])
            if float_rows is None:
                f_values = _with_graph_input(f, f_names, f_outputs, x[start : start + n])
                _check_conv_shapes(q_layer, q_values[q_in], f_values[f_pre], "FLOAT")
            rows, q_rows, image, position = _rows(
                q_layer, q_values[q_in], q_values[q_pre], start, positions_per_image, seed
            )
            if float_rows is None:
                f_rows = _at(q_layer, f_values[f_pre], image - start, position)
            else:
                f_rows = float_rows[filled : filled + len(image)]
                filled += len(image)
                if skip is not None:
                    f_rows = f_rows - _at(q_layer, q_values[skip], image - start, position)
            if fused_relu:
                q_rows = grouped_linear(rows, weights, bias, q_layer.groups).astype(np.float32)
            if f_out:
                f_scores = f_values[f_out].reshape(n, -1)
            else:
                f_scores = float_scores[start : start + n] if scores and float_scores is not None else None
            yield RowBatch(
                float_scores=f_scores,
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
    float_rows: NDArray[np.float32] | None = None,
    float_scores: NDArray[np.float32] | None = None,
    skip: str | None = None,
    executor: Executor | None = None,
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
        float_rows=float_rows,
        float_scores=float_scores,
        skip=skip,
        executor=executor,
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


def kept_activity(
    layer: Layer,
    read_input: Callable[[int, int], NDArray[np.float32]],
    images: int,
    float_rows: NDArray[np.float32],
    weights: NDArray[np.float64],
    bias: NDArray[np.float64],
    batch_size: int,
    *,
    positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
    seed: int = 0,
    read_skip: Callable[[int, int], NDArray[np.float32]] | None = None,
) -> LayerActivity:
    """A layer's rows from its input as already computed (segments.py), FLOAT's rows given (FloatTargets).

    `read_input(start, stop)` gives images start:stop of the layer's input, `read_skip` those of
    the other branch of a residual Add after it (see `layer_row_batches`). The quantized
    pre-activation is computed from the rows and the stored weights: the linear map QUANT applies.
    """
    per_image = positions_within(layer, images, positions_per_image)
    rows = row_image = None
    target = float_rows.copy() if read_skip is not None else float_rows
    filled = 0
    for start in range(0, images, batch_size):
        stop = min(start + batch_size, images)
        x = read_input(start, stop)
        if layer.conv is None:
            batch = x.reshape(len(x), -1)
            _check_width(batch, layer, "QUANT", side="input")
            image, position = np.arange(len(x)), None
        else:
            out_height, out_width = layer.conv.output_size(*x.shape[2:])
            image, position = sample_positions(start + np.arange(len(x)), out_height * out_width, per_image, seed)
            batch = patch_rows(x, layer.conv, image, position)
        if rows is None or row_image is None:  # every image gives as many rows: allocate once, fill in place
            total = len(batch) // len(x) * images
            if total != len(float_rows):
                raise ValueError(f"{total} rows of QUANT's layer '{layer.name}' but {len(float_rows)} of FLOAT's")
            rows, row_image = np.empty((total, batch.shape[1]), np.float32), np.empty(total, np.int64)
        rows[filled : filled + len(batch)] = batch
        row_image[filled : filled + len(batch)] = start + image
        if read_skip is not None:
            target[filled : filled + len(batch)] -= _at(layer, read_skip(start, stop), image, position)
        filled += len(batch)
    assert rows is not None and row_image is not None
    quant_pre = grouped_linear(rows, weights, bias, layer.groups).astype(np.float32)
    return LayerActivity(None, None, target, quant_pre, rows, row_image)


class FloatTargets:
    """FLOAT's pre-activation rows of a run's layers, read for several layers per pass.

    With `residual_sums`, a layer followed by a residual Add gets the Add's output
    instead: the readers take QUANT's other branch from it, so that the layer is
    fitted to make the sum FLOAT's (errors the skip connection carries are
    absorbed too, not only those of the layer's own input).

    FLOAT never changes during a repair, so the layers' targets need not be
    read one pass per layer: a pass (as far as the last layer of a window)
    taps a window of consecutive layers whose rows fit `budget_bytes`, and
    the window moves on when a layer after it is asked for. The rows are those
    `read_layer_activity` takes for QUANT (the same images, positions and
    order), so they line up with its patches.
    """

    def __init__(
        self,
        float_model: onnx.ModelProto,
        layers: Sequence[Layer],
        x: NDArray[np.float32],
        batch_size: int,
        *,
        providers: Sequence[str] | None = None,
        positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
        seed: int = 0,
        budget_bytes: int = 2**30,
        progress: Progress | None = None,
        residual_sums: bool = False,
        executor: Executor | None = None,
    ) -> None:
        self._residual_sums = residual_sums
        self._executor = executor
        self._model, self._layers, self._x = float_model, list(layers), x
        self._batch_size, self._providers, self._seed = batch_size, providers, seed
        self._per_image = {layer.name: positions_within(layer, len(x), positions_per_image) for layer in layers}
        self._budget = budget_bytes
        self._progress = progress or NoProgress()
        self._window: dict[str, NDArray[np.float32]] = {}
        # what one image of each tapped output weighs: a pass holds a batch of every tapped output at once
        shapes = _shapes(float_model)
        self._output_bytes = {
            layer.name: 4 * int(np.prod([d or 1 for d in shapes.get(self.target_tensor(layer), (1, 1))[1:]]))
            for layer in layers
        }

    def rows(self, name: str) -> NDArray[np.float32]:
        """[rows, channels] FLOAT's pre-activation of layer `name` at its rows (reading a window when needed)."""
        if name not in self._window:
            start = [layer.name for layer in self._layers].index(name)
            self._window = {}  # the rows before are done with: free them first
            self._window = self._read(self._layers[start : start + self._fitting(start)])
        return self._window[name]

    def _fitting(self, start: int) -> int:
        """How many layers from `start` fit the budget (at least one): their rows, and a batch of their outputs
        (the feature maps ONNX Runtime hands back, before positions are sampled from them)."""
        rows = outputs = count = 0
        for layer in self._layers[start:]:
            per_image = self._per_image[layer.name] or 1
            rows += len(self._x) * (per_image if layer.conv is not None else 1) * layer.n_out * 4
            outputs += self._batch_size * self._output_bytes[layer.name]
            if count and (rows > self._budget or outputs > self._budget // 2):
                break
            count += 1
        return count

    def target_tensor(self, layer: Layer) -> str:
        """The tensor read for `layer`: its output, or with `residual_sums` the residual Add's after it."""
        return layer.residual.output if self._residual_sums and layer.residual is not None else layer.output_tensor

    def _read(self, layers: list[Layer]) -> dict[str, NDArray[np.float32]]:
        outputs = list(dict.fromkeys(self.target_tensor(layer) for layer in layers))
        tapped = prefix(self._model, outputs)
        batches = stream_on(
            self._executor, tapped, "FLOAT", _feed(tapped, self._x), outputs, self._batch_size, self._providers
        )
        window: dict[str, NDArray[np.float32]] = {}
        filled = dict.fromkeys((layer.name for layer in layers), 0)
        with self._progress.task(f"reading FLOAT ({len(layers)} layers)", len(self._x)) as advance:
            for start, values in batches:
                n = len(values[outputs[0]])
                for layer in layers:
                    pre = values[self.target_tensor(layer)]
                    if layer.conv is None:
                        rows = pre.reshape(n, -1)
                    else:
                        image, position = sample_positions(
                            start + np.arange(n), pre.shape[2] * pre.shape[3], self._per_image[layer.name], self._seed
                        )
                        rows = output_rows(pre, image, position)
                    if layer.name not in window:  # every image gives as many rows: one array, filled in place
                        window[layer.name] = np.empty((len(rows) // n * len(self._x), rows.shape[1]), np.float32)
                    window[layer.name][filled[layer.name] : filled[layer.name] + len(rows)] = rows
                    filled[layer.name] += len(rows)
                del values
                advance(n)
        return window


_IMAGE_FIELDS = ("float_scores", "quant_scores")


def _rows(
    layer: Layer,
    quant_input: NDArray[np.float32],
    quant_pre: NDArray[np.float32],
    start: int,
    per_image: int | None,
    seed: int,
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64], NDArray[np.int64] | None]:
    """(patches, quant pre, image index in the set, output position or None for a dense layer) of one batch."""
    n = len(quant_input)
    if layer.conv is None:
        flat_q, flat_x = quant_pre.reshape(n, -1), quant_input.reshape(n, -1)
        _check_width(flat_q, layer, "QUANT")
        _check_width(flat_x, layer, "QUANT", side="input")
        return flat_x, flat_q, start + np.arange(n), None
    _check_conv_shapes(layer, quant_input, quant_pre, "QUANT")
    positions = quant_pre.shape[2] * quant_pre.shape[3]
    image, position = sample_positions(start + np.arange(n), positions, per_image, seed)
    rows = patch_rows(quant_input, layer.conv, image, position)
    return rows, output_rows(quant_pre, image, position), start + image, position


def _at(
    layer: Layer, pre: NDArray[np.float32], image: NDArray[np.int64], position: NDArray[np.int64] | None
) -> NDArray[np.float32]:
    """A layer's output at the rows: the rows themselves for a dense layer, else the sampled positions."""
    if position is None:
        flat = pre.reshape(len(pre), -1)
        _check_width(flat, layer, "FLOAT")
        return flat
    return output_rows(pre, image, position)


def _tapped_model(model: onnx.ModelProto, names: list[str], whole: bool) -> tuple[onnx.ModelProto, list[str]]:
    """A model that outputs `names` (the graph input, when asked for, is not run: it is `x`).

    `whole`: the whole model with the names added as outputs; else only what computes them (graph.prefix).
    """
    input_name = input_spec(model).name
    outputs = [n for n in dict.fromkeys(names) if n != input_name]
    return (with_outputs(model, outputs) if whole else prefix(model, outputs)), outputs


def _feed(model: onnx.ModelProto, x: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    """The images as the model's one graph input."""
    return {input_spec(model).name: x}


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


def _check_conv_shapes(layer: Layer, quant_input: NDArray[np.float32], pre: NDArray[np.float32], role: str) -> None:
    """The tensors a 2-D convolution reads and writes have the shapes its weights and attributes imply."""
    if layer.conv is None:
        return
    if quant_input.ndim != 4 or quant_input.shape[1] != layer.conv.in_channels:
        raise UnsupportedModelError(
            f"QUANT layer '{layer.name}' ({layer.op}) reads a tensor of shape {list(quant_input.shape)}, "
            f"expected [N, {layer.conv.in_channels}, H, W]"
        )
    expected = (layer.n_out, *layer.conv.output_size(*quant_input.shape[2:]))
    if pre.ndim != 4 or tuple(pre.shape[1:]) != expected:
        raise UnsupportedModelError(
            f"{role} layer '{layer.name}' ({layer.op}) writes a tensor of shape {list(pre.shape)}, "
            f"expected [N, {', '.join(map(str, expected))}]"
        )


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape from ONNX's shape inference (None for an unknown dimension)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes
