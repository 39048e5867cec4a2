"""`reduce`: the main job, as named stages passing typed values.

    read -> fit data -> analyse -> measure -> plan -> rewrite (-> meet latency) -> check

Each stage is a function of its own below (the work itself lives in its modules); `reduce`
only runs them in order and times them, so the flow reads top to bottom as in
docs/design.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import onnx

from onnx_mbs.data import DataSource
from onnx_mbs.data.fit import data_text, has_labels, metadata, open_for_model, preprocessing
from onnx_mbs.data.preprocess import MEAN_KEY, STD_KEY, Preprocess
from onnx_mbs.data.replay import replayable
from onnx_mbs.interop import as_model
from onnx_mbs.logits import has_top1, is_none, no_top1
from onnx_mbs.measurements import drop_measurements
from onnx_mbs.options import ReduceOptions
from onnx_mbs.passes import (
    DEFAULT_CRITERION,
    ONNXRUNTIME_ADVICE,
    ActivationImportance,
    BadInputError,
    ChannelAnalysis,
    ChannelGroup,
    CostModel,
    GraphIndex,
    Importance,
    ModelAnalysis,
    Origin,
    Pass,
    PassResult,
    Site,
    activation_sites,
    analyze_channels,
    analyze_model,
    check_built_for,
    check_model,
    choose_channels,
    count_parameters,
    group_scores,
    is_default,
    is_onnxruntime_op,
    load,
    op_id,
    option,
    pinned_by,
    resized,
    shrink_channels,
    site_tensors,
    static_shape,
    weight_importance,
)
from onnx_mbs.plan import SINGLE_UNIT, Budget, GroupInfo, Plan, plan_widths, round_channels
from onnx_mbs.runtime import check_request, choose_providers, release_freed_memory
from onnx_mbs.weights_file import HeldModel, weights_aside

if TYPE_CHECKING:
    from onnx_mbs.evaluate import EvalResult
    from onnx_mbs.latency import LatencyModel
    from onnx_mbs.stats import ActivationStats


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
    # `--recalibrate`: {"batches", "top1"} of the BatchNorm re-estimation the written model had
    # after the cut (so the report states the model written, not the one before it).
    recalibration: dict | None = None
    # why labelled data gave no top-1 (no classifier-shaped output: a detector), in one line
    no_top1: str = ""
    # the files the report is of: "model", the path read (None for a model given in memory),
    # and "written", the path the command line wrote the reduced model to (None: a dry run);
    # empty where no one said (a report rendered from Python), and then not reported
    files: dict[str, str | None] = field(default_factory=dict)

    @property
    def pinned(self) -> list[str]:
        return sorted({r for g in self.groups if g.pinned for r in g.pin_reasons})

    @property
    def not_exact(self) -> list[str]:
        """Why the cut changes what kept channels compute (normalisations over channels),
        for the groups that lost channels."""
        return not_exact(self.groups, self.plan)


def not_exact(groups: Sequence[ChannelGroup], plan: Plan) -> list[str]:
    cut = [g for g in groups if plan.counts.get(g.id, g.size) < g.size]
    return sorted({reason for g in cut for reason in g.inexact})


def nothing_cut(groups: Sequence[ChannelGroup], plan: Plan) -> str:
    """Why a plan keeps every channel, in one line (naming options as the door in use does)."""
    free = [g for g in groups if not g.pinned and g.macroblocks]
    if not free:
        return "nothing can be cut: every channel group is pinned (see the pinned reasons)"
    if plan.budget is not None and all(f >= 1 for f in plan.budget.fractions.values()):
        return f"nothing cut: the budget {plan.budget} keeps the whole model"
    if all(g.size == 1 for g in free):
        return f"nothing can be cut: every free channel group is a single unit ({SINGLE_UNIT})"
    infos = [GroupInfo.of(g) for g in free]
    step = {g.id: g.multiple(plan.channel_multiple) for g in infos}
    if all(round_channels(g.size, plan.beta_min, step[g.id]) == g.size for g in infos):
        largest = max(infos, key=lambda g: g.size)
        multiple = option("--channel-multiple", plan.channel_multiple)
        has, keeps = f"{largest.size} channels", f"{multiple} of them"
        if largest.unit > 1:  # conv-groups, GroupNorm's one channel of each group
            has = f"{largest.size} units of {largest.unit} channels, each kept or cut whole"
            keeps = f"{step[largest.id]} units ({multiple} counts channels)"
        return (
            f"nothing can be cut: every free channel group is at its smallest already (the "
            f"largest has {has}; a group keeps at least {keeps} and "
            f"{option('--beta-min', plan.beta_min)}, rounded up)"
        )
    beta = {m.index: m.beta for m in plan.macroblocks}
    if plan.budget is None and all(beta.get(m) == 1.0 for g in free for m in g.macroblocks):
        return (
            "nothing can be cut: in every macroblock that makes free channels, each layer's "
            f"{plan.receptive_field} receptive field fits within its limit (R = 0, beta = 1); "
            f"MBS finds no redundancy there: give {option('--budget')} to cut anyway"
        )
    return (
        "nothing can be cut: the planned widths round back to every channel "
        f"({option('--channel-multiple', plan.channel_multiple)}, "
        f"{option('--beta-min', plan.beta_min)})"
    )


def off_multiple(plan: Plan, before: ModelAnalysis, after: ModelAnalysis) -> str | None:
    """The layers of the written model whose cut channel count is not a multiple of the
    channel multiple, in one line; None where every one is. The multiple holds per channel
    group, and a layer whose channels several groups make (a Split's branches concatenated
    again, a ShuffleNet v2 block's shuffled halves) sums them: one group cut to a multiple
    and one kept whole (fewer channels than a step, or pinned) make, say, 8 + 4."""
    multiple = plan.channel_multiple
    was = {layer.name: layer for layer in before.layers}
    off = [
        f"'{layer.name}' {side} {old} -> {new}"
        for layer in after.layers
        if layer.name in was
        for side, old, new in (
            ("out", was[layer.name].out_channels, layer.out_channels),
            ("in", was[layer.name].in_channels, layer.in_channels),
        )
        if new != old and new % multiple
    ]
    if not off:
        return None
    shown = "; ".join(off[:6]) + ("; ..." if len(off) > 6 else "")
    return (
        f"{option('--channel-multiple', multiple)} does not hold on {len(off)} layer "
        f"{'count' if len(off) == 1 else 'counts'} that several channel groups make, some kept "
        f"whole (fewer channels than a step, or pinned): {shown}"
    )


def explain_cut(
    plan: Plan,
    groups: Sequence[ChannelGroup],
    before: ModelAnalysis | None = None,
    after: ModelAnalysis | None = None,
) -> None:
    """Notes on the plan: why nothing is cut, or where the cut is not exact or misses the
    channel multiple (`after`: the written model's analysis); and the ops `before` (the
    analysis) does not count."""
    if before is not None and before.uncounted:
        plan.notes.append(before.uncounted_text())
    if not plan.changes_anything:
        plan.notes.append(nothing_cut(groups, plan))
    if inexact := not_exact(groups, plan):
        plan.notes.append(f"not exact where cut (kept channels change): {'; '.join(inexact)}")
    if before is not None and after is not None and (off := off_multiple(plan, before, after)):
        plan.notes.append(off)


def top1_scoring(
    model: onnx.ModelProto, source: DataSource | None, options: ReduceOptions
) -> tuple[bool, str]:
    """Whether `reduce` scores top-1 before and after, and else why not (a line, or "").
    Top-1 needs labels and a classifier output; several outputs are refused now, before the
    reduction (`--logits` picks one), and a `--logits` typo is said even where nothing reads it."""
    labelled = options.evaluate_accuracy and source is not None and has_labels(source)
    if options.logits is not None:
        has_top1(model, options.logits)
    scored = labelled and has_top1(model, options.logits)
    return scored, no_top1(model, options.logits) if labelled and not scored else ""


def reduce(
    model: str | os.PathLike | onnx.ModelProto | bytes | Any,
    data: Any = None,
    options: ReduceOptions | None = None,
    **overrides: Any,
) -> tuple[onnx.ModelProto, ReduceReport]:
    """Reduce `model` with MBS; returns the smaller model and what was measured.

    `data` is a --data spec (folder, .npz, IDX folder) or a Python reader yielding input
    dicts; without data every activation ratio is taken as 1, so MBS works from MACs and
    receptive fields alone. `options` (a ReduceOptions) or the same names as keywords say
    how: the budget, width map, receptive-field reading, strategy ("auto", the default,
    picks one per budget metric from the experiment's results, onnx_mbs.auto; "mbs",
    "mbs-cost", "mbs-branch", "uniform" or "global"), importance (a registered name, an
    Importance or a factory of one), ...
    `model` may also be a serialized model (bytes) or an onnx-graphsurgeon Graph
    (`onnx_mbs.interop`). The input model is never modified.
    """
    options = ReduceOptions.of(options, **overrides).checked(has_data=data is not None)
    laps = Laps()
    providers = runtime_providers(options, has_data=data is not None)
    given = options.mean is not None and options.std is not None
    loaded = load(as_model(model, preprocessing_given=given), options.input_shapes)
    origin, held = loaded.origin, HeldModel(loaded.model)
    del loaded  # `held` is the analysis form's one owner: its weights can be lent out
    source = fit_data(data, held.model, options)
    scored, unscored = top1_scoring(held.model, source, options)
    recorded = given_preprocessing(options.mean, options.std, source)
    release_freed_memory()  # load's copies and serializations: not in every later peak
    laps.lap("load")
    analysed, index = analyse(held.model, options.receptive_field, origin)
    laps.lap("analyze")
    if source is not None:
        index = None  # it holds the model, whose weights the statistics borrow meanwhile
    form, measured = measure(held, origin, analysed, source, providers, options)
    laps.lap("statistics")
    index = index or GraphIndex.build(form)  # the model as the statistics hand it back
    planner = Planner.build(form, index, origin, analysed, measured, providers, options)
    plan = planner.plan(options.budget)
    laps.lap("plan")
    shrink = Shrink(form, index, origin, analysed, planner.scores, options.receptive_field)
    rewritten = shrink(plan)
    if planner.latency is not None:
        runnable = origin.written(form)
        rewritten = meet_latency(
            rewritten, runnable, planner, shrink, options, analysed_shapes(form)
        )
    if rewritten.plan.changes_anything or rerecords(rewritten.model, recorded):
        drop_measurements(rewritten.model)  # its test top-1 describes other weights or data
    if recorded is not None:
        with_preprocessing(rewritten.model, recorded)
    check_written(rewritten.model, lambda: origin.original)
    rewritten = rewritten.with_written_sizes()
    explain_cut(rewritten.plan, analysed.channels.groups, analysed.before, rewritten.after)
    laps.lap("shrink")
    report = ReduceReport(
        # Without statistics a latency budget or --channel-multiple auto ran a provider.
        provider=measured.stats.provider if measured.stats else (providers or ["none"])[0],
        data=data_text(source, measured.tensors),
        preprocessing=preprocessing(source),
        samples=measured.stats.samples if measured.stats else 0,
        before=analysed.before,
        after=rewritten.after,
        rho=measured.rho,
        activation=analysed.activation,
        plan=rewritten.plan,
        groups=analysed.channels.groups,
        timings=laps.timings,
        no_top1=unscored,
    )
    if scored:
        # Nothing reads the analysis form again: written form in place, let go once written.
        before = HeldModel(origin.write_form(form))
        del form, index, planner, shrink
        models = {"before": before, "after": rewritten.model}
        report.accuracy = accuracy(models, source, providers, origin.batch, options)
        laps.lap("evaluate")
    return rewritten.model, report


def runtime_providers(options: ReduceOptions, has_data: bool) -> list[str]:
    """The providers onnxruntime runs on; none when this run makes no session (no data, no
    latency to time): choosing would import onnxruntime and, where it may, probe CUDA."""
    if has_data or options.plans_latency or options.channel_multiple == "auto":
        return choose_providers(options.providers)
    check_request(options.providers)  # a typo is refused even where nothing runs
    return []


class Laps:
    """Seconds each stage took, by name, in order."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 4)
        self._clock = now


def fit_data(data: Any, model: onnx.ModelProto, options: ReduceOptions) -> DataSource | None:
    """The data fitted to the model's input (None without data)."""
    if data is not None:
        return open_for_model(
            data,
            model,
            mean=options.mean,
            std=options.std,
            limit=options.limit,
            labels=not is_none(options.logits),  # `--logits none`: no top-1 to read them for
            logits=options.logits,
        )
    if options.importance == "act":
        raise BadInputError(
            f"{option('--importance', 'act')} ranks channels by activations: "
            f"give {option('--data')}"
        )
    return None


def given_preprocessing(mean: Any, std: Any, source: DataSource | None) -> Preprocess | None:
    """The preprocessing to record in the written model: the one that read `source`, when
    mean or std were given (None when neither was). Given without images to apply them
    to, they would be ignored: refused."""
    if mean is None and std is None:
        return None
    if source is None or source.preprocess is None:
        raise BadInputError(
            f"{option('--mean')}/{option('--std')} preprocess the images of {option('--data')}; "
            "without data, or with a reader's ready model inputs, they would be ignored: drop "
            f"them or give {option('--data')}"
        )
    return source.preprocess


def with_preprocessing(model: onnx.ModelProto, preprocess: Preprocess) -> onnx.ModelProto:
    """`model`, in place, with `preprocess`'s mean/std recorded in its metadata_props, so
    later commands (eval, retrain) read data as it was read here without being told again."""
    return with_metadata(model, preprocess.metadata())


def rerecords(model: onnx.ModelProto, recorded: Preprocess | Mapping[str, str] | None) -> bool:
    """Whether recording `recorded` (a Preprocess, or the metadata entries it records) changes
    the mean/std `model` records (None: nothing recorded, no change): a figure measured under
    the old ones would then not hold."""
    if recorded is None:
        return False
    entries = recorded if isinstance(recorded, Mapping) else recorded.metadata()
    return any(metadata(model).get(k) != v for k, v in entries.items())


def with_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> onnx.ModelProto:
    """`model`, in place, with `entries` set in its metadata_props (other keys kept)."""
    recorded = {**metadata(model), **entries}
    del model.metadata_props[:]
    for key, value in recorded.items():
        model.metadata_props.add(key=key, value=value)
    return model


@dataclass(frozen=True)
class Analysed:
    """The model before: its macroblocks, channel groups and the activation after each conv."""

    before: ModelAnalysis
    channels: ChannelAnalysis
    sites: dict[str, Site | None]  # conv -> where its activation ratio (its rho) is read

    @property
    def activation(self) -> dict[str, str | None]:
        """conv -> the tensor whose activation ratio is its rho (None: no activation)."""
        return site_tensors(self.sites)


def analyse(
    model: onnx.ModelProto, receptive_field: str, origin: Origin | None = None
) -> tuple[Analysed, GraphIndex]:
    """The analyses, and the index they read (one for all, not one each); `origin`'s
    run-time shape arithmetic pins the groups whose channel count it reads."""
    index = GraphIndex.build(model)
    before = analyze_model(model, receptive_field, index)
    nothing_counted(model, before)
    channels = analyze_channels(model, before, index, origin and origin.run_time)
    nothing_free(model, channels.groups)
    return Analysed(before, channels, activation_sites(model, before, index)), index


def nothing_free(model: onnx.ModelProto, groups: Sequence[ChannelGroup]) -> None:
    """Refuse a model every channel group of which is pinned where onnxruntime's own ops
    (NCHWc's Conv and its reorders: kept whole) pin some of them: reduced, it would be written
    again unchanged, when the same model saved at basic can be reduced. onnxruntime ops that
    pin nothing (a FusedConv, followed as its Conv) are not blamed for pins of other causes."""
    if any(g.macroblocks and not g.pinned for g in groups):
        return
    reasons = {r for g in groups for r in g.pin_reasons}
    ops = sorted(
        {
            op_id(n)
            for n in model.graph.node
            if is_onnxruntime_op(n) and any(r.startswith(pinned_by(n)) for r in reasons)
        }
    )
    if ops:
        raise BadInputError(
            f"nothing can be cut: every channel group is pinned, the model's {', '.join(ops[:3])} "
            f"ops kept whole ({ONNXRUNTIME_ADVICE})"
        )


def nothing_counted(model: onnx.ModelProto, before: ModelAnalysis) -> None:
    """Refuse a model in which no MACs or no parameters are counted: there is nothing to
    measure or cut, and every fraction kept would divide by zero. Names the custom ops a
    layer may hide in (onnxruntime's layout optimisations make every Conv an NCHWc Conv)."""
    if before.total_macs and before.total_params:
        return
    custom = sorted({op_id(n) for n in model.graph.node if not is_default(n.domain)})
    hint = ""
    if custom:
        hint = f"; its {', '.join(custom[:3])} op{'s' * (len(custom) > 1)} may hide layers"
        if any(is_onnxruntime_op(n) for n in model.graph.node):
            hint += f" ({ONNXRUNTIME_ADVICE})"
    raise BadInputError(
        f"nothing to reduce: the model has no layer onnx-mbs counts ({before.total_params} "
        f"parameters, {before.total_macs} MACs of Conv, ConvTranspose, Gemm, MatMul or Einsum "
        f"with known shapes){hint}"
    )


@dataclass(frozen=True)
class Measured:
    """Activation statistics (None without data) and each conv's activation ratio rho."""

    stats: ActivationStats | None
    rho: dict[str, float]
    tensors: list[str]  # the tensors whose activations were measured (or would have been)


def measure(
    held: HeldModel,
    origin: Origin,
    analysed: Analysed,
    source: DataSource | None,
    providers: list[str],
    options: ReduceOptions,
) -> tuple[onnx.ModelProto, Measured]:
    """Measure the activations over the data, the analysis form's weights lent to
    onnxruntime meanwhile; the model is handed back with what was measured."""
    activation = analysed.activation
    rho = dict.fromkeys(activation, 1.0)  # no data: effective flops are plain MACs
    tensors = sorted({t for t in activation.values() if t})  # none: no activation after a conv
    if source is None or not tensors:
        return held.take(), Measured(None, rho, tensors)
    from onnx_mbs.stats import collect_stats  # here: onnxruntime only where it runs

    with weights_aside(held) as (light, folder):
        stats = collect_stats(
            light,
            tensors,
            source,
            providers,
            batch_size=origin.batch or options.batch_size,
            progress=options.progress,
            magnitudes=options.importance == "act",  # sum |x| only ranks by activations
            written=origin.write_form,
            macs_per_sample=analysed.before.total_macs // analysed.before.batch,
            weights_folder=folder,
        )
    made = {layer.name: layer.out_channels for layer in analysed.before.layers}
    rho = {
        layer: 1.0
        if site is None
        else stats.tensors[site.tensor].part(site.channel, made[layer]).ratio
        for layer, site in analysed.sites.items()
    }
    return held.take(), Measured(stats, rho, tensors)


@dataclass(frozen=True)
class Planner:
    """What planning needs, gathered once: it plans any budget (the latency retries
    re-plan with corrected targets)."""

    before: ModelAnalysis
    infos: list[GroupInfo]
    rho: dict[str, float]
    cost: CostModel
    options: ReduceOptions
    channel_multiple: int
    latency: LatencyModel | None
    scores: dict[int, Any]  # group id -> per-channel importance, for every free group
    ranked_by: str

    @classmethod
    def build(
        cls,
        model: onnx.ModelProto,
        index: GraphIndex,
        origin: Origin,
        analysed: Analysed,
        measured: Measured,
        providers: list[str],
        options: ReduceOptions,
    ) -> Planner:
        before, groups = analysed.before, analysed.channels.groups
        cost = CostModel.build(model, analysed.channels, before, index)
        infos = [GroupInfo.of(g) for g in groups]
        multiple, latency = options.channel_multiple, None
        timer = None
        if multiple == "auto" or options.plans_latency:
            from onnx_mbs.latency import auto_channel_multiple, onnxruntime_timer

            timer = onnxruntime_timer(providers, options.latency_threads)
        if multiple == "auto":
            multiple = auto_channel_multiple(before, providers, timer)
        elif not isinstance(multiple, int) or isinstance(multiple, bool):
            raise BadInputError(
                f"{option('--channel-multiple')}: a whole number or auto, not {multiple!r}"
            )
        if options.plans_latency:
            from onnx_mbs.latency import LatencyModel, measure_models

            runnable = origin.written(model)
            latency = LatencyModel(
                before,
                cost,
                measure_models(
                    [runnable],
                    providers,
                    threads=options.latency_threads,
                    shapes=analysed_shapes(model),
                )[0],
                timer,
                batch=before.batch,
                channel_multiple=multiple,
            )
        scorer = importance_for(model, index, options.importance, measured, analysed.sites)
        if scorer is options.importance:  # the caller's own object: of this model?
            check_built_for(scorer, index, groups)
        # Scored once: the global strategy plans counts by them, shrink keeps the top ones.
        free = [g for g, info in zip(groups, infos) if info.free]
        scores = group_scores(free, scorer)
        return cls(
            before, infos, measured.rho, cost, options, multiple, latency, scores, scorer.name
        )

    def plan(self, budget: Budget | None) -> Plan:
        options = self.options
        assert not isinstance(options.width_map, str)
        return plan_widths(
            self.before,
            self.infos,
            self.rho,
            self.cost,
            width_map=options.width_map,
            budget=budget,
            strategy=options.strategy,
            channel_multiple=self.channel_multiple,
            beta_min=options.beta_min,
            latency=self.latency,
            importance=self.scores,
            notes=[f"channels ranked by {self.ranked_by} importance"],
            strategy_reason=options.strategy_reason,
        )


def importance_for(
    model: onnx.ModelProto,
    index: GraphIndex,
    importance: Any,
    measured: Measured,
    activation: Mapping[str, Site | str | None],
) -> Importance:
    """The criterion channels are ranked by: the caller's Importance, one its factory
    builds, act from the statistics, or a registered weight criterion."""
    if isinstance(importance, Importance):
        return importance
    if callable(importance):
        return importance(model, index)
    if importance == "act" and measured.stats is not None:
        return activation_importance(model, measured.stats, activation, index)
    # no data, or no activation to measure: rank by weights
    criterion = DEFAULT_CRITERION if importance == "act" else importance
    return weight_importance(model, criterion, index)


@dataclass(frozen=True)
class Rewritten:
    """A plan, the model it writes (declared I/O) and that model's analysis."""

    plan: Plan
    after: ModelAnalysis
    model: onnx.ModelProto

    def with_written_sizes(self) -> Rewritten:
        """The plan's sizes were predictions; these are what the written model has. A plan
        that cuts nothing writes the input back as it was read: its sizes are the ones
        counted on the analysis form (where weights held in Constant nodes are lifted and
        counted), not the stored form's."""
        plan = self.plan
        if not plan.changes_anything:
            return self
        params = (plan.params[0], count_parameters(self.model))
        macs = (plan.macs[0], self.after.total_macs)
        return replace(self, plan=replace(plan, params=params, macs=macs))


@dataclass(frozen=True)
class Shrink:
    """Writes the model a plan asks for (the latency retries write several)."""

    model: onnx.ModelProto
    index: GraphIndex
    origin: Origin
    analysed: Analysed
    scores: dict[int, Any]
    receptive_field: str

    def __call__(self, plan: Plan) -> Rewritten:
        if not plan.changes_anything:  # hand back the input itself, not a re-serialised copy
            original = self.origin.original
            if _passes_full_check(original):
                return Rewritten(plan, self.analysed.before, original)
            # Its recorded shapes contradict inference (onnxruntime runs it, the checker
            # refuses it): the input as load inferred it afresh, weights untouched.
            return Rewritten(plan, self.analysed.before, self.origin.written(self.model))
        channels = self.analysed.channels
        keep = choose_channels(channels.groups, plan.counts, self.scores)
        shrunk = shrink_channels(self.model, keep, channels, self.index)
        if entries := len(shrunk.training_info):
            # Its graphs initialise and update tensors of the original widths.
            del shrunk.training_info[:]
            plan.notes.append(
                f"the model's training_info ({entries} entr{'y' if entries == 1 else 'ies'}) "
                "was dropped: its graphs make tensors of the original widths"
            )
        # Analysed while it has the analysis form's shapes (shrink keeps them up to date),
        # then put in the written form in place: no second copy of its weights (issue 13).
        after = resized(self.analysed.before, shrunk)
        plan.notes.extend(_copied_weights(self.analysed.before, after))
        return Rewritten(plan, after, self.origin.write_form(shrunk))


def _copied_weights(before: ModelAnalysis, after: ModelAnalysis) -> list[str]:
    """Notes for each weight convs share that the plan cut otherwise for each of them:
    shrink writes one copy per cut, which can make a model larger than the original."""
    readers: dict[str, list[str]] = {}
    for layer in before.layers:
        readers.setdefault(layer.weight, []).append(layer.name)
    written = {layer.name: layer.weight for layer in after.layers}
    notes = []
    for weight, names in readers.items():
        copies = len({written[name] for name in names})
        if copies > 1:
            notes.append(
                f"the weight {weight!r} that convs {', '.join(map(repr, names))} share is cut "
                f"otherwise for each, so it is written as {copies} copies"
            )
    return notes


LATENCY_RETRIES = 3  # re-plans when the written model's measured latency misses
LATENCY_TOLERANCE = 0.05  # relative miss that triggers one


def meet_latency(
    first: Rewritten,
    runnable: onnx.ModelProto,
    planner: Planner,
    shrink: Callable[[Plan], Rewritten],
    options: ReduceOptions,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Rewritten:
    """Measure the written model against the original (at `shapes`, the size analysed, where
    its dims are dynamic); when its latency fraction misses
    the asked one, re-plan with a corrected target: scaled by the miss at first (the
    prediction's error is mostly a factor), then by the secant through the two tries
    nearest the asked fraction. Keeps the closest try that meets the asked fraction (the
    largest model within it), else the closest of all; its measured latency goes into the
    plan."""
    from onnx_mbs.latency import measure_models

    budget, latency = options.budget, planner.latency
    assert isinstance(budget, Budget) and latency is not None
    providers = choose_providers(options.providers)
    asked = target = budget.fractions["latency"]
    tries = []  # (over the asked fraction, |miss|, attempt, target, measured, candidate)
    candidate = first
    for attempt in range(LATENCY_RETRIES + 1):
        models = [runnable, candidate.model]
        before, after = measure_models(
            models, providers, threads=options.latency_threads, shapes=shapes
        )
        candidate = replace(candidate, plan=replace(candidate.plan, latency=(before, after)))
        measured = after / before
        over = "latency" in candidate.plan.missed
        tries.append((over, abs(measured / asked - 1), attempt, target, measured, candidate))
        if tries[-1][1] <= LATENCY_TOLERANCE or attempt == LATENCY_RETRIES:
            break
        target = _next_target(asked, [(t[3], t[4]) for t in tries])
        try:
            plan = planner.plan(budget.with_fraction("latency", target))
        except BadInputError:  # the corrected target is out of reach: keep the best so far
            break
        candidate = shrink(replace(plan, budget=budget))
    best: Rewritten = min(tries, key=lambda t: t[:3])[5]
    plan = best.plan
    note = (
        f"latency: {asked:g} asked, {plan.reached['latency']:.3f} measured on {providers[0]} "
        f"(best of {len(tries)} plans; {latency.measurements} conv widths timed)"
    )
    return replace(best, plan=replace(plan, notes=[*plan.notes, note]))


def analysed_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The static input shapes of the analysis form: where the model written takes dynamic
    dims, the size the plan and its MACs are of, so the size its latency is timed at."""
    return {i.name: shape for i in model.graph.input if (shape := static_shape(i))}


def _next_target(asked: float, tries: list[tuple[float, float]]) -> float:
    """The planning target expected to measure `asked`, from (target, measured) tries."""
    (t1, m1), *rest = sorted(tries, key=lambda t: abs(t[1] - asked))
    if rest and abs(rest[0][1] - m1) > 1e-3:
        t2, m2 = rest[0]
        target = t1 + (asked - m1) * (t2 - t1) / (m2 - m1)
    else:
        target = t1 * asked / m1
    return min(1.0, max(0.05, target))


def accuracy(
    models: Mapping[str, onnx.ModelProto | HeldModel],
    source: DataSource,
    providers: list[str],
    batch: int | None,
    options: ReduceOptions,
) -> dict[str, EvalResult]:
    """Top-1 of each model on the (labelled) data."""
    from onnx_mbs.evaluate import evaluate

    batch_size = batch or options.batch_size
    return {
        key: evaluate(
            model, source, providers, batch_size=batch_size, progress=False, logits=options.logits
        )
        for key, model in models.items()
    }


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


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


def activation_importance(
    model: onnx.ModelProto,
    stats: ActivationStats,
    activation: Mapping[str, Site | str | None],
    index: GraphIndex | None = None,
) -> Importance:
    """`--importance act`: a channel's score is the mean |activation| it produces, read
    at each producer conv's first activation, on the channels it makes there (a Site's, from
    its first channel; a tensor name's, from channel 0); filter L1 where a producer has
    none."""
    per_layer = {}
    for layer, site in activation.items():
        if site is not None:
            site = Site(site) if isinstance(site, str) else site
            per_layer[layer] = stats.tensors[site.tensor].part(site.channel).channel_mean_abs
    return ActivationImportance(model, per_layer, index=index)


class MacroblockScaling(Pass):
    """`reduce` as a pass, to compose with the graph passes:

        Sequential(FixInputShapes({"input": [1, 3, 224, 224]}),
                   MacroblockScaling("calib/", budget="params=0.5"))(model)

    The result's model is the reduced one (when nothing is cut, the input itself, or a copy
    recording the `mean`/`std` given here where the input records others, without its
    measured test top-1), declaring
    the inputs the pass was given: after FixInputShapes, the fixed shapes; give the size
    as `input_shapes=` instead to keep the input's dynamic dims. `result["mbs"]` is the
    ReduceReport.
    """

    name = "mbs"

    def __init__(self, data: Any, options: ReduceOptions | None = None, **overrides: Any) -> None:
        self.data = replayable(data)  # a one-shot reader, read again for every model
        quiet = options or ReduceOptions(progress=False, evaluate_accuracy=False)
        self.options = ReduceOptions.of(quiet, **overrides)

    def call(self, model: onnx.ModelProto) -> PassResult:
        reduced, report = reduce(model, self.data, self.options)
        if report.plan.changes_anything:
            return PassResult(reduced, True, {self.name: report})
        # Nothing cut: the input itself, unless mean/std given here differ from what it
        # records; reduce recorded them, and later commands read the data by that record
        # (a test top-1 measured under the old ones no longer holds: dropped, as reduce does).
        record = {k: v for k, v in metadata(reduced).items() if k in (MEAN_KEY, STD_KEY)}
        if not rerecords(model, record):
            return PassResult(model, False, {self.name: report})
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return PassResult(drop_measurements(with_metadata(out, record)), True, {self.name: report})
