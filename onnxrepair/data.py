"""Image folders -> model-ready arrays, labels and a seeded stratified split.

The layout is torchvision's ImageFolder: ``IMAGES/<class>/<image>``, classes in
sorted folder-name order (folders ``0``..``9`` give labels 0..9). Preprocessing
follows the model's input: N x C x H x W or N x H x W x C, one channel means
greyscale, images are resized to H x W (stretched, or the shorter side scaled
and the centre cropped), channels optionally put in BGR order, pixels scaled
to [0, 1], then ``(x - mean) / std`` per channel when the model was trained
normalised.

The options a user chose are saved in the models onnxrepair writes
(``metadata_props``), so that ``eval`` and a later ``fix`` read images the
same way without being told again.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from onnxrepair.diskrows import DiskRows, RowWriter, decode_directory, rows_of
from onnxrepair.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
MAX_SKIP_WARNINGS = 5  # undecodable files named one by one; the rest are only counted
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes one model input.

    Attributes:
        layout: "NCHW" or "NHWC".
        channels: 1 (greyscale) or 3 (RGB, or BGR when `bgr`).
        height, width: the size images are resized to.
        mean, std: per-channel normalisation applied after scaling to [0, 1],
            in the model's channel order.
        resize: "stretch" (to height x width, ignoring the aspect ratio) or
            "crop" (the shorter side scaled, then the centre cropped).
        shorter_side: for "crop", the length the shorter side is scaled to
            before cropping (torchvision's Resize(256) + CenterCrop(224));
            None scales it just enough to cover height x width.
        bgr: channels in blue, green, red order (Caffe and OpenCV models).
    """

    layout: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "stretch"
    shorter_side: int | None = None
    bgr: bool = False

    def describe(self) -> str:
        """One line for the terminal and the report."""
        if self.resize == "stretch":
            sizing = f"stretched to {self.height}x{self.width}"
        else:
            scaled = f"to {self.shorter_side}" if self.shorter_side else "to cover it"
            sizing = f"shorter side scaled {scaled}, centre {self.height}x{self.width} cropped"
        order = ", BGR" if self.bgr else ""
        return (
            f"{self.layout} {self.channels}x{self.height}x{self.width}{order}, {sizing}, pixels/255, "
            f"mean={list(self.mean)}, std={list(self.std)}"
        )

    def saved_options(self) -> str:
        """The user's choices as JSON, for a model's metadata; `options_from_saved` reads it back."""
        return json.dumps(
            {
                "mean": list(self.mean),
                "std": list(self.std),
                "resize": self.resize,
                "shorter_side": self.shorter_side,
                "bgr": self.bgr,
            }
        )


RESIZE_MODES = ("stretch", "crop")


@dataclass(frozen=True)
class PreprocessingOptions:
    """What the user asked for on the command line; the model's input fills in the rest.

    Attributes:
        preset: one of PRESETS.
        mean, std: override the preset's, in the model's channel order.
        resize: "stretch", "crop", or "crop" with `shorter_side`.
        shorter_side: see Preprocessing.
        bgr: feed channels in BGR order; a preset's RGB mean/std are reversed to match.
    """

    preset: str = "unit"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "stretch"
    shorter_side: int | None = None
    bgr: bool = False


def options_from_saved(text: str, source: str) -> PreprocessingOptions:
    """Parse what `Preprocessing.saved_options` wrote.

    Raises:
        DataError: the saved text is not what onnxrepair writes (edited by hand, say).
    """
    try:
        saved = json.loads(text)
        options = PreprocessingOptions(
            preset="unit",
            mean=tuple(float(v) for v in saved["mean"]),
            std=tuple(float(v) for v in saved["std"]),
            resize=str(saved["resize"]),
            shorter_side=None if saved["shorter_side"] is None else int(saved["shorter_side"]),
            bgr=bool(saved["bgr"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"the preprocessing saved in {source} cannot be read ({exc}); pass --preprocess") from exc
    if options.resize not in RESIZE_MODES:
        raise DataError(f"the preprocessing saved in {source} has an unknown resize {options.resize!r}")
    return options


# --preprocess presets as (mean, std) applied after pixels/255: what the common exporters' models expect
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0,), (1.0,)),  # [0, 1]: torchvision's ToTensor without Normalize
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet Normalize
    "inception": ((0.5,), (0.5,)),  # [-1, 1]: Inception, MobileNet and EfficientNet-Lite ports
    "raw": ((0.0,), (1.0 / 255.0,)),  # 0..255: models that scale inside the graph
}


