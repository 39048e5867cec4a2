"""MBS against uniform width scaling on Fashion-MNIST, after the same retraining.

For each architecture (CIFAR-style ResNet-20 and ResNet-56 by default):

1. train a baseline with the project's training code (`onnx_mbs.models.train.train_model`: SGD
   lr 0.1, momentum 0.9, wd 5e-4, batch 128, cosine, random crop + flip) and export it in the
   BN-kept "train" form with its mean/std in the metadata;
2. reduce it with MBS and with uniform scaling at the same budgets (params 0.5 and 0.3) and at
   the default gamma (uniform then matched to the size MBS reaches);
3. retrain every reduced model through the PyTorch bridge with one recipe for all (plain
   cross-entropy, no distillation, no augmentation; SGD lr 0.02 momentum 0.9 wd 5e-4, batch 128,
   cosine), for several seeds, keeping the epoch with the best accuracy on a validation split
   held out from the TRAIN set;
4. measure top-1 on the 10k test set before and after retraining.

The question it answers: at equal parameter budgets, is MBS more accurate than uniform
scaling after the same retraining, beyond the spread over retraining seeds?

    python bench/experiment.py --quick                 # tiny subsets, a couple of minutes
    python bench/experiment.py                         # the full run (see bench/README.md)
    python bench/experiment.py --seeds 3 --archs resnet20 --out /tmp/exp.json

Writes the JSON after every architecture (with "complete": false until the end), then the plot
`accuracy_vs_params.png` beside it, and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnx_mbs.bridge import retrain
from onnx_mbs.data import open_data, to_arrays
from onnx_mbs.evaluate import evaluate
from onnx_mbs.models.export import INPUT_NAME, export_onnx
from onnx_mbs.models.train import (
    DATASET_NAME,
    FMNIST_DIR,
    channel_stats,
    load_fashion_mnist,
    train_model,
    with_metadata,
)
from onnx_mbs.models.zoo import get_entry
from onnx_mbs.passes import analyze_model, load_model
from onnx_mbs.pipeline import reduce
from onnx_mbs.runtime import choose_providers

HERE = Path(__file__).resolve().parent
INPUT_SHAPE = (1, 1, 28, 28)
# (label, budget): the same label is run once per strategy.
BUDGETS: list[tuple[str, str | None]] = [
    ("params=0.5", "params=0.5"),
    ("params=0.3", "params=0.3"),
    ("gamma=0.5", None),
]
STRATEGIES = ("mbs", "uniform")


@dataclass
class Settings:
    """Everything that decides the numbers; stored in the JSON beside them."""

    archs: list[str]
    seeds: list[int]
    train_size: int
    val_size: int
    test_size: int
    calib_size: int
    base_epochs: int
    base_lr: float
    base_seed: int
    retrain_epochs: int
    retrain_lr: float
    batch_size: int
    gamma: float
    channel_multiple: int
    device: str
    providers: list[str]
    quick: bool
    data: str
    deadline_minutes: float
    baseline_recipe: str = (
        "onnx_mbs.models.train.train_model: SGD momentum 0.9 wd 5e-4 batch 128, cosine, "
        "random crop (pad 2) + horizontal flip, cross-entropy"
    )
    retrain_recipe: str = (
        "onnx_mbs.bridge.retrain: SGD momentum 0.9 wd 5e-4 (not on BN/bias), cosine, "
        "cross-entropy only (no distillation), no augmentation, best epoch by validation top-1"
    )
    split: str = (
        "train = first train_size images of the IDX train file, validation = its last "
        "val_size images (disjoint), calibration = first calib_size training images, "
        "test = first test_size images of the t10k file"
    )


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value), min and max of per-seed accuracies."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def compare(mbs: dict[str, Any], uniform: dict[str, Any]) -> dict[str, Any]:
    """MBS minus uniform after retraining; 'beyond the spread' = seed ranges don't overlap."""
    a, b = mbs["after"], uniform["after"]
    if a is None or b is None:
        verdict = "not retrained"
    elif a["n"] < 2 or b["n"] < 2:
        verdict = "one seed: no spread to judge by"
    elif a["min"] > b["max"]:
        verdict = "MBS better, beyond the seed spread"
    elif a["max"] < b["min"]:
        verdict = "uniform better, beyond the seed spread"
    else:
        verdict = "within the seed spread"
    return {
        "arch": mbs["arch"],
        "budget": mbs["budget"],
        "params_mbs": mbs["params"],
        "params_uniform": uniform["params"],
        "after_diff": None if a is None or b is None else a["mean"] - b["mean"],
        "before_diff": mbs["acc_before"] - uniform["acc_before"],
        "verdict": verdict,
    }


