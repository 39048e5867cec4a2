"""Data sources: stream preprocessed batches, as often as asked.

Array sources hold raw samples (npz, IDX, reader dicts) and preprocess one
batch at a time; the image folder source keeps only file names and opens each
image when its batch is built, so memory stays flat in the number of images.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from onnx_mbs.data.preprocess import Preprocess, apply, to_unit_nchw
from onnx_mbs.passes.errors import BadInputError

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Batch:
    x: np.ndarray  # float32 NCHW, preprocessed model input (model-ready data: as given)
    y: np.ndarray | None  # int64 class indices
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the model's other inputs


def batch_inputs(batch: Batch, input_name: str) -> dict[str, np.ndarray]:
    """Every model input `batch` gives, by name (duck-typed batches: x alone)."""
    return {input_name: batch.x, **getattr(batch, "extra", {})}


class DataSource(Protocol):
    description: str  # what was read, e.g. "npz sample.npz: 512 samples, labels: yes"
    preprocess: Preprocess | None  # None when the samples are model inputs already
    input_name: str

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[Batch]: ...


class ArraySource:
    """Samples held as raw arrays; `layout` None means they are model inputs already.
    `extra` holds the model's other inputs (model-ready data), one entry per sample."""

    def __init__(
        self,
        raw: np.ndarray,
        labels: np.ndarray | None,
        layout: str | None,
        preprocess: Preprocess | None,
        input_name: str,
        description: str,
        extra: dict[str, np.ndarray] | None = None,
        name: str = "",
    ) -> None:
        self.raw = raw
        self.labels = labels
        self.layout = layout
        self.preprocess = preprocess
        self.input_name = input_name
        self.description = description
        self.extra = extra or {}
        self.name = name  # what was read, for messages (source_name)

    def __len__(self) -> int:
        return len(self.raw)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        for start in range(0, len(self.raw), batch_size):
            yield self.take(np.arange(start, min(start + batch_size, len(self.raw))))

    def take(self, indices: np.ndarray) -> Batch:
        """The preprocessed samples at `indices` (any order), for shuffled training."""
        raw = self.raw[indices]
        if self.layout is None or self.preprocess is None:
            x = raw
        else:
            x = apply(to_unit_nchw(raw, self.layout, self.preprocess.divisor), self.preprocess)
        extra = {name: array[indices] for name, array in self.extra.items()}
        for array in (x, *extra.values()):
            check_finite(array, indices, self.description)
        return Batch(x, None if self.labels is None else self.labels[indices], extra)


class ImageFolderSource:
    """Image files read with Pillow when their batch is built; labels are class indices."""

    def __init__(
        self,
        files: list[Path],
        labels: np.ndarray | None,
        preprocess: Preprocess,
        input_name: str,
        description: str,
        classes: tuple[str, ...] | None = None,
        name: str = "",
    ) -> None:
        self.files = files
        self.labels = labels
        self.preprocess = preprocess
        self.input_name = input_name
        self.description = description
        self.classes = classes  # the class folders' names, label order (None: no labels)
        self.name = name  # what was read, for messages (source_name)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        for start in range(0, len(self.files), batch_size):
            yield self.take(np.arange(start, min(start + batch_size, len(self.files))))

    def take(self, indices: np.ndarray) -> Batch:
        """The samples at `indices` (any order), each decoded and preprocessed here."""
        x = np.concatenate([self._load(self.files[i]) for i in indices])
        check_finite(x, indices, self.description)
        return Batch(x, None if self.labels is None else self.labels[indices])

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError  # here: only image folders need Pillow

        try:
            with warnings.catch_warnings():  # Pillow warns of large images: refused below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    pixels, divisor = image_pixels(image, self.preprocess.channels, path)
        except Image.DecompressionBombError:
            raise BadInputError(too_large(path)) from None
        except (OSError, ValueError, UnidentifiedImageError) as error:
            # ValueError: Pillow's answer to some broken headers (a PGM's maxval)
            raise BadInputError(f"cannot read image {path}: {error}") from None
        layout = "NHW" if pixels.ndim == 2 else "NHWC"
        return apply(to_unit_nchw(pixels[None], layout, divisor), self.preprocess)


