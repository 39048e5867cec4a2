"""Explicit preprocessing: raw pixels -> the model's input tensor.

Every reader maps its samples to float32 NCHW in [0, 1] first, then one
function resizes, converts channels and normalises, so a folder of PNGs and an
.npz of the same pixels give the same model input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnx_mbs.passes.errors import BadInputError, input_shape_option, option

MEAN_KEY = "onnx_mbs.mean"
STD_KEY = "onnx_mbs.std"
# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Preprocess:
    """What is done to every sample; printed and written to reports."""

    size: tuple[int, int]  # (H, W) of the model input
    channels: int  # model input channel count (1 -> grayscale, 3 -> RGB)
    mean: tuple[float, ...]  # per channel, applied after scaling pixels to [0, 1]
    std: tuple[float, ...]
    scale: str = "/255"  # how raw pixels reach [0, 1], in words
    divisor: float = 255.0  # raw pixels / divisor are in [0, 1]
    layout: str = "NCHW"  # the model input's layout: NHWC models get channels last
    origin: str = field(default="", compare=False)  # where mean/std came from, in words

    def describe(self) -> str:
        kind = {1: " (grayscale)", 3: " (RGB)"}.get(self.channels, "")
        plural = "" if self.channels == 1 else "s"
        origin = f" ({self.origin})" if self.origin else ""
        return (
            f"{self.layout} input, resize to {self.size[0]}x{self.size[1]}, "
            f"{self.channels} channel{plural}{kind}, {self.scale}, "
            f"mean {_numbers(self.mean)} std {_numbers(self.std)}{origin}"
        )

    def metadata(self) -> dict[str, str]:
        """mean/std as the model's metadata_props record them (exact, one per channel)."""
        return {
            MEAN_KEY: ",".join(repr(float(v)) for v in self.mean),
            STD_KEY: ",".join(repr(float(v)) for v in self.std),
        }


def _numbers(values: tuple[float, ...]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]:.3g}"
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def model_chw(input_shape: Sequence[object]) -> tuple[int, int, int]:
    """(C, H, W) of a 4-D NCHW model input; they must be fixed to preprocess files."""
    dims = list(input_shape)
    if len(dims) != 4:
        kind = {3: " (a Conv1d model's N, C, L)", 5: " (a Conv3d model's N, C, D, H, W)"}
        raise BadInputError(
            f"image data (folders, IDX, an npz of x and y) feeds 4-D (N, C, H, W) inputs; this "
            f"model's input {tuple(dims)} is {len(dims)}-D{kind.get(len(dims), '')}: give a "
            "model-ready .npz, one array per model input named after it, fed as it is "
            "(docs/data.md)"
        )
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise BadInputError(
            f"model input shape {tuple(dims)} is not NCHW with fixed C, H, W; "
            f"give the input shape explicitly (e.g. {input_shape_option('x', (1, 3, 32, 32))})"
        )
    return dims[1], dims[2], dims[3]


def scales_pixels_itself(
    mean: object, std: object, metadata: Mapping[str, str] | None, raw_pixels: str | None
) -> bool:
    """Whether the model takes pixels in 0..255 by its own word (`raw_pixels`: how its graph
    shows it, `passes.graph.raw_pixels`) and neither mean/std nor the metadata say otherwise.
    Fed [0, 1] pixels, it would see them divided twice."""
    metadata = metadata or {}
    said = mean is not None or std is not None or MEAN_KEY in metadata or STD_KEY in metadata
    return not said and raw_pixels is not None


def normalisation(
    mean: object,
    std: object,
    channels: int,
    metadata: Mapping[str, str] | None,
    raw_pixels: str | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std: given values, else the model's metadata, else 0 and 1 (std
    1/255 for a model that takes 0..255 pixels itself: `scales_pixels_itself`)."""
    if scales_pixels_itself(mean, std, metadata, raw_pixels):
        return (0.0,) * channels, (1 / 255,) * channels
    metadata = metadata or {}
    # the std in the mean's units: given with it, or the default 1 (no scaling in any units);
    # not the metadata's, recorded in [0, 1] units (divided too, it would scale inputs 255-fold)
    std_with_mean = std is not None or STD_KEY not in metadata
    if mean is None:
        mean = metadata.get(MEAN_KEY, 0.0)
    if std is None:
        std = metadata.get(STD_KEY, 1.0)
    means = _per_channel("mean", mean, channels)
    stds = _per_channel("std", std, channels)
    if any(not s > 0 for s in stds):
        raise BadInputError(f"std must be positive for every channel, got {stds}")
    if any(not 0.0 <= m <= 1.0 for m in means):
        # Pixels are in [0, 1] when normalised: such a mean is in 0..255 units (ImageNet's
        # 123.675), which would shift every input far off and still run.
        scaled = option("--mean", ",".join(f"{m / 255:.4g}" for m in means))
        if std_with_mean:
            scaled += " " + option("--std", ",".join(f"{x / 255:.4g}" for x in stds))
        raise BadInputError(
            f"mean {','.join(f'{m:g}' for m in means)} is outside [0, 1]: mean and std apply "
            f"to pixels already divided by 255; in 0..255 units divide "
            f"{'both' if std_with_mean else 'it'} by 255 ({scaled})"
        )
    return means, stds


def normalisation_origin(
    mean: object, std: object, metadata: Mapping[str, str] | None, raw_pixels: str | None = None
) -> str:
    """Where `normalisation` takes mean and std from, in words: given values win over the
    model's metadata, which wins over the defaults."""
    if scales_pixels_itself(mean, std, metadata, raw_pixels):
        return f"0..255 pixels: {raw_pixels}"
    metadata = metadata or {}

    def origin(value: object, key: str) -> str:
        if value is not None:
            return "as given"
        return "from the model's metadata" if key in metadata else "by default"

    first, second = origin(mean, MEAN_KEY), origin(std, STD_KEY)
    return first if first == second else f"mean {first}, std {second}"


