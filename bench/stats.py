"""Cost of collecting activation statistics, relative to plain inference.

ResNet-56 (CIFAR, random weights), 2048 random 32x32x3 images, batch 64, all
Relu outputs watched, CPU provider with onnxruntime's default threads.

End to end, each repeat times back to back, in rotating order:

  plain   make_session + run every batch (the original model)
  stats   collect_stats (instrument + make_session + run + host sums), counting
          x > 0 only: what `reduce` runs by default
  stats+abs  the same with magnitudes (sum |x|), what `--importance act` runs
  naive   Greater->Cast->ReduceSum and Abs->ReduceSum over axes (0, 2, 3), the
          obvious instrumentation, kept to show why stats.py does otherwise
          (onnxruntime has to convert its NCHWc layout back to NCHW for it)

Per batch, paired: one more collect_stats run whose data source runs the
plain model on each batch just before handing it over, so both times of a
batch are taken within milliseconds of each other. On a shared machine this
pairing is far less noisy than whole runs seconds apart. On CUDA, alternating
two sessions costs each some speed, so per batch alone is measured too: one
collect_stats run, then one plain session over the same batches, as `reduce`
runs them (medians of batches 2..n).

Only ratios measured in one run are compared. The last line prints the
end-to-end median ratio of collect_stats over plain inference.

    python bench/stats.py [--repeats 3] [--images 2048] [--providers cpu|cuda]
                          [--model resnet56|resnet50] [--json PATH]

`--providers cuda` runs everything on onnxruntime's CUDA provider (GPU machines); `--model
resnet50` uses ImageNet ResNet-50 at 224x224 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.data import Batch, DataSource, open_data
from onnx_mbs.models.export import export_onnx
from onnx_mbs.models.zoo import ZOO
from onnx_mbs.runtime import choose_providers, make_session, session_provider
from onnx_mbs.stats import ActivationStats, collect_stats

BATCH = 64
SIZES = {"resnet56": 32, "resnet50": 224}


def plain(model: onnx.ModelProto, data: DataSource, providers: list[str]) -> None:
    session = make_session(model, providers)
    for batch in data.batches(BATCH):
        session.run(None, {data.input_name: batch.x})


def naive_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.output[:]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 2, 3], np.int64), "naive/axes"),
            numpy_helper.from_array(np.array(0, np.float32), "naive/zero"),
        ]
    )
    for i, t in enumerate(tensors):
        p = f"naive/{i}/"
        graph.node.extend(
            [
                helper.make_node("Greater", [t, "naive/zero"], [p + "gt"]),
                helper.make_node("Cast", [p + "gt"], [p + "f"], to=TensorProto.FLOAT),
                helper.make_node("ReduceSum", [p + "f", "naive/axes"], [p + "pos"], keepdims=0),
                helper.make_node("Abs", [t], [p + "abs"]),
                helper.make_node("ReduceSum", [p + "abs", "naive/axes"], [p + "sum"], keepdims=0),
            ]
        )
        graph.output.extend(
            helper.make_tensor_value_info(p + n, TensorProto.FLOAT, [None]) for n in ("pos", "sum")
        )
    return out


def naive(
    model: onnx.ModelProto, tensors: list[str], data: DataSource, providers: list[str]
) -> float:
    """Run the naive instrumentation; return how many watched elements were > 0."""
    session = make_session(naive_model(model, tensors), providers)
    positive = 0.0
    for batch in data.batches(BATCH):
        results = session.run(None, {data.input_name: batch.x})
        positive += sum(float(r.astype(np.float64).sum()) for r in results[0::2])
    return positive


def elements_per_sample(model: onnx.ModelProto, tensors: list[str]) -> float:
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred}
    return float(sum(np.prod(shapes[t][1:]) for t in tensors))


def overall_rho(stats: ActivationStats) -> float:
    positive = sum(s.positive.sum() for s in stats.tensors.values())
    elements = sum(s.elements_per_channel * s.channels for s in stats.tensors.values())
    return float(positive / elements)


class TimedSource:
    """Hands `data` to collect_stats and times what it spends on each batch (run + host sums).

    With `model`, that model runs on each batch just before it is handed over (paired).
    The clock stops when collect_stats asks for the next batch, before the source makes
    it: making a batch is charged to neither side. The first interval also holds
    instrumenting and session creation, so it is reported apart.
    """

    def __init__(
        self, data: DataSource, model: onnx.ModelProto | None = None, providers: list[str] = ()
    ) -> None:
        self.data = data
        self.session = None if model is None else make_session(model, providers)
        self.description = data.description
        self.preprocess = data.preprocess
        self.input_name = data.input_name
        self.plain: list[float] = []
        self.stats: list[float] = []

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        source = self.data.batches(batch_size)
        handed = None
        while True:
            asked = time.perf_counter()
            if handed is not None:
                self.stats.append(asked - handed)
            batch = next(source, None)
            if batch is None:
                return
            if self.session is not None:
                start = time.perf_counter()
                self.session.run(None, {self.input_name: batch.x})
                self.plain.append(time.perf_counter() - start)
            handed = time.perf_counter()
            yield batch


def plain_per_batch(model: onnx.ModelProto, data: DataSource, providers: list[str]) -> list[float]:
    """Seconds per batch of plain inference, one session over all of `data`."""
    session = make_session(model, providers)
    times = []
    for batch in data.batches(BATCH):
        start = time.perf_counter()
        session.run(None, {data.input_name: batch.x})
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--providers", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", choices=sorted(SIZES), default="resnet56")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--spatial-mean",
        choices=["pool", "reduce"],
        default="pool",
        help="the instrumentation's spatial mean (collect_stats' default: pool)",
    )
    args = parser.parse_args()
    mean = args.spatial_mean
    providers = choose_providers(args.providers)
    size = SIZES[args.model]

    torch.manual_seed(0)
    model = export_onnx(ZOO[args.model].build(), (BATCH, 3, size, size))
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    images = np.random.default_rng(0).random((args.images, 3, size, size), dtype=np.float32)
    input_name = model.graph.input[0].name
    data = open_data([{input_name: images}], input_name, (BATCH, 3, size, size))
    per_sample = elements_per_sample(model, relus)

    load = [os.getloadavg()]  # the machine's load beside the figures (1, 5, 15 min)
    times: dict[str, list[float]] = {"plain": [], "stats": [], "stats+abs": [], "naive": []}
    rho: dict[str, float] = {}
    for repeat in range(args.repeats):
        turn = repeat % len(times)
        order = list(times)[turn:] + list(times)[:turn]
        for name in order:
            start = time.perf_counter()
            if name == "plain":
                plain(model, data, providers)
            elif name.startswith("stats"):
                stats = collect_stats(
                    model,
                    relus,
                    data,
                    providers,
                    BATCH,
                    False,
                    magnitudes=name == "stats+abs",
                    spatial_mean=mean,
                )
                rho[name] = overall_rho(stats)
            else:
                rho[name] = naive(model, relus, data, providers) / (len(data) * per_sample)
            times[name].append(time.perf_counter() - start)

    paired = TimedSource(data, model, providers)
    ran_on = session_provider(paired.session)
    collect_stats(
        model, relus, paired, providers, BATCH, progress=False, magnitudes=False, spatial_mean=mean
    )
    batch_ratios = [s / p for s, p in zip(paired.stats[1:], paired.plain[1:], strict=True)]
    # Alone: each as `reduce` runs it, one session at a time, medians of batches 2..n.
    alone = TimedSource(data)
    collect_stats(
        model, relus, alone, providers, BATCH, progress=False, magnitudes=False, spatial_mean=mean
    )
    alone_ms = {
        "plain": 1e3 * statistics.median(plain_per_batch(model, data, providers)[1:]),
        "stats": 1e3 * statistics.median(alone.stats[1:]),
    }
    alone_ratio = alone_ms["stats"] / alone_ms["plain"]

    base = statistics.median(times["plain"])
    print(
        f"{args.model} at {size}x{size}, {args.images} images, batch {BATCH}, {len(relus)} Relu "
        f"outputs watched, on {ran_on}"
    )
    print(f"{'end to end':<11} {'median s':>9} {'ratio':>7}  all runs (s)")
    for name, runs in times.items():
        median = statistics.median(runs)
        joined = " ".join(f"{t:.2f}" for t in runs)
        print(f"{name:<11} {median:9.2f} {median / base:6.2f}x  {joined}")
    print(f"rho over all Relu outputs: stats {rho['stats']:.6f}, naive {rho['naive']:.6f}")
    summed = sum(paired.stats[1:]) / sum(paired.plain[1:])
    print(
        f"paired per batch ({len(batch_ratios)} batches): stats/plain median "
        f"{statistics.median(batch_ratios):.3f}x, sum {summed:.3f}x; "
        f"first batch + setup {paired.stats[0] - paired.plain[0]:+.3f} s over plain"
    )
    print(
        f"alone per batch: collect_stats {alone_ms['stats']:.2f} ms, plain inference "
        f"{alone_ms['plain']:.2f} ms: {alone_ratio:.3f}x"
    )
    ratios = [s / p for s, p in zip(times["stats"], times["plain"], strict=True)]
    print(
        f"collect_stats / plain inference: {statistics.median(ratios):.3f}x "
        f"(end to end, median of {args.repeats} repeats; target <= 1.15x)"
    )
    load.append(os.getloadavg())
    print(f"load average at start and end: {load[0][0]:.2f}, {load[1][0]:.2f}")
    if args.json:
        figures = {
            "command": "python bench/stats.py " + " ".join(sys.argv[1:]),
            "load": load,
            "model": args.model,
            "provider": ran_on,
            "spatial_mean": args.spatial_mean,
            "images": args.images,
            "batch": BATCH,
            "per_batch_ratio_median": statistics.median(batch_ratios),
            "per_batch_ratio_sum": summed,
            "per_batch_alone_ratio": alone_ratio,
            "per_batch_alone_ms": alone_ms,
            "end_to_end_ratio_median": statistics.median(ratios),
            "end_to_end_seconds": {k: statistics.median(v) for k, v in times.items()},
            "rho_stats_vs_naive": [rho["stats"], rho["naive"]],
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