def preprocessing_for_input(
    input_name: str,
    shape: Sequence[int | None],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    preset: str = "unit",
    *,
    resize: str = "stretch",
    shorter_side: int | None = None,
    bgr: bool = False,
) -> Preprocessing:
    """Derive the preprocessing from a model input shape (None = dynamic dimension).

    `mean` and `std` override the `preset`'s (one of PRESETS). Presets are in
    RGB order; with `bgr` they are reversed, while a given `mean`/`std` is
    taken in the model's channel order as it is.

    Raises:
        DataError: when the input is not an image tensor of known size.
    """
    dims = list(shape)
    if len(dims) != 4:
        raise DataError(
            f"model input '{input_name}' has shape {_show(dims)}; image folders need a 4-D "
            "N x C x H x W or N x H x W x C input"
        )
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        layout, channels, height, width = "NCHW", dims[1], dims[2], dims[3]
    elif dims[3] in (1, 3):
        layout, channels, height, width = "NHWC", dims[3], dims[1], dims[2]
    else:
        raise DataError(
            f"model input '{input_name}' has shape {_show(dims)}: cannot tell which axis holds "
            "the 1 or 3 colour channels"
        )
    if height is None or width is None:
        raise DataError(
            f"model input '{input_name}' has shape {_show(dims)}: height and width must be fixed "
            "numbers to resize images to them; pass the inputs as a .npz/.npy array instead"
        )
    assert channels is not None  # the branches above only accept 1 or 3
    if preset not in PRESETS:
        raise DataError(f"--preprocess must be one of {', '.join(PRESETS)}, got {preset!r}")
    preset_mean, preset_std = PRESETS[preset]
    if channels == 1 and ((len(preset_mean) > 1 and mean is None) or (len(preset_std) > 1 and std is None)):
        raise DataError(
            f"--preprocess {preset} has one value per RGB channel, but model input '{input_name}' takes greyscale "
            f"{_show(dims)}; use --mean/--std with one value"
        )
    if bgr and channels != 3:
        raise DataError(f"--bgr needs a model that takes 3 colour channels; input '{input_name}' takes {_show(dims)}")
    if bgr:
        preset_mean, preset_std = preset_mean[::-1], preset_std[::-1]
    mean_t = _per_channel("--mean", mean or preset_mean, channels, 0.0)
    std_t = _per_channel("--std", std or preset_std, channels, 1.0)
    if any(s == 0 for s in std_t):
        raise DataError("--std must not contain 0")
    if resize not in RESIZE_MODES:
        raise DataError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if shorter_side is not None and (resize != "crop" or shorter_side < max(height, width)):
        raise DataError(
            f"--resize {shorter_side} scales the shorter side to {shorter_side} before a centre crop of "
            f"{height}x{width}; it must be at least {max(height, width)}"
        )
    return Preprocessing(layout, channels, height, width, mean_t, std_t, resize, shorter_side, bgr)


def preprocessing_from_options(
    input_name: str, shape: Sequence[int | None], options: PreprocessingOptions
) -> Preprocessing:
    """`preprocessing_for_input` with the options as one value."""
    return preprocessing_for_input(
        input_name,
        shape,
        options.mean,
        options.std,
        options.preset,
        resize=options.resize,
        shorter_side=options.shorter_side,
        bgr=options.bgr,
    )


@dataclass(frozen=True)
class ImageSet:
    """Model-ready images with their labels.

    Attributes:
        x: float32 array in the model's layout, one row per image; for a decoded image folder, `DiskRows`
            (read from disk slice by slice: ``x[start:stop]`` is an array, ``np.asarray(x)`` reads them all).
        labels: class index per image; None for unlabelled arrays.
        class_names: folder name of each class index.
        paths: source file of each image.
        skipped: files that could not be decoded (kept by `subset`: they belong to the load, not to a part).
    """

    x: NDArray[np.float32] | DiskRows
    labels: NDArray[np.int64] | None
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def strata(self) -> NDArray[np.int64]:
        """What splits stratify by: the labels, or one stratum when unlabelled."""
        return self.labels if self.labels is not None else np.zeros(len(self.x), np.int64)

    def subset(self, indices: NDArray[np.int64]) -> ImageSet:
        """The images at `indices`, in that order (rows on disk, a decoded folder's or a .npy's, are not copied)."""
        rows = rows_of(self.x)
        return ImageSet(
            x=rows.select(indices) if isinstance(rows, DiskRows) else rows[indices],
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names,
            paths=tuple(self.paths[i] for i in indices),
            skipped=self.skipped,  # what loading skipped stays known to every part of a split
        )


