"""Reports of a reduce run: report.json (everything), report.md (tables), widths.png.

Rendering only: every number here was computed by reduce.py and its steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from onnx_mbs.passes.analysis import params_once, resolution_text
from onnx_mbs.pipeline import ReduceReport
from onnx_mbs.plan import Plan


def _finite(value: float) -> float | str:
    return "global" if math.isinf(value) else value


def report_dict(report: ReduceReport) -> dict:
    after_layers = {layer.name: layer for layer in report.after.layers}
    plan = report.plan
    layers = []
    for layer in report.before.layers:
        new = after_layers.get(layer.name)
        layers.append(
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "macroblock": layer.macroblock,
                "in_base": layer.name in report.before.macroblocks[layer.macroblock].base_layers,
                "receptive_field": {
                    "global": _finite(layer.global_receptive_field),
                    "local": _finite(layer.local_receptive_field),
                },
                "rho": report.rho.get(layer.name, 1.0),
                "activation": report.activation.get(layer.name),
                "channels": {
                    "in": [layer.in_channels, new.in_channels if new else None],
                    "out": [layer.out_channels, new.out_channels if new else None],
                },
                "macs": [layer.macs, new.macs if new else None],
                "params": [layer.params, new.params if new else None],
            }
        )
    return {
        **({"files": report.files} if report.files else {}),
        "provider": report.provider,
        "data": report.data,
        "preprocessing": report.preprocessing,
        "samples": report.samples,
        "plan": plan.to_dict(),
        "macroblocks": [
            {
                **m,
                "layers": len(report.before.macroblocks[m["index"]].layers),
                "base_layers": len(report.before.macroblocks[m["index"]].base_layers),
                "params": [
                    report.before.macroblocks[m["index"]].params,
                    _block_sum(report, m["index"], "params"),
                ],
                "macs": [
                    report.before.macroblocks[m["index"]].macs,
                    _block_sum(report, m["index"], "macs"),
                ],
            }
            for m in plan.to_dict()["macroblocks"]
        ],
        "groups": [
            {
                "id": g.id,
                "channels": [g.size, plan.counts[g.id]],
                "macroblocks": list(g.macroblocks),
                "pinned": g.pinned,
                "pin_reasons": list(g.pin_reasons),
                "not_exact": list(g.inexact),
            }
            for g in report.groups
        ],
        "layers": layers,
        "totals": {
            "params": [report.before.total_params, report.after.total_params],
            "macs": [report.before.total_macs, report.after.total_macs],
            "batch": report.before.batch,  # the batch the MACs count
        },
        "budget": None
        if plan.budget is None
        else {
            "asked": plan.budget.fractions,
            "reached": {m: plan.reached[m] for m in plan.budget.fractions},
            "missed": plan.missed,
            "binding": list(plan.binding),
        },
        "reached": {
            "params": report.after.total_params / report.before.total_params,
            "flops": report.after.total_macs / report.before.total_macs,
        },
        "pinned": report.pinned,
        "not_exact": report.not_exact,
        "accuracy": {k: vars(v) for k, v in report.accuracy.items()},
        **({"no_top1": report.no_top1} if report.no_top1 else {}),
        **({} if report.recalibration is None else {"recalibration": report.recalibration}),
        "timings_s": report.timings,
    }


def _block_sum(report: ReduceReport, index: int, what: str) -> int:
    """A macroblock's params or MACs in the written model (a shared weight counted once)."""
    names = set(report.before.macroblocks[index].layers)
    if what == "params":
        once = params_once(report.after.layers)
        return sum(once[x.name] for x in report.after.layers if x.name in names)
    return sum(getattr(x, what) for x in report.after.layers if x.name in names)


def macroblock_rows(report: ReduceReport) -> list[tuple]:
    """Per macroblock: resolution, layers/base, R, beta ("-" where none decided the counts),
    the kept fraction of the channels it makes, its convs' out-channels, params and MACs
    before/after (MACROBLOCK_LEGEND says what each counts)."""
    after = {x.name: x for x in report.after.layers}
    rows = []
    for block, planned in zip(report.before.macroblocks, report.plan.macroblocks):
        ch_before = sum(report.before.layer(n).out_channels for n in block.layers)
        ch_after = sum(after[n].out_channels for n in block.layers if n in after)
        rows.append(
            (
                block.index,
                resolution_text(block.resolution),
                f"{len(block.base_layers)}/{len(block.layers)}",
                f"{planned.redundancy:.3f}",
                "-" if planned.beta is None else f"{planned.beta:.3f}",
                f"{planned.kept:.3f}",
                f"{ch_before} -> {ch_after}",
                f"{block.params} -> {_block_sum(report, block.index, 'params')}",
                f"{block.macs} -> {_block_sum(report, block.index, 'macs')}",
            )
        )
    return rows


