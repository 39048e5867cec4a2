"""The cost model predicts exactly what shrinking produces, for random plans on zoo models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FORMS, SMALL_ZOO
from graphs import Builder, parameters_by_layer

from onnx_mbs.passes import analyze_model, count_parameters, load_model
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.cost import CostModel
from onnx_mbs.passes.shrink import predicted_params, shrink_channels
from onnx_mbs.pipeline import reduce


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_cost_model_matches_shrunk_model(zoo_onnx, name, form):
    model = load_model(zoo_onnx(name, form))
    channels = analyze_channels(model)
    cost = CostModel.build(model, channels)
    before = analyze_model(model)
    assert cost({}) == (before.total_params, before.total_macs)
    rng = np.random.default_rng(1)
    for _ in range(3):
        counts = {
            g.id: g.size if g.pinned else int(rng.integers(1, g.size + 1)) for g in channels.groups
        }
        keep = {
            g: sorted(rng.choice(size, counts[g], replace=False).tolist())
            for g, size in enumerate(cost.sizes.tolist())
        }
        reduced = load_model(shrink_channels(model, keep, channels))
        assert cost(counts) == (count_parameters(reduced), analyze_model(reduced).total_macs)


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_every_step_at_once_equals_one_query_per_step(zoo_onnx, name):
    """`with_steps` (all of a planner's next steps in one query) gives, for each step, what
    the model gives for that step's counts alone."""
    model = load_model(zoo_onnx(name, FORMS[0]))
    cost = CostModel.build(model, analyze_channels(model))
    rng = np.random.default_rng(2)
    sizes = cost.sizes.tolist()
    counts = {g: int(rng.integers(1, size + 1)) for g, size in enumerate(sizes)}
    groups = list(range(len(sizes)))
    new = [max(1, counts[g] - int(rng.integers(-3, 4))) for g in groups]
    new = [min(n, size) for n, size in zip(new, sizes)]
    params, macs = cost.with_steps(counts, groups, new)
    expected = [cost({**counts, g: n}) for g, n in zip(groups, new)]
    assert [(int(p), int(m)) for p, m in zip(params, macs)] == expected
    params, macs = cost.with_steps({}, groups[:1], [1])  # counts omitted: the full sizes
    assert (int(params[0]), int(macs[0])) == cost({0: 1})


def _shared_constants_model() -> onnx.ModelProto:
    """Two convs reading one zero bias (the TorchScript exporter merges equal tensors),
    and one weight read by two convs whose channels are different groups (a conv applied
    twice): shrink_channels writes a copy per distinct cut."""
    b = Builder("shared_constants")
    x = b.input("input", [1, 3, 16, 16])
    zero = b.const(np.zeros(16, np.float32), "zero_bias")
    pad = {"kernel_shape": [3, 3], "pads": [1] * 4}
    x = b.op("Relu", [b.op("Conv", [x, b.weight(16, 3, 3, 3), zero], name="c1", **pad)])
    x = b.op("Relu", [b.op("Conv", [x, b.weight(16, 16, 3, 3), zero], name="c2", **pad)])
    twice = b.weight(16, 16, 3, 3)
    x = b.op("Relu", [b.op("Conv", [x, twice], name="t1", **pad)])
    x = b.op("Relu", [b.op("Conv", [x, twice], name="t2", **pad)])
    return b.model([b.conv(x, 16, 8, name="head")], ["out"])


def test_cost_model_counts_the_copies_of_constants_read_with_different_cuts():
    """A constant whose readers are cut differently is written once per cut: the budget
    is met on what is written (a weight shared by two convs was counted once, and a
    params=0.5 reduce wrote 106% of the model)."""
    model = load_model(_shared_constants_model())
    channels = analyze_channels(model)
    cost = CostModel.build(model, channels)
    before = analyze_model(model)
    assert cost({}) == (before.total_params, before.total_macs)
    free = [g.id for g in channels.groups if not g.pinned]
    assert len(free) == 4
    rng = np.random.default_rng(3)
    plans = [{g: 16 for g in free}, {free[0]: 8}, {free[0]: 8, free[1]: 8}]
    plans += [{g: int(rng.integers(1, 17)) for g in free} for _ in range(6)]
    for counts in plans:
        # groups keep different positions (equal cuts of a shared constant are merged)
        keep = {g: list(range(16 - n, 16) if free.index(g) % 2 else range(n))
                for g, n in counts.items()}  # fmt: skip
        reduced = load_model(shrink_channels(model, keep, channels))
        assert cost(counts) == (count_parameters(reduced), analyze_model(reduced).total_macs)
        steps = [(g, n) for g in free for n in (1, 8, 16)]
        params, macs = cost.with_steps(counts, [g for g, _ in steps], [n for _, n in steps])
        assert [(int(p), int(m)) for p, m in zip(params, macs)] == [
            cost({**counts, g: n}) for g, n in steps
        ]
    reduced, report = reduce(model, budget="params=0.5", channel_multiple=1, progress=False)
    assert report.plan.reached["params"] <= 0.5
    assert report.plan.params[1] == count_parameters(reduced)


def _bn_sharing_model() -> onnx.ModelProto:
    """Two untrained BatchNorms as the TorchScript exporter writes them: equal tensors
    merged, so each BN's scale is one all-ones tensor with both running variances and its
    bias one all-zeros tensor with both running means."""
    b = Builder("bn_sharing")
    x = b.input("input", [1, 3, 16, 16])
    ones, zeros = b.const(np.ones(8), "ones"), b.const(np.zeros(8), "zeros")
    for k, cin in enumerate((3, 8)):
        x = b.conv(x, cin, 8, name=f"c{k}")
        x = b.op("Relu", [b.op("BatchNormalization", [x, ones, zeros, zeros, ones])])
    return b.model([b.conv(x, 8, 4, name="head")], ["out"])


def test_a_bn_scale_or_bias_shared_with_a_running_statistic_is_a_parameter():
    """A tensor read both as a learned value (BN scale, bias) and as a running statistic
    holds the learned value: counted, once, as the file holds it (the statistic's reader
    made it count 0: 16 parameters short). The cost model and shrink's prediction agree
    with what shrink writes."""
    model = load_model(_bn_sharing_model())
    assert count_parameters(model) == parameters_by_layer(model)
    channels = analyze_channels(model)
    cost = CostModel.build(model, channels)
    assert cost({}) == (count_parameters(model), analyze_model(model).total_macs)
    free = [g.id for g in channels.groups if not g.pinned]
    assert len(free) == 2
    for n in (8, 5, 2):
        # the groups keep different positions (equal cuts of a shared constant are merged)
        keep = {free[0]: list(range(n)), free[1]: list(range(8 - n, 8))}
        reduced = load_model(shrink_channels(model, keep, channels))
        assert count_parameters(reduced) == parameters_by_layer(reduced)
        assert predicted_params(model, keep, channels) == count_parameters(reduced)
        counts = {g: n for g in free}
        assert cost(counts) == (count_parameters(reduced), analyze_model(reduced).total_macs)


def test_an_instance_norm_of_ones_and_zeros_stays_uncounted_when_cut():
    """InstanceNorm without affine (scale all ones, bias all zeros) has no parameters, cut or
    not: the cost model and shrink's prediction agree with what shrink writes."""
    b = Builder("instance_norm")
    x = b.conv(b.input("input", [1, 3, 16, 16]), 3, 8, name="c0")
    norm = [b.const(np.ones(8), "ones"), b.const(np.zeros(8), "zeros")]
    x = b.op("Relu", [b.op("InstanceNormalization", [x, *norm])])
    model = load_model(b.model([b.conv(x, 8, 4, name="head")], ["out"]))
    channels = analyze_channels(model)
    cost = CostModel.build(model, channels)
    (free,) = [g.id for g in channels.groups if not g.pinned]
    for n in (8, 3):
        by_hand = n * 3 * 9 + n + 4 * n * 9 + 4  # the two convs' weights and biases
        keep = {free: list(range(n))}
        reduced = load_model(shrink_channels(model, keep, channels))
        assert count_parameters(reduced) == predicted_params(model, keep, channels) == by_hand
        assert cost({free: n}) == (by_hand, analyze_model(reduced).total_macs)


def _plainly_read() -> onnx.ModelProto:
    """Two convs as an exporter may write them: unnamed nodes, the first weight read
    through an Identity (load names the nodes and collapses the Identity)."""
    b = Builder("plain", seed=0)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8)])
    model = b.model([b.conv(y, 8, 4)], ["y"])
    weight = model.graph.node[0].input[1]
    model.graph.node[0].input[1] = "weight_read"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [weight], ["weight_read"]))
    for node in model.graph.node:
        node.name = ""
    return model


