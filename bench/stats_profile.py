"""Where the statistics' time goes on a provider: onnxruntime's profiler, per op and provider.

ResNet-50 at 224, batch 64, random weights and images. Four sessions, each warmed up three runs
then timed over ten runs of the same batch: the plain model; the instrumented copy that
`collect_stats` runs (every Relu watched, counts only) with the GlobalAveragePool and with the
ReduceMean spatial mean; and one Relu watched. Prints the median run time and kernel time per
op type and provider (summed over the 13 profiled runs).

    python bench/stats_profile.py [--providers cuda]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import numpy as np
import onnxruntime as ort
import torch

from onnx_mbs.instrument import instrument
from onnx_mbs.models.export import export_onnx
from onnx_mbs.models.zoo import ZOO
from onnx_mbs.runtime import choose_providers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default="cuda", help="auto, cpu or cuda")
    args = p.parse_args()
    providers = choose_providers(args.providers)
    torch.manual_seed(0)
    model = export_onnx(ZOO["resnet50"].build(), (64, 3, 224, 224))
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    x = np.random.default_rng(0).random((64, 3, 224, 224), dtype=np.float32)
    shapes = {model.graph.input[0].name: x.shape}
    variants = {
        "plain": model,
        "stats_pool": instrument(model, relus, shapes, False, "pool")[0],
        "stats_reduce": instrument(model, relus, shapes, False, "reduce")[0],
        "stats_one_relu": instrument(model, relus[-1:], shapes, False, "pool")[0],
    }
    for name, variant in variants.items():
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = f"/tmp/onnx_mbs_profile_{name}"
        options.log_severity_level = 3
        session = ort.InferenceSession(variant.SerializeToString(), options, providers=providers)
        feed = {session.get_inputs()[0].name: x}
        for _ in range(3):
            session.run(None, feed)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        path = session.end_profiling()
        with open(path) as f:
            events = json.load(f)
        os.remove(path)
        by_op: collections.Counter = collections.Counter()
        by_provider: collections.Counter = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"].get("op_name")] += event["dur"]
                by_provider[event["args"].get("provider")] += event["dur"]
        print(
            f"{name} median run ms {1000 * np.median(times):.2f} "
            f"outputs {len(session.get_outputs())}"
        )
        print("  by provider us (13 runs):", dict(by_provider))
        print("  top ops us:", by_op.most_common(8))


if __name__ == "__main__":
    main()
