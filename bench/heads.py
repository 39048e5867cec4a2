"""Label-free retraining of a detector and a dense-map graph: does agreement with the teacher rise?

The zoo's YOLO-style detector (multi-scale heads decoded with Sigmoid/Split/Concat into one
(batch, boxes, 9) output) and DBNet-style text detector (FPN, two ConvTranspose heads giving
probability and threshold maps), random weights with BatchNorm statistics measured on the training
images, exported BN-folded (deployment form). Each is reduced at params=0.7 and retrained without
labels (distillation from the original on every output) on bundled Fashion-MNIST training
images resized to 64x64 RGB; agreement is measured with onnxruntime on the 512 held-out bundled
test images (`onnx-mbs eval --teacher` metrics): relative error ||s - t|| / ||t|| and cosine
similarity per output, and for the probability map the IoU of the maps thresholded at 0.5.

    python bench/heads.py [--seeds 1] [--train 512] [--epochs 2] [--out bench/results/heads.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from onnx_mbs.bridge import retrain
from onnx_mbs.data import to_arrays
from onnx_mbs.data.fit import open_for_model
from onnx_mbs.evaluate import agreement
from onnx_mbs.models import FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE
from onnx_mbs.models.export import export_head_model
from onnx_mbs.passes import load_model
from onnx_mbs.pipeline import reduce

PROVIDERS = ["CPUExecutionProvider"]


def measure(model, teacher, test) -> dict:
    result = agreement(model, teacher, test, PROVIDERS, batch_size=64, progress=False)
    return {
        o.name: {"relative_error": o.relative_error, "cosine": o.cosine, "iou": o.iou}
        for o in result.outputs
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--train", type=int, default=512, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", default="bench/results/heads.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    results: dict = {"command": "python " + " ".join(sys.argv), "models": {}}
    for name in ("yolo_tiny", "dbnet_tiny"):
        shaped = load_model(export_head_model(name))
        train = open_for_model(str(FMNIST_TRAIN_SAMPLE), shaped, mean=[0.5] * 3, std=[0.25] * 3)
        x, _ = to_arrays(train)
        x = x[: args.train]
        teacher = export_head_model(name, calibration=torch.from_numpy(x))
        test = open_for_model(str(FMNIST_SAMPLE), shaped, mean=[0.5] * 3, std=[0.25] * 3)
        small, report = reduce(
            teacher,
            [{"input": x[i : i + 64]} for i in range(0, 256, 64)],
            budget="params=0.7",
            providers="cpu",
            evaluate_accuracy=False,
            progress=False,
        )
        before = measure(small, teacher, test)
        runs = []
        for seed in range(args.seeds):
            result = retrain(
                small,
                (x, None),
                teacher=teacher,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=32,
                seed=seed,
                progress=False,
            )
            runs.append(measure(result.model, teacher, test))
        entry = {
            "params_kept": report.plan.reached["params"],
            "bn_reinserted": result.bn_reinserted,
            "losses": result.losses,
            "before": before,
            "after": runs,
        }
        results["models"][name] = entry
        for output, b in before.items():
            for metric in ("relative_error", "cosine", "iou"):
                if b[metric] is None:
                    continue
                after = [r[output][metric] for r in runs]
                print(
                    f"{name:<11} {output:<11} {metric:<15} {b[metric]:.4f} -> "
                    f"{statistics.mean(after):.4f}"
                    + (f" (min {min(after):.4f}, max {max(after):.4f})" if len(after) > 1 else "")
                )
    results["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