def _per_channel(what: str, value: object, channels: int) -> tuple[float, ...]:
    try:
        if isinstance(value, str):
            values = [float(v) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float, np.number)):
            values = [float(value)]
        else:
            values = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BadInputError(
            f"{what} {value!r} is not a number or comma-separated numbers"
        ) from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(np.isfinite(values)):
        count = (
            "one finite number: the model input has 1 channel"
            if channels == 1
            else f"1 or {channels} finite numbers (one per channel of the model input)"
        )
        raise BadInputError(f"{what} {value!r} must be {count}")
    return tuple(values)


def raw_layout(shape: tuple[int, ...], channels: int, what: str) -> str:
    """Which of NHW, NCHW or NHWC an array of samples uses (channel axis of size 1, 3 or C)."""
    if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[1] >= 2 * shape[2]:
        # images 1, 3 or 4 pixels wide and at least twice as high are stripes, not images: one
        # (H, W, C) image, read as (N, H, W) it would give H stripes stretched to the model's size
        raise BadInputError(
            f"{what} has shape {shape}: one (H, W, C) image, not (N, H, W) samples? Store the "
            "samples on the first axis: x[None] for one image, (N, H, W, C) for several"
        )
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        first = shape[1] in (1, 3, channels)
        last = shape[3] in (1, 3, channels)
        if first and last:
            return "NHWC" if shape[3] == channels and shape[1] != channels else "NCHW"
        if first:
            return "NCHW"
        if last:
            return "NHWC"
    allowed = sorted({1, 3, channels})
    listed = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
    raise BadInputError(
        f"{what} has shape {shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) "
        f"with C {listed} (the model takes {channels})"
    )


def raw_channels(shape: tuple[int, ...], layout: str) -> int:
    return {"NHW": 1, "NCHW": shape[1] if len(shape) == 4 else 1, "NHWC": shape[-1]}[layout]


def check_channels(source: int, target: int, what: str) -> None:
    """Only grayscale <-> RGB is converted; anything else would be a guess."""
    if source != target and {source, target} != {1, 3}:
        raise BadInputError(
            f"{what} has {source} channels but the model expects {target}; "
            "only grayscale <-> RGB is converted"
        )


def to_unit_nchw(raw: np.ndarray, layout: str, divisor: float = 255.0) -> np.ndarray:
    """Samples as float32 NCHW in [0, 1]: raw pixels divided by `divisor` (255 or 1)."""
    x = raw[:, None] if layout == "NHW" else raw
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    x = x.astype(np.float32)
    if divisor != 1:
        x /= np.float32(divisor)  # in place: no second float copy of a large batch
    return x


# How far float arithmetic may leave [0, 1] pixels outside [0, 1] (float64's 1 + 2**-52, which
# float32 rounds to 1): they are still [0, 1] pixels; 0..255 pixels this dark are black.
UNIT_ROUNDING = 1e-5


def pixel_scale(x: np.ndarray, what: str, advice: str = "") -> tuple[str, float]:
    """How raw pixels reach [0, 1], read from the values: uint8 and float 0..255 are divided
    by 255, floats in [0, 1] are kept; other float ranges are refused (a guess would be
    silently wrong), `advice` closing the refusal."""
    if x.dtype == np.uint8:
        return "/255", 255.0
    finite = x[np.isfinite(x)] if x.size else x
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if low >= -UNIT_ROUNDING and high <= 1 + UNIT_ROUNDING:
        return "floats in [0, 1] kept", 1.0
    if low >= 0 and high <= 255:
        return f"float pixels in [0, {high:g}] read as 0..255, /255", 255.0
    raise BadInputError(
        f"{what} holds floats in [{low:g}, {high:g}]: neither [0, 1] nor 0..255 pixels; "
        "store raw pixels (uint8, or floats in [0, 1] or 0..255) and give "
        f"{option('--mean')}/{option('--std')}{advice}"
    )


def check_pixel_dtype(dtype: np.dtype, what: str) -> None:
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise BadInputError(
            f"{what} has dtype {dtype}; expected uint8 pixels (0-255) or floats in [0, 1]"
        )


def apply(x: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Resize, convert channels and normalise float32 NCHW samples in [0, 1]."""
    if x.shape[2:] != pre.size:
        x = resize(x, pre.size)
    if x.shape[1] == 1 and pre.channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif x.shape[1] == 3 and pre.channels == 1:
        x = np.einsum("nchw,c->nhw", x, LUMA)[:, None]
    mean = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
    x = (x - mean) / std
    if pre.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of every channel of every sample with Pillow (float mode, no rounding)."""
    from PIL import Image  # here: `reduce` without data never imports Pillow

    height, width = size
    out = np.empty((x.shape[0], x.shape[1], height, width), np.float32)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            image = Image.fromarray(np.ascontiguousarray(x[n, c]))
            out[n, c] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return out