def load_image_folder(
    folder: Path,
    prep: Preprocessing,
    advance: Callable[[int], None] | None = None,
    class_names: Sequence[str] | None = None,
    labels_file: Path | None = None,
) -> ImageSet:
    """Read a folder of images into an ImageSet, in the layout the user has.

    - ``folder/<class>/*``: labels from the folder names;
    - ``folder/*`` with ``labels_file`` (CSV rows ``filename,label``, integer labels);
    - ``folder/*`` alone: unlabelled (pass/fail comes from agreement with the float model).

    Args:
        folder: the images.
        prep: how each image becomes a model input.
        advance: called with 1 after each file, for progress display.
        class_names: the classes of a repair folder, so that a validation
            folder maps the same names to the same labels.
        labels_file: labels of a flat folder.

    Raises:
        DataError: the folder is missing or has no images, the labels file is
            unusable, or no image in it can be read.
    """
    if labels_file is not None or not _has_class_subfolders(folder):
        return _load_flat_folder(folder, prep, advance, labels_file)
    files = list_class_images(folder)
    names = tuple(sorted({cls for cls, _ in files})) if class_names is None else tuple(class_names)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({cls for cls, _ in files} - index.keys())
    if unknown:
        raise DataError(
            f"{folder} has class folders {unknown} that the repair images do not have (known classes: {list(names)})"
        )
    x, kept, skipped = _decode([path for _, path in files], prep, advance, folder)
    decoded = set(kept)
    labels = np.asarray([index[cls] for cls, path in files if str(path) in decoded], dtype=np.int64)
    return ImageSet(x=x, labels=labels, class_names=names, paths=tuple(kept), skipped=tuple(skipped))


def count_images(folder: Path) -> int:
    """How many image files `load_image_folder` will read (for progress bars)."""
    if _has_class_subfolders(folder):
        return len(list_class_images(folder))
    return len(list_flat_images(folder))


