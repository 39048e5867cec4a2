"""The reductions MBS plans at the default gamma (0.5, no budget), beside the paper's.

For the paper's architectures (CIFAR ResNet-20/56/110/1202 at 3x32x32; ResNet-101, MobileNetV2
and ShuffleNetV2 at 3x224x224) this exports the zoo model with seeded random weights (random but
tame BatchNorm, `onnx_mbs.models.export.build_zoo_model`), reduces it with `onnx_mbs.reduce` at
gamma 0.5, and prints parameters and MACs before/after with the paper's reported reductions.

What differs from the paper, and why the numbers need not match:
- weights are random, not trained, and the statistics come from a few Fashion-MNIST test images
  (resized and replicated to 3 channels by open_data) instead of CIFAR-10/ImageNet: both change
  the activation ratios rho. The receptive-field part of MBS (which layers form each
  macroblock's base) depends only on the architecture;
- the paper's "MobileNet"/"ShuffleNet" rows need not be the zoo's MobileNetV2/ShuffleNetV2;
  the arXiv v1 abstract reports MobileNet 25.53%, the CVPR 2019 version MobileNetV2 25.03%;
- kept channel counts are rounded to multiples of 8 (the project's default);
- the paper's reductions are of the whole model's parameters, as are ours.

    python bench/paper_table.py                 # all models, 64 calibration images
    python bench/paper_table.py --models resnet20 resnet56 --limit 32
    python bench/paper_table.py --imagenet-size 112   # cheaper ResNet-101/MobileNet/ShuffleNet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from onnx_mbs.models.export import build_zoo_model, export_onnx
from onnx_mbs.models.train import FMNIST_DIR
from onnx_mbs.models.zoo import get_entry
from onnx_mbs.pipeline import reduce

HERE = Path(__file__).resolve().parent
# model -> (paper's parameter reduction in %, what the paper reports it on)
PAPER: dict[str, tuple[float | None, str]] = {
    "resnet20": (None, "CIFAR-10 (not quoted here)"),
    "resnet56": (None, "CIFAR-10 (not quoted here)"),
    "resnet110": (None, "CIFAR-10 (not quoted here)"),
    "resnet1202": (72.71, "CIFAR-10"),
    "resnet101": (51.67, "ImageNet"),
    "mobilenet_v2": (25.53, "ImageNet, 'MobileNet' (arXiv v1; CVPR version: MobileNetV2 25.03)"),
    "shufflenet_v2": (20.74, "ImageNet, 'ShuffleNet'"),
}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Export `name` with random weights, reduce it at gamma 0.5, return the row."""
    entry = get_entry(name)
    shape = entry.input_shape
    if shape[-1] == 224 and args.imagenet_size != 224:
        shape = (1, 3, args.imagenet_size, args.imagenet_size)
    t0 = time.perf_counter()
    proto = export_onnx(build_zoo_model(name, args.seed), shape, form="train")
    export_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, report = reduce(
        proto,
        f"{args.data}:test",
        gamma=args.gamma,
        strategy="mbs",
        providers=args.providers,
        limit=args.limit,
        batch_size=args.batch_size,
        evaluate_accuracy=False,
        progress=False,
    )
    reduce_seconds = time.perf_counter() - t0
    before, after = report.before, report.after
    paper, paper_on = PAPER.get(name, (None, ""))
    return {
        "model": name,
        "input_shape": list(shape),
        "params_before": before.total_params,
        "params_after": after.total_params,
        "smaller_percent": 100 * (1 - after.total_params / before.total_params),
        "macs_before": before.total_macs,
        "macs_after": after.total_macs,
        "macs_smaller_percent": 100 * (1 - after.total_macs / before.total_macs),
        "paper_smaller_percent": paper,
        "paper_setting": paper_on,
        "gamma": report.plan.gamma,
        "macroblocks": [
            {
                "index": m.index,
                "resolution": list(m.resolution),
                "effective_flops": m.effective_flops,
                "base_effective_flops": m.base_effective_flops,
                "redundancy": m.redundancy,
                "beta": m.beta,
            }
            for m in report.plan.macroblocks
        ],
        "samples": report.samples,
        "data": report.data,
        "preprocessing": report.preprocessing,
        "pinned": report.pinned,
        "export_seconds": export_seconds,
        "reduce_seconds": reduce_seconds,
        "reduce_timings": report.timings,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| model | input | params before | params after | % smaller (ours) | "
        "% smaller (paper) | MACs before | MACs after | beta per macroblock |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        paper = "-" if r["paper_smaller_percent"] is None else f"{r['paper_smaller_percent']:.2f}"
        betas = " ".join(f"{m['beta']:.2f}" for m in r["macroblocks"])
        print(
            f"| {r['model']} | {'x'.join(map(str, r['input_shape'][1:]))} | "
            f"{r['params_before']:,} | {r['params_after']:,} | {r['smaller_percent']:.2f} | "
            f"{paper} | {r['macs_before'] / 1e6:,.1f}M | {r['macs_after'] / 1e6:,.1f}M | "
            f"{betas} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PAPER))
    parser.add_argument("--limit", type=int, default=64, help="calibration images per model")
    parser.add_argument("--batch-size", type=int, default=16, help="statistics batch size")
    parser.add_argument("--imagenet-size", type=int, default=224, help="ImageNet models' input")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="random weights seed")
    parser.add_argument("--providers", default="auto")
    parser.add_argument("--data", default=str(FMNIST_DIR), help="Fashion-MNIST IDX folder")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "paper_table.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        row = run_model(name, args)
        rows.append(row)
        print(
            f"{name}: {row['params_before']:,} -> {row['params_after']:,} params "
            f"({row['smaller_percent']:.2f}% smaller), {row['reduce_seconds']:.0f}s",
            flush=True,
        )
    result = {
        "settings": {
            "gamma": args.gamma,
            "budget": None,
            "strategy": "mbs",
            "weights": f"random (zoo build_zoo_model seed {args.seed}, random tame BatchNorm)",
            "form": "train (BatchNorm kept)",
            "calibration": f"{args.limit} Fashion-MNIST test images, batch {args.batch_size}",
            "imagenet_size": args.imagenet_size,
            "providers": args.providers,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "differences_from_paper": [
            "random (untrained) weights instead of trained ones: changes rho",
            "Fashion-MNIST images resized and replicated to 3 channels instead of "
            "CIFAR-10/ImageNet: changes rho",
            "the receptive-field part (each macroblock's base) depends only on the architecture",
            "zoo MobileNetV2/ShuffleNetV2 may differ from the paper's MobileNet/ShuffleNet",
            "channel counts rounded to multiples of 8",
        ],
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(rows)
    print(f"\ntotal {result['total_seconds']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
