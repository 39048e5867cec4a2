"""Plot test accuracy against parameters for MBS and uniform scaling, one panel per arch.

Reads what `bench/experiment.py` wrote, so the plot can be redrawn without rerunning:

    python bench/plot_results.py [bench/results/experiment.json] [-o accuracy_vs_params.png]

Top row: after retraining (mean, error bar = min..max over seeds, small dots = each seed).
Bottom row: before retraining (its accuracies can be far lower). Star: the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"mbs": "tab:blue", "uniform": "tab:orange"}


def plot_accuracy_vs_params(results: dict[str, Any], path: str | Path) -> None:
    """Write the figure: after retraining on top, before retraining below (scales differ)."""
    archs = list(results["archs"])
    fig, axes = plt.subplots(
        2, len(archs), figsize=(6 * len(archs), 8), squeeze=False, height_ratios=[3, 2]
    )
    for column, arch in enumerate(archs):
        block = results["archs"][arch]
        base = block["baseline"]
        top, bottom = axes[0][column], axes[1][column]
        for ax in (top, bottom):
            ax.plot(base["params"] / 1e3, 100 * base["test_top1"], "k*", ms=12, label="baseline")
        for strategy, color in COLORS.items():
            variants = sorted(
                (v for v in block["variants"] if v["strategy"] == strategy),
                key=lambda v: v["params"],
            )
            retrained = [v for v in variants if v["after"] is not None]
            if retrained:
                _after(top, retrained, strategy, color)
            if variants:
                _before(bottom, variants, strategy, color)
        top.set_title(f"{arch}: after retraining")
        bottom.set_title(f"{arch}: before retraining")
        for ax in (top, bottom):
            ax.set_xlabel("parameters (thousands)")
            ax.set_ylabel("Fashion-MNIST test top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    s = results.get("settings", {})
    fig.suptitle(
        f"MBS vs uniform scaling: retrained {s.get('retrain_epochs')} epoch(s) on "
        f"{s.get('train_size')} images, {len(s.get('seeds', []))} seed(s)\n"
        "bars = min..max over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _after(ax: Any, variants: list[dict[str, Any]], strategy: str, color: str) -> None:
    x = [v["params"] / 1e3 for v in variants]
    mean = [100 * v["after"]["mean"] for v in variants]
    low = [m - 100 * v["after"]["min"] for m, v in zip(mean, variants)]
    high = [100 * v["after"]["max"] - m for m, v in zip(mean, variants)]
    ax.errorbar(x, mean, yerr=[low, high], fmt="o-", color=color, capsize=4, label=strategy)
    for v in variants:
        seeds = [100 * r["test_top1"] for r in v["runs"]]
        ax.plot([v["params"] / 1e3] * len(seeds), seeds, ".", color=color, alpha=0.5)
        ax.annotate(
            v["budget"],
            (v["params"] / 1e3, 100 * v["after"]["mean"]),
            textcoords="offset points",
            xytext=(4, -12 if strategy == "mbs" else 6),
            fontsize=7,
            color=color,
        )


def _before(ax: Any, variants: list[dict[str, Any]], strategy: str, color: str) -> None:
    x = [v["params"] / 1e3 for v in variants]
    before = [100 * v["acc_before"] for v in variants]
    ax.plot(x, before, "o--", mfc="none", color=color, label=strategy)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent / "results"
    parser = argparse.ArgumentParser(description="Redraw accuracy_vs_params.png from the JSON.")
    parser.add_argument("results", nargs="?", type=Path, default=here / "experiment.json")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    out = args.output or args.results.parent / "accuracy_vs_params.png"
    plot_accuracy_vs_params(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
