"""Which strategy spends each budget best? MBS, cost-aware MBS and the rest at equal cost
(issues 16 and 28).

For each converged Fashion-MNIST baseline (ResNet-20 and ResNet-56, at least 92% test top-1;
refused below that unless --allow-weak-baseline), every arm is reduced to every budget, once
(deterministic: calibration on the first `calib_size` TRAIN images), and retrained with one
recipe for all: distillation from the baseline as teacher plus the labels through
`onnx_mbs.bridge.retrain`, the same epochs, images and seeds for every arm.

Arms: `mbs` (global receptive-field reading), `mbs-cost` (MBS's worth of each channel priced
by the budget's metric), `uniform`, `global` (one importance ranking across all groups) and
`onnxsim` (onnxsim 0.8.1's `apply_structured_pruning` on the BN-folded baseline, its sparsity
bisected to the budget's target; the bridge re-inserts BN to retrain it); `mbs-local` (local
reading) on request. Budgets: params=0.5, params=0.3, flops=0.5, flops=0.3, latency=0.6
(onnxruntime CPU, 1 thread, measured on the written model against the baseline) and MBS's own
default (no budget), every other arm matched to the params MBS's default reaches. An arm whose
size is not within 2% of its target (measured latency: 5%, the tolerance `reduce` re-plans at)
is recorded and left out of the comparisons. `settings.default_arm` records, per budget, the
arm `onnx-mbs reduce` runs by default there (`--strategy auto`, onnx_mbs/auto.py);
`--auto-table` regenerates that table from the results.

Top-1 on the test set with onnxruntime (`onnx_mbs.evaluate`): baselines, every reduced model
before retraining, every retrained model; with --validation N, on the last N images of the
train split instead (never trained on): the split to tune a strategy on.

    python bench/experiment.py                  # the full run -> bench/results/experiment.json
    python bench/experiment.py --resume         # continue a run that was stopped
    python bench/experiment.py --auto-table     # onnx_mbs/auto.py's table, from the results
    python bench/experiment.py --table          # the README's markdown table, from the JSON
    python bench/experiment.py --quick --out /tmp/exp.json   # tiny subsets, minutes

Retraining images per arch are chosen from measured throughput so that the whole run takes
about --target-minutes (recorded under "plan" in the JSON), unless --train-images fixes them.
Retraining goes arch by arch (every seed of the first arch before the second). The JSON is
written after every run with "complete": false and "partial": true until the end; --resume
skips every run already in it and retries those a deadline skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from retrain import folded_form

from onnx_mbs.auto import choose_strategy
from onnx_mbs.bridge import retrain
from onnx_mbs.data import to_arrays
from onnx_mbs.data.fit import metadata, open_for_model
from onnx_mbs.data.sources import ArraySource
from onnx_mbs.evaluate import evaluate
from onnx_mbs.latency import measure_models
from onnx_mbs.models import BUNDLED_DIR
from onnx_mbs.models.train import FMNIST_DIR
from onnx_mbs.passes import BadInputError, analyze_model, count_parameters, load_model
from onnx_mbs.pipeline import LATENCY_TOLERANCE, reduce
from onnx_mbs.plan import STRATEGIES, Budget
from onnx_mbs.runtime import CPU, choose_providers

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "experiment.json"
EARLIER_OUT = HERE / "results" / "experiment_issue16.json"  # issue 16's run: 4 arms, 4 budgets
FORMAT = "issue-28"
FORMATS = ("issue-16", FORMAT)  # --table, --plot and --auto-table read both
BASELINES = {
    "resnet20": BUNDLED_DIR / "resnet20_fmnist_e8.onnx",
    "resnet56": BUNDLED_DIR / "resnet56_fmnist_e7.onnx",
}
ARMS = ("mbs", "mbs-cost", "mbs-branch", "uniform", "global", "onnxsim", "mbs-local")
DEFAULT_ARMS = ARMS[:6]
BUDGETS = ("params=0.5", "params=0.3", "flops=0.5", "flops=0.3", "latency=0.6", "default")
METRIC_OF = {"params": "params", "flops": "macs", "latency": "latency"}  # budget -> cell key
LATENCY_THREADS = 1  # latency budgets: onnxruntime CPU, one thread
MIN_BASELINE_TOP1 = 0.92
MATCH_TOLERANCE = 0.02  # an arm is at its target when within 2% of it (relative)
NEGLIGIBLE_POINTS = 0.5  # this project's reading of the paper's "negligible" degradation
PAPER_CLAIM = "MBS (arXiv:1809.06569) reports its reductions with negligible accuracy degradation"
VERDICT_RULE = (
    "beyond the seed spread = the difference of the mean top-1 after retraining exceeds twice "
    "the larger of the two sample standard deviations over seeds; otherwise 'within spread'"
)


@dataclass
class Settings:
    """Everything that decides the numbers; stored in the JSON beside them (and reused by
    --resume)."""

    archs: list[str]
    baselines: dict[str, str]
    arms: list[str]
    budgets: list[str]
    seeds: list[int]
    data: str
    calib_size: int = 256
    test_size: int | None = None  # None: the whole test split
    train_images: dict[str, int] = field(default_factory=dict)  # empty: chosen by the plan
    epochs: int = 1
    lr: float = 0.02
    batch_size: int = 128
    distill_alpha: float = 0.5
    temperature: float = 4.0
    # 1, not reduce's 8: the question is the policy, not the rounding (at 8, ResNet-20's
    # 16-channel groups can only be 8 or 16, and MBS and uniform at params=0.5 wrote one model)
    channel_multiple: int = 1
    # Latency budgets: 8, onnxruntime's CPU channel block (--channel-multiple auto on CPU):
    # at 1, odd widths run slower than the full model (ResNet-20 at half the MACs by uniform
    # scaling measured 118% of the baseline's time), and no arm could reach latency=0.6.
    latency_channel_multiple: int = 8
    width_map: str | None = None  # None: reduce's default for each strategy
    device: str = "cpu"
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    target_minutes: float = 60.0
    deadline_minutes: float = 85.0
    probe_images: int = 1024
    allow_weak_baseline: bool = False
    quick: bool = False
    validation: int | None = None  # top-1 on the last N train images instead of the test set
    default_arm: dict[str, str] = field(default_factory=dict)  # budget -> `reduce`'s default
    recipe: str = (
        "onnx_mbs.bridge.retrain with the baseline as teacher: loss = alpha * KL(T) + "
        "(1 - alpha) * cross-entropy on the labels; SGD momentum 0.9, wd 5e-4 (not on BN/bias), "
        "cosine schedule per step, no augmentation; BN re-inserted for BN-folded graphs "
        "(onnxsim); the last epoch is kept (no validation split)"
    )
    split: str = (
        "retraining = the first train_images[arch] images of the IDX train split; calibration "
        "= its first calib_size images; test = the first test_size images of the test split "
        "(all of it when null), or with validation = N the last N images of the train split"
    )


# ---------------------------------------------------------------- budgets and matching


def target(budget: str, default_fraction: float | None) -> tuple[str, float | None]:
    """(metric, fraction) an arm is reduced to at `budget`: "default" is MBS's own size
    (fraction None for MBS itself; its params fraction for every other arm)."""
    if budget == "default":
        return "params", default_fraction
    metric, value = budget.split("=")
    return METRIC_OF[metric], float(value)


def budget_text(metric: str, fraction: float) -> str:
    """The --budget string that asks for `fraction` of `metric`."""
    name = {v: k for k, v in METRIC_OF.items()}[metric]
    return f"{name}={fraction:.6f}"


def default_arms(budgets: list[str]) -> dict[str, str]:
    """Per budget, the arm `onnx-mbs reduce` runs there by default (`--strategy auto`)."""
    return {b: choose_strategy(None if b == "default" else Budget.parse(b))[0] for b in budgets}


def match_error(reached: float, wanted: float) -> float:
    """Relative distance of a reached size fraction from its target."""
    return abs(reached / wanted - 1.0)


def tolerance(metric: str) -> float:
    """Measured latency is as noisy as the machine: it is matched within the tolerance
    `reduce` itself re-plans at (5%, 3 points at 0.6)."""
    return LATENCY_TOLERANCE if metric == "latency" else MATCH_TOLERANCE


def sizes(model: onnx.ModelProto) -> tuple[int, int]:
    """(params, MACs) as `onnx_mbs analyze` counts them, for every arm alike."""
    return count_parameters(model), analyze_model(load_model(model)).total_macs


def bisect_sparsity(
    prune, measure, wanted: float, steps: int = 14
) -> tuple[onnx.ModelProto | None, float, float, list[list[float]]]:
    """The sparsity whose pruned model's size fraction (`measure`, falling with sparsity) is
    nearest `wanted`: (model, sparsity, fraction, [[sparsity, fraction], ...] tried)."""
    lo, hi = 0.0, 0.99
    best: tuple[float, onnx.ModelProto | None, float, float] = (math.inf, None, 0.0, 1.0)
    tried: list[list[float]] = []
    for _ in range(steps):
        s = (lo + hi) / 2
        model = prune(s)
        fraction = measure(model)
        tried.append([s, fraction])
        error = match_error(fraction, wanted)
        if error < best[0]:
            best = (error, model, s, fraction)
        if error < 0.002:
            break
        lo, hi = (s, hi) if fraction > wanted else (lo, s)
    return best[1], best[2], best[3], tried


# ---------------------------------------------------------------- statistics and verdicts


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value), min, max and n of per-seed accuracies."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def verdict(mbs: dict[str, float], other: dict[str, float]) -> str:
    """Is the first arm more accurate than `other` beyond the seed spread (VERDICT_RULE)?"""
    if mbs["n"] < 2 or other["n"] < 2:
        return "one seed: no spread"
    diff = mbs["mean"] - other["mean"]
    if abs(diff) <= 2 * max(mbs["std"], other["std"]):
        return "within spread"
    return "yes" if diff > 0 else "no"


COST_NAMES = {"params": "params", "macs": "MACs", "latency": "latency"}
REFERENCES = ("mbs", "mbs-cost", "mbs-branch")  # the arms compared with every other arm


def compare(
    cells: list[dict[str, Any]], default_arm: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """MBS, cost-aware MBS and each budget's default arm against every other arm, per arch
    and budget, where both reached the same size. Rows keep issue 16's keys ("mbs" holds the
    reference arm's figures); "reference" names it, "default" marks the default arm's rows."""
    by_key = {(c["arch"], c["budget"], c["arm"]): c for c in cells}
    rows = []
    for c in cells:
        default = (default_arm or {}).get(c["budget"])
        references = list(dict.fromkeys([*REFERENCES, *([default] if default else [])]))
        for reference in references:
            ref = by_key.get((c["arch"], c["budget"], reference))
            if c["arm"] == reference or c.get("after") is None:
                continue
            if ref is None or ref.get("after") is None:
                continue
            rows.append(
                {
                    "arch": c["arch"],
                    "budget": c["budget"],
                    "cost": COST_NAMES[c["metric"]],
                    "reference": reference,
                    "default": reference == default,
                    "other": c["arm"],
                    "mbs": ref["after"],
                    "other_after": c["after"],
                    "difference": ref["after"]["mean"] - c["after"]["mean"],
                    "verdict": verdict(ref["after"], c["after"]),
                }
            )
    return rows


def auto_table(sources: list[tuple[str, dict[str, Any]]]) -> dict[str, tuple[str, str]]:
    """onnx_mbs/auto.py's table from results, newest first: per metric, the strategy whose
    retrained models have the best mean top-1 over that metric's budgets and the archs where
    every arm `reduce` can run has every seed there. Read from the first results that settle
    the metric on all their archs, else (a metric no such results measured) from the first
    that settle it on some (the why names the archs, and those still running): evidence
    over every architecture outranks newer evidence over fewer. A metric measured nowhere
    follows flops (the nearest compute budget), and says so."""
    table: dict[str, tuple[str, str]] = {}
    for metric in ("params", "flops", "latency"):
        found = [(name, r, settled_means(r, metric)) for name, r in sources]
        found = [f for f in found if f[2]]
        if not found:
            continue
        found.sort(key=lambda f: f[2][1] != f[1]["settings"]["archs"])  # stable: newest first
        name, results, (means, archs) = found[0]
        best = max(means, key=means.get)
        others = [a for a in means if a != best]
        missing = [a for a in STRATEGIES if a not in means]
        s = results["settings"]
        budgets = [b for b in s["budgets"] if b.startswith(metric + "=")]
        running = [a for a in s["archs"] if a not in archs]
        table[metric] = (
            best,
            f"at {metric} budgets {best} was the most accurate after retraining: mean "
            f"top-1 {means[best]:.4f} ({best}) against "
            + ", ".join(f"{means[a]:.4f} ({a})" for a in others)
            + "".join(f", {a} not measured" for a in missing)
            + f"; {', '.join(archs)} at {', '.join(budgets)}"
            + "".join(f" ({a} still running)" for a in running)
            + f", {name}",
        )
    if "latency" not in table and "flops" in table:
        best = table["flops"][0]
        table["latency"] = (
            best,
            f"latency budgets not measured yet: the flops budgets' winner ({best})",
        )
    return table


def settled_means(
    results: dict[str, Any], metric: str
) -> tuple[dict[str, float], list[str]] | None:
    """Per arm `reduce` can run, its mean top-1 over `metric`'s budgets and the archs where
    every such arm has all its seeds at each, and those archs; None where no arch is settled
    (the ranking could still move)."""
    s = results["settings"]
    budgets = [b for b in s["budgets"] if b.startswith(metric + "=")]
    arms = [a for a in s["arms"] if a in STRATEGIES]
    if not budgets or not arms:
        return None
    by_key = {(c["arch"], c["budget"], c["arm"]): c for c in results["cells"]}

    def settled(c: dict[str, Any] | None) -> bool:
        return c is not None and c["status"] == "reduced" and len(c["runs"]) >= len(s["seeds"])

    archs = [
        arch
        for arch in s["archs"]
        if all(settled(by_key.get((arch, b, a))) for b in budgets for a in arms)
    ]
    if not archs:
        return None
    means = {
        arm: statistics.fmean(
            by_key[(arch, b, arm)]["after"]["mean"] for arch in archs for b in budgets
        )
        for arm in arms
    }
    return means, archs


def auto_source(table: dict[str, tuple[str, str]]) -> str:
    """The Python of onnx_mbs/auto.py's AUTO, for pasting."""
    lines = ["AUTO = {"]
    for metric, (strategy, why) in table.items():
        lines.append(f"    {json.dumps(metric)}: (")
        lines.append(f"        {json.dumps(strategy)},")
        words, line = why.split(" "), ""
        parts = []
        for w in words:
            if len(line) + len(w) + 1 > 80:
                parts.append(line)
                line = ""
            line += w + " "
        parts.append(line.rstrip())
        lines += [f"        {json.dumps(p)}" for p in parts]
        lines[-1] += ","
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