MACROBLOCK_HEADERS = [
    "macroblock",
    "resolution",
    "base/layers",
    "R",
    "beta",
    "kept/made",
    "conv out ch",
    "conv params",
    "conv MACs",
]
# What the columns that count channels, parameters and MACs count (report.md prints it under
# the table, the command line after it): two counts of channels differ on purpose.
MACROBLOCK_LEGEND = {
    "kept/made": "the fraction kept of the channels the macroblock makes, each channel once "
    "(a residual stream that its convs share counts once)",
    "conv out ch": "its conv layers' output channels summed, before -> after (a shared stream "
    "once per conv that writes it)",
    "conv params, conv MACs": "of its conv layers (weights and biases, a weight that several "
    "convs read counted once, in the first macroblock reading it; BatchNorm, other ops and "
    "the head count in the totals only)",
}


def macroblock_legend() -> list[str]:
    return [f"{column}: {meaning}" for column, meaning in MACROBLOCK_LEGEND.items()]


def markdown(report: ReduceReport) -> str:
    data = report_dict(report)
    plan = report.plan
    lines = [
        "# onnx-mbs reduce report",
        "",
        *_files_lines(report.files),
        f"- strategy: {plan.strategy}; why: {plan.strategy_reason}; receptive field: "
        f"{plan.receptive_field}; width map: "
        f"{plan.width_map.kind if plan.width_map else 'none (global ranking)'}; "
        f"channel multiple: {plan.channel_multiple}",
        f"- formula: `{plan.formula}`",
        *(f"- note: {note}" for note in plan.notes),
        f"- data: {report.data}; preprocessing: {report.preprocessing}; "
        f"{report.samples} samples on {report.provider}",
    ]
    if plan.budget is not None:
        lines.append(f"- budget: {budget_text(plan, 4)}")
    t = data["totals"]
    batch = f", at batch {t['batch']}" if t["batch"] != 1 else ""
    lines += [
        f"- params: {t['params'][0]} -> {t['params'][1]} ({data['reached']['params']:.2%} kept)",
        f"- MACs: {t['macs'][0]} -> {t['macs'][1]} ({data['reached']['flops']:.2%} kept{batch})",
    ]
    for key, acc in report.accuracy.items():
        lines.append(f"- top-1 {key}: {acc.top1:.4f} on {acc.samples} samples")
    if report.no_top1:
        lines.append(f"- {report.no_top1}")
    if report.recalibration is not None:
        top1 = report.recalibration["top1"]
        lines.append(
            f"- BatchNorm recalibrated on {report.recalibration['batches']} batches of the data"
            + ("" if top1 is None else f"; top-1 after recalibration: {top1:.4f}")
            + " (the model written)"
        )
    lines += ["", "## Macroblocks", "", _md_table(MACROBLOCK_HEADERS, macroblock_rows(report))]
    lines += ["", *(f"- {line}" for line in macroblock_legend())]
    lines += ["", "## Layers", ""]
    lines.append(
        _md_table(
            ["layer", "mb", "base", "RF", "rho", "out ch", "in ch", "MACs"],
            [
                (
                    x["name"],
                    x["macroblock"],
                    "yes" if x["in_base"] else "",
                    x["receptive_field"][report.plan.receptive_field],
                    f"{x['rho']:.3f}",
                    f"{x['channels']['out'][0]} -> {x['channels']['out'][1]}",
                    f"{x['channels']['in'][0]} -> {x['channels']['in'][1]}",
                    f"{x['macs'][0]} -> {x['macs'][1]}",
                )
                for x in data["layers"]
            ],
        )
    )
    if report.pinned:
        lines += ["", "## Pinned (kept whole)", ""] + [f"- {r}" for r in report.pinned]
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v}" for k, v in report.timings.items()]
    return "\n".join(lines) + "\n"


def _files_lines(files: dict[str, str | None]) -> list[str]:
    """The model read and the model written, where the report was told them."""
    if not files:
        return []
    written = files.get("written") or "none (dry run)"
    return [f"- model: {files.get('model') or 'given in memory'}; written: {written}"]


