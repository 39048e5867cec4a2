"""Property-based fuzzing of the channel rewrite on random CNN DAGs (`random_cnn.py`).

Unlike `test_shrink_fuzz.py`, which zeroes what the channel analysis groups together,
the channels here are zeroed at the convs that make them, without asking the
analysis, and which channels that made dead is read from the values onnxruntime
computes. Properties, on each random graph (dynamic batch):

1. keeping every channel, the written model computes what the original does (shrink,
   and `reduce` with a width map that keeps every channel);
2. the dead channels, chosen by the values and by an importance criterion that ranks
   them last, cut away: the outputs stay, at batch 1 and 3;
3. every written model passes the full checker and runs at a dynamic batch;
4. its parameter count is an independent count of the initializers its layers read,
   and the report (`reduce`'s) says the same.

A small seeded batch runs by default; `-m slow` runs a larger sweep. A failing seed
is shrunk with `random_cnn.shrink_spec` (see `minimal_failing_spec`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import assert_runs_at_declared_shapes, run
from onnx import numpy_helper
from random_cnn import (
    Built,
    Made,
    build,
    merge_equal_initializers,
    random_spec,
    shrink_spec,
    untrained,
)
from variants import VARIANTS

import onnx_mbs
from onnx_mbs.passes import count_parameters, load
from onnx_mbs.passes.channel_groups import ChannelAnalysis, analyze_channels
from onnx_mbs.passes.channel_walk import ACTIVATION, FILTERS
from onnx_mbs.passes.importance import FilterNorm, choose_channels, group_scores
from onnx_mbs.passes.read import check_model  # onnx's, a -1 dim checked as dynamic
from onnx_mbs.passes.shrink import predicted_params, shrink_channels

DEFAULT_SEEDS = range(24)
SLOW_SEEDS = range(24, 424)
# What each op learns, by input position (BatchNorm's running statistics are buffers), and
# per-channel constants of element-wise ops (a scale or shift a layer learned).
LEARNED_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
    "BatchNormalization": (1, 2),
}  # fmt: skip
AFFINE_OPS = {"Add", "Sub", "Mul", "Div", "PRelu"}


def numpy_parameter_count(model: onnx.ModelProto) -> int:
    """Elements of the float constants (initializers, Constant nodes) a layer reads as
    weights, of PRelu's slopes, and of the constants of Add, Sub, Mul and Div that are not
    one number (0-d, or (1, 1, 1, 1) as tf2onnx stores one), each tensor once."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # weights an exporter wrote as Constant nodes
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    learned: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits or inits[name].dtype.kind != "f":
                continue
            layer = k in LEARNED_INPUTS.get(node.op_type, ())
            one_number = node.op_type != "PRelu" and inits[name].size == 1
            if layer or (node.op_type in AFFINE_OPS and not one_number):
                learned.add(name)
    return sum(int(inits[name].size) for name in learned)


# -- dead channels, chosen without the analysis ---------------------------------------------


def kill_at_convs(built: Built, rng: np.random.Generator) -> onnx.ModelProto:
    """A copy whose chosen conv output channels make exact zeros: filters, bias, and the
    BatchNorm's shift and mean after them zeroed. Some cases zero the same channel indices
    in every conv they touch, so that channels joined across convs die together; grouped
    convs lose whole conv-groups, with the channels they read zeroed where those are made
    (a conv-group is one channel of the model: its inputs and outputs are cut together)."""
    out = onnx.ModelProto()
    out.CopyFrom(built.model)
    tensors = {t.name: t for t in out.graph.initializer}
    shared = rng.random() < 0.5
    common = rng.random(64) < 0.4
    for made in built.made:
        if rng.random() < 0.3:
            continue
        chosen = common[: made.channels] if shared else rng.random(made.channels) < 0.4
        _zero_channels(tensors, made, np.flatnonzero(chosen))
    nodes = {n.name: n for n in out.graph.node}
    producer = {o: n for n in out.graph.node for o in n.output}
    by_output = {nodes[m.node].output[0]: m for m in built.made}
    for made in built.made:
        node = nodes[made.node]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group == 1 or rng.random() < 0.4:
            continue
        conv_groups = np.flatnonzero(rng.random(group) < 0.5)
        per_out = made.channels // group
        _zero_channels(tensors, made, (conv_groups[:, None] * per_out + np.arange(per_out)).ravel())
        upstream = _made_upstream(node.input[0], producer, by_output)
        if upstream is not None:
            per_in = upstream.channels // group
            chans = (conv_groups[:, None] * per_in + np.arange(per_in)).ravel()
            _zero_channels(tensors, upstream, chans)
    return out


