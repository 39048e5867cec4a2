"""onnxruntime latency of reduced models: against their MACs, and against a latency budget.

Zoo models in deploy form (BN folded), random weights (latency does not depend
on them), statistics on 8 random images. Each is reduced with MBS twice:
`--budget flops=0.5` and `--budget latency=0.6` (planned with measured conv
times on the CPU provider, then checked on the written model). Afterwards the
original and both reduced models are timed in one process, taking turns run
by run, batch 1, the fastest run of each (least disturbed by other load).
onnxruntime runs with --threads intra-op threads, 1 by default: on a shared,
overloaded 2-core machine multi-threaded runs wait on each other's threads
and their times scatter several-fold.

- flops=0.5: measured speedup (original / reduced time) against the MACs
  ratio (original / reduced MACs); 1.0 would mean time falls exactly with MACs.
- latency=0.6: the measured time fraction (reduced / original) in this final
  timing, and whether it lies within 10% of 0.6.

    python bench/latency.py [--runs 60] [--threads 1] [--models resnet50 mobilenet_v2 ...]

ImageNet models run at 224x224 (ResNet-50, MobileNetV2) or 112x112 (the rest,
to bound the run time on 2 shared cores); CIFAR models at 32x32.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from onnx_mbs.latency import measure_models
from onnx_mbs.models.export import export_zoo
from onnx_mbs.passes import BadInputError
from onnx_mbs.pipeline import reduce

MODELS = {
    "resnet20": (1, 3, 32, 32),
    "resnet56": (1, 3, 32, 32),
    "resnet110": (1, 3, 32, 32),
    "densenet_bc": (1, 3, 32, 32),
    "resnet18": (1, 3, 112, 112),
    "resnet50": (1, 3, 224, 224),
    "resnet101": (1, 3, 112, 112),
    "mobilenet_v2": (1, 3, 224, 224),
    "shufflenet_v2": (1, 3, 112, 112),
}
ASKED = 0.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="timed runs per model, in turns")
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads (0: one per core)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="bench/results/latency.json")
    args = parser.parse_args()
    rows = []
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            shape = MODELS[name]
            model = export_zoo(name, "deploy", shape)
            data = Path(folder) / f"{name}.npz"
            rng = np.random.default_rng(0)
            np.savez(data, x=rng.integers(0, 256, (8, *shape[1:]), dtype=np.uint8))
            reduced = {}
            for budget in ("flops=0.5", f"latency={ASKED}"):
                start = time.perf_counter()
                try:
                    small, report = reduce(
                        model,
                        str(data),
                        budget=budget,
                        providers="cpu",
                        latency_threads=args.threads,
                        progress=False,
                    )
                except BadInputError as error:  # recorded, not hidden
                    small, report = None, str(error)
                reduced[budget] = (small, report, time.perf_counter() - start)
            (flops_model, flops_report, _), (lat_model, lat_report, lat_s) = reduced.values()
            models = [model, flops_model] + ([lat_model] if lat_model is not None else [])
            times = measure_models(
                models, ["CPUExecutionProvider"], runs=args.runs, threads=args.threads
            )
            t_orig, t_flops = times[:2]
            t_lat = times[2] if lat_model is not None else float("nan")
            reached = lat_report.plan.reached if lat_model is not None else {}
            rows.append(
                {
                    "model": name,
                    "input": list(shape),
                    "orig_ms": 1e3 * t_orig,
                    "flops_ms": 1e3 * t_flops,
                    "macs_ratio": flops_report.before.total_macs / flops_report.after.total_macs,
                    "speedup": t_orig / t_flops,
                    "latency_ms": 1e3 * t_lat,
                    "latency_fraction": t_lat / t_orig,
                    "latency_fraction_at_reduce": reached.get("latency", float("nan")),
                    "latency_params_kept": reached.get("params", float("nan")),
                    "latency_reduce_s": lat_s,
                    "notes": lat_report.plan.notes if lat_model is not None else [lat_report],
                }
            )
            load.append(os.getloadavg())
    print(f"load average (1, 5, 15 min) at start and after each model: {load}")
    print(f"onnxruntime CPU provider, {args.threads or 'default'} intra-op threads, batch 1")
    print(
        f"{'model':<14}{'input':>6}{'orig ms':>9}{'flops=0.5 ms':>13}{'MACs ratio':>11}"
        f"{'speedup':>8}{'speedup/MACs':>13}{'latency=0.6 ms':>15}{'fraction':>9}"
        f"{'at reduce':>10}{'within 10%':>11}{'reduce s':>9}"
    )
    for r in rows:
        within = abs(r["latency_fraction"] / ASKED - 1) <= 0.1
        print(
            f"{r['model']:<14}{r['input'][-1]:>6}{r['orig_ms']:>9.2f}{r['flops_ms']:>13.2f}"
            f"{r['macs_ratio']:>11.2f}{r['speedup']:>8.2f}{r['speedup'] / r['macs_ratio']:>13.2f}"
            f"{r['latency_ms']:>15.2f}{r['latency_fraction']:>9.3f}"
            f"{r['latency_fraction_at_reduce']:>10.3f}{str(within):>11}"
            f"{r['latency_reduce_s']:>9.1f}"
        )
    hits = sum(abs(r["latency_fraction"] / ASKED - 1) <= 0.1 for r in rows)
    print(f"latency={ASKED}: within 10% on {hits} of {len(rows)} models (final timing)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load": load, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
