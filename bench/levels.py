"""What each onnxruntime optimisation level costs and saves in `reduce --data` (issue 23).

`collect_stats` builds its session at the highest level that repays its build over the
calibration set (`onnx_mbs.level_costs.optimization_level`). This bench runs
`onnx-mbs reduce --data` on 16 images of each model with the level forced to none,
extended and full in turn, each in its own process, and records the statistics phase's
seconds and the memory its work took (peak over the imports) against the model file:
the layout level (full) is the fastest on the ResNets at 224 but holds reordered copies
of the weights, which is what keeps it out of 16-image runs on models whose weights pass
32 MB (memory is budgeted at 3x the model file, issue 13); on smaller weights (the
MobileNets, ShuffleNet, the CIFAR models) it is chosen where its build repays.

    python bench/levels.py [--models resnet50 resnet101 ...] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from reduce import run  # bench/reduce.py: one timed worker process, its JSON line
from reduce import worker as reduce_worker

LEVELS = ("none", "extended", "full")
MODELS = (
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet1202",
    "mobilenet_v1",
    "mobilenet_v2",
    "shufflenet_v2",
    "densenet_bc",
    "resnet110",
)
IMAGES = 16


def worker(level: str, argv: list[str]) -> None:
    """bench/reduce.py's worker for `reduce` (phases, work memory over the imports), with
    the statistics session built at `level`; its JSON line gains the level the model
    would have chosen."""
    import onnx_mbs.stats as stats_module

    chosen = []
    own = stats_module.optimization_level

    def forced(*args):
        chosen.append(own(*args))
        return level

    stats_module.optimization_level = forced
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reduce_worker("ours", argv)
    print(json.dumps({**json.loads(out.getvalue().splitlines()[-1]), "model_level": chosen}))


def run_one(model: Path, data: Path, level: str, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", level, "reduce", str(model), "--data"]
    command += [str(data), "--providers", "cpu", "--budget", "params=0.5", "--json", "-o", str(out)]
    wall, result = run(command)
    out.unlink(missing_ok=True)
    if result is None:
        sys.exit(f"bench/levels.py: reduce failed on {model.name} at level {level}: {command}")
    return {**result, "process_s": wall}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/levels.json")
    args = parser.parse_args()
    import numpy as np
    import onnx

    from onnx_mbs.models.export import export_zoo
    from onnx_mbs.models.zoo import ZOO

    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for model_name in args.models:
            shape = ZOO[model_name].input_shape
            path, data = folder / f"{model_name}.onnx", folder / f"{model_name}.npz"
            onnx.save(export_zoo(model_name, "deploy", shape), path)
            rng = np.random.default_rng(0)
            np.savez(data, x=rng.integers(0, 256, (IMAGES, *shape[1:]), dtype=np.uint8))
            file_mb = path.stat().st_size / 2**20
            load = [os.getloadavg()[0]]
            runs: dict[str, list[dict]] = {level: [] for level in LEVELS}
            for _ in range(args.repeats):
                for level in LEVELS:  # alternating, so load drifts hit every level alike
                    runs[level].append(run_one(path, data, level, folder / "out.onnx"))
            load.append(os.getloadavg()[0])
            model_level = runs["none"][0]["model_level"][0]
            row = {"model": model_name, "file_mb": round(file_mb, 1), "load": load}
            row["model_level"] = model_level
            for level, done in runs.items():
                row[level] = {
                    "statistics_s": statistics.median(r["phases"]["statistics"] for r in done),
                    "process_s": statistics.median(r["process_s"] for r in done),
                    "work_over_file": max(r["work_mb"] for r in done) / file_mb,
                }
            rows.append(row)
            cells = "  ".join(
                f"{level} {row[level]['statistics_s']:.2f} s {row[level]['work_over_file']:.2f}x"
                for level in LEVELS
            )
            print(
                f"{model_name}: chosen {model_level}; statistics, work memory/file: {cells}",
                flush=True,
            )
    result = {"images": IMAGES, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
