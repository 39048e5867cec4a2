"""Plot top-1 after retraining against params, MACs and latency, one marker per arm.

Reads what `bench/experiment.py` wrote, so the plot can be redrawn without rerunning:

    python bench/plot_results.py [bench/results/experiment.json] [-o experiment.png]

Rows: against parameters, MACs and measured latency (onnxruntime CPU, 1 thread; fractions of
the baseline; the latency row where the results have it); one column per arch. Markers: mean
over seeds, bars: min..max; dashed line: the baseline. A cell whose arm is the default
(`--strategy auto`) at its budget is drawn filled, the others hollow.
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

MARKERS = {
    "mbs": "o",
    "mbs-cost": "*",
    "mbs-branch": "P",
    "mbs-local": "s",
    "uniform": "^",
    "global": "D",
    "onnxsim": "v",
}
COLORS = {
    "mbs": "tab:blue",
    "mbs-cost": "tab:purple",
    "mbs-branch": "tab:brown",
    "mbs-local": "tab:cyan",
    "uniform": "tab:orange",
    "global": "tab:green",
    "onnxsim": "tab:red",
}


def plot_experiment(results: dict[str, Any], path: str | Path) -> None:
    """Write the figure (rows: params, MACs and latency where measured; columns: archs)."""
    archs = list(results["baselines"])
    axes_of = [("params_fraction", "parameters"), ("macs_fraction", "MACs")]
    if any(c.get("latency_fraction") is not None for c in results["cells"]):
        axes_of.append(("latency_fraction", "measured latency"))
    default_arm = results["settings"].get("default_arm", {})
    fig, axes = plt.subplots(
        len(axes_of), len(archs), figsize=(6 * len(archs), 4.5 * len(axes_of)), squeeze=False
    )
    for column, arch in enumerate(archs):
        cells = [c for c in results["cells"] if c["arch"] == arch and c.get("after")]
        base = 100 * results["baselines"][arch]["test_top1"]
        for row, (key, label) in enumerate(axes_of):
            ax = axes[row][column]
            ax.axhline(base, color="k", ls="--", lw=1, label="baseline")
            for arm, marker in MARKERS.items():
                mine = sorted(
                    (c for c in cells if c["arm"] == arm and c.get(key) is not None),
                    key=lambda c: c[key],
                )
                for default in (True, False):
                    part = [c for c in mine if (default_arm.get(c["budget"]) == arm) == default]
                    if not part:
                        continue
                    x = [100 * c[key] for c in part]
                    mean = [100 * c["after"]["mean"] for c in part]
                    low = [m - 100 * c["after"]["min"] for m, c in zip(mean, part)]
                    high = [100 * c["after"]["max"] - m for m, c in zip(mean, part)]
                    ax.errorbar(
                        x,
                        mean,
                        yerr=[low, high],
                        fmt=marker,
                        color=COLORS[arm],
                        mfc=COLORS[arm] if default or not default_arm else "none",
                        capsize=3,
                        label=arm + (" (default)" if default and default_arm else ""),
                    )
            ax.set_title(f"{arch}: top-1 after retraining against {label}")
            ax.set_xlabel(f"{label} (% of the baseline)")
            ax.set_ylabel("Fashion-MNIST test top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    s = results["settings"]
    fig.suptitle(
        f"retrained {s['epochs']} epoch(s) on "
        + ", ".join(f"{a}: {n} images" for a, n in s["train_images"].items())
        + f"; {len(s['seeds'])} seed(s), bars = min..max over seeds"
        + ("; PARTIAL: the run is unfinished" if results.get("partial") else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent / "results"
    parser = argparse.ArgumentParser(description="Redraw experiment.png from the JSON.")
    parser.add_argument("results", nargs="?", type=Path, default=here / "experiment.json")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    out = args.output or args.results.with_suffix(".png")
    plot_experiment(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
