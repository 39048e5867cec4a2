"""`onnx-mbs reduce` end to end against onnxsim's structured pruning (issues 13, 23).

For each zoo model in deploy form (BatchNorm folded, which onnxsim needs), both
tools run as fresh processes, alternating, on the same file:

- ours without data: `onnx-mbs reduce MODEL --budget params=0.5 --json -o OUT`;
- ours with data: the same with `--data x.npz --providers cpu`, 16 random
  calibration images (unlabelled: no accuracy pass);
- onnxsim 0.8.1: `onnxsim.pruning.apply_structured_pruning(MODEL, 0.5)` then
  `onnx.save`;
- the pass, in onnx-mbs's environment: plain onnxruntime inference of the same 16
  images through the original model (onnxruntime's default session options, one
  image a run), not a tool but the limit issue 23 names for "ours with data": its
  statistics are this pass over the calibration set, which onnxsim does not run.
  `floor_ratio` is ours without data, plus the pass (importing onnxruntime, building
  the session, running the images), over onnxsim's process: what "ours with data"
  would take if its statistics cost no more than plain inference.

Each tool runs in two environments:

- minimal (how a user installs each tool alone): onnx-mbs with its base install
  (`pip install .`, no extras: no torch) in one virtual environment, onnxsim with
  onnx, onnxruntime and numpy only in another. `--setup` creates both under
  --venvs (bench/results/tmp/venvs, ignored by git), with:
      python3 -m venv VENVS/ours && VENVS/ours/bin/pip install .
      python3 -m venv VENVS/onnxsim && VENVS/onnxsim/bin/pip install onnxsim==0.8.1 \\
          onnx onnxruntime numpy
  Every run reinstalls this checkout into VENVS/ours (`pip install --no-deps
  --force-reinstall .`), so the figures are this commit's.
- torch: both beside torch, in this interpreter's environment (the project's
  .venv with its torch and dev extras). onnxsim imports its optional integrations,
  torch among them, when they are installed.

Each worker process imports its tool, then times its work in process (ours: the
CLI's `main`; what it imports lazily counts as work). Reported: wall time of each
process (what a user waits for: interpreter start, imports and work), the import
and the work apart, medians of --repeats alternating runs; the ratios ours /
onnxsim; parameters kept; the memory each tool's work adds over the RSS after its
imports (VmHWM - VmRSS in the worker); our phase breakdown (`timings_s` from
--json, last run); the load average (1, 5, 15 min) before and after each model.
A model onnxsim leaves unchanged or either tool fails on is marked: the speed
comparison only counts models both process.

    python bench/reduce.py --setup            # once: the two minimal environments
    python bench/reduce.py [--repeats 3] [--envs minimal torch] [--models resnet20 ...]
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

# Only the standard library above: a worker process imports its tool and nothing else.
REPO = Path(__file__).resolve().parent.parent
VENVS = REPO / "bench" / "results" / "tmp" / "venvs"
SIM_PACKAGES = ["onnxsim==0.8.1", "onnx", "onnxruntime", "numpy"]
ARMS = ("ours", "ours+data", "onnxsim", "pass")  # run in this order, alternating, per repeat
WRITERS = ("ours", "ours+data", "onnxsim")  # the arms that write a model


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) / 1024


def worker(tool: str, argv: list[str]) -> None:
    """Import the tool, then time its work in this process; print JSON on the last line."""
    start = time.perf_counter()
    if tool == "ours":
        import contextlib
        import io

        from onnx_mbs.cli import main as cli

        imported, base = time.perf_counter(), status_mb("VmRSS")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(argv)
        result = {"phases": json.loads(out.getvalue())["timings_s"], "code": code}
        heavy = ("onnxruntime", "torch", "matplotlib", "PIL", "tqdm")
        result["imported"] = [m for m in heavy if m in sys.modules]
    elif tool == "pass":
        import numpy as np

        numpy_done = time.perf_counter()
        import onnxruntime as ort

        imported, base = time.perf_counter(), status_mb("VmRSS")
        session = ort.InferenceSession(argv[0], providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for image in np.load(argv[1])["x"].astype(np.float32) / 255:
            session.run(None, {name: image[None]})
        result = {"phases": None, "code": 0, "onnxruntime_import_s": imported - numpy_done}
    else:
        import onnx
        from onnxsim.pruning import apply_structured_pruning

        imported, base = time.perf_counter(), status_mb("VmRSS")
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
                "work_mb": status_mb("VmHWM") - base,
            }
        )
    )


def run(command: list[str]) -> tuple[float, dict | None]:
    """Wall seconds and the worker's JSON (None if it failed) of one process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        # cwd: not the checkout, whose onnx_mbs/ folder would shadow the installed package
        code = subprocess.run(
            command, stdout=out, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir()
        ).returncode
        wall = time.perf_counter() - start
        out.seek(0)
        lines = out.read().strip().splitlines()
        return wall, json.loads(lines[-1]) if code == 0 and lines else None


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True, cwd=REPO)