def test_cost_model_and_predicted_params_take_a_plainly_read_model():
    """Public functions bring a plainly read model to the analysis form themselves: the
    cost model indexed the model as read while its analyses read the loaded form (an
    IndexError or KeyError, or costs of the wrong nodes)."""
    raw = _plainly_read()
    before = raw.SerializeToString()
    model = load_model(raw)
    channels = analyze_channels(model)
    (free,) = [g for g in channels.groups if not g.pinned]
    counts, keep = {free.id: 3}, {free.id: [0, 1, 2]}
    expected = CostModel.build(model)(counts)
    assert expected == (count_parameters(shrink_channels(model, keep)),
                        analyze_model(shrink_channels(model, keep)).total_macs)  # fmt: skip
    assert CostModel.build(raw)(counts) == expected
    assert CostModel.build(raw, channels)(counts) == expected
    assert predicted_params(raw, keep) == predicted_params(raw, keep, channels) == expected[0]
    assert raw.SerializeToString() == before


def test_cost_model_and_predicted_params_refuse_an_analysis_of_another_model():
    model = load_model(_plainly_read())
    b = Builder("other", seed=0)
    x = b.input("x", [1, 3, 8, 8])
    other = load_model(b.model([b.conv(b.op("Relu", [b.conv(x, 3, 8)]), 8, 4)], ["y"]))
    channels = analyze_channels(other)
    keep = {g.id: [0] for g in channels.groups if not g.pinned}
    with pytest.raises(ValueError, match="another model"):
        CostModel.build(model, channels)
    with pytest.raises(ValueError, match="another model"):
        predicted_params(model, keep, channels)
