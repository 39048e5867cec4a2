"""The GPU check (issue 15): CUDA statistics, CUDA retraining, the demo and torchrun, in one run.

Runs on a machine with an NVIDIA GPU, onnxruntime-gpu and a CUDA torch (`scripts/gpu_check.sh`
sets that up on the device machine) and writes every figure, with the command that made it, to
one JSON file:

    python bench/gpu.py --out bench/results/gpu.json [--quick]

- statistics: `bench/stats.py --providers cuda` (ResNet-50 at 224, ResNet-56 at 32): collect_stats
  against plain CUDA inference of the same model and data, per batch (target at most 1.15x),
  with the default GlobalAveragePool instrumentation (and the ReduceMean alternative on ResNet-50);
- bridge: `bench/bridge.py --device cuda --amp bf16`: forward+backward of the OnnxModule against
  the native torch module (target at most 1.1x), and bf16 autocast's training speedup;
- demo: the README demo (reduce, retrain, eval) on the GPU with `--providers auto` and
  `--device cuda`, its accuracies and times, plus the retrain again under `--amp bf16`;
- torchrun: 2 processes on the one GPU (gloo, since NCCL wants a GPU per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "bundled"
# -P (and PYTHONSAFEPATH for the processes torchrun starts): never import the source tree's
# onnx_mbs/ in place of the installed package.
PY = [sys.executable, "-P"]
ENV = {**os.environ, "PYTHONSAFEPATH": "1"}


def run(args: list[str], log: list[dict]) -> subprocess.CompletedProcess:
    """Run a command from the repository root, time it, keep its tail in the log."""
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shown = " ".join(a if a != sys.executable else "python" for a in args)
    log.append(
        {
            "command": shown,
            "rc": done.returncode,
            "seconds": round(seconds, 2),
            "stdout_tail": done.stdout[-1500:],
            "stderr_tail": done.stderr[-1500:],
        }
    )
    print(f"[{done.returncode}] {seconds:7.1f}s  {shown}", flush=True)
    return done


def bench_json(script: str, extra: list[str], log: list[dict]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        done = run([*PY, f"bench/{script}", *extra, "--json", f.name], log)
        if done.returncode != 0:
            return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
        return {**json.loads(Path(f.name).read_text()), "command": log[-1]["command"]}


def onnx_mbs(args: list[str], log: list[dict]) -> subprocess.CompletedProcess:
    return run([*PY, "-m", "onnx_mbs", *args], log)


def top1(model: Path, log: list[dict]) -> float | None:
    done = onnx_mbs(
        ["eval", str(model), "--data", str(BUNDLED / "fmnist_sample.npz"), "--json"], log
    )
    return json.loads(done.stdout)["top1"] if done.returncode == 0 else None


def demo(work: Path, log: list[dict]) -> dict:
    """The README demo on the GPU, each step timed; the retrain again with bf16 autocast."""
    original = BUNDLED / "resnet20_fmnist.onnx"
    small, tuned, tuned_bf16 = work / "small.onnx", work / "small.ft.onnx", work / "small.bf16.onnx"
    reduce = onnx_mbs(
        [
            "reduce",
            str(original),
            "-o",
            str(small),
            "--providers",
            "auto",
            "--data",
            str(BUNDLED / "fmnist_sample.npz"),
            "--budget",
            "params=0.5",
        ],
        log,
    )
    result: dict = {"reduce": log[-1]}
    result["statistics_provider"] = next(
        (line for line in reduce.stderr.splitlines() if line.startswith("statistics:")), None
    )
    retrain = [
        "retrain",
        str(small),
        "--data",
        str(BUNDLED / "fmnist_train_sample.npz"),
        "--teacher",
        str(original),
        "--epochs",
        "2",
        "--lr",
        "0.02",
        "--device",
        "cuda",
    ]
    onnx_mbs([*retrain, "-o", str(tuned)], log)
    result["retrain"] = log[-1]
    onnx_mbs([*retrain, "-o", str(tuned_bf16), "--amp", "bf16"], log)
    result["retrain_bf16"] = log[-1]
    result["top1"] = {
        "original": top1(original, log),
        "reduced": top1(small, log),
        "retrained": top1(tuned, log),
        "retrained_bf16": top1(tuned_bf16, log),
    }
    return result


def torchrun(work: Path, log: list[dict]) -> dict:
    out = work / "ddp.onnx"
    args = [
        *PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "onnx_mbs",
        "retrain",
        str(BUNDLED / "resnet20_fmnist.onnx"),
        "-o",
        str(out),
        "--data",
        str(BUNDLED / "fmnist_train_sample.npz"),
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--device",
        "cuda",
    ]
    run(args, log)
    return {**log[-1], "top1": top1(out, log) if out.exists() else None}


def device_info() -> dict:
    import onnxruntime
    import torch

    from onnx_mbs.runtime import choose_providers, cuda_unavailable_reason

    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda_unavailable_reason": cuda_unavailable_reason(),
        "providers_auto": choose_providers("auto"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gpu.json")
    p.add_argument("--quick", action="store_true", help="small sizes: check the script runs")
    args = p.parse_args()
    images, repeats = (256, 1) if args.quick else (2048, 3)
    log: list[dict] = []
    figures: dict = {"command": " ".join(["python", *sys.argv]), "device": device_info()}
    print(json.dumps(figures["device"]), flush=True)
    # pool: collect_stats' default; reduce measured once beside it, on ResNet-50
    for model, count, means in (
        ("resnet50", images // 2, ("reduce", "pool")),
        ("resnet56", images * 2, ("pool",)),
    ):
        for mean in means:
            figures[f"stats_{model}_{mean}"] = bench_json(
                "stats.py",
                [
                    "--providers",
                    "cuda",
                    "--model",
                    model,
                    "--images",
                    str(count),
                    "--repeats",
                    str(repeats),
                    "--spatial-mean",
                    mean,
                ],
                log,
            )
    figures["bridge"] = {
        str(batch): bench_json(
            "bridge.py",
            [
                "--device",
                "cuda",
                "--batch",
                str(batch),
                "--repeats",
                str(10 * repeats),
                "--steps",
                "10",
                "--amp",
                "bf16",
            ],
            log,
        )
        for batch in (128, 512)
    }
    with tempfile.TemporaryDirectory() as tmp:
        figures["demo"] = demo(Path(tmp), log)
        figures["torchrun_2_processes_one_gpu"] = torchrun(Path(tmp), log)
    figures["log"] = log
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if os.environ.get("GPU_CHECK_STRICT") and any(step["rc"] != 0 for step in log):
        sys.exit(1)


if __name__ == "__main__":
    main()
