"""The bundled model and data as a deployment engineer meets them: a BN-folded graph and
a folder of images without labels (the README's quick start and scripts/demo.sh).

    python -m onnx_mbs.models.deployment_form out/folded.onnx images/

writes the bundled ResNet-20 with each BatchNorm folded into its Conv by onnxruntime's
basic graph optimisations (as shipped models are), and the 2,048 bundled training
images as PNG files in one folder, no class sub-folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from onnx_mbs.models import BUNDLED_MODEL, FMNIST_TRAIN_SAMPLE


def fold_batchnorm(model: Path, output: Path) -> None:
    """`model` as onnxruntime's basic optimisations leave it: BatchNorm folded into Conv."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(output)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def write_images(samples: Path, folder: Path) -> int:
    """The uint8 images `x` of an (N, 1, H, W) npz as grayscale PNGs; how many."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(samples) as data:
        x = data["x"]
    for k, image in enumerate(x):
        Image.fromarray(np.asarray(image[0], np.uint8), mode="L").save(folder / f"{k:05d}.png")
    return len(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="where to write the BN-folded model")
    parser.add_argument("images", type=Path, help="folder to write the unlabelled images to")
    args = parser.parse_args(argv)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    fold_batchnorm(BUNDLED_MODEL, args.model)
    count = write_images(FMNIST_TRAIN_SAMPLE, args.images)
    print(f"wrote {args.model} (BatchNorm folded) and {count} images in {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