def list_flat_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted.

    Raises:
        DataError: the folder is missing or holds no image.
    """
    _check_folder(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or in class subfolders"
        )
    return files


def read_labels_file(path: Path, folder: Path) -> dict[str, int]:
    """file name -> integer label from a CSV of ``filename,label`` rows (a ``filename,label`` header is allowed).

    Raises:
        DataError: the file is missing or unreadable, a row is malformed or has
            a non-integer label, or a row names a file that is not in `folder`.
    """
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"labels file {path} cannot be read ({exc})") from exc
    labels: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip() or (number == 1 and [f.lower() for f in fields] == ["filename", "label"]):
            continue
        if len(fields) != 2 or not fields[0]:
            raise DataError(f"{path}, line {number}: expected 'filename,label', got {line!r}")
        name, label = fields
        try:
            value = int(label)
        except ValueError:
            raise DataError(f"{path}, line {number}: label {label!r} of {name} is not an integer") from None
        if value < 0:
            raise DataError(f"{path}, line {number}: label {value} of {name} is negative")
        if not (folder / name).is_file():
            raise DataError(f"{path}, line {number}: {name} is not a file in {folder}")
        labels[name] = value
    if not labels:
        raise DataError(f"labels file {path} has no rows")
    return labels


def _load_flat_folder(
    folder: Path, prep: Preprocessing, advance: Callable[[int], None] | None, labels_file: Path | None
) -> ImageSet:
    files = list_flat_images(folder)
    if labels_file is None:
        x, kept, skipped = _decode(files, prep, advance, folder)
        return ImageSet(x=x, labels=None, class_names=(), paths=tuple(kept), skipped=tuple(skipped))
    labels = read_labels_file(labels_file, folder)
    unlabelled = [p.name for p in files if p.name not in labels]
    if unlabelled:
        logger.warning(
            "%s: %d image(s) have no row in %s and are left out, e.g. %s",
            folder,
            len(unlabelled),
            labels_file,
            unlabelled[0],
        )
    files = [p for p in files if p.name in labels]
    if not files:
        raise DataError(f"none of the images in {folder} has a row in {labels_file}")
    x, kept, skipped = _decode(files, prep, advance, folder)
    y = np.asarray([labels[Path(path).name] for path in kept], dtype=np.int64)
    names = tuple(str(i) for i in range(int(max(labels.values())) + 1))
    return ImageSet(x=x, labels=y, class_names=names, paths=tuple(kept), skipped=tuple(skipped))


def _decode(
    files: Sequence[Path], prep: Preprocessing, advance: Callable[[int], None] | None, folder: Path
) -> tuple[DiskRows, list[str], list[str]]:
    """Decode every file into rows on disk, one at a time (never the whole set in memory); undecodable
    ones are skipped with a warning, an error only if none is left."""
    writer: RowWriter | None = None
    kept, skipped, reasons = [], [], []
    for path in files:
        try:
            image = load_image(path, prep)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            skipped.append(str(path))
            reasons.append(str(exc))
        else:
            if writer is None:
                writer = RowWriter(image.shape, np.dtype(np.float32), decode_directory())
            writer.append(image)
            kept.append(str(path))
        if advance is not None:
            advance(1)
    if writer is None:  # one sentence, not a warning per file before it
        raise DataError(f"{folder}: none of its {len(files)} image files could be decoded ({skipped[0]}: {reasons[0]})")
    for name, reason in list(zip(skipped, reasons, strict=True))[:MAX_SKIP_WARNINGS]:
        logger.warning("skipping %s: cannot decode it as an image (%s)", name, reason)
    if skipped:
        logger.warning("%s: skipped %d file(s) that could not be decoded", folder, len(skipped))
    logger.info("%s: %d images decoded (%s)", folder, len(kept), prep.describe())
    return writer.rows(), kept, skipped


def _has_class_subfolders(folder: Path) -> bool:
    _check_folder(folder)
    return any(
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        for sub in folder.iterdir()
        if sub.is_dir()
        for path in sub.iterdir()
    )


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder of images (or of class subfolders)")


ARRAY_SUFFIXES = frozenset({".npz", ".npy"})


def is_array_file(path: Path) -> bool:
    """True for the .npz / .npy inputs of users whose data is already tensors."""
    return path.suffix.lower() in ARRAY_SUFFIXES


def load_array_file(path: Path, input_shape: Sequence[int | None]) -> ImageSet:
    """Read model-ready inputs from ``.npz`` (arrays ``x`` and optional ``y``) or ``.npy`` (``x`` only).

    The arrays are used as they are: no resizing or scaling. A float32 ``.npy``
    is memory-mapped, read-only: inference reads it batch by batch, so a large
    set (1,000 ImageNet crops are 600 MB) need not sit in memory at once.

    Raises:
        DataError: the file is missing or unreadable, or ``x`` does not fit the model input.
    """
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix == ".npy" else None)
        if isinstance(loaded, np.ndarray):
            arrays = {"x": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz/.npy file ({exc})") from exc
    if "x" not in arrays:
        raise DataError(f"{path} has no array named 'x' (it has {sorted(arrays)}); save inputs as x and labels as y")
    x = arrays["x"]
    expected = list(input_shape)[1:]
    if x.ndim != len(expected) + 1 or any(
        e is not None and e != d for e, d in zip(expected, x.shape[1:], strict=False)
    ):
        shown = ["N", *("?" if e is None else str(e) for e in expected)]
        raise DataError(f"{path}: x has shape {list(x.shape)} but the model takes [{', '.join(shown)}]")
    if len(x) == 0:
        raise DataError(f"{path}: x holds no inputs")
    labels = None
    if "y" in arrays:
        y = np.asarray(arrays["y"])
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y must hold one integer label per row of x, got shape {list(y.shape)} {y.dtype}")
        labels = y.astype(np.int64)
    n_classes = int(labels.max()) + 1 if labels is not None else 0
    return ImageSet(
        x=x if x.dtype == np.float32 else x.astype(np.float32),
        labels=labels,
        class_names=tuple(str(i) for i in range(n_classes)),
        paths=tuple(f"{path}[{i}]" for i in range(len(x))),
    )


def list_class_images(folder: Path) -> list[tuple[str, Path]]:
    """(class name, file) for every image file under ``folder/<class>/``, sorted.

    Raises:
        DataError: the folder is missing or holds no image in a class subfolder.
    """
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder of class subfolders")
    files = [
        (cls_dir.name, path)
        for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir())
        for path in sorted(cls_dir.iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        loose = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        hint = (
            "; its images must sit in one subfolder per class (IMAGES/<class>/<image>)"
            if loose
            else f" ({', '.join(sorted(IMAGE_SUFFIXES))}) in class subfolders"
        )
        raise DataError(f"image folder {folder} has no images{hint}")
    return files


def load_image(path: Path, prep: Preprocessing) -> NDArray[np.float32]:
    """Decode one image file into a model-layout float32 array (without the batch axis)."""
    with Image.open(path) as img:
        img.load()
        source: Image.Image = img
        if img.mode in SIXTEEN_BIT_MODES:  # convert("L") would clip every value above 255
            source = Image.fromarray(np.round(np.asarray(img, np.float64) / 65535 * 255).astype(np.uint8), "L")
        elif img.mode == "P" and "transparency" in img.info:
            source = img.convert("RGBA")  # PIL warns when a palette's transparency is dropped in one step
        converted = source.convert("L" if prep.channels == 1 else "RGB")  # alpha dropped, as torchvision does
    converted = _resized(converted, prep)
    pixels = np.asarray(converted, dtype=np.float32) / 255.0
    hwc = pixels.reshape(prep.height, prep.width, prep.channels)
    if prep.bgr:
        hwc = hwc[:, :, ::-1]
    normalised = ((hwc - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)).astype(np.float32)
    return normalised.transpose(2, 0, 1) if prep.layout == "NCHW" else normalised


def _resized(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """`image` at the model's height x width: stretched, or scaled and centre-cropped."""
    width, height = image.size
    if prep.resize == "stretch":
        if (width, height) == (prep.width, prep.height):
            return image
        return image.resize((prep.width, prep.height), Image.Resampling.BILINEAR)
    if prep.shorter_side is None:  # just cover height x width
        scale = max(prep.width / width, prep.height / height)
        scaled_w, scaled_h = max(prep.width, round(width * scale)), max(prep.height, round(height * scale))
    elif width <= height:  # torchvision's Resize(N): the shorter side to N, the longer one truncated
        scaled_w, scaled_h = prep.shorter_side, int(prep.shorter_side * height / width)
    else:
        scaled_w, scaled_h = int(prep.shorter_side * width / height), prep.shorter_side
    if (scaled_w, scaled_h) != (width, height):
        image = image.resize((scaled_w, scaled_h), Image.Resampling.BILINEAR)
    # torchvision's CenterCrop offsets: int(round(margin / 2)), Python's rounding (half to even)
    left, top = int(round((scaled_w - prep.width) / 2)), int(round((scaled_h - prep.height) / 2))
    return image.crop((left, top, left + prep.width, top + prep.height))