def answer(comparisons: list[dict[str, Any]]) -> str:
    """One sentence from the comparisons, whichever way they go."""
    comparisons = [c for c in comparisons if c["after_diff"] is not None]
    if not comparisons:
        return "no model was retrained"
    better = sum(c["verdict"].startswith("MBS better") for c in comparisons)
    worse = sum(c["verdict"].startswith("uniform better") for c in comparisons)
    judged = sum(not c["verdict"].startswith("one seed") for c in comparisons)
    n = len(comparisons)
    mean_diff = statistics.fmean(c["after_diff"] for c in comparisons)
    tail = f"mean difference MBS - uniform {100 * mean_diff:+.2f} points over {n} comparisons"
    if judged == 0:
        return f"cannot say beyond seed spread (one seed per model); {tail}"
    if better == n:
        head = "yes: MBS is more accurate beyond the seed spread in every comparison"
    elif better == 0 and worse == 0:
        head = "no: every MBS/uniform difference is within the seed spread"
    elif better == 0:
        head = f"no: uniform is better beyond the spread in {worse} of {n}, MBS in none"
    else:
        head = (
            f"mixed: MBS better beyond the spread in {better} of {n}, uniform in {worse}, "
            f"the rest within the spread"
        )
    return f"{head}; {tail}"


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write through a temporary file so a killed run never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_jsonable))
    os.replace(tmp, path)


def save(results: dict[str, Any], path: Path, start: float) -> None:
    results["total_seconds"] = time.perf_counter() - start
    write_json(results, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def load_arrays(s: Settings, mean: list[float], std: list[float]) -> dict[str, Any]:
    """Preprocessed float arrays for the bridge (the project's own open_data preprocessing)."""
    source = open_data(f"{s.data}:train", INPUT_NAME, INPUT_SHAPE, mean=mean, std=std)
    x, y = to_arrays(source)
    return {
        "train": (x[: s.train_size], y[: s.train_size]),
        "val": (x[len(x) - s.val_size :], y[len(y) - s.val_size :]),
        "preprocessing": source.preprocess.describe() if source.preprocess else "",
    }


def test_source(s: Settings, mean: list[float], std: list[float]):
    return open_data(
        f"{s.data}:test", INPUT_NAME, INPUT_SHAPE, mean=mean, std=std, limit=s.test_size
    )


def accuracy(model: onnx.ModelProto, s: Settings, mean: list[float], std: list[float]) -> float:
    return evaluate(model, test_source(s, mean, std), s.providers, progress=False).top1


def train_baseline(arch: str, s: Settings, raw_train, mean, std, workdir: Path) -> dict[str, Any]:
    """Train the baseline with the project's training loop and save its train-form ONNX."""
    torch.manual_seed(s.base_seed)
    module = get_entry(arch).build(num_classes=10, in_channels=1)
    device = torch.device("cuda" if s.device.startswith("cuda") else "cpu")
    start = time.perf_counter()
    if device.type == "cuda":
        # train_model builds CPU batches; run it on CPU tensors but let the module live on GPU.
        module = module.to(device)
        module = _OnDevice(module, device)
    train_model(
        module,
        raw_train,
        None,
        mean=mean,
        std=std,
        epochs=s.base_epochs,
        lr=s.base_lr,
        seed=s.base_seed,
        log=lambda line: print(f"  {arch} baseline {line}", flush=True),
    )
    seconds = time.perf_counter() - start
    module = module.inner.cpu() if isinstance(module, _OnDevice) else module
    proto = export_onnx(module, INPUT_SHAPE, form="train", dynamic_batch=True)
    proto = with_metadata(
        proto,
        {
            "onnx_mbs.mean": ",".join(f"{v:.6f}" for v in mean),
            "onnx_mbs.std": ",".join(f"{v:.6f}" for v in std),
            "onnx_mbs.dataset": DATASET_NAME,
            "onnx_mbs.model": arch,
        },
    )
    path = workdir / f"{arch}_baseline.onnx"
    onnx.save(proto, path)
    analysis = analyze_model(load_model(proto))
    t0 = time.perf_counter()
    top1 = accuracy(proto, s, mean, std)
    return {
        "arch": arch,
        "path": str(path),
        "params": analysis.total_params,
        "macs": analysis.total_macs,
        "test_top1": top1,
        "train_seconds": seconds,
        "train_images_per_second": s.base_epochs * len(raw_train[0]) / seconds,
        "eval_seconds": time.perf_counter() - t0,
    }


class _OnDevice(torch.nn.Module):
    """Moves CPU batches to the module's device and logits back, so train_model runs on a GPU."""

    def __init__(self, inner: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.device)).cpu()