# Images with more pixels are refused before they are decoded: a PNG of a few hundred KB can
# hold a billion pixels. 2^25 (33.5 M, 8192 x 4096) keeps a decoded RGB image and its float
# copy under 600 MB.
MAX_IMAGE_PIXELS = 2**25
# How a Pillow mode's pixels reach [0, 1]: 16-bit grayscale is divided by 65535; modes
# Pillow converts to 8 bits (palette, 1-bit, RGBA, CMYK...) by 255. 32-bit integer and float
# images have no fixed range and are refused.
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Formats whose 16-bit grayscale Pillow opens as 32-bit mode I: PGM (maxval scaled to 65535)
# and PNG before Pillow 10.3 (python-pillow/Pillow#7849). Neither holds 32-bit pixels: their
# range is 0..65535.
SIXTEEN_BIT_AS_I = ("PNG", "PPM")
IMAGE_SCALE = "8-bit pixels /255, 16-bit /65535"


def image_pixels(image: Image.Image, channels: int, path: Path) -> tuple[np.ndarray, float]:
    """An open image's pixels, grayscale (H, W) or RGB (H, W, 3) as `channels` asks, and
    what to divide them by to reach [0, 1]."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInputError(too_large(path, width, height))
    if image.mode in SIXTEEN_BIT or (image.mode == "I" and image.format in SIXTEEN_BIT_AS_I):
        pixels = np.asarray(image).astype(np.uint16)
        return (pixels if channels == 1 else np.repeat(pixels[..., None], 3, axis=2)), 65535.0
    if image.mode in ("I", "F"):
        raise BadInputError(
            f"image {path} holds {'32-bit integer' if image.mode == 'I' else 'float'} pixels, "
            "whose range is unknown; store 8- or 16-bit images"
        )
    if channels == 1 and image.mode == "LAB":  # Pillow converts LAB to RGB, not to L
        image = image.convert("RGB")
    return np.asarray(image.convert("L" if channels == 1 else "RGB")), 255.0


def too_large(path: Path, width: int | None = None, height: int | None = None) -> str:
    size = f" ({width} x {height} pixels)" if width else ""
    return (
        f"image {path}{size} has more than {MAX_IMAGE_PIXELS:,} pixels (a decompression bomb, "
        "or far larger than any model input): resize it or leave it out"
    )


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise BadInputError(f"batch size must be at least 1, got {batch_size}")


def check_finite(x: np.ndarray, indices: np.ndarray, description: str) -> None:
    """Refuse NaN/inf early, naming the sample, instead of letting them poison statistics."""
    if not np.issubdtype(x.dtype, np.floating):
        return
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        sample = int(indices[int(np.argmin(finite))])
        raise BadInputError(
            f"sample {sample} contains NaN or inf values ({description}); fix or drop that sample"
        )


def to_arrays(source: DataSource) -> tuple[np.ndarray, np.ndarray | None]:
    """All of a (small) source in memory, e.g. to shuffle it for retraining."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for batch in source.batches(256):
        given = batch_inputs(batch, getattr(source, "input_name", "x"))
        if len(given) > 1:
            raise BadInputError(
                f"{source_name(source)} gives several model inputs "
                f"({', '.join(given)}); retraining feeds one image input"
            )
        xs.append(batch.x)
        if batch.y is not None:
            ys.append(batch.y)
    if not xs:
        raise BadInputError(f"no samples in {source.description}")
    return np.concatenate(xs), (np.concatenate(ys) if ys else None)


def source_name(source: DataSource) -> str:
    """What a source read, for messages ("image folder D:\\imgs (3 classes)"): its `name`,
    else its description up to the counts (a drive letter's ':' is no end)."""
    return getattr(source, "name", "") or source.description.split(": ")[0]


def default_workers() -> int:
    """Data-loading processes by default: the cores this process may use, shared among the
    processes of one torchrun node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