def stratified_split(
    labels: NDArray[np.int64], val_fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split indices into (repair, validation), the same share of every class held out.

    Every class with at least two images keeps one in each part, so neither part
    loses a class. The same labels and seed always give the same split.

    Raises:
        DataError: the fraction is outside (0, 1) or too few images to split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    repair: list[int] = []
    val: list[int] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.extend(members[:n_val])
        repair.extend(members[n_val:])
    if not repair or not val:
        raise DataError(
            f"{len(labels)} image(s) are too few to hold out a validation part; "
            "add images or pass a separate --val folder"
        )
    return np.sort(np.asarray(repair, np.int64)), np.sort(np.asarray(val, np.int64))


def stratified_folds(labels: NDArray[np.int64], folds: int, seed: int) -> NDArray[np.int64]:
    """A fold number in [0, folds) for every index, each class dealt round-robin over the folds.

    Every fold gets its share of every class, so no fold's fit part loses a
    class that has at least `folds` images.
    """
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[members] = (np.arange(len(members)) + int(rng.integers(folds))) % folds
    return fold_of


def _per_channel(option: str, values: Sequence[float] | None, channels: int, default: float) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if len(values) == 1:
        return (float(values[0]),) * channels
    if len(values) != channels:
        raise DataError(f"{option} needs 1 or {channels} values, got {len(values)}")
    return tuple(float(v) for v in values)


def _show(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
