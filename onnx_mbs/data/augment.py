"""Training augmentation of image inputs: a random crop (padded, or resized) and a horizontal flip.

Applied to preprocessed model inputs, so a folder of PNGs and an npz of the same pixels are
augmented alike, and the one augmented tensor is what both student and teacher see (label-free
distillation of detectors and segmenters stays consistent). Inputs up to `PAD_CROP_MAX_SIDE`
pixels a side get the CIFAR recipe (pad by an eighth of the side with black, crop back at a
random offset); larger ones the ImageNet recipe (a random crop of 8-100% of the area, aspect
3/4-4/3, resized back bilinearly). Every sample draws from a generator seeded with
(seed, epoch, index): the same sample is augmented the same way whichever worker process, and
however many, prepares it, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_mbs.data.preprocess import Preprocess, resize
from onnx_mbs.passes.errors import BadInputError, option

AUGMENT_CHOICES = ("auto", "none", "standard")
PAD_CROP_MAX_SIDE = 64
RESIZED_CROP_AREA = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Augment:
    """One augmentation recipe for one model input (NCHW or NHWC)."""

    size: tuple[int, int]  # (H, W)
    pad: int  # > 0: crop with padding; 0: random resized crop
    fill: tuple[float, ...]  # per channel: a black pixel in model-input units
    layout: str = "NCHW"
    flip: bool = True

    def describe(self) -> str:
        h, w = self.size
        if self.pad:
            crop = f"random {h}x{w} crop of the input padded by {self.pad} px of black"
        else:
            low, high = RESIZED_CROP_AREA
            crop = (
                f"random resized crop ({low:.0%}-{high:.0%} of the area, aspect 3/4-4/3) "
                f"back to {h}x{w}"
            )
        flip = ", horizontal flip" if self.flip else ""
        return f"standard: {crop}{flip}; per-sample seeds from (seed, epoch, index)"

    def __call__(self, x: np.ndarray, indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """Augmented copies of the samples `x` (a batch), sample i seeded by its dataset index."""
        nchw = x.transpose(0, 3, 1, 2) if self.layout == "NHWC" else x
        out = np.empty_like(nchw)
        for k, index in enumerate(indices):
            rng = np.random.default_rng([seed, epoch, int(index)])
            sample = self._crop(nchw[k], rng)
            out[k] = sample[:, :, ::-1] if self.flip and rng.random() < 0.5 else sample
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1) if self.layout == "NHWC" else out)

    def _crop(self, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = self.size
        if self.pad:
            p = self.pad
            dy, dx = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
            padded = np.empty((sample.shape[0], h + 2 * p, w + 2 * p), sample.dtype)
            padded[:] = np.asarray(self.fill, sample.dtype).reshape(-1, 1, 1)
            padded[:, p : p + h, p : p + w] = sample
            return padded[:, dy : dy + h, dx : dx + w]
        top, left, ch, cw = _resized_crop_box(h, w, rng)
        return resize(sample[None, :, top : top + ch, left : left + cw], (h, w))[0]


def _resized_crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop draws them."""
    area = h * w
    low, high = (math.log(r) for r in RESIZED_CROP_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*RESIZED_CROP_AREA)
        ratio = math.exp(rng.uniform(low, high))
        cw = round(math.sqrt(target * ratio))
        ch = round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w  # the whole input, as torchvision falls back to a central crop


def choose_augment(
    choice: str, input_shape: tuple[int, ...], preprocess: Preprocess | None
) -> Augment | None:
    """The recipe `choice` names for this input ("auto": standard for image data, i.e. pixels
    read from an image folder, npz or IDX files, to an (N, C, H, W) or (N, H, W, C) input;
    none for anything else, e.g. arrays given as model inputs)."""
    if choice not in AUGMENT_CHOICES:
        raise BadInputError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}, not {choice!r}")
    if choice == "auto" and (preprocess is None or len(input_shape) != 4):
        return None
    if choice == "none":
        return None
    layout = preprocess.layout if preprocess is not None else "NCHW"
    if len(input_shape) != 4:
        raise BadInputError(
            f"{option('--augment', 'standard')} needs image inputs (N, C, H, W) or "
            f"(N, H, W, C); this input has shape {tuple(input_shape)}: use "
            f"{option('--augment', 'none')}"
        )
    c, h, w = input_shape[1:] if layout == "NCHW" else (input_shape[3], *input_shape[1:3])
    if preprocess is not None:
        fill = tuple(-m / s for m, s in zip(preprocess.mean, preprocess.std, strict=True))
    else:
        fill = (0.0,) * c
    pad = max(1, round(min(h, w) / 8)) if max(h, w) <= PAD_CROP_MAX_SIDE else 0
    return Augment(size=(h, w), pad=pad, fill=fill, layout=layout)
