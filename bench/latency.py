"""onnxruntime latency of reduced models against the MACs they save (issue 4).

ResNet-56 (CIFAR, 32x32) and ResNet-50 (224x224), deploy form (BN folded),
random weights, reduced with MBS at --budget params=0.5 (statistics on a few
random images: latency does not depend on the weights). Batch 1 on the CPU
provider, interleaved repeats of N runs, medians. The measured speedup
(original / reduced latency) is set against the MACs ratio (original /
reduced MACs): 1.0 would mean time falls exactly with MACs.

    python bench/latency.py [--runs 50] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_mbs.models.export import export_zoo
from onnx_mbs.pipeline import reduce

MODELS = {"resnet56": (1, 3, 32, 32), "resnet50": (1, 3, 224, 224)}


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _latency(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: x})  # warm-up
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, {name: x})
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, shape in MODELS.items():
            model = export_zoo(name, "deploy", shape)
            data = Path(folder) / f"{name}.npz"
            rng = np.random.default_rng(0)
            np.savez(data, x=rng.integers(0, 256, (8, *shape[1:]), dtype=np.uint8))
            small, report = reduce(
                model,
                str(data),
                budget="params=0.5",
                providers="cpu",
                evaluate_accuracy=False,
                progress=False,
            )
            x = rng.standard_normal(shape).astype(np.float32)
            big_s, small_s = _session(model, args.threads), _session(small, args.threads)
            runs = max(5, args.runs // (20 if name == "resnet50" else 1))
            t_big, t_small = [], []
            for _ in range(args.repeats):
                t_big.append(_latency(big_s, x, runs))
                t_small.append(_latency(small_s, x, runs))
            macs_ratio = report.before.total_macs / report.after.total_macs
            params_kept = report.after.total_params / report.before.total_params
            rows.append(
                (
                    name,
                    params_kept,
                    macs_ratio,
                    statistics.median(t_big),
                    statistics.median(t_small),
                )
            )
    print(
        f"{'model':<10}{'params kept':>12}{'MACs ratio':>11}{'orig ms':>9}{'reduced ms':>11}"
        f"{'speedup':>9}{'speedup/MACs':>14}"
    )
    for name, kept, macs_ratio, t_big, t_small in rows:
        speedup = t_big / t_small
        print(
            f"{name:<10}{kept:>12.3f}{macs_ratio:>11.2f}{1e3 * t_big:>9.2f}"
            f"{1e3 * t_small:>11.2f}{speedup:>9.2f}{speedup / macs_ratio:>14.2f}"
        )
    print(
        "speedup / MACs ratio: "
        + ", ".join(
            f"{name} {(t_big / t_small) / macs_ratio:.2f}"
            for name, _, macs_ratio, t_big, t_small in rows
        )
    )


if __name__ == "__main__":
    main()