def reduce_variant(
    arch: str,
    label: str,
    budget: str | None,
    strategy: str,
    baseline: dict[str, Any],
    s: Settings,
    mean: list[float],
    std: list[float],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Reduce the baseline and measure the reduced model before any retraining."""
    t0 = time.perf_counter()
    reduced, report = reduce(
        baseline["path"],
        f"{s.data}:train",
        budget=budget,
        # The setting these results were recorded with (before the global reading and the
        # linear map became the defaults); the model-quality rerun changes it.
        width_map=f"power:{s.gamma}",
        receptive_field="local",
        strategy=strategy,
        providers="cuda" if "CUDAExecutionProvider" in s.providers else "cpu",
        channel_multiple=s.channel_multiple,
        limit=s.calib_size,
        evaluate_accuracy=False,
        progress=False,
    )
    reduce_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    before = accuracy(reduced, s, mean, std)
    plan = report.plan
    variant = {
        "arch": arch,
        "strategy": strategy,
        "budget": label,
        "budget_asked": budget,
        "params": report.after.total_params,
        "macs": report.after.total_macs,
        "params_fraction": report.after.total_params / report.before.total_params,
        "macs_fraction": report.after.total_macs / report.before.total_macs,
        "gamma": plan.width_map.value,
        "macroblocks": [
            {
                "index": m.index,
                "resolution": m.resolution,
                "redundancy": m.redundancy,
                "beta": m.beta,
            }
            for m in plan.macroblocks
        ],
        "acc_before": before,
        "after": None,
        "runs": [],
        "reduce_seconds": reduce_seconds,
        "reduce_timings": report.timings,
        "eval_seconds": time.perf_counter() - t0,
    }
    print(
        f"  {arch} {strategy:7s} {label}: {variant['params']:,} params "
        f"({100 * variant['params_fraction']:.1f}%), top-1 before retraining {before:.4f}",
        flush=True,
    )
    return reduced, variant


def retrain_variant(
    reduced: onnx.ModelProto,
    variant: dict[str, Any],
    arrays: dict[str, Any],
    s: Settings,
    seed: int,
    mean: list[float],
    std: list[float],
) -> None:
    """Retrain one reduced model with one seed; append the run to the variant."""
    result = _retrain(reduced, arrays, s, seed)
    t0 = time.perf_counter()
    after = accuracy(result.model, s, mean, std)
    variant["runs"].append(
        {
            "seed": seed,
            "test_top1": after,
            "best_epoch": result.best_epoch,
            "best_val_top1": result.best_val_top1,
            "seconds": result.seconds,
            "images_per_second": result.images_per_second,
            "device": result.device,
            "eval_seconds": time.perf_counter() - t0,
            "history": [asdict(h) for h in result.history],
        }
    )
    variant["after"] = spread([r["test_top1"] for r in variant["runs"]])
    print(
        f"  {variant['arch']} {variant['strategy']:7s} {variant['budget']}: seed {seed} "
        f"test top-1 {after:.4f} (before retraining {variant['acc_before']:.4f}, "
        f"{result.seconds:.0f}s)",
        flush=True,
    )


def _retrain(model: onnx.ModelProto, arrays: dict[str, Any], s: Settings, seed: int):
    return retrain(
        model,
        arrays["train"],
        arrays["val"],
        epochs=s.retrain_epochs,
        lr=s.retrain_lr,
        batch_size=s.batch_size,
        optimizer="sgd",
        seed=seed,
        device=s.device,
        progress=False,
    )


def print_table(results: dict[str, Any]) -> None:
    """The summary as a markdown table, then the comparisons and the answer."""
    print()
    print(
        "| arch | strategy | budget | params | MACs | top-1 before retrain | top-1 after "
        "(mean ± std) | min / max | seeds | retrain s/run |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch, block in results["archs"].items():
        base = block["baseline"]
        print(
            f"| {arch} | baseline | - | {base['params']:,} | {base['macs'] / 1e6:.1f}M | "
            f"{100 * base['test_top1']:.2f} | - | - | - | - |"
        )
        for v in block["variants"]:
            a = v["after"]
            after = "- | - | 0 | -"
            if a is not None:
                seconds = statistics.fmean(r["seconds"] for r in v["runs"])
                after = (
                    f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f} | "
                    f"{100 * a['min']:.2f} / {100 * a['max']:.2f} | {a['n']} | {seconds:.0f}"
                )
            print(
                f"| {arch} | {v['strategy']} | {v['budget']} | {v['params']:,} | "
                f"{v['macs'] / 1e6:.1f}M | {100 * v['acc_before']:.2f} | {after} |"
            )
    print()
    print("| arch | budget | params MBS / uniform | MBS - uniform after | before | verdict |")
    print("|---|---|---:|---:|---:|---|")
    for c in results["comparisons"]:
        diff = "-" if c["after_diff"] is None else f"{100 * c['after_diff']:+.2f}"
        print(
            f"| {c['arch']} | {c['budget']} | {c['params_mbs']:,} / {c['params_uniform']:,} | "
            f"{diff} | {100 * c['before_diff']:+.2f} | {c['verdict']} |"
        )
    print()
    print(
        "At equal parameter budgets, is MBS more accurate than uniform after the same "
        f"retraining, beyond the seed spread? {results['answer']}"
    )
    if results["skipped"]:
        print(f"skipped (deadline): {', '.join(results['skipped'])}")
    print(f"total wall time {results['total_seconds'] / 60:.1f} min")


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick
    pick = lambda full, small, given: given if given is not None else (small if quick else full)  # noqa: E731
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Settings(
        archs=args.archs,
        seeds=list(range(pick(3, 1, args.seeds))),
        train_size=pick(10000, 512, args.train_size),
        val_size=pick(2000, 256, args.val_size),
        test_size=pick(10000, 1000, args.test_size),
        calib_size=pick(256, 64, args.calib_size),
        base_epochs=pick(3, 1, args.epochs),
        base_lr=0.1,
        base_seed=0,
        retrain_epochs=pick(2, 1, args.retrain_epochs),
        retrain_lr=args.retrain_lr,
        batch_size=128,
        gamma=0.5,
        channel_multiple=8,
        device=device,
        providers=choose_providers(args.providers),
        quick=quick,
        data=args.data,
        deadline_minutes=pick(75.0, 30.0, args.deadline),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets, for smoke tests")
    parser.add_argument("--seeds", type=int, help="retraining seeds per reduced model")
    parser.add_argument("--archs", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "experiment.json")
    parser.add_argument("--train-size", type=int, help="training images (train and retrain)")
    parser.add_argument("--val-size", type=int, help="validation images, held out from train")
    parser.add_argument("--test-size", type=int, help="test images (10000 = all)")
    parser.add_argument("--calib-size", type=int, help="calibration images for the statistics")
    parser.add_argument("--epochs", type=int, help="baseline training epochs")
    parser.add_argument("--retrain-epochs", type=int, help="retraining epochs")
    parser.add_argument("--retrain-lr", type=float, default=0.02)
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    parser.add_argument("--providers", default="auto", help="onnxruntime: auto, cpu, cuda")
    parser.add_argument("--data", default=str(FMNIST_DIR), help="Fashion-MNIST IDX folder")
    parser.add_argument(
        "--deadline",
        type=float,
        help="minutes after which further seeds are skipped (first seed always runs)",
    )
    parser.add_argument("--keep-models", type=Path, help="keep the baseline ONNX files here")
    args = parser.parse_args(argv)
    s = settings_from_args(args)
    start = time.perf_counter()
    raw_train, raw_labels = load_fashion_mnist("train", s.data)
    raw_train, raw_labels = raw_train[: s.train_size], raw_labels[: s.train_size]
    mean, std = channel_stats(raw_train)
    mean = [round(v, 6) for v in mean]  # as the metadata stores them
    std = [round(v, 6) for v in std]
    arrays = load_arrays(s, mean, std)
    print(
        f"Fashion-MNIST: {s.train_size} train, {s.val_size} val (held out from train), "
        f"{s.test_size} test; device {s.device}, providers {s.providers}; seeds {s.seeds}",
        flush=True,
    )
    results: dict[str, Any] = {
        "complete": False,
        "settings": asdict(s),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "preprocessing": arrays["preprocessing"],
        "mean": mean,
        "std": std,
        "archs": {},
        "comparisons": [],
        "skipped": [],
    }
    deadline = start + 60 * s.deadline_minutes
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep_models or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        # Phase 1: baselines and every reduced model, measured before retraining.
        pairs: list[dict[str, tuple[onnx.ModelProto, dict[str, Any]]]] = []
        for arch in s.archs:
            print(f"{arch}: training the baseline ({s.base_epochs} epochs)", flush=True)
            baseline = train_baseline(arch, s, (raw_train, raw_labels), mean, std, workdir)
            print(
                f"  {arch} baseline: {baseline['params']:,} params, test top-1 "
                f"{baseline['test_top1']:.4f}, {baseline['train_seconds']:.0f}s",
                flush=True,
            )
            block: dict[str, Any] = {"baseline": baseline, "variants": []}
            results["archs"][arch] = block
            for label, budget in BUDGETS:
                pair = {}
                for strategy in STRATEGIES:
                    pair[strategy] = reduce_variant(
                        arch, label, budget, strategy, baseline, s, mean, std
                    )
                    block["variants"].append(pair[strategy][1])
                pairs.append(pair)
            save(results, args.out, start)
        # Phase 2: retrain seed by seed, so that every pair has its first seed before any
        # second one; later seeds are skipped when a pair would end past the deadline.
        pair_seconds: dict[int, float] = {}
        for seed in s.seeds:
            for index, pair in enumerate(pairs):
                now = time.perf_counter()
                if index in pair_seconds and now + pair_seconds[index] > deadline:
                    results["skipped"].append(
                        f"{pair['mbs'][1]['arch']} {pair['mbs'][1]['budget']} seed {seed}"
                    )
                    print(f"  skipping seed {seed} of pair {index}: past the deadline", flush=True)
                    continue
                for strategy in STRATEGIES:
                    reduced, variant = pair[strategy]
                    retrain_variant(reduced, variant, arrays, s, seed, mean, std)
                pair_seconds[index] = time.perf_counter() - now
                results["comparisons"] = [compare(p["mbs"][1], p["uniform"][1]) for p in pairs]
                save(results, args.out, start)
    results["comparisons"] = [compare(p["mbs"][1], p["uniform"][1]) for p in pairs]
    results["answer"] = answer(results["comparisons"])
    results["total_seconds"] = time.perf_counter() - start
    results["complete"] = True
    write_json(results, args.out)
    from plot_results import plot_accuracy_vs_params

    plot_path = args.out.parent / "accuracy_vs_params.png"
    plot_accuracy_vs_params(results, plot_path)
    print_table(results)
    print(f"wrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
