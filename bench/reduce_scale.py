"""Scaling of `onnx-mbs reduce` and `eval` with graph size, stage by stage.

CIFAR ResNet-110 and ResNet-1202 in deploy form (random weights, batch 1, as
bench/analyze.py builds them), 64 random model-ready calibration images (labelled
for `eval`). Each command runs in a fresh process through the CLI's `main`:

    onnx-mbs reduce MODEL --data ready.npz --budget params=0.5 --providers cpu --json -o OUT
    onnx-mbs eval MODEL --data ready.npz --providers cpu --json

The worker wraps the functions each stage is (nothing else changes) and records each
stage's seconds and the peak RSS reached within it over the RSS after imports (VmHWM,
reset per stage through /proc/self/clear_refs). Stages of `reduce`: load (read, check,
normalise, shape inference), analyze, statistics (of which: instrumenting, building
the onnxruntime session), plan, rewrite (shrink), check (the full checker on the
written model), sizes (the written model counted), save; of `eval`: load, session,
runs (evaluate less its session).

Reported as ratios measured in one run: each stage's seconds per graph node on
ResNet-1202 over ResNet-110 (linear: ~1x; target <= 1.5x; fixed costs make small
graphs dearer per node, so < 1 is usual), and each command's work peak (RSS over the
RSS after imports) over the model file. Medians of --repeats runs, the models and
commands alternating. Writes bench/results/reduce_scale.json with the load average
before and after (the machine is shared: compare ratios within one run only).

    nice python bench/reduce_scale.py [--repeats 3] [--images 64]
    git worktree add --detach ../base main     # once: the code to compare against
    nice python bench/reduce_scale.py --repeats 2 --base ../base   # both, alternating

`--folder DIR` keeps the exported models and data there for later runs (ResNet-1202's
export takes about a minute).
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

REPO = Path(__file__).resolve().parent.parent
MODELS = ["resnet110", "resnet1202"]
COMMANDS = ("reduce", "eval")


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1])


class Stages:
    """Seconds and peak RSS (kB over a base) of wrapped calls, by stage name (summed over
    calls). Nested stages keep their own peak; the enclosing one keeps the larger."""

    def __init__(self, base_kb: int) -> None:
        self.base = base_kb
        self.seconds: dict[str, float] = {}
        self.peak_kb: dict[str, int] = {}
        self._floors: list[int] = [0]  # per open frame: the peak seen before its resets

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def wrap(self, owner: object, attribute: str, stage: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self._floors[-1] = max(self._floors[-1], status_kb("VmHWM"))
            self._reset()
            self._floors.append(0)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                peak = max(self._floors.pop(), status_kb("VmHWM"))
                self._floors[-1] = max(self._floors[-1], peak)
                self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
                self.peak_kb[stage] = max(self.peak_kb.get(stage, 0), peak - self.base)
                self._reset()

        setattr(owner, attribute, timed)

    def whole_peak_kb(self) -> int:
        return max(self._floors[0], status_kb("VmHWM")) - self.base


def worker(command: str, argv: list[str]) -> None:
    """Run one command through the CLI with its stages wrapped; JSON on the last line."""
    import contextlib
    import io

    import onnxruntime  # noqa: F401  (an import, not work: eval and the statistics load it)

    import onnx_mbs.evaluate as evaluate
    import onnx_mbs.pipeline as pipeline
    import onnx_mbs.save as save
    import onnx_mbs.stats as stats
    from onnx_mbs import runtime  # noqa: F401  (imported before the base is read)
    from onnx_mbs.cli import main

    base = status_kb("VmRSS")
    recorder = Stages(base)
    if command == "reduce":
        for owner, name, stage in [
            (pipeline, "load", "load"),
            (pipeline, "analyse", "analyze"),
            (pipeline, "measure", "statistics"),
            (stats, "instrument_without_weights", "statistics: instrument"),
            (stats, "make_session", "statistics: session"),
            (pipeline.Planner, "build", "plan"),
            (pipeline.Planner, "plan", "plan"),
            (pipeline.Shrink, "__call__", "rewrite"),
            (pipeline, "check_written", "check"),
            (pipeline.Rewritten, "with_written_sizes", "sizes"),
            (pipeline, "accuracy", "accuracy"),
            (save, "save_model", "save"),
        ]:
            recorder.wrap(owner, name, stage)
    else:
        for owner, name, stage in [
            (evaluate, "load_for_eval", "load"),
            (evaluate, "make_session", "session"),
            (evaluate, "evaluate", "evaluate"),
        ]:
            recorder.wrap(owner, name, stage)
    recorder._reset()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main([command, *argv])
    total = time.perf_counter() - start
    seconds = dict(recorder.seconds)
    peak_kb = dict(recorder.peak_kb)
    if command == "eval":  # evaluate holds the session: its runs are the rest
        seconds["runs"] = seconds.pop("evaluate") - seconds["session"]
        peak_kb["runs"] = peak_kb.pop("evaluate")
    print(
        json.dumps(
            {
                "code": code,
                "seconds": seconds,
                "total_s": total,
                "peak_mb": {k: v / 1024 for k, v in peak_kb.items()},
                "work_peak_mb": recorder.whole_peak_kb() / 1024,
                "code_from": str(Path(pipeline.__file__).resolve().parent.parent),
            }
        )
    )


def prepare(folder: Path, name: str, images: int) -> tuple[Path, Path, int]:
    """The deploy-form model, labelled model-ready data, and the model's node count."""
    import numpy as np
    import onnx

    from onnx_mbs.models.export import export_zoo

    path, data = folder / f"{name}.onnx", folder / f"{name}_{images}.npz"
    if path.exists() and data.exists():  # made by an earlier run in --folder
        model = onnx.load(path, load_external_data=False)
        return path, data, len(model.graph.node)
    model = export_zoo(name, "deploy", (1, 3, 32, 32))
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((images, 3, 32, 32)).astype(np.float32)
    np.savez(data, **{model.graph.input[0].name: x, "y": rng.integers(0, 10, images)})
    return path, data, len(model.graph.node)


