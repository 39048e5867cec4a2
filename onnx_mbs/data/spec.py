"""open_data: turn a --data SPEC (or a Python reader) into a DataSource."""

from __future__ import annotations

import os
import sys
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_mbs.data import idx
from onnx_mbs.data.preprocess import (
    Preprocess,
    check_channels,
    check_pixel_dtype,
    model_chw,
    normalisation,
    normalisation_origin,
    pixel_scale,
    raw_channels,
    raw_layout,
)
from onnx_mbs.data.ready import (
    IMAGE_ARRAY,
    LABELS,
    DeclaredInput,
    is_model_ready,
    model_ready_arrays,
    reads_x_as_images,
    takes_floats,
)
from onnx_mbs.data.replay import Replay
from onnx_mbs.data.sources import (
    IMAGE_SCALE,
    MAX_IMAGE_PIXELS,
    ArraySource,
    DataSource,
    ImageFolderSource,
)
from onnx_mbs.memory import check_fits
from onnx_mbs.passes.errors import BadInputError, input_shape_option, option

# torchvision's IMG_EXTENSIONS, compared without case as its ImageFolder compares them: the
# same folder gives the same samples (it skips .gif, so a model trained there never saw one).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
KINDS = (
    "an image folder (one sub-folder per class), an .npz with x (and y), an .npz with one "
    "array per model input (model-ready), or an IDX folder"
)
# Why model inputs given as arrays (a reader's, or retrain's (x, y)) that are not floats are
# refused: cast to float, uint8 pixels would be read as 0..255, not as the model reads them.
AS_FED = "fed as they are (no scaling or mean/std): give them preprocessed, as floats"


