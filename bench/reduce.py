"""`onnx-mbs reduce` end to end against onnxsim's structured pruning (issue 13).

For each zoo model in deploy form (BatchNorm folded, which onnxsim needs), both
tools run as fresh processes, alternating, on the same file:

- ours: `onnx-mbs reduce MODEL --data x.npz --budget params=0.5 --providers cpu
  --json -o OUT` with 16 random calibration images (unlabelled: no accuracy pass);
- onnxsim 0.8.1: `onnxsim.pruning.apply_structured_pruning(MODEL, 0.5)` then
  `onnx.save`, in a `python -c` process.

Each tool runs in a worker process that imports it, then times its work (our
work is the CLI's `main`, in process). Reported: wall time of each process
(imports included: what a user waits for) and of the work alone, medians of
--repeats alternating runs, the ratios ours / onnxsim, parameters kept by
each, the memory each tool's work adds over the RSS after its imports (VmHWM
- VmRSS in the worker) against the model file, and our phase breakdown
(`timings_s` from --json, last run). A model onnxsim leaves unchanged or
fails on is marked: the speed comparison only counts models both process.
The load average is printed with the results.

    pip install --no-deps onnxsim==0.8.1
    python bench/reduce.py [--repeats 3] [--models resnet20 resnet50 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_mbs.passes import count_parameters


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) / 1024


def worker(tool: str, argv: list[str]) -> None:
    """Import the tool, then time its work in this process; print JSON on the last line.

    Everything the work imports is imported first, so that the memory the work adds
    (peak RSS minus RSS after the imports) is the work's own."""
    start = time.perf_counter()
    if tool == "ours":
        import contextlib
        import io

        import onnxruntime  # noqa: F401  (imported lazily by the CLI: counted as import)

        import onnx_mbs.pipeline  # noqa: F401
        from onnx_mbs.cli import main as cli

        imported, base = time.perf_counter(), _status_mb("VmRSS")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(argv)
        result = {"phases": json.loads(out.getvalue())["timings_s"], "code": code}
    else:
        from onnxsim.pruning import apply_structured_pruning

        imported, base = time.perf_counter(), _status_mb("VmRSS")
        onnx.save(apply_structured_pruning(argv[0], 0.5), argv[1])
        result = {"phases": None, "code": 0}
    done = time.perf_counter()
    print(
        json.dumps(
            {
                **result,
                "import_s": imported - start,
                "work_s": done - imported,
                "base_mb": base,
                "work_mb": _status_mb("VmHWM") - base,
            }
        )
    )