def budget_text(plan: Plan, digits: int) -> str:
    """ "params=0.5 asked, params 0.4979 reached": a limit the written model is over (a measured
    latency, the closest of the plans tried) is said to be missed, not reached. Of several
    limits, it says which bind and which have room ("; flops binds, params has room")."""
    assert plan.budget is not None
    missed = plan.missed
    met = [f"{m} {plan.reached[m]:.{digits}f}" for m, _ in plan.budget.limits if m not in missed]
    parts = [f"{', '.join(met)} reached"] if met else []
    noisy = (
        ": the closest of the plans tried, all over it; measured latency is as noisy as the machine"
    )
    parts += [
        f"{m} {plan.reached[m]:.{digits}f} missed (over {f:g}{noisy if m == 'latency' else ''})"
        for m, f in plan.budget.limits
        if m in missed
    ]
    text = f"{plan.budget} asked, {', '.join(parts)}"
    if len(plan.budget.limits) < 2 or missed:
        return text
    binding = plan.binding
    room = [m for m, _ in plan.budget.limits if m not in binding]
    verb = "binds" if len(binding) == 1 else "bind"
    return f"{text}; {' and '.join(binding)} {verb}" + (
        f", {' and '.join(room)} {'has' if len(room) == 1 else 'have'} room" if room else ""
    )


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(out)


def _md_cell(value: object) -> str:
    """`value` as one table cell: a '|' or a line break in a name (ONNX names are any text)
    would end the cell or the row, and the figures after it would sit under other headers."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def plot_widths(report: ReduceReport, path: Path) -> None:
    """widths.png: `widths_figure`, saved."""
    import matplotlib.pyplot as plt

    fig = widths_figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def widths_figure(report: ReduceReport):
    """Output channels per conv layer before/after, macroblocks shaded. Each layer spans a
    whole unit of the x axis (the first and last too); the resolution labels sit in rows
    above the plot, a label moving up a row where it would touch its neighbour (MobileNets
    and ShuffleNets have one-layer macroblocks); the legend sits outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    after = {x.name: x.out_channels for x in report.after.layers}
    layers = report.before.layers
    edges = np.arange(len(layers) + 1) - 0.5
    fig, ax = plt.subplots(figsize=(max(6.5, min(24.0, len(layers) * 0.12)), 4.0))
    ax.stairs([x.out_channels for x in layers], edges, baseline=None, label="before", color="0.5")
    ax.stairs(
        [after.get(x.name, 0) for x in layers], edges, baseline=None, label="after", color="C0"
    )
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    labels = []
    start = 0
    for block in report.before.macroblocks:
        end = start + len(block.layers)
        if block.index % 2:
            ax.axvspan(start - 0.5, end - 0.5, color="0.92", zorder=0)
        labels.append(
            ax.text(
                (start + end - 1) / 2,
                1.01,
                f"{block.resolution[0]}",
                ha="center",
                va="bottom",
                fontsize=8,
                transform=ax.get_xaxis_transform(),
            )
        )
        start = end
    rows = _stagger(fig, labels)
    ax.set_xlabel("conv layer (graph order; shading = macroblock, label = resolution)")
    ax.set_ylabel("output channels")
    ax.set_title(
        f"onnx-mbs: {report.plan.strategy}, params kept "
        f"{report.after.total_params / report.before.total_params:.1%}",
        pad=8 + 11 * rows,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    fig.tight_layout()
    return fig


def _stagger(fig, labels: list) -> int:
    """Move each label up to the lowest row where it clears the labels already there (by 4
    pixels); how many rows were used."""
    renderer = fig.canvas.get_renderer()
    ends: list[float] = []  # per row, the right edge of its last label
    for label in labels:
        box = label.get_window_extent(renderer)
        row = next((k for k, end in enumerate(ends) if box.x0 >= end + 4), len(ends))
        if row == len(ends):
            ends.append(box.x1)
        ends[row] = box.x1
        label.set_y(1.01 + 0.06 * row)
    return len(ends)


# What a report folder holds: an existing folder holding anything else is never written into.
REPORT_FILES = ("report.json", "report.md", "widths.png")


def write_report(report: ReduceReport, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in REPORT_FILES]
    paths[0].write_text(json.dumps(report_dict(report), indent=2) + "\n")
    paths[1].write_text(markdown(report))
    plot_widths(report, paths[2])
    return paths
