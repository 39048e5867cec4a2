"""`reduce`: the main job, load -> analyse -> measure -> plan -> shrink.

Each step is a module of its own; this file only wires them together and
times them, so the flow reads top to bottom like DESIGN.md's diagram.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx
from onnx import helper

from onnx_mbs.data import DataSource, open_data
from onnx_mbs.data.ready import declared_inputs
from onnx_mbs.evaluate import EvalResult, evaluate
from onnx_mbs.interop import as_model
from onnx_mbs.passes import (
    BadInputError,
    GraphIndex,
    ModelAnalysis,
    Pass,
    PassResult,
    analyze_model,
    count_parameters,
)
from onnx_mbs.passes.activations import activation_tensors
from onnx_mbs.passes.analysis import DEFAULT_RECEPTIVE_FIELD, check_reading
from onnx_mbs.passes.channel_groups import ChannelGroup, analyze_channels
from onnx_mbs.passes.cost import CostModel
from onnx_mbs.passes.importance import (
    CRITERIA,
    DEFAULT_CRITERION,
    ActivationImportance,
    Importance,
    choose_channels,
    group_scores,
    weight_importance,
)
from onnx_mbs.passes.load import load, set_io
from onnx_mbs.passes.read import check_model
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.plan import (
    DEFAULT_WIDTH_MAP,
    STRATEGIES,
    Budget,
    GroupInfo,
    Plan,
    WidthMap,
    plan_widths,
)
from onnx_mbs.runtime import choose_providers, release_freed_memory
from onnx_mbs.stats import ActivationStats, collect_stats
from onnx_mbs.weights_file import weights_aside

if TYPE_CHECKING:
    from onnx_mbs.latency import LatencyModel


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

    @property
    def not_exact(self) -> list[str]:
        """Why the cut changes what kept channels compute (normalisations over channels),
        for the groups that lost channels."""
        return not_exact(self.groups, self.plan)


def nothing_cut(groups: Sequence[ChannelGroup], plan: Plan) -> str:
    """Why a plan keeps every channel, in one line."""
    free = [g for g in groups if not g.pinned and g.macroblocks]
    if not free:
        return "nothing can be cut: every channel group is pinned (see the pinned reasons)"
    beta = {m.index: m.beta for m in plan.macroblocks}
    if plan.budget is None and all(beta.get(m) == 1.0 for g in free for m in g.macroblocks):
        return (
            "nothing can be cut: in every macroblock that makes free channels, each layer's "
            f"{plan.receptive_field} receptive field fits within its limit (R = 0, beta = 1); "
            "MBS finds no redundancy there: give --budget to cut anyway"
        )
    return (
        "nothing can be cut: the planned widths round back to every channel "
        f"(--channel-multiple {plan.channel_multiple}, --beta-min {plan.beta_min:g})"
    )


def not_exact(groups: Sequence[ChannelGroup], plan: Plan) -> list[str]:
    cut = [g for g in groups if plan.counts.get(g.id, g.size) < g.size]
    return sorted({reason for g in cut for reason in g.inexact})


def model_input(model: onnx.ModelProto) -> tuple[str, list[int]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BadInputError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); give "
            "an .npz with one array per input, named after it (model-ready data, fed as it is)"
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
    reads it; mean/std default to its metadata; `split` is the default IDX split. Model-ready
    data (an npz with an array per input) feeds every input as it is, several included."""
    inputs = declared_inputs(model)
    is_path = isinstance(spec, (str, os.PathLike))
    if is_path and len(inputs) > 1:  # open_data takes a model-ready npz or refuses
        name, shape = inputs[0].name, [d or 0 for d in inputs[0].dims]
    else:
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
        inputs=inputs if is_path else (),
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