def run(command: list[str]) -> tuple[float, dict | None]:
    """Wall seconds and the worker's JSON (None if it failed) of one process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - start
        out.seek(0)
        lines = out.read().strip().splitlines()
        return wall, json.loads(lines[-1]) if code == 0 and lines else None


def _median_work(runs: list[tuple[float, dict | None]]) -> float:
    return statistics.median(r[1]["work_s"] for r in runs if r[1] is not None)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # a tool's process: --worker TOOL ARGS...
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    # The zoo (torch) is imported here, not at the top: a worker process must import only
    # its tool, or both tools' process times would carry torch's import.
    from onnx_mbs.models.export import export_zoo
    from onnx_mbs.models.zoo import ZOO

    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--out", default="bench/results/reduce.json")
    args = parser.parse_args()
    try:
        import onnxsim.pruning  # noqa: F401
    except ImportError:
        sys.exit("bench/reduce.py needs onnxsim: pip install --no-deps onnxsim==0.8.1")
    rows = []
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            shape = ZOO[name].input_shape
            path = Path(folder) / f"{name}.onnx"
            onnx.save(export_zoo(name, "deploy", shape), path)
            data = Path(folder) / f"{name}.npz"
            rng = np.random.default_rng(0)
            np.savez(data, x=rng.integers(0, 256, (16, *shape[1:]), dtype=np.uint8))
            ours_out, sim_out = Path(folder) / "ours.onnx", Path(folder) / "sim.onnx"
            ours_cmd = [
                sys.executable,
                __file__,
                "--worker",
                "ours",
                "reduce",
                str(path),
                "--data",
                str(data),
                "--budget",
                "params=0.5",
                "--providers",
                "cpu",
                "--json",
                "-o",
                str(ours_out),
            ]
            sim_cmd = [sys.executable, __file__, "--worker", "onnxsim", str(path), str(sim_out)]
            ours, sim = [], []
            for _ in range(args.repeats):
                for cmd, target, times in (
                    (ours_cmd, ours_out, ours),
                    (sim_cmd, sim_out, sim),
                ):
                    target.unlink(missing_ok=True)
                    times.append(run(cmd))
            params = count_parameters(onnx.load(path))
            ours_ok = all(t[1] is not None for t in ours) and ours_out.exists()
            sim_ok = all(t[1] is not None for t in sim) and sim_out.exists()
            row = {
                "model": name,
                "input": list(shape),
                "nodes": len(onnx.load(path).graph.node),
                "file_mb": path.stat().st_size / 2**20,
                "ours_s": statistics.median(t[0] for t in ours),
                "onnxsim_s": statistics.median(t[0] for t in sim),
                "ours_work_s": _median_work(ours) if ours_ok else None,
                "onnxsim_work_s": _median_work(sim) if sim_ok else None,
                "ours_work_mb": max(t[1]["work_mb"] for t in ours) if ours_ok else None,
                "onnxsim_work_mb": max(t[1]["work_mb"] for t in sim) if sim_ok else None,
                "ours_kept": count_parameters(onnx.load(ours_out)) / params if ours_ok else None,
                "onnxsim_kept": count_parameters(onnx.load(sim_out)) / params if sim_ok else None,
                "phases": ours[-1][1]["phases"] if ours_ok else None,
            }
            row["both"] = bool(ours_ok and sim_ok and row["onnxsim_kept"] < 1.0)
            rows.append(row)
            load.append(os.getloadavg())
    print(f"load average (1, 5, 15 min) at start and after each model: {load}")
    print("process: wall s of the whole process (imports included); work: after the imports")
    print(
        f"{'model':<14}{'nodes':>6}{'file MB':>8}{'ours s':>8}{'sim s':>7}{'ratio':>7}"
        f"{'ours work':>10}{'sim work':>9}{'ratio':>7}{'kept ours':>10}{'kept sim':>9}"
    )
    for r in rows:
        sim_kept = "fail" if r["onnxsim_kept"] is None else f"{r['onnxsim_kept']:.3f}"
        ours_w, sim_w = r["ours_work_s"] or float("nan"), r["onnxsim_work_s"] or float("nan")
        print(
            f"{r['model']:<14}{r['nodes']:>6}{r['file_mb']:>8.1f}{r['ours_s']:>8.2f}"
            f"{r['onnxsim_s']:>7.2f}{r['ours_s'] / r['onnxsim_s']:>7.2f}"
            f"{ours_w:>10.2f}{sim_w:>9.2f}{ours_w / sim_w:>7.2f}"
            f"{r['ours_kept'] or 0:>10.3f}{sim_kept:>9}"
        )
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in (r["phases"] or {}).items())
        work_mb = r["ours_work_mb"] or float("nan")
        print(
            f"{r['model']}: our phases (s): {phases}; memory the work adds over the "
            f"imports {work_mb:.0f} MB = {work_mb / r['file_mb']:.2f}x the model file"
        )
    both = [r for r in rows if r["both"]]
    for key in ("ours_s", "ours_work_s"):
        peer = key.replace("ours", "onnxsim")
        slower = [r["model"] for r in both if r[key] > r[peer]]
        worst = max((r[key] / r[peer] for r in both), default=float("nan"))
        print(
            f"{'process' if key == 'ours_s' else 'work'}: models both process {len(both)} of "
            f"{len(rows)}; ours no slower on {len(both) - len(slower)}, worst ratio {worst:.2f}"
            + (f" (slower: {', '.join(slower)})" if slower else "")
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load": load, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
