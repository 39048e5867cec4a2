"""Does image-folder retraining keep up with the same images in an npz?

Writes the first `--images` Fashion-MNIST training images as PNG files (one sub-folder per class)
and as an npz, then retrains the bundled ResNet-20 reduced to params=0.5 for one epoch on each,
alternating folder and npz `--rounds` times, with the defaults of `onnx-mbs retrain` (standard
augmentation, --workers = the cores, batch 64). The folder is decoded by the worker processes
while the training process trains; the npz is held in memory and preprocessed a batch at a time
by the same workers. Reported: the median training images/s of each and their ratio, with the
load average before and after (the machine is shared: a busy one lowers both).

    python bench/retrain_loading.py [--images 4096] [--rounds 3] [--threads 2]
        [--out bench/results/retrain_loading.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from onnx_mbs.bridge import retrain
from onnx_mbs.data import idx
from onnx_mbs.data.sources import default_workers
from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE
from onnx_mbs.passes import load_model
from onnx_mbs.pipeline import open_for_model, reduce

DATA = Path("/usr/share/datasets/fashion-mnist")


def write_copies(count: int, root: Path) -> tuple[Path, Path]:
    """The first `count` training images as a PNG folder and as an npz (same pixels)."""
    images, labels = idx.find_split(DATA, "train")
    x = idx.read_idx(images)[:count]
    y = idx.read_idx(labels)[:count]
    folder = root / "folder"
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        (folder / f"{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{label}" / f"{i:05d}.png")
    # The folder lists class by class; the npz holds the same samples in the same order.
    order = sorted(range(count), key=lambda i: (int(y[i]), f"{i:05d}"))
    npz = root / "same.npz"
    np.savez(npz, x=x[order], y=y[order])
    return folder, npz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="default: the cores")
    p.add_argument("--out", default="bench/results/retrain_loading.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    small, _ = reduce(
        BUNDLED_MODEL, str(FMNIST_SAMPLE), budget="params=0.5", providers="cpu", progress=False
    )
    teacher = onnx.load(BUNDLED_MODEL)
    load_before = os.getloadavg()
    speeds: dict[str, list[float]] = {"folder": [], "npz": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder, npz = write_copies(args.images, Path(tmp))
        sources = {
            k: open_for_model(str(v), load_model(small))
            for k, v in (("folder", folder), ("npz", npz))
        }
        for _ in range(args.rounds):
            for kind, source in sources.items():
                result = retrain(
                    small,
                    source,
                    teacher=teacher,
                    epochs=1,
                    seed=0,
                    device="cpu",
                    progress=False,
                    workers=args.workers,
                )
                speeds[kind].append(result.images_per_second)
                print(
                    f"{kind}: {result.images_per_second:.0f} images/s ({result.augment})",
                    flush=True,
                )
    load_after = os.getloadavg()
    median = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = median["folder"] / median["npz"]
    results = {
        "command": "python " + " ".join(sys.argv),
        "images": args.images,
        "threads": args.threads,
        "workers": args.workers if args.workers is not None else default_workers(),
        "cpu_count": os.cpu_count(),
        "images_per_second": speeds,
        "median_images_per_second": median,
        "folder_over_npz": ratio,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"image folder / npz throughput: {ratio:.2f}x (median {median['folder']:.0f} vs "
        f"{median['npz']:.0f} images/s); load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