def open_data(
    spec: str | os.PathLike | Iterable[dict[str, np.ndarray]] | Any,
    input_name: str,
    input_shape: Sequence[int],
    mean: Any = None,
    std: Any = None,
    limit: int | None = None,
    metadata: Mapping[str, str] | None = None,
    layout: str = "NCHW",
    split: str | None = "test",
    labels: bool = True,
    inputs: Sequence[DeclaredInput] = (),
    raw_pixels: str | None = None,
) -> DataSource:
    """A DataSource for `spec`, preprocessed to fit the model input (N, C, H, W), or
    (N, H, W, C) for `layout` "NHWC".

    mean/std default to the model's metadata (onnx_mbs.mean / onnx_mbs.std), else 0 and 1;
    `raw_pixels` says how the graph shows it takes 0..255 pixels (`passes.graph.raw_pixels`):
    a model that divides by 255 itself is fed 0..255 pixels.
    `limit` keeps the first N samples. `split` is the IDX split used when the spec names
    none (None: it must be named). `labels` False ignores the data's labels: they are
    neither read nor checked (`--no-labels`). An .npz with an array for each of `inputs`
    (the model's declared inputs) is model-ready data, fed as it is (`ready.py`). Python
    readers (anything with get_next(), or an iterable of input dicts) give model inputs
    already: they are not preprocessed.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise BadInputError(f"limit must be a positive whole number of samples, got {limit!r}")
    if not isinstance(spec, (str, os.PathLike)):
        dtype = next((i.dtype for i in inputs if i.name == input_name), None)
        return _open_reader(spec, input_name, input_shape, limit, dtype)

    path, named_split = split_suffix(os.fspath(spec))
    if not path.exists():
        raise BadInputError(_missing(os.fspath(spec), path))
    npz = _read_npz(path) if path.suffix.lower() == ".npz" and path.is_file() else None
    if npz is not None and is_model_ready(list(npz), inputs):
        return _model_ready_source(path, npz, inputs, input_name, mean, std, limit, labels)
    if len(inputs) > 1:
        raise BadInputError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); give "
            "an .npz with one array per input, named after it (model-ready data, fed as it is)"
        )
    if layout == "NHWC":
        dims = list(input_shape)
        input_shape = [dims[0], dims[3], dims[1], dims[2]] if len(dims) == 4 else dims
    channels, height, width = model_chw(input_shape)
    check_fits(
        3 * 4 * channels * height * width,  # a float sample, resized, then normalised
        f"preprocessing one {channels}x{height}x{width} sample",
        f"fix {input_shape_option()} to the size the model was trained at",
    )
    means, stds = normalisation(mean, std, channels, metadata, raw_pixels)
    origin = normalisation_origin(mean, std, metadata, raw_pixels)

    def preprocess(scale: tuple[str, float]) -> Preprocess:
        return Preprocess(
            (height, width), channels, means, stds, *scale, layout=layout, origin=origin
        )

    if path.is_dir() and idx.is_idx_folder(path):
        if named_split is None and split is None:
            raise BadInputError(f"say which IDX split to use: {path}:train or {path}:test")
        how = "" if named_split else ", the default here; add :train or :test to choose"
        split = named_split or split
        images, label_file = idx.find_split(path, split)
        x = idx.read_idx(images)
        y = idx.read_idx(label_file) if label_file is not None and labels else None
        what = f"IDX {path} ({split} split{how})"
        return _array_source(x, y, what, channels, preprocess, input_name, limit, labels)
    split = named_split
    if split is not None:
        raise BadInputError(f"':{split}' only applies to IDX folders; {path} is not one")
    if path.is_dir():
        return _open_folder(path, preprocess((IMAGE_SCALE, 255.0)), input_name, limit, labels)
    if npz is not None:
        x, y = _image_arrays(path, npz, inputs)
        what = f"npz {path.name}"
        source = _array_source(x, y if labels else None, what, channels, preprocess,
                               input_name, limit, labels, _x_advice(inputs))  # fmt: skip
        source.description += _ignored(npz, {IMAGE_ARRAY, LABELS})
        return source
    raise BadInputError(f"cannot use data file {path}; pass {KINDS}")


def split_suffix(spec: str) -> tuple[Path, str | None]:
    """'folder:train' -> (folder, 'train') unless a file of that exact name exists."""
    for split in idx.SPLITS:
        suffix = ":" + split
        if spec.endswith(suffix) and not Path(spec).exists():
            return Path(spec[: -len(suffix)]), split
    return Path(spec), None


def _missing(spec: str, path: Path) -> str:
    """Why `path` cannot be read: a split IDX folders do not have (folder:val) is named as
    such, with the ones they have, rather than as a path that does not exist."""
    base, _, word = spec.rpartition(":")
    if base and word.isalnum() and Path(base).exists():
        if Path(base).is_dir() and idx.is_idx_folder(Path(base)):
            return f"IDX folder {base} has no split {word!r}; use {base}:train or {base}:test"
        return f"data path {spec}: ':{word}' is not a split, and only IDX folders take one"
    return f"data path {path} does not exist; pass {KINDS}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"cannot read npz {path}: not a zip archive of .npy arrays")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise BadInputError(f"cannot read npz {path}: {error}") from None


def _image_arrays(
    path: Path, npz: dict[str, np.ndarray], inputs: Sequence[DeclaredInput]
) -> tuple[np.ndarray, np.ndarray | None]:
    if IMAGE_ARRAY not in npz:
        ready = f" or one array per model input ({', '.join(i.name for i in inputs)})"
        raise BadInputError(
            f"npz {path} has no array 'x' (it has: {', '.join(npz) or 'nothing'}); "
            f"store the images as x and the labels as y{ready if inputs else ''}"
        )
    return npz[IMAGE_ARRAY], npz.get(LABELS)


def _x_advice(inputs: Sequence[DeclaredInput]) -> str:
    """How to feed arrays normalised already to a model whose only input is named x, whose
    npz x is image data (`ready.reads_x_as_images`): the refusal of their range says it."""
    if not reads_x_as_images(inputs):
        return ""
    return (
        f"; the model's only input is named {IMAGE_ARRAY}, so an npz {IMAGE_ARRAY} is read as "
        "images, not fed as it is: store the pixels from before normalising, or feed the "
        f"arrays from Python as a reader ([{{'{IMAGE_ARRAY}': batch}}, ...]), fed as they are"
    )


def _model_ready_source(
    path: Path,
    npz: dict[str, np.ndarray],
    inputs: Sequence[DeclaredInput],
    input_name: str,
    mean: Any,
    std: Any,
    limit: int | None,
    read_labels: bool,
) -> ArraySource:
    """The arrays of a model-ready npz, fed as they are: `input_name`'s as the batch's x,
    the other inputs' beside it; labels neither read nor checked without `read_labels`."""
    what = f"model-ready npz {path.name}"
    if mean is not None or std is not None:
        raise BadInputError(
            f"{what} is fed as it is; {option('--mean')}/{option('--std')} apply to image "
            "data only: drop them or store the arrays normalised"
        )
    arrays, y = model_ready_arrays(npz, inputs, what)
    total = len(arrays[input_name])
    labels = None if y is None or not read_labels else class_labels(y, total, what)[:limit]
    arrays = {name: array[:limit] for name, array in arrays.items()}
    x = arrays.pop(input_name)
    description = _describe(
        f"{what} ({', '.join(i.name for i in inputs)}, fed as they are)",
        len(x),
        total,
        labels is not None,
    ) + _ignored(npz, {*(i.name for i in inputs), LABELS})
    return ArraySource(x, labels, None, None, input_name, description, arrays, what)