def setup(venvs: Path) -> None:
    """The two minimal environments: onnx-mbs's base install; onnxsim with onnx,
    onnxruntime and numpy."""
    for name, packages in (("ours", ["."]), ("onnxsim", SIM_PACKAGES)):
        folder = venvs / name
        if not (folder / "bin" / "python").exists():
            subprocess.run(["python3", "-m", "venv", str(folder)], check=True)
        _pip(folder / "bin" / "python", *packages)


def interpreters(env: str, venvs: Path) -> dict[str, str]:
    """The Python each tool runs in for `env`."""
    if env == "torch":
        return {"ours": sys.executable, "onnxsim": sys.executable}
    pythons = {tool: venvs / tool / "bin" / "python" for tool in ("ours", "onnxsim")}
    if not all(p.exists() for p in pythons.values()):
        sys.exit(f"bench/reduce.py: no minimal environments under {venvs}: run it with --setup")
    _pip(pythons["ours"], "--no-deps", "--force-reinstall", ".")  # this checkout's code
    return {tool: str(p) for tool, p in pythons.items()}


def _median(runs: list[tuple[float, dict | None]], key: str) -> float | None:
    if not runs or any(r[1] is None for r in runs):
        return None
    return statistics.median(r[1][key] for r in runs)


def measure(
    name: str, folder: Path, pythons: dict[str, str], repeats: int, count_parameters
) -> dict:
    """One model in one environment: each arm `repeats` times, alternating."""
    path, data = folder / f"{name}.onnx", folder / f"{name}.npz"
    outs = {arm: folder / f"{arm}.onnx" for arm in WRITERS}
    ours = [pythons["ours"], __file__, "--worker", "ours", "reduce", str(path)]
    common = ["--budget", "params=0.5", "--json", "-o"]
    commands = {
        "ours": [*ours, *common, str(outs["ours"])],
        "ours+data": [*ours, "--data", str(data), "--providers", "cpu", *common],
        "onnxsim": [pythons["onnxsim"], __file__, "--worker", "onnxsim", str(path)],
        "pass": [pythons["ours"], __file__, "--worker", "pass", str(path), str(data)],
    }
    commands["ours+data"].append(str(outs["ours+data"]))
    commands["onnxsim"].append(str(outs["onnxsim"]))
    runs: dict[str, list] = {arm: [] for arm in ARMS}
    load = [os.getloadavg()]
    for _ in range(repeats):
        for arm in ARMS:
            if arm in outs:
                outs[arm].unlink(missing_ok=True)
            runs[arm].append(run(commands[arm]))
    load.append(os.getloadavg())
    import onnx

    params = count_parameters(onnx.load(path))
    row: dict = {"model": name, "load": load}
    for arm, times in runs.items():
        wrote = arm not in outs or outs[arm].exists()
        ok = wrote and all(t[1] is not None for t in times)
        last = times[-1][1] if ok else None
        row[arm] = {
            "process_s": statistics.median(t[0] for t in times),
            "processes_s": [round(t[0], 4) for t in times],
            "import_s": _median(times, "import_s") if ok else None,
            "work_s": _median(times, "work_s") if ok else None,
            "work_mb": max(t[1]["work_mb"] for t in times) if ok else None,
            "kept": count_parameters(onnx.load(outs[arm])) / params if ok and arm in outs else None,
            "phases": last.get("phases") if last else None,
            "imported": last.get("imported") if last else None,
        }
    sim_kept = row["onnxsim"]["kept"]
    for arm in ("ours", "ours+data"):
        row[arm]["both"] = bool(
            row[arm]["kept"] is not None and sim_kept is not None and sim_kept < 1.0
        )
        row[arm]["process_ratio"] = row[arm]["process_s"] / row["onnxsim"]["process_s"]
        work, sim_work = row[arm]["work_s"], row["onnxsim"]["work_s"]
        row[arm]["work_ratio"] = work / sim_work if work and sim_work else None
    inference = row["pass"]
    inference["onnxruntime_import_s"] = _median(runs["pass"], "onnxruntime_import_s")
    if inference["work_s"] is not None:
        floor = row["ours"]["process_s"] + inference["onnxruntime_import_s"] + inference["work_s"]
        inference["floor_s"] = floor  # the least "ours+data" could take, the pass included
        inference["floor_ratio"] = floor / row["onnxsim"]["process_s"]
    return row


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(env: str, rows: list[dict]) -> None:
    print(f"\n== {env} environments (process: wall s; import/work: inside the process)")
    print(
        f"{'model':<14}{'load':>5}{'sim s':>7}{'sim imp':>8}{'sim wrk':>8}"
        f"{'ours s':>8}{'ratio':>7}{'imp':>6}{'work':>6}"
        f"{'+data s':>8}{'ratio':>7}{'imp':>6}{'work':>6}{'kept':>7}{'sim kept':>9}"
    )
    for r in rows:
        sim, free, data = r["onnxsim"], r["ours"], r["ours+data"]
        print(
            f"{r['model']:<14}{r['load'][-1][0]:>5.1f}{sim['process_s']:>7.2f}"
            f"{_f(sim['import_s']):>8}{_f(sim['work_s']):>8}"
            f"{free['process_s']:>8.2f}{free['process_ratio']:>7.2f}"
            f"{_f(free['import_s']):>6}{_f(free['work_s']):>6}"
            f"{data['process_s']:>8.2f}{data['process_ratio']:>7.2f}"
            f"{_f(data['import_s']):>6}{_f(data['work_s']):>6}"
            f"{_f(free['kept'], 3):>7}{_f(sim['kept'], 3):>9}"
        )
    for r in rows:
        for arm in ("ours", "ours+data"):
            phases = ", ".join(f"{k} {v:.2f}" for k, v in (r[arm]["phases"] or {}).items())
            print(f"{r['model']} {arm}: phases (s) {phases}; imported {r[arm]['imported']}")
    for r in rows:
        floor = r["pass"].get("floor_ratio")
        print(
            f"{r['model']} pass: onnxruntime import {_f(r['pass']['onnxruntime_import_s'])} s, "
            f"build and run {_f(r['pass']['work_s'])} s; ours without data plus the pass "
            f"{_f(r['pass'].get('floor_s'))} s = {_f(floor)}x onnxsim "
            f"(ours with data {r['ours+data']['process_ratio']:.2f}x)"
        )
    for arm, limit in (("ours", 1.0), ("ours+data", 1.6)):
        both = [r for r in rows if r[arm]["both"]]
        over = [r["model"] for r in both if r[arm]["process_ratio"] > limit]
        worst = max((r[arm]["process_ratio"] for r in both), default=float("nan"))
        print(
            f"{env} {arm}: models both process {len(both)} of {len(rows)}; process ratio "
            f"<= {limit} on {len(both) - len(over)}, worst {worst:.2f}"
            + (f" (over: {', '.join(over)})" if over else "")
        )


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # a tool's process: --worker TOOL ARGS...
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--envs", nargs="+", default=["minimal", "torch"])
    parser.add_argument("--venvs", type=Path, default=VENVS)
    parser.add_argument("--setup", action="store_true", help="create the minimal environments")
    import numpy as np
    import onnx

    from onnx_mbs.models.export import export_zoo
    from onnx_mbs.models.zoo import ZOO
    from onnx_mbs.passes import count_parameters

    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--out", default="bench/results/reduce.json")
    args = parser.parse_args()
    if args.setup:
        setup(args.venvs)
        return
    try:
        import onnxsim.pruning  # noqa: F401
    except ImportError:
        sys.exit("bench/reduce.py needs onnxsim beside torch: pip install onnxsim==0.8.1")
    results: dict = {"repeats": args.repeats, "envs": {}}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for model in args.models:
            shape = ZOO[model].input_shape
            onnx.save(export_zoo(model, "deploy", shape), folder / f"{model}.onnx")
            images = np.random.default_rng(0).integers(0, 256, (16, *shape[1:]), dtype=np.uint8)
            np.savez(folder / f"{model}.npz", x=images)
        for env in args.envs:
            pythons = interpreters(env, args.venvs)
            rows = []
            for model in args.models:
                rows.append(measure(model, folder, pythons, args.repeats, count_parameters))
                print(f"{env} {model} done, load {os.getloadavg()}", flush=True)
            results["envs"][env] = rows
    for env, rows in results["envs"].items():
        report(env, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
