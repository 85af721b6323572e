"""The row view of a layer: which values one output channel computes from, as matrix rows.

A dense layer's rows are its inputs. A 2-D convolution's rows are the
patches its output positions see (im2col): output position (oy, ox) of image
i reads, for every input channel, the kernel window starting at
(oy * stride - pad_top, ox * stride - pad_left) with the dilation's gaps; zero
outside the image. One row holds every input channel's window, so an output
channel of group g reads the columns of its group only (`Layer.columns`).

A feature map has many positions (112 x 112 on an ImageNet stem), so rows are
taken at positions sampled per image, seeded by the image's index in its set:
the same rows whatever the batch size. Memory follows the batch: nothing here
holds more than one batch of patches.

Numeric only: arrays in, arrays out; no ONNX.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from onnxrepair.layers import ConvGeometry


def sample_positions(
    image_index: NDArray[np.int64], positions: int, per_image: int | None, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Rows to take from a batch of images with `positions` output positions each.

    Args:
        image_index: [n] the images' indices in their set (what seeds each image's draw).
        positions: output positions per image (H' x W').
        per_image: positions to draw per image, without replacement; None, or at
            least `positions`, takes every position in order.
        seed: the run's seed.

    Returns:
        (image of each row as a position in the batch [r], flat output position of each row [r]),
        sorted by image then position.
    """
    n = len(image_index)
    if per_image is None or per_image >= positions:
        return np.repeat(np.arange(n), positions), np.tile(np.arange(positions), n)
    drawn = [
        np.sort(np.random.default_rng((seed, int(i))).choice(positions, size=per_image, replace=False))
        for i in image_index
    ]
    return np.repeat(np.arange(n), per_image), np.concatenate(drawn).astype(np.int64)


def patch_rows(
    x: NDArray[np.float32], geometry: ConvGeometry, image: NDArray[np.int64], position: NDArray[np.int64]
) -> NDArray[np.float32]:
    """The patches of `x` [n, C, H, W] that output positions `position` of images `image` see: [r, C * kh * kw].

    A view of the zero-padded input (sliding_window_view, strided by the
    convolution's strides and dilations) gathered at the rows' positions: no
    loop over positions, and only the rows asked for are copied.
    """
    n, channels, height, width = x.shape
    top, left, bottom, right = geometry.padding(height, width)
    padded = x
    if top or left or bottom or right:  # (np.pad is several times slower than this for large maps)
        padded = np.zeros((n, channels, height + top + bottom, width + left + right), dtype=x.dtype)
        padded[:, :, top : top + height, left : left + width] = x
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    out_width = windows.shape[3]
    rows = windows[image, :, position // out_width, position % out_width]  # [r, C, kh, kw]
    return np.ascontiguousarray(rows).reshape(len(image), channels * kh * kw)


def output_rows(y: NDArray[np.float32], image: NDArray[np.int64], position: NDArray[np.int64]) -> NDArray[np.float32]:
    """A convolution's output `y` [n, C_out, H', W'] at the rows' positions: [r, C_out]."""
    out_width = y.shape[3]
    return np.ascontiguousarray(y[image, :, position // out_width, position % out_width])


def grouped_linear(
    rows: NDArray, weights: NDArray[np.float64], bias: NDArray[np.float64], groups: int
) -> NDArray[np.float64]:
    """rows [r, groups * n_in] through weights [out, n_in]: [r, out]; channel j reads group j // (out / groups)."""
    r = len(rows)
    out, n_in = weights.shape
    grouped = weights.reshape(groups, out // groups, n_in).transpose(0, 2, 1)  # [groups, n_in, out / groups]
    result = np.empty((r, out))
    chunk = max(64, _CHUNK_BYTES // (8 * max(rows.shape[1], out)))  # float64 copies stay small
    for start in range(0, r, chunk):
        part = rows[start : start + chunk]
        per_group = part.reshape(len(part), groups, n_in).astype(np.float64).transpose(1, 0, 2)  # [groups, k, n_in]
        result[start : start + chunk] = (per_group @ grouped).transpose(1, 0, 2).reshape(len(part), out)
    return result + bias


_CHUNK_BYTES = 64 * 2**20
