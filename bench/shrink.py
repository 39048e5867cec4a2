"""Benchmark the shrink path against Torch-Pruning on deep CIFAR ResNets.

    python bench/shrink.py                 # ResNet-110 and ResNet-1202, ~3 minutes
    python bench/shrink.py --depths 110    # quicker

For each depth, the same torch model (seed 0) is exported to ONNX (train form,
BatchNorm kept) and shrunk to half the channels of every unpinned group:
find channel groups + choose channels by L1 + shrink, timed after the file is
loaded. Torch-Pruning's MagnitudePruner (L1, pruning_ratio 0.5, final Linear
ignored, example input 1x3x32x32) prunes the torch model; its time is building
the dependency graph plus the pruning step.

The machine is shared and its load changes by the minute, so times are CPU
seconds of the measuring process (torch limited to one thread, as ours is
single-threaded); wall seconds are shown too. Each tool's time is its fastest
run in one process: ours at least --repeats runs and ~3 s, Torch-Pruning
--tp-repeats runs on fresh copies of the model (it prunes in place). Each tool
runs in a fresh subprocess, so peak memory (VmHWM) is per tool: ours is compared
with the interpreter baseline (after imports) plus 3x the model file. The last
line prints the speed ratio on the deepest model.

Needs `pip install --no-deps torch-pruning` (never let pip pull torch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    """Peak resident memory of this process. VmHWM starts afresh at exec; ru_maxrss
    would carry over the parent's peak (Linux keeps it across exec)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """CPU and wall seconds since creation."""

    def __init__(self) -> None:
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def split(self) -> tuple[float, float]:
        return time.process_time() - self.cpu, time.perf_counter() - self.wall