def check_written(
    model: onnx.ModelProto, original: onnx.ModelProto | Callable[[], onnx.ModelProto]
) -> None:
    """The full checker on a model about to be written. When it fails, the original is checked
    too: if that fails the same way the input was never valid ONNX (bad input, exit 2, e.g. a
    bfloat16 Conv below opset 22, which the light check at load lets through); else it is a bug."""
    try:
        check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        try:
            check_model(original() if callable(original) else original, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            first = str(error).strip().splitlines()[0]
            raise BadInputError(f"the model is not valid ONNX: {first}") from None
        raise


def reduce(
    model: str | os.PathLike | onnx.ModelProto | Any,
    data: Any = None,
    *,
    budget: Budget | str | None = None,
    width_map: WidthMap | str = DEFAULT_WIDTH_MAP,
    receptive_field: str = DEFAULT_RECEPTIVE_FIELD,
    strategy: str = "mbs",
    providers: str = "auto",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    channel_multiple: int | str = 8,
    beta_min: float = 0.1,
    importance: str = "auto",
    mean: Any = None,
    std: Any = None,
    limit: int | None = None,
    batch_size: int = 64,
    latency_threads: int = 0,
    evaluate_accuracy: bool = True,
    progress: bool = True,
) -> tuple[onnx.ModelProto, ReduceReport]:
    """Reduce `model` with MBS; returns the smaller model and what was measured.

    `data` is a --data spec (folder, .npz, IDX folder) or a Python reader
    yielding input dicts; without data every activation ratio is taken as 1,
    so MBS works from MACs and receptive fields alone. `width_map` ("linear:C"
    or "power:GAMMA") and `receptive_field` ("global" or "local") choose the
    formula (onnx_mbs.plan); `strategy` ("mbs", "uniform" or "global") who decides
    each group's count: MBS, one width scale, or one ranking of the channels' `importance`
    over all groups. `model` may also be an
    onnx-graphsurgeon Graph (`onnx_mbs.interop`). The input model is never modified.
    `channel_multiple="auto"` picks one for the provider; a `latency=` budget is planned
    with measured conv times and checked by measuring the written model (see latency.py),
    with `latency_threads` onnxruntime threads (0: its default).
    """
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    width_map = WidthMap.parse(width_map)
    check_reading(receptive_field)
    if strategy not in STRATEGIES:
        raise BadInputError(f"unknown --strategy {strategy!r}: use {', '.join(STRATEGIES)}")
    if importance not in (*CRITERIA, "act", "auto"):
        raise BadInputError(
            f"unknown --importance {importance!r}: use auto, act or one of {', '.join(CRITERIA)}"
        )
    if importance == "auto":  # bench/importance.py: act ranks best, then l2
        importance = "act" if data is not None else DEFAULT_CRITERION
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    provider_list = choose_providers(providers)
    read = load(as_model(model), input_shapes)
    loaded = read.model
    batch_size = read.batch or batch_size
    source: DataSource | None = None
    if data is not None:
        source = open_for_model(data, loaded, mean=mean, std=std, limit=limit)
    elif importance == "act":
        raise BadInputError("--importance act ranks channels by activations: give --data")
    release_freed_memory()  # load's copies and serializations: not in every later peak
    lap("load")

    index = GraphIndex.build(loaded)  # one index for the steps below, not one each
    before = analyze_model(loaded, receptive_field, index)
    channels = analyze_channels(loaded, before, index)
    groups = channels.groups
    activation = activation_tensors(loaded, before, index)
    del index  # it holds the whole model, which the statistics let go meanwhile
    lap("analyze")

    stats: ActivationStats | None = None
    rho = dict.fromkeys(activation, 1.0)  # no data: effective flops are plain MACs
    measured = sorted({t for t in activation.values() if t})  # none: no activation follows a conv
    if source is not None and measured:
        del loaded  # the analysis form's weights are lent to onnxruntime meanwhile
        with weights_aside(read) as (light, folder):
            stats = collect_stats(
                light,
                measured,
                source,
                provider_list,
                batch_size=batch_size,
                progress=progress,
                magnitudes=importance == "act",  # sum |x| is only needed to rank by activations
                declared=read.declared,
                macs_per_sample=before.total_macs // (read.batch or 1),  # analysed at that batch
                weights_folder=folder,
            )
        loaded = read.model
        rho = {layer: (stats.tensors[t].ratio if t else 1.0) for layer, t in activation.items()}
    lap("statistics")

    index = GraphIndex.build(loaded)  # the model as the statistics hand it back
    cost = CostModel.build(loaded, channels, before, index)
    infos = [GroupInfo(g.id, g.size, tuple(g.macroblocks), g.pinned) for g in groups]
    latency: LatencyModel | None = None
    timer = None
    if channel_multiple == "auto" or (budget is not None and "latency" in budget.fractions):
        from onnx_mbs.latency import auto_channel_multiple, onnxruntime_timer

        timer = onnxruntime_timer(provider_list, latency_threads)
    if channel_multiple == "auto":
        channel_multiple = auto_channel_multiple(before, provider_list, timer)
    elif not isinstance(channel_multiple, int):
        raise BadInputError(f"--channel-multiple: a number or auto, not {channel_multiple!r}")
    if budget is not None and "latency" in budget.fractions:
        from onnx_mbs.latency import LatencyModel, measure_models

        latency = LatencyModel(
            before,
            cost,
            measure_models([read.runnable], provider_list, threads=latency_threads)[0],
            timer,
            batch=read.batch or 1,
            channel_multiple=channel_multiple,
        )

    if importance == "act" and stats is not None:
        scorer = activation_importance(loaded, stats, activation, index)
    else:  # no data, or no activation to measure: rank by weights
        criterion = DEFAULT_CRITERION if importance == "act" else importance
        scorer = weight_importance(loaded, criterion, index)
    # Scored once: the global strategy plans counts by them, shrink keeps the top ones.
    scores = group_scores([g for g, info in zip(groups, infos) if info.free], scorer)

    def make_plan(asked: Budget | None) -> Plan:
        plan = plan_widths(
            before,
            infos,
            rho,
            cost,
            width_map=width_map,
            budget=asked,
            strategy=strategy,
            channel_multiple=channel_multiple,
            beta_min=beta_min,
            latency=latency,
            importance=scores,
        )
        plan.notes.append(f"channels ranked by {scorer.name} importance")
        return plan

    plan = make_plan(budget)
    lap("plan")

    def rewrite(plan: Plan) -> tuple[ModelAnalysis, onnx.ModelProto]:
        """The analysis of the shrunk model, and the model to write (declared I/O)."""
        if not plan.changes_anything:  # hand back the input itself, not a re-serialised copy
            return before, read.original
        keep = choose_channels(groups, plan.counts, scores)
        shrunk = shrink_channels(loaded, keep, channels, index)
        # Analysed while it has the analysis form's shapes (shrink keeps them up to date),
        # then given the declared I/O in place: no second copy of its weights (issue 13).
        return analyze_model(shrunk, receptive_field), set_io(shrunk, read.declared)

    after, reduced = rewrite(plan)
    if latency is not None:
        plan, after, reduced = _meet_latency(
            (plan, after, reduced),
            read.runnable,
            budget,
            lambda models: measure_models(models, provider_list, threads=latency_threads),
            provider_list[0],
            latency,
            make_plan,
            rewrite,
        )
    check_written(reduced, lambda: read.original)
    if not plan.changes_anything:
        plan.notes.append(nothing_cut(groups, plan))
    if inexact := not_exact(groups, plan):
        plan.notes.append(f"not exact where cut (kept channels change): {'; '.join(inexact)}")
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
        for key, candidate in (("before", read.runnable), ("after", reduced)):
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


LATENCY_RETRIES = 3  # re-plans when the written model's measured latency misses
LATENCY_TOLERANCE = 0.05  # relative miss that triggers one


def _meet_latency(
    first: tuple[Plan, ModelAnalysis, onnx.ModelProto],
    runnable: onnx.ModelProto,
    budget: Budget,
    measure: Callable[[list[onnx.ModelProto]], list[float]],
    provider: str,
    latency: LatencyModel,
    make_plan: Callable[[Budget], Plan],
    rewrite: Callable[[Plan], tuple[ModelAnalysis, onnx.ModelProto]],
) -> tuple[Plan, ModelAnalysis, onnx.ModelProto]:
    """Measure the written model against the original; when its latency fraction misses
    the asked one, re-plan with a corrected target: scaled by the miss at first (the
    prediction's error is mostly a factor), then by the secant through the two tries
    nearest the asked fraction. Keeps the closest try; its measured latency goes into
    the plan."""
    asked = target = budget.fractions["latency"]
    tries = []  # (|miss|, attempt, target, measured fraction, candidate)
    candidate = first
    for attempt in range(LATENCY_RETRIES + 1):
        plan, _, reduced = candidate
        before, after = measure([runnable, reduced])
        plan.latency = (before, after)
        measured = after / before
        tries.append((abs(measured / asked - 1), attempt, target, measured, candidate))
        if tries[-1][0] <= LATENCY_TOLERANCE or attempt == LATENCY_RETRIES:
            break
        target = _next_target(asked, [(t[2], t[3]) for t in tries])
        try:
            plan = make_plan(budget.with_fraction("latency", target))
        except BadInputError:  # the corrected target is out of reach: keep the best so far
            break
        plan.budget = budget
        candidate = (plan, *rewrite(plan))
    plan, after, reduced = min(tries, key=lambda t: t[:2])[4]
    plan.notes.append(
        f"latency: {asked:g} asked, {plan.reached['latency']:.3f} measured on {provider} "
        f"(best of {len(tries)} plans; {latency.measurements} conv widths timed)"
    )
    return plan, after, reduced


def _next_target(asked: float, tries: list[tuple[float, float]]) -> float:
    """The planning target expected to measure `asked`, from (target, measured) tries."""
    (t1, m1), *rest = sorted(tries, key=lambda t: abs(t[1] - asked))
    if rest and abs(rest[0][1] - m1) > 1e-3:
        t2, m2 = rest[0]
        target = t1 + (asked - m1) * (t2 - t1) / (m2 - m1)
    else:
        target = t1 * asked / m1
    return min(1.0, max(0.05, target))


def _preprocessing(source: DataSource | None) -> str:
    if source is None:
        return "none (no data)"
    return source.preprocess.describe() if source.preprocess else "none (model inputs as given)"


def _has_labels(source: DataSource) -> bool:
    first = next(iter(source.batches(1)), None)
    return first is not None and first.y is not None


def activation_importance(
    model: onnx.ModelProto,
    stats: ActivationStats,
    activation: Mapping[str, str | None],
    index: GraphIndex | None = None,
) -> Importance:
    """`--importance act`: a channel's score is the mean |activation| it produces, read
    at each producer conv's first activation (filter L1 where a producer has none)."""
    per_layer = {layer: stats.tensors[t].channel_mean_abs for layer, t in activation.items() if t}
    return ActivationImportance(model, per_layer, index=index)


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
