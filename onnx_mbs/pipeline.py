"""`reduce`: the main job, load -> analyse -> measure -> plan -> shrink.

Each step is a module of its own; this file only wires them together and
times them, so the flow reads top to bottom like DESIGN.md's diagram.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnx_mbs.data import DataSource, open_data
from onnx_mbs.evaluate import EvalResult, evaluate
from onnx_mbs.passes import (
    BadInputError,
    ModelAnalysis,
    Pass,
    PassResult,
    analyze_model,
    count_parameters,
)
from onnx_mbs.passes.activations import activation_tensors
from onnx_mbs.passes.channel_groups import FILTERS, ChannelGroup, analyze_channels
from onnx_mbs.passes.cost import CostModel
from onnx_mbs.passes.importance import choose_channels, l1_importance
from onnx_mbs.passes.load import check_model, load
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.plan import Budget, GroupInfo, Plan, plan_widths
from onnx_mbs.runtime import choose_providers
from onnx_mbs.stats import ActivationStats, collect_stats


@dataclass
class ReduceReport:
    """Everything `reduce` measured and decided; report.py renders it."""

    provider: str
    data: str
    preprocessing: str
    samples: int
    before: ModelAnalysis
    after: ModelAnalysis
    rho: dict[str, float]
    activation: dict[str, str | None]
    plan: Plan
    groups: list[ChannelGroup]
    timings: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, EvalResult] = field(default_factory=dict)

    @property
    def pinned(self) -> list[str]:
        return sorted({r for g in self.groups if g.pinned for r in g.pin_reasons})


def model_input(model: onnx.ModelProto) -> tuple[str, list[int]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BadInputError(
            f"onnx-mbs feeds data to single-input models; this one has {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)})"
        )
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def input_layout(model: onnx.ModelProto, name: str) -> str:
    """NHWC when the input only feeds Transposes to NCHW (how tf2onnx writes Keras models)."""
    readers = [n for n in model.graph.node if name in n.input]
    perms = [
        list(helper.get_attribute_value(a))
        for n in readers
        if n.op_type == "Transpose"
        for a in n.attribute
        if a.name == "perm"
    ]
    if readers and len(perms) == len(readers) and all(p == [0, 3, 1, 2] for p in perms):
        return "NHWC"
    return "NCHW"


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def open_for_model(
    spec: Any,
    model: onnx.ModelProto,
    *,
    mean: Any = None,
    std: Any = None,
    limit: int | None = None,
    split: str | None = "test",
) -> DataSource:
    """A DataSource fitted to `model`'s (single, fixed) input, NCHW or NHWC as the graph
    reads it; mean/std default to its metadata; `split` is the default IDX split."""
    name, shape = model_input(model)
    source = open_data(
        spec,
        name,
        shape,
        mean=mean,
        std=std,
        limit=limit,
        metadata=metadata(model),
        layout=input_layout(model, name),
        split=split,
    )
    check_labels(source, model)
    return source


def check_labels(source: DataSource, model: onnx.ModelProto) -> None:
    """Labels must name one of the model's classes (its first output's last dim, when fixed)."""
    labels = getattr(source, "labels", None)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if labels is None or not len(labels) or len(dims) != 2 or not dims[1].dim_value:
        return
    classes = dims[1].dim_value
    if int(labels.max()) >= classes:
        raise BadInputError(
            f"label {int(labels.max())} in {source.description.split(':')[0]} does not exist: "
            f"the model has {classes} classes (0..{classes - 1})"
        )


def reduce(
    model: str | os.PathLike | onnx.ModelProto,
    data: Any = None,
    *,
    budget: Budget | str | None = None,
    gamma: float = 0.5,
    strategy: str = "mbs",
    providers: str = "auto",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    channel_multiple: int = 8,
    beta_min: float = 0.1,
    importance: str = "l1",
    mean: Any = None,
    std: Any = None,
    limit: int | None = None,
    batch_size: int = 64,
    evaluate_accuracy: bool = True,
    progress: bool = True,
) -> tuple[onnx.ModelProto, ReduceReport]:
    """Reduce `model` with MBS; returns the smaller model and what was measured.

    `data` is a --data spec (folder, .npz, IDX folder) or a Python reader
    yielding input dicts; without data every activation ratio is taken as 1,
    so MBS works from MACs and receptive fields alone. The input model is
    never modified.
    """
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if importance not in ("l1", "act"):
        raise BadInputError(f"unknown --importance {importance!r}: use l1 or act")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    provider_list = choose_providers(providers)
    read = load(model, input_shapes)
    loaded, runnable = read.model, read.runnable
    batch_size = read.batch or batch_size
    source: DataSource | None = None
    if data is not None:
        source = open_for_model(data, loaded, mean=mean, std=std, limit=limit)
    elif importance == "act":
        raise BadInputError("--importance act ranks channels by activations: give --data")
    lap("load")

    before = analyze_model(loaded)
    channels = analyze_channels(loaded, before)
    groups = channels.groups
    activation = activation_tensors(loaded, before)
    lap("analyze")

    stats: ActivationStats | None = None
    rho = dict.fromkeys(activation, 1.0)  # no data: effective flops are plain MACs
    measured = sorted({t for t in activation.values() if t})  # none: no activation follows a conv
    if source is not None and measured:
        stats = collect_stats(
            runnable,
            measured,
            source,
            provider_list,
            batch_size=batch_size,
            progress=progress,
            magnitudes=importance == "act",  # sum |x| is only needed to rank by activations
        )
        rho = {layer: (stats.tensors[t].ratio if t else 1.0) for layer, t in activation.items()}
    lap("statistics")

    cost = CostModel.build(loaded, channels, before)
    infos = [GroupInfo(g.id, g.size, tuple(g.macroblocks), g.pinned) for g in groups]
    plan = plan_widths(
        before,
        infos,
        rho,
        cost,
        gamma=gamma,
        budget=budget,
        strategy=strategy,
        channel_multiple=channel_multiple,
        beta_min=beta_min,
    )
    lap("plan")

    scorer = (
        activation_importance(stats, activation)
        if stats is not None and importance == "act"
        else l1_importance
    )
    keep = choose_channels(loaded, groups, plan.counts, importance=scorer)
    shrunk = shrink_channels(loaded, keep, channels) if plan.changes_anything else loaded
    after = analyze_model(shrunk)  # shrink keeps the recorded shapes up to date
    # Nothing to cut: hand back the input model itself, not a re-serialised copy.
    reduced = read.written(shrunk) if plan.changes_anything else read.original
    check_model(reduced, full_check=True)
    # The plan's sizes were predictions; report what the written model has.
    plan.params = (plan.params[0], count_parameters(reduced))
    plan.macs = (plan.macs[0], after.total_macs)
    lap("shrink")

    report = ReduceReport(
        provider=stats.provider if stats else "none",
        data=_data_text(source, measured),
        preprocessing=_preprocessing(source),
        samples=stats.samples if stats else 0,
        before=before,
        after=after,
        rho=rho,
        activation=activation,
        plan=plan,
        groups=groups,
        timings=timings,
    )
    if evaluate_accuracy and source is not None and _has_labels(source):
        for key, candidate in (("before", runnable), ("after", reduced)):
            report.accuracy[key] = evaluate(
                candidate, source, provider_list, batch_size=batch_size, progress=False
            )
        lap("evaluate")
    return reduced, report


def _data_text(source: DataSource | None, measured: list[str]) -> str:
    if source is None:
        return "none: rho = 1 everywhere (MACs and receptive fields only; give --data to measure)"
    if not measured:
        return f"{source.description}; no Conv activations to measure: rho = 1 everywhere"
    return source.description


def _preprocessing(source: DataSource | None) -> str:
    if source is None:
        return "none (no data)"
    return source.preprocess.describe() if source.preprocess else "none (reader)"


def _has_labels(source: DataSource) -> bool:
    first = next(iter(source.batches(1)), None)
    return first is not None and first.y is not None


def activation_importance(stats: ActivationStats, activation: Mapping[str, str | None]):
    """`--importance act`: a channel's score is the mean |activation| it produces,
    summed over the group's producer convs (read at each one's first activation)."""
    per_layer = {layer: stats.tensors[t].channel_mean_abs for layer, t in activation.items() if t}

    def score(model: onnx.ModelProto, group: ChannelGroup) -> np.ndarray:
        total = np.zeros(group.size)
        for member in group.members:
            if member.role == FILTERS and member.node in per_layer:
                total += per_layer[member.node][member.positions].sum(axis=1)
        return total if total.any() else l1_importance(model, group)

    return score


class MacroblockScaling(Pass):
    """`reduce` as a pass, to compose with the graph passes:

        Sequential(FixInputShapes({"input": [1, 3, 224, 224]}),
                   MacroblockScaling("calib/", budget="params=0.5"))(model)

    The result's model is the reduced one; `result["mbs"]` is the ReduceReport.
    """

    name = "mbs"

    def __init__(self, data: Any, **options: Any) -> None:
        self.data = data
        self.options = {"progress": False, "evaluate_accuracy": False, **options}

    def call(self, model: onnx.ModelProto) -> PassResult:
        reduced, report = reduce(model, self.data, **self.options)
        return PassResult(reduced, report.plan.changes_anything, {self.name: report})