def overlay(folder: Path, root: Path) -> Path:
    """A folder to put first on PYTHONPATH so `onnx_mbs` is imported from the checkout
    `root` (its onnx_mbs/, passes/ and models/ laid out as installed), ahead of this
    environment's editable install of this checkout."""
    package = folder / "onnx_mbs"
    package.mkdir(parents=True)
    for entry in (root / "onnx_mbs").iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for name, source in (("passes", "passes"), ("models", "models")):
        (package / name).symlink_to((root / source).resolve())
    return folder


def run(command: str, model: Path, data: Path, out: Path, path: Path | None = None) -> dict:
    """One command in a fresh worker process; `path` (an `overlay`) puts another checkout's
    code in place of this one's."""
    argv = [str(model), "--data", str(data), "--providers", "cpu", "--json"]
    if command == "reduce":
        argv += ["--budget", "params=0.5", "-o", str(out)]
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "--worker", command, *argv],
        capture_output=True,
        text=True,
        cwd=out.parent,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"{command} {model.name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{command} {model.name} exited {result['code']}")
    return result


def commit(root: Path) -> str:
    """The checkout's commit (with "+changes" when its tree differs from it)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "+changes" if git("status", "--porcelain") else ""
    )


def median_of(runs: list[dict], key: str) -> dict[str, float]:
    return {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}


def summary(runs: list[dict]) -> dict:
    return {
        "seconds": median_of(runs, "seconds"),
        "total_s": statistics.median(r["total_s"] for r in runs),
        "peak_mb": median_of(runs, "peak_mb"),
        "work_peak_mb": statistics.median(r["work_peak_mb"] for r in runs),
        "code_from": runs[0]["code_from"],
    }


def table(rows: dict[str, dict], command: str) -> dict[str, float]:
    """Print one command's stages for both models; their per-node ratios, 1202 over 110."""
    small, big = (rows[m] for m in MODELS)
    scale = big["nodes"] / small["nodes"]
    print(f"\n{command}: seconds, per node (us), peak within the stage over the imports (MB)")
    print(f"{'stage':<24}" + "".join(f"{m:>28}" for m in MODELS) + f"{'per node 1202/110':>19}")
    ratios = {}
    for stage in [*small[command]["seconds"], "total"]:
        cells = ""
        for m in MODELS:
            r = rows[m][command]
            s = r["total_s"] if stage == "total" else r["seconds"][stage]
            peak = r["work_peak_mb"] if stage == "total" else r["peak_mb"].get(stage, 0.0)
            cells += f"{s:>9.3f} s {1e6 * s / rows[m]['nodes']:>6.0f} us {peak:>5.0f} MB"
        a, b = (
            r[command]["total_s"] if stage == "total" else r[command]["seconds"][stage]
            for r in (small, big)
        )
        ratios[stage] = (b / scale) / a if a > 0 else float("nan")
        print(f"{stage:<24}{cells}{ratios[stage]:>18.2f}x")
    for m in MODELS:
        r = rows[m]
        peak = r[command]["work_peak_mb"]
        print(
            f"{m}: work peak {peak:.0f} MB = {peak / r['file_mb']:.2f}x the file "
            f"({r['file_mb']:.1f} MB)"
        )
    return ratios


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench/results/reduce_scale.json"))
    parser.add_argument("--folder", help="where the models and data are made (default: a temp)")
    parser.add_argument(
        "--base",
        help="another checkout (a worktree at an older commit) run alternately with "
        'this one, under the same load: its figures are written under "base"',
    )
    args = parser.parse_args()
    load = [os.getloadavg()]
    codes = {"this": None}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if args.base:
            codes["base"] = overlay(Path(tmp) / "base", Path(args.base))
        prepared = {name: prepare(folder, name, args.images) for name in MODELS}
        runs: dict[tuple[str, str, str], list[dict]] = {}
        for _ in range(args.repeats):
            for name in MODELS:
                path, data, _ = prepared[name]
                for command in COMMANDS:
                    for code, where in codes.items():
                        out = Path(tmp) / f"{name}_{code}_reduced.onnx"
                        result = run(command, path, data, out, where)
                        runs.setdefault((code, name, command), []).append(result)
        results = {}
        for code in codes:
            rows = {}
            for name in MODELS:
                path, _, nodes = prepared[name]
                rows[name] = {"nodes": nodes, "file_mb": path.stat().st_size / 2**20}
                for command in COMMANDS:
                    rows[name][command] = summary(runs[(code, name, command)])
            results[code] = rows
    load.append(os.getloadavg())
    written = {
        "command": "nice python bench/reduce_scale.py "
        f"--repeats {args.repeats} --images {args.images}"
        + (f" --base {args.base}" if args.base else ""),
        "load": load,
        "commits": {
            code: commit(Path(r[MODELS[0]]["reduce"]["code_from"])) for code, r in results.items()
        },
    }
    for code, rows in results.items():
        print(f"\n=== {code}: {rows[MODELS[0]]['reduce']['code_from']}")
        ratios = {command: table(rows, command) for command in COMMANDS}
        for c in COMMANDS:
            worst = max(ratios[c], key=ratios[c].get)
            print(f"{c}: largest per-node ratio {worst} {ratios[c][worst]:.2f}x (target <= 1.5x)")
        written[code] = {"rows": rows, "per_node_ratio_1202_over_110": ratios}
    if "base" in results:
        print("\nthis / base, same run:")
        for name in MODELS:
            for c in COMMANDS:
                this, base = results["this"][name][c], results["base"][name][c]
                print(
                    f"{name} {c}: time {this['total_s'] / base['total_s']:.2f}x, work peak "
                    f"{this['work_peak_mb']:.0f} / {base['work_peak_mb']:.0f} MB = "
                    f"{this['work_peak_mb'] / base['work_peak_mb']:.2f}x"
                )
    print(f"load average (1, 5, 15 min) at start and end: {load}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(written, indent=2) + "\n")


if __name__ == "__main__":
    main()
