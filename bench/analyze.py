"""Analyze time against onnx.load + shape inference of the same file (issue 2).

For CIFAR ResNet-56/110/1202 (deploy form): the time of `onnx-mbs analyze`'s
work (load_model: read, check, fix shapes, infer shapes; then analyze_model),
beside plain `onnx.load` + `onnx.shape_inference.infer_shapes`, as a ratio, and
the time per graph node (cost must grow linearly: ResNet-1202's per-node time
within 1.5x of ResNet-110's). Also the share of analyze time spent normalising
the graph (`normalise`: Constants to initializers, Identity on weights, names,
dynamic dims; target <= 10% on ResNet-1202) and its cost per node.
Medians of interleaved repeats.

Writes bench/results/analyze.json with the load average at start and end (the
machine is shared: compare the ratio, measured alternating in one run).

    python bench/analyze.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import onnx

from onnx_mbs.models.export import export_zoo
from onnx_mbs.passes import analyze_model, load_model, normalise

MODELS = ["resnet56", "resnet110", "resnet1202"]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/analyze.json")
    args = parser.parse_args()
    rows = []
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            path = Path(folder) / f"{name}.onnx"
            onnx.save(export_zoo(name, "deploy", (1, 3, 32, 32)), path)
            nodes = len(onnx.load(path).graph.node)
            loaded = load_model(path)
            raw = onnx.load(path)
            ours, peer, passes, norm = [], [], [], []
            for _ in range(args.repeats):
                ours.append(_time(lambda p=path: analyze_model(load_model(p))))
                peer.append(_time(lambda p=path: onnx.shape_inference.infer_shapes(onnx.load(p))))
                passes.append(_time(lambda m=loaded: analyze_model(m)))
                norm.append(_time(lambda m=raw: normalise(m)))
            rows.append((name, nodes, *map(statistics.median, (ours, peer, passes, norm))))
    print(
        f"{'model':<12}{'nodes':>7}{'analyze s':>11}{'load+infer s':>14}{'ratio':>8}"
        f"{'passes us/node':>16}{'total us/node':>15}{'normalise %':>13}{'norm us/node':>14}"
    )
    for name, nodes, ours, peer, passes, norm in rows:
        print(
            f"{name:<12}{nodes:>7}{ours:>11.3f}{peer:>14.3f}{ours / peer:>8.2f}"
            f"{1e6 * passes / nodes:>16.1f}{1e6 * ours / nodes:>15.1f}"
            f"{100 * norm / ours:>13.1f}{1e6 * norm / nodes:>14.1f}"
        )
    by_name = {r[0]: r for r in rows}
    big, mid = by_name["resnet1202"], by_name["resnet110"]
    print(
        f"resnet1202: analyze {big[2]:.2f} s (target <= 1.0 s); the analysis passes' cost per "
        f"node, 1202 vs 110: {(big[4] / big[1]) / (mid[4] / mid[1]):.2f}x (target <= 1.5x); "
        f"total per node {(big[2] / big[1]) / (mid[2] / mid[1]):.2f}x, plain onnx.load + "
        f"shape inference {(big[3] / big[1]) / (mid[3] / mid[1]):.2f}x"
    )
    print(f"ratio analyze / (onnx.load + shape inference), resnet1202: {big[2] / big[3]:.2f}")
    print(
        f"normalise: {100 * big[5] / big[2]:.1f}% of analyze time on resnet1202 (target <= 10%); "
        f"per node, 1202 vs 110: {(big[5] / big[1]) / (mid[5] / mid[1]):.2f}x (linear: ~1x)"
    )
    load.append(os.getloadavg())
    print(f"load average (1, 5, 15 min) at start and end: {load}")
    keys = ("model", "nodes", "analyze_s", "load_infer_s", "passes_s", "normalise_s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"load": load, "rows": [dict(zip(keys, r)) for r in rows]}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