# Ops a channel passes through alone, 0 staying 0 (what a conv's channel reaches a grouped
# conv by, in the generated graphs).
_PASS_ZERO = {"BatchNormalization", "Relu", "Clip", "HardSwish", "MaxPool", "AveragePool",
              "Resize", "Identity"}  # fmt: skip


def _made_upstream(name: str, producer: dict, by_output: dict[str, Made]) -> Made | None:
    """The conv whose output channels reach tensor `name` one to one, if one does."""
    while name not in by_output:
        node = producer.get(name)
        if node is None or node.op_type not in _PASS_ZERO:
            return None
        name = node.input[0]
    return by_output[name]


def _zero_channels(tensors: dict, made: Made, chans: np.ndarray) -> None:
    if not len(chans):
        return
    weight = numpy_helper.to_array(tensors[made.weight]).copy()
    if made.axis == 0:
        weight[chans] = 0
    else:  # ConvTranspose (cin, cout / group, k, k): output o in conv-group o // per
        per = weight.shape[1]
        rows = weight.shape[0] // (made.channels // per)
        for o in chans.tolist():
            weight[o // per * rows : (o // per + 1) * rows, o % per] = 0
    tensors[made.weight].CopyFrom(numpy_helper.from_array(weight, made.weight))
    zeroed = [made.bias] + ([made.bn[1], made.bn[3]] if made.bn else [])
    for name in filter(None, zeroed):
        value = numpy_helper.to_array(tensors[name]).copy()
        value[chans] = 0
        tensors[name].CopyFrom(numpy_helper.from_array(value, name))


def all_values(model: onnx.ModelProto, names: list[str], seeds=(3, 4)) -> dict[str, np.ndarray]:
    """Every named tensor of `model` (static shapes) over a few random inputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names
                                if n not in have)  # fmt: skip
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    runs = []
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        runs.append(run(exposed, {model.graph.input[0].name: x}, names))
    return {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}


def dead_channels(model: onnx.ModelProto, analysis: ChannelAnalysis) -> dict[int, list[int]]:
    """Per free group, the channels that are exactly 0 in every tensor of the group, or
    read only where that does not matter: by a Mul whose other operand is 0 there (an SE
    gate on a dead channel), or by a unary op whose output is such. One of the channel's
    producers must have zero filters there: a channel that is 0 only on the inputs tried
    (a Relu below zero) is not dead."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [n for n, _ in analysis.tensors.items() if n not in {i.name for i in model.graph.input}]
    values = all_values(model, names)
    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dead: dict[int, list[int]] = {}
    for group in analysis.groups:
        if group.pinned:
            continue
        acts = [m for m in group.members if m.role == ACTIVATION and m.tensor in values]
        chans = []
        for c in range(group.size):
            zero = {m.tensor: _zero_at(values[m.tensor], m.axis, m.positions[c]) for m in acts}
            harmless = dict(zero)
            for _ in range(len(acts)):  # settle: a unary op's input is harmless if its output is
                for m in acts:
                    if harmless[m.tensor] or m.tensor in graph_outputs:
                        continue
                    readers = consumers.get(m.tensor, [])
                    harmless[m.tensor] = bool(readers) and all(
                        _harmless_reader(r, m.tensor, zero, harmless) for r in readers
                    )
            zeroed = any(
                m.role == FILTERS and m.tensor in inits
                and _zero_at(inits[m.tensor], m.axis, m.positions[c])
                for m in group.members
            )  # fmt: skip
            if zeroed and all(harmless.values()) and any(zero.values()):
                chans.append(c)
        if chans:
            dead[group.id] = chans
    return dead


def _zero_at(value: np.ndarray, axis: int, positions: np.ndarray) -> bool:
    return not np.take(value, positions, axis=axis).any()


def _harmless_reader(node: onnx.NodeProto, name: str, zero: dict, harmless: dict) -> bool:
    if node.op_type == "Mul":
        other = [n for n in node.input if n != name]
        return any(zero.get(n, False) for n in other)
    if node.op_type in ("Sigmoid", "HardSigmoid", "Relu", "Clip", "HardSwish", "Identity"):
        return harmless.get(node.output[0], False)
    return False


# -- the properties ---------------------------------------------------------------------------


# How an exporter may write the same graph; killing happens before, on the builder's names.
FORMS = [
    "canonical", "canonical", "merged", "constants", "names", "value_attrs", "ir3", "opset21",
    "minus_one",
]  # fmt: skip


def exported(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    if form == "merged":
        return merge_equal_initializers(model)
    return model if form == "canonical" else VARIANTS[form](model)


def check_case(seed: int, spec: list[dict] | None = None) -> None:
    spec = spec if spec is not None else random_spec(seed)
    built = build(spec)
    form = FORMS[seed % len(FORMS)]
    if form == "merged":
        built = untrained(built, np.random.default_rng(seed))
    raw = built.model  # what onnxruntime runs as the original (every form computes it)
    read = load(exported(raw, form))
    model = read.model
    analysis = analyze_channels(model)

    # (1) keep everything: the same outputs
    everything = {g.id: list(range(g.size)) for g in analysis.groups}
    same = read.written(shrink_channels(model, everything, analysis))
    check_model(same, full_check=True)
    assert_same_at_batches(raw, same)

    # (2) provably dead channels cut away
    killed_raw = kill_at_convs(built, np.random.default_rng(seed))
    killed_read = load(exported(killed_raw, form))
    killed = killed_read.model
    analysis = analyze_channels(killed)
    keep = dead_plan(killed, analysis)
    small = killed_read.written(shrink_channels(killed, keep, analysis))
    check_model(small, full_check=True)  # (3)
    assert_runs_at_declared_shapes(killed_raw, small)
    assert_same_at_batches(killed_raw, small)
    # (4) counts
    assert count_parameters(small) == numpy_parameter_count(small)
    assert predicted_params(killed, keep, analysis) == numpy_parameter_count(small)

    # (2') an importance criterion that ranks zero filters last cuts the same channels where
    # every producer of the dead channels has zero filters
    criterion = FilterNorm(killed, p=2)
    counts = {gid: len(chans) for gid, chans in keep.items()}
    scores = group_scores([analysis.groups[g] for g in counts], criterion)
    ranked = {
        gid: n for gid, n in counts.items()
        if _ranks_dead_last(scores[gid], keep[gid])
    }  # fmt: skip
    chosen = choose_channels(analysis.groups, ranked, criterion)
    for gid in ranked:
        assert chosen[gid] == keep[gid], gid


def _ranks_dead_last(scores: np.ndarray, kept: list[int]) -> bool:
    cut = np.setdiff1d(np.arange(len(scores)), kept)
    return bool((scores[cut] == 0).all() and (scores[kept] > 0).all())


def assert_same_at_batches(a: onnx.ModelProto, b: onnx.ModelProto, batches=(1, 3)) -> None:
    shape = [d.dim_value for d in a.graph.input[0].type.tensor_type.shape.dim]
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal([batch, *shape[1:]]).astype(np.float32)
        feeds = {a.graph.input[0].name: x}
        for out, x1, y1 in zip(a.graph.output, run(a, feeds), run(b, feeds)):
            assert x1.shape == y1.shape, out.name
            scale = max(1.0, float(np.abs(x1).max()))
            assert np.abs(x1 - y1).max() <= 1e-4 * scale, (out.name, batch)


def check_reduce(seed: int, spec: list[dict] | None = None) -> None:
    """`reduce` itself: keeping everything (width map linear:0, no channel multiple) gives
    the same outputs; at a params budget the written model passes the checker, runs at a
    dynamic batch and the report counts what it holds."""
    built = build(spec if spec is not None else random_spec(seed))
    form = FORMS[seed % len(FORMS)]
    if form == "merged":
        built = untrained(built, np.random.default_rng(seed))
    raw = built.model
    given = exported(raw, form)
    whole, report = onnx_mbs.reduce(given, width_map="linear:0", strategy="mbs",
                                    channel_multiple=1, progress=False)  # fmt: skip
    check_model(whole, full_check=True)
    if form != "names":  # nothing cut: the input back, whose repeated names ort refuses
        assert_same_at_batches(raw, whole)
    assert report.after.total_params == numpy_parameter_count(whole)
    strategy = ["mbs", "uniform", "global", "mbs-branch"][seed % 4]
    try:
        small, report = onnx_mbs.reduce(given, budget="params=0.6", strategy=strategy,
                                        channel_multiple=1, progress=False)  # fmt: skip
    except onnx_mbs.BadInputError:
        return  # a budget the graph cannot reach is refused in one line: fine
    check_model(small, full_check=True)
    assert_runs_at_declared_shapes(raw, small)
    assert report.after.total_params == numpy_parameter_count(small) == count_parameters(small)


def dead_plan(killed: onnx.ModelProto, analysis: ChannelAnalysis) -> dict[int, list[int]]:
    """The keep plan that cuts every dead channel (`dead_channels`), one kept per group."""
    keep: dict[int, list[int]] = {}
    for gid, chans in dead_channels(killed, analysis).items():
        size = analysis.groups[gid].size
        if len(chans) == size:
            chans = chans[1:]  # a group keeps one channel at least
        if chans:
            keep[gid] = sorted(set(range(size)) - set(chans))
    return keep


def check_reduce_dead(seed: int, tmp_path, spec: list[dict] | None = None) -> str:
    """`reduce` end to end on a model with dead channels: the global ranking, at the params
    budget that cutting exactly the dead channels reaches, by an importance that ranks them
    last (l2 without data, act with data), cuts them and nothing else. Returns what the
    case came to (for seeing what a sweep covers)."""
    built = build(spec if spec is not None else random_spec(seed))
    killed_raw = kill_at_convs(built, np.random.default_rng(seed))
    killed = load(killed_raw).model
    analysis = analyze_channels(killed)
    keep = dead_plan(killed, analysis)
    if not keep:
        return "no dead channels"
    importance = ["l2", "act"][seed % 2]
    data = None
    if importance == "act":
        shape = [d.dim_value for d in killed.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(seed).standard_normal([16, *shape[1:]]).astype(np.float32)
        data = str(tmp_path / "calib.npz")
        np.savez(data, input=x)
    else:
        scores = group_scores([analysis.groups[g] for g in keep], FilterNorm(killed, p=2))
        if not all(_ranks_dead_last(scores[g], kept) for g, kept in keep.items()):
            return "l2 does not rank them last"
    budget = (predicted_params(killed, keep, analysis) + 0.5) / count_parameters(killed)
    try:
        small, report = onnx_mbs.reduce(
            killed_raw, data, budget=f"params={budget:.6f}", strategy="global",
            importance=importance, channel_multiple=1, beta_min=1e-6, progress=False,
        )  # fmt: skip
    except onnx_mbs.BadInputError:
        return "refused"  # in one line (the budget's rounding, a pinned group): fine
    check_model(small, full_check=True)
    assert report.after.total_params == numpy_parameter_count(small)
    cut = {g: n for g, n in report.plan.counts.items() if n < report.plan.sizes[g]}
    wanted = {g: len(kept) for g, kept in keep.items()}
    if cut != wanted:
        return "another plan"
    assert_same_at_batches(killed_raw, small)  # as many cut as were dead: the dead ones
    return "compared"


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_rewrite_properties(seed):
    check_case(seed)


@pytest.mark.parametrize("seed", DEFAULT_SEEDS[:8])
def test_reduce_properties(seed):
    check_reduce(seed)


@pytest.mark.parametrize("seed", DEFAULT_SEEDS[:8])
def test_reduce_cuts_dead_channels_first(seed, tmp_path):
    check_reduce_dead(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS[:100])
def test_reduce_cuts_dead_channels_first_sweep(seed, tmp_path):
    check_reduce_dead(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_rewrite_properties_sweep(seed):
    check_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS[:100])
def test_reduce_properties_sweep(seed):
    check_reduce(seed)


def minimal_failing_spec(seed: int, check=check_case) -> list[dict]:
    """For triage: the seed's spec shrunk to the fewest blocks that still fail."""
    return shrink_spec(random_spec(seed), lambda spec: _raises(check, seed, spec))


def _raises(check, seed: int, spec: list[dict]) -> bool:
    try:
        check(seed, spec)
    except AssertionError:
        return True
    return False