def default_loss(cells: list[dict[str, Any]], baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """Question 3: top-1 lost at MBS's default reduction against the baseline, after
    retraining, in points."""
    rows = []
    for c in cells:
        if c["arm"] != "mbs" or c["budget"] != "default" or c.get("after") is None:
            continue
        base = baselines[c["arch"]]["test_top1"]
        a = c["after"]
        loss = 100 * (base - a["mean"])
        rows.append(
            {
                "arch": c["arch"],
                "params_fraction": c["params_fraction"],
                "macs_fraction": c["macs_fraction"],
                "baseline": base,
                "after": a,
                "loss_points": loss,
                "loss_points_range": [100 * (base - a["max"]), 100 * (base - a["min"])],
                "negligible": loss <= NEGLIGIBLE_POINTS,
            }
        )
    return rows


# ---------------------------------------------------------------- the JSON


def write_json(results: dict[str, Any], path: Path) -> None:
    """Through a temporary file: a killed run never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BadInputError(f"cannot read {path}: {error}") from None
    if results.get("format") not in FORMATS:
        raise BadInputError(
            f"{path} was written by the earlier experiment (MBS vs uniform only); "
            "run python bench/experiment.py to make new results"
        )
    return results


def retried_latency_misses(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`cells` without those that missed a latency target: measured latency is as noisy as
    the machine, so a resumed run reduces them again (a size budget's miss is the arm's)."""
    return [c for c in cells if not (c["status"] == "unmatched" and c["metric"] == "latency")]


def with_current_defaults(results: dict[str, Any]) -> dict[str, Any]:
    """`results` (this format) with `settings.default_arm` as this checkout's `auto` picks
    and the comparisons made against it: the default arm is a fact of the code, which may
    have changed since the run started (auto's table is regenerated from partial results).
    Unfinished runs get their comparisons here, over the cells retrained so far."""
    if results.get("format") != FORMAT:
        return results
    default_arm = default_arms(results["settings"]["budgets"])
    return {
        **results,
        "settings": {**results["settings"], "default_arm": default_arm},
        "comparisons": compare(results["cells"], default_arm),
    }


# Settings that may differ between runs merged into one result: what each run covers, and
# how long it was given.
PER_RUN_SETTINGS = ("archs", "baselines", "train_images", "target_minutes", "deadline_minutes")


def check_same_recipe(
    first: dict[str, Any], other: dict[str, Any], verb: str, free: tuple[str, ...] = ()
) -> None:
    """Refuse to `verb` a run whose settings differ from `first`'s beyond what each run
    covers (PER_RUN_SETTINGS, and `free`)."""
    for key, value in first["settings"].items():
        if key not in (*PER_RUN_SETTINGS, *free) and other["settings"][key] != value:
            raise BadInputError(f"cannot {verb} runs whose setting {key} differs")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of disjoint archs under one recipe, as one result. Their wall time is the span
    from the first start to the last finish (runs side by side overlap), with each run's own
    time kept under "runs"."""
    first = parts[0]
    for part in parts[1:]:
        check_same_recipe(first, part, "merge")
    archs = [a for part in parts for a in part["settings"]["archs"]]
    if len(set(archs)) != len(archs):
        raise BadInputError(f"cannot merge runs that share an arch: {archs}")
    merged = {**first, "settings": dict(first["settings"])}
    merged["settings"]["archs"] = archs
    for key in ("baselines", "train_images"):
        merged["settings"][key] = {k: v for p in parts for k, v in p["settings"][key].items()}
    for key in ("target_minutes", "deadline_minutes"):  # one per run
        merged["settings"][key] = [p["settings"][key] for p in parts]
    merged["baselines"] = {k: v for p in parts for k, v in p["baselines"].items()}
    for key in ("cells", "skipped"):
        merged[key] = [item for p in parts for item in p[key]]
    merged["plan"] = {
        "target_minutes": [p.get("plan", {}).get("target_minutes") for p in parts],
        "archs": {k: v for p in parts for k, v in p.get("plan", {}).get("archs", {}).items()},
    }
    merged["runs"] = [
        {key: p.get(key) for key in ("command", "total_seconds", "started_at", "finished_at")}
        | {"archs": p["settings"]["archs"], "environment": p["environment"]}
        for p in parts
    ]
    merged["command"] = " ; ".join(p["command"] for p in parts)
    merged["total_seconds"] = max(p["finished_at"] for p in parts) - min(
        p["started_at"] for p in parts
    )
    merged["comparisons"] = compare(merged["cells"], first["settings"].get("default_arm"))
    merged["default_loss"] = default_loss(merged["cells"], merged["baselines"])
    merged["paper_claim"] = PAPER_CLAIM
    merged["complete"] = all(p["complete"] for p in parts)
    merged["partial"] = not merged["complete"]
    return merged


def add_arms(base: dict[str, Any], extras: list[dict[str, Any]]) -> dict[str, Any]:
    """`base` with the cells of later runs of new arms or budgets on its archs, under its
    recipe (issue 28's mbs-branch arm joined the finished run this way). A cell of `base`
    is refused, unless it failed: a later run's cell replaces a failed one. Among the added
    runs a later one's cell replaces an earlier one's (a rerun after a change; listed under
    "replaced"). Each added run is kept under "added" (command and times); the arms and
    budgets are the union, in ARMS order and the order first seen, the cells are sorted by
    arch, budget and arm, as one run writes them, and compared with the arms `auto` runs."""
    cells = {(c["arch"], c["budget"], c["arm"]): c for c in base["cells"]}
    base_keys, replaced = set(cells), []
    result = {**base, "settings": dict(base["settings"])}
    for extra in extras:
        check_same_recipe(base, extra, "add", free=("arms", "budgets", "default_arm"))
        for arch in extra["settings"]["archs"]:
            if arch not in base["settings"]["archs"]:
                raise BadInputError(f"cannot add a run of {arch}: not an arch of --out")
            if extra["baselines"][arch]["test_top1"] != base["baselines"][arch]["test_top1"]:
                raise BadInputError(f"cannot add a run whose {arch} baseline scores otherwise")
        for cell in extra["cells"]:
            key = (cell["arch"], cell["budget"], cell["arm"])
            if key in base_keys and cells[key]["status"] != "failed":
                raise BadInputError(f"cannot add {key}: --out has that cell already")
            if key in cells and key not in base_keys:  # an added run's cell, run again
                replaced.append({"cell": list(key), "by": extra["command"]})
            cells[key] = cell  # a failed cell gives way to its retry
        s = result["settings"]
        s["arms"] = [a for a in ARMS if a in s["arms"] or a in extra["settings"]["arms"]]
        s["budgets"] = list(dict.fromkeys([*s["budgets"], *extra["settings"]["budgets"]]))
        result["skipped"] = [*result["skipped"], *extra["skipped"]]
        result["added"] = [
            *result.get("added", []),
            {key: extra.get(key) for key in ("command", "total_seconds", "started_at",
                                             "finished_at", "complete", "environment")},
        ]  # fmt: skip
    s = result["settings"]
    order = {"arch": s["archs"], "budget": s["budgets"], "arm": list(ARMS)}
    if replaced:
        result["replaced"] = [*result.get("replaced", []), *replaced]
    result["cells"] = sorted(cells.values(), key=lambda c: [order[k].index(c[k]) for k in order])
    result["default_loss"] = default_loss(result["cells"], result["baselines"])
    result["complete"] = base["complete"] and all(e["complete"] for e in extras)
    result["partial"] = not result["complete"]
    return with_current_defaults(result)  # compared with the arms `auto` runs now


# ---------------------------------------------------------------- the run


class Experiment:
    """One run: its settings, the JSON it grows, the files it keeps for --resume."""

    def __init__(self, settings: Settings, out: Path, results: dict[str, Any] | None = None):
        self.s = settings
        self.out = out
        self.work = out.parent / "tmp" / f"{out.stem}_models"
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.mbs_sizes: dict[str, float | None] = {}  # MBS's default size, runs without it
        self.results = results or {
            "format": FORMAT,
            "complete": False,
            "partial": True,
            "command": "python " + " ".join(sys.argv),
            "settings": asdict(settings),
            "environment": environment(settings),
            "verdict_rule": VERDICT_RULE,
            "match_tolerance": MATCH_TOLERANCE,
            "baselines": {},
            "cells": [],
            "skipped": [],
        }
        self.before = self.results.get("total_seconds", 0.0)
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.models: dict[str, dict[str, onnx.ModelProto]] = {}

    # -- helpers

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def save(self) -> None:
        self.results["total_seconds"] = self.elapsed()
        self.results.setdefault("started_at", time.time() - self.elapsed())
        self.results["finished_at"] = time.time()
        write_json(self.results, self.out)

    def cell(self, arch: str, budget: str, arm: str) -> dict[str, Any] | None:
        return next(
            (
                c
                for c in self.results["cells"]
                if (c["arch"], c["budget"], c["arm"]) == (arch, budget, arm)
            ),
            None,
        )

    def source(self, arch: str, split: str, limit: int | None):
        base = self.models[arch]["kept"]
        meta = metadata(base)
        return open_for_model(
            f"{self.s.data}:{split}",
            base,
            mean=meta.get("onnx_mbs.mean"),
            std=meta.get("onnx_mbs.std"),
            limit=limit,
        )

    def top1(self, arch: str, model: onnx.ModelProto) -> float:
        return evaluate(model, self.scored(arch), self.s.providers, progress=False).top1

    def scored(self, arch: str):
        """The images top-1 is read on: the test split, or the held-out end of the train
        split with --validation."""
        if not self.s.validation:
            return self.source(arch, "test", self.s.test_size)
        key = f"{arch}:validation"
        if key not in self.arrays:
            n = self.s.validation
            if max(self.s.train_images.values(), default=0) + n > self.available(arch):
                raise BadInputError(f"--validation {n}: it overlaps the retraining images")
            self.arrays[key] = to_arrays(self.source(arch, "train", None))
            x, y = self.arrays[key]
            self.arrays[key] = (x[-n:], y[-n:])
        x, y = self.arrays[key]
        name = self.models[arch]["kept"].graph.input[0].name
        return ArraySource(x, y, None, None, name, f"the last {len(x)} train images")

    def latency_fraction(self, arch: str, model: onnx.ModelProto) -> float:
        """Measured seconds per image of `model` over the baseline's, onnxruntime CPU with
        LATENCY_THREADS threads, both timed in one call (load changes hit both alike)."""
        base, reduced = measure_models(
            [self.models[arch]["kept"], model], [CPU], threads=LATENCY_THREADS
        )
        return reduced / base

    # -- phase 0: baselines

    def baselines(self) -> None:
        for arch in self.s.archs:
            path = Path(self.s.baselines[arch])
            kept = onnx.load(path)
            self.models[arch] = {"kept": kept}
            if arch not in self.results["baselines"]:
                t0 = time.perf_counter()
                top1 = self.top1(arch, kept)
                eval_seconds = time.perf_counter() - t0
                print(f"{arch} baseline {path}: test top-1 {top1:.4f}", flush=True)
                if top1 < MIN_BASELINE_TOP1 and not self.s.allow_weak_baseline:
                    raise BadInputError(
                        f"baseline {path} reaches {100 * top1:.2f}% test top-1, below the "
                        f"{100 * MIN_BASELINE_TOP1:.0f}% the experiment needs; pass a "
                        "converged baseline or --allow-weak-baseline"
                    )
                params, macs = sizes(kept)
                self.results["baselines"][arch] = {
                    "path": str(path),
                    "params": params,
                    "macs": macs,
                    "test_top1": top1,
                    "eval_seconds": eval_seconds,
                }
                self.save()
            if "onnxsim" in self.s.arms:
                folded = self.work / f"{arch}_folded.onnx"
                self.models[arch]["folded"] = folded_form(path, folded)
                self.results["baselines"][arch]["folded_params"] = count_parameters(
                    self.models[arch]["folded"]
                )

    # -- phase 1: one reduction per (arch, budget, arm)

    def reductions(self) -> None:
        for arch in self.s.archs:
            for budget in self.s.budgets:
                # MBS first: at "default" the other arms are matched to its size.
                for arm in sorted(self.s.arms, key=lambda a: a != "mbs"):
                    if self.cell(arch, budget, arm) is None:
                        self.results["cells"].append(self.reduce_cell(arch, budget, arm))
                        self.save()

    def mbs_default_fraction(self, arch: str) -> float | None:
        """The parameter fraction MBS's default keeps, that "default" cells are matched to:
        its cell's, or (a run without the mbs arm, adding arms to an earlier result) that
        of MBS reduced once more for the size alone (deterministic); None where it failed."""
        mbs_default = self.cell(arch, "default", "mbs")
        if mbs_default is not None:
            return mbs_default["params_fraction"] if mbs_default["status"] == "reduced" else None
        if arch not in self.mbs_sizes:
            try:
                model, _ = self.reduce_arm(arch, "mbs", "params", None)
                fraction = sizes(model)[0] / self.results["baselines"][arch]["params"]
            except (BadInputError, RuntimeError, ValueError):
                fraction = None
            self.mbs_sizes[arch] = fraction
        return self.mbs_sizes[arch]

    def reduce_cell(self, arch: str, budget: str, arm: str) -> dict[str, Any]:
        matched = budget == "default" and arm != "mbs"  # MBS's own default is the size
        default_fraction = self.mbs_default_fraction(arch) if matched else None
        metric, fraction = target(budget, default_fraction)
        cell: dict[str, Any] = {
            "arch": arch,
            "budget": budget,
            "arm": arm,
            "metric": metric,
            "target_fraction": fraction,
            "status": "failed",
            "runs": [],
            "after": None,
        }
        if budget == "default" and arm != "mbs" and fraction is None:
            cell["reason"] = "MBS's default reduction failed: no size to match"
            return cell
        t0 = time.perf_counter()
        try:
            model, extra = self.reduce_arm(arch, arm, metric, fraction)
        except (BadInputError, ImportError, RuntimeError, ValueError) as error:
            cell["reason"] = str(error).strip().splitlines()[0]
            print(f"  {arch} {budget} {arm}: failed: {cell['reason']}", flush=True)
            return cell
        cell.update(extra)
        params, macs = sizes(model)
        base = self.results["baselines"][arch]
        base_params = base["folded_params"] if arm == "onnxsim" else base["params"]
        cell.update(
            params=params,
            macs=macs,
            params_fraction=params / base_params,
            macs_fraction=macs / base["macs"],
            latency_fraction=extra.get("latency_fraction") or self.latency_fraction(arch, model),
            reduce_seconds=time.perf_counter() - t0,
        )
        reached = cell[f"{metric}_fraction"]
        if fraction is not None:
            cell["match_error"] = match_error(reached, fraction)
        if fraction is not None and cell["match_error"] > tolerance(metric):
            cell["status"] = "unmatched"
            cell["reason"] = (
                f"not reachable: best = {100 * reached:.1f}% of the baseline's {metric} "
                f"against {100 * fraction:.1f}% asked"
            )
        else:
            cell["status"] = "reduced"
            onnx.save(model, self.model_path(cell))
            cell["acc_before"] = self.top1(arch, model)
        print(
            f"  {arch} {budget:11s} {arm:9s}: params {100 * cell['params_fraction']:.1f}% "
            f"MACs {100 * cell['macs_fraction']:.1f}% "
            f"latency {100 * cell['latency_fraction']:.1f}% {cell['status']}"
            + (
                f", top-1 before retraining {cell['acc_before']:.4f}"
                if "acc_before" in cell
                else ""
            ),
            flush=True,
        )
        return cell

    def reduce_arm(
        self, arch: str, arm: str, metric: str, fraction: float | None
    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
        if arm == "onnxsim":
            return self.onnxsim_arm(arch, metric, fraction)
        strategy = "mbs" if arm == "mbs-local" else arm
        reduced, report = reduce(
            self.s.baselines[arch],
            f"{self.s.data}:train",
            budget=None if fraction is None else budget_text(metric, fraction),
            receptive_field="local" if arm == "mbs-local" else "global",
            width_map=self.s.width_map,
            strategy=strategy,
            providers="cuda" if "CUDAExecutionProvider" in self.s.providers else "cpu",
            channel_multiple=(
                self.s.latency_channel_multiple if metric == "latency" else self.s.channel_multiple
            ),
            limit=self.s.calib_size,
            latency_threads=LATENCY_THREADS,
            evaluate_accuracy=False,
            progress=False,
        )
        plan = report.plan
        return reduced, {
            "width_map": str(plan.width_map),
            "betas": [m.beta for m in plan.macroblocks],
            "kept": [m.kept for m in plan.macroblocks],
            "knobs": plan.knobs(),
            # a latency budget is checked on the written model by reduce itself: kept as is
            "latency_fraction": plan.reached.get("latency"),
        }

    def onnxsim_arm(
        self, arch: str, metric: str, fraction: float | None
    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
        from onnxsim.pruning import apply_structured_pruning  # ImportError: recorded

        folded = self.models[arch]["folded"]
        base = self.results["baselines"][arch]
        full = base["folded_params"] if metric == "params" else base["macs"]

        def measure(model: onnx.ModelProto) -> float:
            if metric == "latency":
                return self.latency_fraction(arch, model)
            params, macs = sizes(model)
            return (params if metric == "params" else macs) / full

        model, sparsity, _, tried = bisect_sparsity(
            lambda s: apply_structured_pruning(folded, s), measure, fraction
        )
        return model, {"sparsity": sparsity, "sparsity_tried": tried}

    def model_path(self, cell: dict[str, Any]) -> Path:
        return self.work / f"{cell['arch']}_{cell['budget']}_{cell['arm']}.onnx"

    def load_reduced(self, cell: dict[str, Any]) -> onnx.ModelProto:
        """The reduced model saved at phase 1; reduced again (deterministic) when its file is
        gone, and checked against the recorded size."""
        path = self.model_path(cell)
        if path.exists():
            return onnx.load(path)
        model, _ = self.reduce_arm(
            cell["arch"], cell["arm"], cell["metric"], cell["target_fraction"]
        )
        if sizes(model) != (cell["params"], cell["macs"]):
            raise RuntimeError(f"reducing {path.stem} again gave another size than recorded")
        onnx.save(model, path)
        return model

    # -- phase 2: retraining, seed by seed over every cell

    def plan(self) -> None:
        """Training images per arch: fixed by the settings, or chosen from the throughput
        measured here so that the whole run takes about target_minutes."""
        if "plan" in self.results:
            return
        plan: dict[str, Any] = {"target_minutes": self.s.target_minutes, "archs": {}}
        todo = {
            arch: sum(c["status"] == "reduced" for c in self.results["cells"] if c["arch"] == arch)
            * len(self.s.seeds)
            for arch in self.s.archs
        }
        left = self.s.target_minutes * 60 - self.elapsed()
        for arch in self.s.archs:
            if arch in self.s.train_images:  # fixed: nothing to fit, no probe to spend time on
                images = self.s.train_images[arch]
                plan["archs"][arch] = {"runs": todo[arch], "train_images": images}
                plan["archs"][arch]["chosen_by"] = "settings"
                continue
            probe = self.probe(arch)
            eval_s = self.results["baselines"][arch]["eval_seconds"]
            share = left / len(self.s.archs)  # each arch gets the same time
            per_run = share / max(todo[arch], 1) - probe["overhead_seconds"] - eval_s
            fitted = int(per_run * probe["images_per_second"] / self.s.epochs)
            images = self.round_images(fitted, self.available(arch))
            plan["archs"][arch] = {
                **probe,
                "eval_seconds": eval_s,
                "runs": todo[arch],
                "images_fitted_to_target": fitted,
                "train_images": images,
                "chosen_by": "throughput",
                "projected_minutes": todo[arch]
                * (
                    probe["overhead_seconds"]
                    + eval_s
                    + self.s.epochs * images / probe["images_per_second"]
                )
                / 60,
            }
            print(
                f"{arch}: {probe['images_per_second']:.0f} images/s retraining, "
                f"{todo[arch]} runs of {images} images x {self.s.epochs} epoch(s), "
                f"projected {plan['archs'][arch]['projected_minutes']:.1f} min",
                flush=True,
            )
        self.s.train_images = {a: p["train_images"] for a, p in plan["archs"].items()}
        self.results["settings"]["train_images"] = self.s.train_images
        self.results["plan"] = plan
        self.save()

    def available(self, arch: str) -> int:
        return len(self.source(arch, "train", None))

    def round_images(self, fitted: int, available: int) -> int:
        step = 1000 if fitted >= 4000 else self.s.batch_size
        return int(min(available, max(2 * self.s.batch_size, fitted // step * step)))

    def probe(self, arch: str) -> dict[str, float]:
        """Retraining throughput measured on the baseline itself (the largest model of the
        arch, so the plan errs on the safe side)."""
        kept = self.models[arch]["kept"]
        x, y = to_arrays(self.source(arch, "train", self.s.probe_images))
        result = self.retrain(kept, (x, y), kept, seed=0, epochs=1)
        train = sum(h.seconds for h in result.history)
        return {
            "probe_images": len(x),
            "images_per_second": result.images_per_second,
            "overhead_seconds": max(result.seconds - train, 0.0),
            "device": result.device,
        }

    def retrain(self, model, data, teacher, seed: int, epochs: int | None = None):
        return retrain(
            model,
            data,
            teacher=teacher,
            epochs=epochs or self.s.epochs,
            lr=self.s.lr,
            batch_size=self.s.batch_size,
            optimizer="sgd",
            seed=seed,
            distill_alpha=self.s.distill_alpha,
            temperature=self.s.temperature,
            device=self.s.device,
            progress=False,
        )

    def retraining(self) -> None:
        for arch, seed in ((a, s) for a in self.s.archs for s in self.s.seeds):
            for cell in self.results["cells"]:
                if cell["arch"] != arch or cell["status"] != "reduced":
                    continue
                if any(r["seed"] == seed for r in cell["runs"]):
                    continue
                key = f"{cell['arch']} {cell['budget']} {cell['arm']} seed {seed}"
                if any(k["run"] == key for k in self.results["skipped"]):
                    continue
                estimate = self.estimate(cell["arch"])
                if self.elapsed() + estimate > self.s.deadline_minutes * 60:
                    self.results["skipped"].append(
                        {
                            "run": key,
                            "reason": f"would end past the {self.s.deadline_minutes} min deadline",
                        }
                    )
                    print(f"  {key}: skipped (deadline)", flush=True)
                    self.save()
                    continue
                self.retrain_cell(cell, seed)
                self.save()

    def estimate(self, arch: str) -> float:
        """Seconds the next run of `arch` will take: its last run, else the plan's figure."""
        done = [
            r["seconds"] + r["eval_seconds"]
            for c in self.results["cells"]
            if c["arch"] == arch
            for r in c["runs"]
        ]
        if done:
            return done[-1]
        p = self.results["plan"]["archs"][arch]
        return p.get("projected_minutes", 0.0) * 60 / max(p["runs"], 1)

    def retrain_cell(self, cell: dict[str, Any], seed: int) -> None:
        arch = cell["arch"]
        if arch not in self.arrays:
            self.arrays[arch] = to_arrays(self.source(arch, "train", self.s.train_images[arch]))
        teacher = self.models[arch]["folded" if cell["arm"] == "onnxsim" else "kept"]
        try:
            result = self.retrain(self.load_reduced(cell), self.arrays[arch], teacher, seed)
            t0 = time.perf_counter()
            after = self.top1(arch, result.model)
        except (BadInputError, RuntimeError, ValueError) as error:
            cell.setdefault("failed_runs", []).append(
                {"seed": seed, "reason": str(error).strip().splitlines()[0]}
            )
            print(f"  {arch} {cell['budget']} {cell['arm']} seed {seed}: failed: {error}")
            return
        cell["runs"].append(
            {
                "seed": seed,
                "test_top1": after,
                "seconds": result.seconds,
                "images_per_second": result.images_per_second,
                "eval_seconds": time.perf_counter() - t0,
                "device": result.device,
                "bn_reinserted": result.bn_reinserted,
                "history": [asdict(h) for h in result.history],
            }
        )
        cell["after"] = spread([r["test_top1"] for r in cell["runs"]])
        print(
            f"  {arch} {cell['budget']:10s} {cell['arm']:9s} seed {seed}: top-1 {after:.4f} "
            f"(before retraining {cell['acc_before']:.4f}, {result.seconds:.0f} s)",
            flush=True,
        )

    def finish(self) -> None:
        cells = self.results["cells"]
        self.results["comparisons"] = compare(cells, self.s.default_arm)
        self.results["default_loss"] = default_loss(cells, self.results["baselines"])
        self.results["paper_claim"] = PAPER_CLAIM
        self.results["complete"] = not self.results["skipped"]
        self.results["partial"] = not self.results["complete"]
        self.save()

    def run(self) -> None:
        self.baselines()
        self.reductions()
        self.plan()
        self.retraining()
        self.finish()


def shown(path: Path) -> str:
    """A results path as the docs name it: from the repository root where it lies under it."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return path.name


def environment(s: Settings) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": s.device,
    }


# ---------------------------------------------------------------- the table


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def after_text(a: dict[str, float] | None) -> str:
    if a is None:
        return "-"
    return f"{pct(a['mean'])} ± {pct(a['std'])} ({pct(a['min'])}-{pct(a['max'])}, n={a['n']})"


def table(results: dict[str, Any]) -> str:
    """The README's markdown, from the JSON alone."""
    s = results["settings"]
    lines = [
        f"`{results['command']}` ({results.get('total_seconds', 0) / 60:.1f} min"
        f"{'' if results['complete'] else ', PARTIAL: still running or stopped'}; retraining: "
        + ", ".join(f"{a} {n} images" for a, n in s["train_images"].items())
        + f" x {s['epochs']} epoch(s), seeds {s['seeds']}, lr {s['lr']}, batch {s['batch_size']},"
        f" distillation alpha {s['distill_alpha']} T {s['temperature']}; device {s['device']})",
        "",
        "| arch | budget | arm | params | MACs | latency | top-1 before retraining | top-1 after,"
        " mean ± std (min-max, n) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    default_arm = s.get("default_arm", {})
    for arch, base in results["baselines"].items():
        lines.append(
            f"| {arch} | - | baseline | {base['params']:,} | {base['macs'] / 1e6:.1f}M | 100% | "
            f"{pct(base['test_top1'])} | - |"
        )
        for c in results["cells"]:
            if c["arch"] != arch:
                continue
            arm = c["arm"] + (" (default)" if default_arm.get(c["budget"]) == c["arm"] else "")
            if c["status"] == "failed":
                lines.append(f"| {arch} | {c['budget']} | {arm} | - | - | - | - | {c['reason']} |")
                continue
            latency = c.get("latency_fraction")
            size = (
                f"{c['params']:,} ({100 * c['params_fraction']:.1f}%) | "
                f"{c['macs'] / 1e6:.1f}M ({100 * c['macs_fraction']:.1f}%) | "
                + ("-" if latency is None else f"{100 * latency:.1f}%")
            )
            after = c["reason"] if c["status"] == "unmatched" else after_text(c["after"])
            before = pct(c["acc_before"]) if "acc_before" in c else "-"
            lines.append(f"| {arch} | {c['budget']} | {arm} | {size} | {before} | {after} |")
    lines += [
        "",
        f"Rule: {results['verdict_rule']}. Arms more than "
        f"{100 * results['match_tolerance']:.0f}% off their target size (measured latency: "
        f"{100 * LATENCY_TOLERANCE:.0f}%) are left out.",
        "",
        "| equal | arch | budget | arm | top-1 | other arm | other | arm - other (points) | "
        "arm more accurate? |",
        "|---|---|---|---|---:|---|---:|---:|---|",
    ]
    for r in results.get("comparisons", []):
        reference = r.get("reference", "mbs") + (" (default)" if r.get("default") else "")
        lines.append(
            f"| {r['cost']} | {r['arch']} | {r['budget']} | {reference} | "
            f"{pct(r['mbs']['mean'])} | {r['other']} | {pct(r['other_after']['mean'])} | "
            f"{100 * r['difference']:+.2f} | {r['verdict']} |"
        )
    lines += ["", summary(results.get("comparisons", [])), ""]
    lines += [
        "| (3) MBS default | params | MACs | baseline | after retraining | lost (points) | "
        f"negligible (<= {NEGLIGIBLE_POINTS} points)? |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.get("default_loss", []):
        low, high = r["loss_points_range"]
        lines.append(
            f"| {r['arch']} | {100 * r['params_fraction']:.1f}% | {100 * r['macs_fraction']:.1f}% "
            f"| {pct(r['baseline'])} | {after_text(r['after'])} | {r['loss_points']:.2f} "
            f"({low:.2f} to {high:.2f}) | {'yes' if r['negligible'] else 'no'} |"
        )
    lines.append(f"\nThe paper: {results.get('paper_claim', PAPER_CLAIM)}.")
    if results["skipped"]:
        lines.append(f"\nSkipped runs: {len(results['skipped'])} (see the JSON).")
    return "\n".join(lines)


def summary(comparisons: list[dict[str, Any]]) -> str:
    """One line per cost, compared arm and other arm: how many comparisons went which way
    (the default arm's rows count under "default")."""
    out = []
    for cost in COST_NAMES.values():
        for reference in (*REFERENCES, "default"):
            for other in ARMS:
                rows = [
                    r
                    for r in comparisons
                    if r["cost"] == cost
                    and r["other"] == other
                    and (r.get("default") if reference == "default" else
                         r.get("reference", "mbs") == reference)
                ]  # fmt: skip
                if not rows:
                    continue
                counts = {v: sum(r["verdict"] == v for r in rows) for v in ("yes", "no")}
                within = len(rows) - counts["yes"] - counts["no"]
                out.append(
                    f"equal {cost}, {reference} vs {other}: more accurate beyond the spread in "
                    f"{counts['yes']} of {len(rows)}, less accurate in {counts['no']}, "
                    f"within the spread (or one seed) in {within}."
                )
    return "\n".join(out) or "No comparison: no arm pair was retrained at one size."


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--table", action="store_true", help="print the markdown table from --out")
    p.add_argument("--plot", action="store_true", help="redraw the plot from --out")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --out")
    p.add_argument("--quick", action="store_true", help="tiny subsets and one seed: a smoke test")
    p.add_argument("--archs", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="ARCH=PATH",
        help="a baseline ONNX file per arch (default: the bundled ones)",
    )
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--data", default=str(FMNIST_DIR), help="an IDX folder with both splits")
    p.add_argument("--train-images", help="N, or ARCH=N,ARCH=N (default: fitted to the time)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--test-size", type=int, help="test images (default: the whole split)")
    p.add_argument(
        "--validation",
        type=int,
        metavar="N",
        help="read top-1 on the last N train images instead of the test set (to tune on)",
    )
    p.add_argument(
        "--auto-table",
        action="store_true",
        help="print onnx_mbs/auto.py's AUTO from --out and the issue-16 results",
    )
    p.add_argument("--channel-multiple", type=int, default=1)
    p.add_argument(
        "--width-map",
        help="f(R) for the mbs arms and mbs-cost's worth (default: reduce's for each strategy)",
    )
    p.add_argument("--target-minutes", type=float, default=60.0)
    p.add_argument(
        "--deadline",
        type=float,
        help="minutes of the run's total time; later runs skipped (default 85; --resume: the "
        "recorded one)",
    )
    p.add_argument("--device", default="auto", help="torch: auto (cuda when present), cpu, cuda")
    p.add_argument("--providers", default="auto", help="onnxruntime: auto, cpu, cuda")
    p.add_argument("--allow-weak-baseline", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="combine runs of other archs (e.g. one process per arch, side by side) into --out",
    )
    p.add_argument(
        "--add",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="add runs of new arms or budgets (same recipe, archs of --out) to --out",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    baselines = {arch: str(path) for arch, path in BASELINES.items()}
    for item in args.baseline:
        arch, _, path = item.partition("=")
        if arch not in BASELINES or not path:
            raise BadInputError(f"--baseline takes ARCH=PATH with ARCH one of {list(BASELINES)}")
        baselines[arch] = path
    for arch in args.archs:
        if not Path(baselines[arch]).is_file():
            raise BadInputError(
                f"no baseline for {arch} at {baselines[arch]}: pass --baseline {arch}=PATH"
            )
    for budget in args.budgets:
        if budget != "default" and budget.split("=")[0] not in METRIC_OF:
            raise BadInputError(f"budget {budget!r}: params=F, flops=F, latency=F or default")
    if not Path(args.data).is_dir():
        raise BadInputError(f"no data folder {args.data}: apt-get install dataset-fashion-mnist")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = dict(seeds=1, calib_size=64, test_size=1000, probe_images=256) if args.quick else {}
    return Settings(
        archs=args.archs,
        baselines={a: baselines[a] for a in args.archs},
        arms=args.arms,
        budgets=args.budgets,
        seeds=list(range(quick.get("seeds", args.seeds))),
        data=args.data,
        calib_size=quick.get("calib_size", args.calib_size),
        test_size=quick.get("test_size", args.test_size),
        train_images=parse_images(args.train_images, args.archs)
        or ({a: 512 for a in args.archs} if args.quick else {}),
        epochs=args.epochs,
        lr=args.lr,
        channel_multiple=args.channel_multiple,
        width_map=args.width_map,
        device=device,
        providers=choose_providers(args.providers),
        target_minutes=args.target_minutes,
        deadline_minutes=85.0 if args.deadline is None else args.deadline,
        probe_images=quick.get("probe_images", 1024),
        allow_weak_baseline=args.allow_weak_baseline,
        quick=args.quick,
        validation=args.validation,
        default_arm=default_arms(args.budgets),
    )


def parse_images(text: str | None, archs: list[str]) -> dict[str, int]:
    if not text:
        return {}
    try:
        if "=" not in text:
            return dict.fromkeys(archs, int(text))
        pairs = (item.split("=") for item in text.split(","))
        return {arch: int(n) for arch, n in pairs}
    except ValueError:
        raise BadInputError(f"--train-images {text!r}: N or ARCH=N,ARCH=N") from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.auto_table:
            paths = [args.out] + [EARLIER_OUT] * (EARLIER_OUT.exists() and args.out != EARLIER_OUT)
            sources = [(shown(path), read_results(path)) for path in paths]
            print(auto_source(auto_table(sources)))
            return 0
        if args.table or args.plot:
            results = with_current_defaults(read_results(args.out))
            if args.plot:
                print(f"wrote {plot(results, args.out.with_suffix('.png'))}")
            if args.table:
                print(table(results))
            return 0
        if args.add:
            results = add_arms(read_results(args.out), [read_results(p) for p in args.add])
            write_json(results, args.out)
            print(f"added {len(args.add)} run(s) to {args.out}")
            print(f"wrote {plot(results, args.out.with_suffix('.png'))}")
            print(table(results))
            return 0
        if args.merge:
            results = merge_results([read_results(path) for path in args.merge])
            write_json(results, args.out)
            print(f"wrote {args.out} from {len(args.merge)} runs")
            print(f"wrote {plot(results, args.out.with_suffix('.png'))}")
            print(table(results))
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.resume:
            results = with_current_defaults(read_results(args.out))
            s = Settings(**results["settings"])
            if args.deadline is not None:
                s.deadline_minutes = results["settings"]["deadline_minutes"] = args.deadline
            results["skipped"] = []  # a deadline's skips are retried
            results["cells"] = retried_latency_misses(results["cells"])
            print(f"resuming {args.out}: its recorded settings are used", flush=True)
            experiment = Experiment(s, args.out, results)
        else:
            experiment = Experiment(settings_from(args), args.out)
        experiment.run()
    except BadInputError as error:
        print(f"experiment: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({experiment.elapsed() / 60:.1f} min)")
    print(f"wrote {plot(experiment.results, args.out.with_suffix('.png'))}")
    print(table(experiment.results))
    return 0


def plot(results: dict[str, Any], path: Path) -> Path:
    from plot_results import plot_experiment

    plot_experiment(results, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