def _array_source(
    x: np.ndarray,
    y: np.ndarray | None,
    what: str,
    channels: int,
    preprocess: Any,
    input_name: str,
    limit: int | None,
    read_labels: bool = True,
    advice: str = "",
) -> ArraySource:
    check_pixel_dtype(x.dtype, what)
    layout = raw_layout(x.shape, channels, f"{what} x")
    check_channels(raw_channels(x.shape, layout), channels, what)
    height, width = x.shape[2:4] if layout == "NCHW" else x.shape[1:3]
    if height * width > MAX_IMAGE_PIXELS:  # as image folders: before any float copy
        raise BadInputError(
            f"{what} x holds images of {height} x {width} pixels, more than "
            f"{MAX_IMAGE_PIXELS:,} (far larger than any model input): resize them first"
        )
    labels = None if y is None else class_labels(y, len(x), what)
    total = len(x)
    if total == 0:
        raise BadInputError(f"{what} has no samples")
    x, labels = x[:limit], (None if labels is None else labels[:limit])
    description = _describe(what, len(x), total, labels is not None, read_labels)
    scale = pixel_scale(x, f"{what} x", advice)
    return ArraySource(x, labels, layout, preprocess(scale), input_name, description, name=what)


def class_labels(y: Any, count: int, what: str) -> np.ndarray:
    """`count` labels as int64 class indices: (N,) or (N, 1), whole numbers, none negative."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise BadInputError(f"{what} labels have shape {y.shape}; expected (N,) class indices")
    if len(y) != count:
        raise BadInputError(f"{what} has {len(y)} labels for {count} samples; they must match")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
        raise BadInputError(f"{what} labels are not whole numbers; expected class indices")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise BadInputError(f"{what} labels have dtype {y.dtype}; expected class indices")
    if len(y) and y.min() < 0:
        raise BadInputError(f"{what} has negative labels; expected class indices 0..K-1")
    if len(y) and y.max() >= 2**62:  # past int64 the cast below would wrap to negative
        raise BadInputError(f"{what} has a label of {y.max()}; expected class indices 0..K-1")
    return y.astype(np.int64)


def _open_folder(
    path: Path, preprocess: Preprocess, input_name: str, limit: int | None, read_labels: bool
) -> ImageFolderSource:
    """One sub-folder per class (labels = sorted index), or loose images without labels."""
    if preprocess.channels not in (1, 3):
        raise BadInputError(
            f"the model expects {preprocess.channels} channels; image folders give 1 or 3"
        )
    # by name as a string, as torchvision numbers them (Windows paths compare without case)
    folders = (p for p in _listing(path) if p.is_dir() and not p.name.startswith("."))
    classes = sorted(folders, key=lambda p: p.name)
    files: list[Path] = []
    labels: list[int] | None = []
    skipped: Counter[str] = Counter()  # files of the other kinds, by suffix
    if classes and read_labels:
        _check_numbered_classes(path, [c.name for c in classes])
    if classes:
        for label, folder in enumerate(classes):
            images = _images(folder, skipped)
            files += images
            labels += [label] * len(images)
        loose = sum(1 for p in _listing(path) if _is_image(p))  # no class: left out, said
        kind = f"{len(classes)} classes" + (
            f", {loose} image{'s' if loose > 1 else ''} beside them left out" if loose else ""
        )
    else:
        files, labels, kind = _images(path, skipped), None, "no class sub-folders"
    others, suffixes = _other_files(skipped)
    kinds = f"{'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} files"
    if not files:
        why = (
            f": its {others} ({suffixes}) are none of the kinds torchvision's ImageFolder "
            "reads, nor read here"
            if skipped
            else ""
        )
        raise BadInputError(
            f"no images found in {path}{why}; expected one sub-folder per class holding {kinds}"
        )
    if skipped:
        kind += f", {others} left out: {suffixes}"
    total = len(files)
    picked = list(range(total))[:limit] if labels is None else _in_turn(labels, limit)
    files = [files[k] for k in picked]
    y = None if labels is None or not read_labels else np.asarray(labels, np.int64)[picked]
    what = f"image folder {path} ({kind})"
    in_turn = labels is not None
    description = _describe(what, len(files), total, y is not None, read_labels, in_turn)
    names = None if y is None else tuple(c.name for c in classes)
    return ImageFolderSource(files, y, preprocess, input_name, description, names, what)


def check_same_classes(train: Any, val: Any, val_labels: np.ndarray | None = None) -> None:
    """Folder labels are positions in each folder's sorted class list: a validation folder
    without one of the training folder's classes, or with another, numbers the rest otherwise,
    and every epoch would be scored against shifted labels. Validation labels without names
    (`val_labels` of an npz, IDX or arrays) can only be held to the training folder's count."""
    ours, theirs = getattr(train, "classes", None), getattr(val, "classes", None)
    if ours is not None and theirs is None and val_labels is not None and len(val_labels):
        top = int(np.max(val_labels))
        if top >= len(ours):
            raise BadInputError(
                f"label {top} in the validation data names no class of the training folder's "
                f"{len(ours)} classes ({_few(ours)}): labels are positions in its sorted class "
                "list; give it a sub-folder for each class (an empty one keeps its place)"
            )
    if ours is None or theirs is None or tuple(ours) == tuple(theirs):
        return
    missing = [c for c in ours if c not in theirs]
    extra = [c for c in theirs if c not in ours]
    moved = next((c for c in ours if c in theirs and ours.index(c) != theirs.index(c)), None)
    said = [
        *([f"missing there: {', '.join(missing)}"] if missing else []),
        *([f"not in training: {', '.join(extra)}"] if extra else []),
    ]
    shift = (
        f"; {moved} is {ours.index(moved)} in training but {theirs.index(moved)} there"
        if moved is not None
        else ""
    )
    raise BadInputError(
        f"the validation folder's classes differ from the training folder's ({'; '.join(said)})"
        f"{shift}: labels are positions in each folder's sorted class list; give both the "
        "same class sub-folders (an empty one keeps its place)"
    )