def worker_ours(path: str, repeats: int) -> dict:
    """Load a prepared model, then time groups + choose + shrink (fastest run; each
    run's results are freed before the next, so the peak is that of one run)."""
    import onnx

    from onnx_mbs.passes import count_parameters
    from onnx_mbs.passes.channel_groups import analyze_channels
    from onnx_mbs.passes.graph import GraphIndex
    from onnx_mbs.passes.importance import FilterNorm, choose_channels
    from onnx_mbs.passes.shrink import shrink_channels

    base = _peak_mb()
    model = onnx.load(path)
    runs: list[dict] = []
    while len(runs) < repeats or (sum(r["cpu"] for r in runs) < 3.0 and len(runs) < 30):
        clock = _Clock()
        # One index of the graph serves the three steps, as Torch-Pruning builds one
        # DependencyGraph for its pruner (its build is counted in its time too).
        index = GraphIndex.build(model)
        analysis = analyze_channels(model, index=index)
        t_groups = clock.split()[0]
        free = [g for g in analysis.groups if not g.pinned]
        widths = {g.id: max(1, g.size // 2) for g in free}
        keep = choose_channels(free, widths, FilterNorm(model, index=index))
        t_choose = clock.split()[0] - t_groups
        small = shrink_channels(model, keep, analysis, index)
        cpu, wall = clock.split()
        runs.append({"cpu": cpu, "wall": wall, "t_groups": t_groups, "t_choose": t_choose})
        runs[-1]["t_shrink"] = cpu - t_groups - t_choose
        result = {
            "nodes": len(model.graph.node),
            "groups": len(analysis.groups),
            "pinned": len(analysis.groups) - len(free),
            "params_after": count_parameters(small),
        }
        del analysis, small, index
    best = min(runs, key=lambda r: r["cpu"])
    return {**result, **best, "runs": len(runs), "base_mb": base, "peak_mb": _peak_mb()}


def worker_torch_pruning(depth: int, repeats: int) -> dict:
    """Torch-Pruning on a fresh copy of the model per run; the fastest run counts."""
    import torch
    import torch_pruning as tp

    from onnx_mbs.models.export import build_zoo_model

    torch.set_num_threads(1)
    runs = []
    for _ in range(repeats):
        model = build_zoo_model(f"resnet{depth}")
        clock = _Clock()
        pruner = tp.pruner.MagnitudePruner(
            model,
            torch.randn(1, 3, 32, 32),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=[model.fc],
        )
        t_graph = clock.split()[0]
        pruner.step()
        cpu, wall = clock.split()
        params = sum(p.numel() for p in model.parameters())
        runs.append({"cpu": cpu, "wall": wall, "t_graph": t_graph, "params_after": params})
    return {**min(runs, key=lambda r: r["cpu"]), "runs": repeats}


def prepare(depth: int, folder: Path) -> Path:
    """Export ResNet-depth (train form) and store it in `load_model` form."""
    import onnx

    from onnx_mbs.models.export import export_zoo
    from onnx_mbs.passes import load_model

    path = folder / f"resnet{depth}.onnx"
    onnx.save(load_model(export_zoo(f"resnet{depth}", "train")), str(path))
    return path


def _subprocess(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[110, 1202])
    parser.add_argument("--repeats", type=int, default=5, help="fewest runs of ours per depth")
    parser.add_argument("--tp-repeats", type=int, default=2, help="runs of Torch-Pruning")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tp-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_ours(args.worker, args.repeats)))
        return
    if args.tp_worker:
        print(json.dumps(worker_torch_pruning(args.tp_worker, args.tp_repeats)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            path = prepare(depth, Path(tmp))
            ours = _subprocess("--worker", str(path), "--repeats", str(args.repeats))
            ours["file_mb"] = os.path.getsize(path) / 2**20
            tp = _subprocess("--tp-worker", str(depth), "--tp-repeats", str(args.tp_repeats))
            rows.append((depth, ours, tp))

    print("CPU seconds (wall seconds in brackets)")
    print(
        f"{'model':<11}{'nodes':>6}{'ours':>16}{'ms/node':>8}{'Torch-Pruning':>19}{'ratio':>7}"
        f"{'params ours':>12}{'params TP':>10}{'file MB':>8}{'base MB':>8}{'peak MB':>8}"
        f"{'limit MB':>9}"
    )
    for depth, ours, tp in rows:
        limit = ours["base_mb"] + 3 * ours["file_mb"]
        print(
            f"{'resnet' + str(depth):<11}{ours['nodes']:>6}"
            f"{ours['cpu']:>8.3f} [{ours['wall']:>5.3f}]{1000 * ours['cpu'] / ours['nodes']:>8.3f}"
            f"{tp['cpu']:>11.2f} [{tp['wall']:>5.1f}]{tp['cpu'] / ours['cpu']:>6.1f}x"
            f"{ours['params_after']:>12}{tp['params_after']:>10}{ours['file_mb']:>8.1f}"
            f"{ours['base_mb']:>8.1f}{ours['peak_mb']:>8.1f}{limit:>9.1f}"
        )
    for depth, ours, tp in rows:
        print(
            f"resnet{depth}: groups {ours['t_groups']:.3f}, choose {ours['t_choose']:.3f}, "
            f"shrink {ours['t_shrink']:.3f} CPU s (fastest of {ours['runs']}); "
            f"{ours['groups']} groups, {ours['pinned']} pinned; peak - base = "
            f"{(ours['peak_mb'] - ours['base_mb']) / ours['file_mb']:.2f}x the model file; "
            f"Torch-Pruning graph {tp['t_graph']:.2f} CPU s (fastest of {tp['runs']})"
        )
    if len(rows) > 1:
        (d0, small, _), (d1, large, _) = rows[0], rows[-1]
        per = [r["cpu"] / r["nodes"] for r in (small, large)]
        print(f"time per node resnet{d1} / resnet{d0}: {per[1] / per[0]:.2f} (linear: ~1)")
    depth, ours, tp = rows[-1]
    print(
        f"speed ratio (Torch-Pruning / onnx-mbs, CPU time) on resnet{depth}: "
        f"{tp['cpu'] / ours['cpu']:.1f}x"
    )


if __name__ == "__main__":
    main()