def _in_turn(labels: list[int], limit: int | None) -> list[int]:
    """The positions `limit` keeps of files sorted by class: one of each class in turn (the
    first N would be the first classes only), back in folder order."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    rank: dict[int, int] = {}
    order = []
    for k, label in enumerate(labels):
        order.append((rank.get(label, 0), label, k))
        rank[label] = rank.get(label, 0) + 1
    return sorted(k for _, _, k in sorted(order)[:limit])


def _few(names: Sequence[str]) -> str:
    """Class folder names for a message: all of up to six, else the first five and "..."."""
    return ", ".join(names if len(names) <= 6 else [*names[:5], "..."])


def _check_numbered_classes(path: Path, names: list[str]) -> None:
    """Labels are the class folders' positions in sorted order. Folders named by numbers that
    are not their positions (3 and 7 of a 10-class set; 0..10 unpadded, where "10" sorts before
    "2") say another label than the one they would get: refused rather than read either way,
    beside folders named otherwise too (0..10 and other)."""
    moved = [(name, k) for k, name in enumerate(names) if name.isdecimal() and int(name) != k]
    if not moved:
        return
    mapping = ", ".join(f"{name} -> {k}" for name, k in moved[:4]) + (
        ", ..." if len(moved) > 4 else ""
    )
    raise BadInputError(
        f"image folder {path} has class sub-folders named by numbers ({_few(names)}) "
        f"that are not their positions in sorted order, which are the labels ({mapping}): "
        "name them so that sorted order gives the class index (0, 1, ...; zero-padded past "
        "9), or store the images and labels in an .npz (x, y)"
    )


def _images(folder: Path, skipped: Counter[str]) -> list[Path]:
    """The image files in `folder` and its sub-folders, in torchvision's order: its
    ImageFolder reads a class's images at any depth (cat/2019/x.png), so a model trained so is
    measured on the same files, and lists them by its sorted os.walk (folders by their path
    strings, each one's files by name, cat/a.png before cat/2019/x.png), which `--limit`
    picks by. Hidden files and folders stay out; each real folder is read once (a symlink
    loop would list its images again at every turn). The other files are counted in
    `skipped` by suffix."""
    found: list[Path] = []
    seen: set[str] = set()
    folders = [folder]
    while folders:
        current = folders.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        for p in _listing(current):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                folders.append(p)
            elif _is_image(p):
                found.append(p)
            elif p.is_file():
                skipped[p.suffix.lower() or "no suffix"] += 1
    return sorted(found, key=lambda p: (str(p.parent), p.name))


def _other_files(skipped: Counter[str]) -> tuple[str, str]:
    """('5 other files', '.gif 4, .txt 1'): the files of a folder that are not images."""
    total = sum(skipped.values())
    counts = ", ".join(f"{suffix} {n}" for suffix, n in skipped.most_common())
    return f"{total} other file{'s' if total > 1 else ''}", counts


def _is_image(path: Path) -> bool:
    """An image file by its name, hidden ones aside."""
    hidden = path.name.startswith(".")
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as error:
        raise BadInputError(f"cannot read folder {folder}: {error.strerror}") from None


def _open_reader(
    spec: Any,
    input_name: str,
    input_shape: Sequence[Any],
    limit: int | None,
    dtype: np.dtype | None = None,
) -> ArraySource:
    """Gather a CalibrationDataReader (get_next() until None) or an iterable of input dicts.

    Such readers are one-shot and have no length, so their arrays are kept to be replayed.
    `dtype`: the input's declared type, when known; arrays of another kind are refused.
    """
    if isinstance(spec, dict):
        spec = [spec]
    if hasattr(spec, "get_next"):
        items: Iterable[Any] = iter(spec.get_next, None)
    else:
        try:
            items = iter(spec)
        except TypeError:
            raise BadInputError(
                f"cannot use {type(spec).__name__} as data; pass {KINDS}, "
                "or a reader of input dicts"
            ) from None
    kept = isinstance(spec, Replay)  # its items are copies already (replay._kept)
    arrays: list[np.ndarray] = []
    count = 0
    for number, item in enumerate(items):
        arrays.append(_reader_array(item, number, input_name, input_shape, dtype, kept))
        count += len(arrays[-1])
        if limit is not None and count >= limit:
            break
    if not arrays:
        raise BadInputError("the input reader yielded no data")
    x = np.concatenate(arrays)[: min(limit or sys.maxsize, padded_from(spec))]
    what = "input reader (model inputs, not preprocessed)"
    description = _describe(what, len(x), None, False)
    return ArraySource(x, None, None, None, input_name, description, name=what)


def padded_from(reader: Any) -> int:
    """Where a reader's padding starts: a reader that pads its last batch (CalibrationReader,
    for a model that fixes its batch) says how many of its rows are real in `samples`; the
    copies after them would be measured as samples otherwise."""
    samples = getattr(reader, "samples", None)
    if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0:
        return samples
    return sys.maxsize


def _reader_array(
    item: Any,
    number: int,
    input_name: str,
    input_shape: Sequence[Any],
    dtype: np.dtype | None,
    kept: bool = False,
) -> np.ndarray:
    """The model input of reader item `number`, checked: a copy (a reader may refill one
    buffer for every batch) unless the item is `kept` as it was read already."""
    if not isinstance(item, Mapping):
        raise BadInputError(
            f"input reader item {number} is a {type(item).__name__}; expected a dict of arrays"
        )
    if input_name not in item:
        raise BadInputError(
            f"input reader item {number} has no {input_name!r} (keys: {', '.join(item)}); "
            f"the model input is named {input_name!r}"
        )
    x = np.asarray(item[input_name]) if kept else np.array(item[input_name])
    fixed = [(axis, d) for axis, d in enumerate(input_shape) if isinstance(d, int) and d > 0]
    if x.ndim != len(input_shape) or any(x.shape[a] != d for a, d in fixed if a > 0):
        raise BadInputError(
            f"input reader item {number} has shape {x.shape}; the model input {input_name!r} "
            f"expects {tuple(input_shape)}"
        )
    if takes_floats(dtype) and x.dtype.kind != "f":
        raise BadInputError(
            f"input reader item {number} has dtype {x.dtype}; the model input {input_name!r} "
            f"expects {dtype}: a reader gives model inputs, {AS_FED}"
        )
    return x


def _ignored(npz: Mapping[str, np.ndarray], read: set[str]) -> str:
    """The npz's other arrays, named in the data line: a misnamed label array (`labels`) is
    otherwise dropped without a word."""
    left = [name for name in npz if name not in read]
    return f"; ignored arrays: {', '.join(left)}" if left else ""


def _describe(
    what: str,
    count: int,
    total: int | None,
    labelled: bool,
    read: bool = True,
    in_turn: bool = False,
) -> str:
    """The data line; `in_turn`: a limit took each class in turn, not the first samples."""
    samples = f"{count} samples"
    if total and count < total and in_turn:
        samples = f"{count} of {total} samples, each class in turn"
    elif total and count < total:
        samples = f"first {count} of {total} samples"
    return f"{what}: {samples}, labels: {'yes' if labelled else 'no' if read else 'ignored'}"
