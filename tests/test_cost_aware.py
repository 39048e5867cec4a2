"""`--strategy mbs-cost` (MBS's worth of a channel against its cost in the budget's metric),
`--strategy mbs-branch` (the same, residual streams cut last) and `--strategy auto` (the
strategy per budget metric, from the experiment's results)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from conftest import REDUCIBLE_ZOO
from test_latency import _linear_timer, _model_parts
from test_plan import _analysis

from onnx_mbs.auto import AUTO, choose_strategy
from onnx_mbs.latency import LatencyModel
from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE
from onnx_mbs.passes import load_model
from onnx_mbs.passes.importance import group_scores, weight_importance
from onnx_mbs.pipeline import reduce
from onnx_mbs.plan import COST_AWARE, COST_WIDTH_MAP, Budget, GroupInfo, plan_widths

# Two macroblocks of 4 layers: 0 has 1 base layer (R = 3/4, f = 1 - 0.4 R = 0.7), 1 has 3
# (R = 1/4, f = 0.9); one free group of 256 channels in each, of equal importance; rho 1.
ANALYSIS = _analysis([1, 3], [4, 4])
GROUPS = [GroupInfo(0, 256, (0,), False), GroupInfo(1, 256, (1,), False)]
RHO = {layer.name: 1.0 for layer in ANALYSIS.layers}
FLAT = {0: np.ones(256), 1: np.ones(256)}


def _plan(cost, budget: str, strategy: str = "mbs-cost", **options):
    """With f = 1 - 0.4 R (MBS's default; mbs-cost's own default is c = 0, f = 1)."""
    return plan_widths(
        ANALYSIS,
        GROUPS,
        RHO,
        cost,
        budget=Budget.parse(budget),
        strategy=strategy,
        channel_multiple=1,
        importance=FLAT,
        width_map="linear:0.4",
        **options,
    )


def test_mbs_cost_weighs_redundancy_by_its_own_tuned_default():
    # At c = 0 (mbs-cost's default) f = 1: equal prices, equal MACs shares and equal rho
    # leave nothing to tell the groups apart, so both keep alike.
    def cost(c):
        return int(c[0] ** 2 + c[1] ** 2), int(c[0] ** 2 + c[1] ** 2)

    plan = plan_widths(
        ANALYSIS, GROUPS, RHO, cost, budget=Budget.parse("params=0.5"),
        strategy="mbs-cost", channel_multiple=1, importance=FLAT,
    )  # fmt: skip
    assert str(plan.width_map) == COST_WIDTH_MAP == "linear:0"
    assert abs(plan.counts[0] - plan.counts[1]) <= 1
    assert _plan(cost, "params=0.5").counts[0] < plan.counts[0]  # c = 0.4 cuts block 0 more


def _hand_counts(w0: float, w1: float, p0: float, p1: float, fraction: float) -> tuple:
    """The optimum of W0 log c0 + W1 log c1 under p0 c0^2 + p1 c1^2 <= fraction of full:
    W_g / c_g = lambda * 2 p_g c_g, so c_g^2 = W_g / (2 lambda p_g), capped at 256."""
    budget = fraction * (p0 + p1) * 256**2
    ratio = (w0 / p0) / (w1 / p1)  # c0^2 / c1^2
    c1 = math.sqrt(budget / (p0 * ratio + p1))
    c0 = math.sqrt(ratio) * c1
    if c0 > 256:
        c0, c1 = 256, math.sqrt((budget - p0 * 256**2) / p1)
    elif c1 > 256:
        c0, c1 = math.sqrt((budget - p1 * 256**2) / p0), 256
    return c0, c1


def test_cheap_redundant_block_is_cut_before_an_expensive_busy_one():
    # Group 1's channels cost 1.2x group 0's parameters: less than its worth is above
    # group 0's (0.9 against 0.7, each group carrying half the MACs), so the redundant,
    # cheaper group 0 is cut more. MACs are c0^2 + c1^2: each group's share is 1/2.
    def cost(c):
        return int(c[0] ** 2 + 1.2 * c[1] ** 2), int(c[0] ** 2 + c[1] ** 2)

    plan = _plan(cost, "params=0.7")
    c0, c1 = _hand_counts(0.7 * 0.5, 0.9 * 0.5, 1.0, 1.2, 0.7)
    assert (plan.counts[0], plan.counts[1]) == (
        pytest.approx(c0, abs=2),
        pytest.approx(c1, abs=2),
    )
    assert plan.counts[0] < plan.counts[1]
    assert plan.reached["params"] == pytest.approx(0.7, abs=0.02)
    assert plan.reached["params"] <= 0.7


def test_expensive_busy_block_is_cut_before_a_cheap_redundant_one():
    # Parameters: group 1's channels cost 4x group 0's. MACs the other way round, so group 0
    # carries 4/5 of the effective flops: W0 = 0.7 * 4/5, W1 = 0.9 * 1/5. Group 1's worth
    # does not pay for its price: the busy group 1 is cut and the redundant group 0 kept
    # whole, where MBS (which prices nothing) cuts the redundant one more.
    def cost(c):
        return int(c[0] ** 2 + 4 * c[1] ** 2), int(4 * c[0] ** 2 + c[1] ** 2)

    plan = _plan(cost, "params=0.5")
    c0, c1 = _hand_counts(0.7 * 0.8, 0.9 * 0.2, 1.0, 4.0, 0.5)
    assert c0 == 256 and plan.counts[0] == 256
    assert plan.counts[1] == pytest.approx(c1, abs=2)
    assert plan.reached["params"] == pytest.approx(0.5, abs=0.02)
    mbs = _plan(cost, "params=0.5", strategy="mbs")
    assert mbs.counts[0] < mbs.counts[1]
    assert plan.strategy == "mbs-cost" and plan.priced == ("params",)
    assert "worth(g, k) / price(g, k) > lambda" in plan.formula
    assert "original params" in plan.formula


@pytest.mark.parametrize("strategy", ["mbs-cost", "mbs-branch"])
def test_a_dead_macroblock_is_cut_first_without_nan_worth(strategy):
    # rho 0 (no activation > 0 on the data): its groups are worth 0, so its first channel's
    # worth was 0 * inf, NaN, with a RuntimeWarning on the console
    rho = {layer.name: 0.0 if layer.macroblock == 0 else 1.0 for layer in ANALYSIS.layers}

    def cost(c):
        return int(c[0] ** 2 + c[1] ** 2), int(c[0] ** 2 + c[1] ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_widths(
            ANALYSIS, GROUPS, rho, cost, budget=Budget.parse("params=0.3"), strategy=strategy,
            channel_multiple=1, importance=FLAT,
        )  # fmt: skip
    # cut to about beta_min (the nudge may step it back up), far below the busy group
    assert math.ceil(0.1 * 256) <= plan.counts[0] <= 32 < plan.counts[1] < 256
    assert math.isfinite(plan.threshold)


def test_at_a_macs_budget_the_worth_follows_the_effective_flops():
    # The same model at a MACs budget: group 1 now carries 4/5 of the MACs and costs 4x;
    # its worth grows with the effective flops it carries (W1 = 0.9 * 4/5 against
    # W0 = 0.7 * 1/5), so both are cut, the redundant group 0 more (hand optimum).
    def cost(c):
        return int(4 * c[0] ** 2 + c[1] ** 2), int(c[0] ** 2 + 4 * c[1] ** 2)

    plan = _plan(cost, "flops=0.5")
    c0, c1 = _hand_counts(0.7 * 0.2, 0.9 * 0.8, 1.0, 4.0, 0.5)
    assert (plan.counts[0], plan.counts[1]) == (
        pytest.approx(c0, abs=2),
        pytest.approx(c1, abs=2),
    )
    assert plan.counts[0] < plan.counts[1] < 256
    assert plan.priced == ("flops",) and "original flops" in plan.formula


def test_redundant_block_is_cut_first_when_it_is_also_the_expensive_one():
    # Parameters: group 0 (the redundant one) costs 4x; equal MACs, W0 = 0.35, W1 = 0.45.
    def cost(c):
        return int(4 * c[0] ** 2 + c[1] ** 2), int(c[0] ** 2 + c[1] ** 2)

    plan = _plan(cost, "params=0.6")
    c0, c1 = _hand_counts(0.35, 0.45, 4.0, 1.0, 0.6)
    assert c1 == 256 and plan.counts[1] == 256
    assert plan.counts[0] == pytest.approx(c0, abs=2)
    assert plan.reached["params"] == pytest.approx(0.6, abs=0.02)


def test_importance_within_a_group_and_pins_beta_min_and_multiple():
    def cost(c):
        return int(c[0] ** 2 + c[1] ** 2), int(c[0] ** 2 + c[1] ** 2)

    # Half of group 0's channels are dead: they go first, before any of group 1.
    dead = {0: np.concatenate([np.ones(128), np.zeros(128)]), 1: np.ones(256)}
    plan = plan_widths(
        ANALYSIS, GROUPS, RHO, cost, budget=Budget.parse("flops=0.63"),
        strategy="mbs-cost", channel_multiple=1, importance=dead,
    )  # fmt: skip
    assert plan.counts == {0: pytest.approx(128, abs=4), 1: 256}
    # A pinned group stays whole; beta_min and the channel multiple hold for the rest.
    pinned = [GroupInfo(0, 256, (0,), False), GroupInfo(1, 256, (1,), True)]
    plan = plan_widths(
        ANALYSIS, pinned, RHO, cost, budget=Budget.parse("flops=0.55"),
        strategy="mbs-cost", channel_multiple=8, beta_min=0.3, importance=FLAT,
    )  # fmt: skip
    assert plan.counts[1] == 256
    assert plan.counts[0] % 8 == 0 and plan.counts[0] >= 0.3 * 256
    assert plan.reached["flops"] <= 0.55


def test_combined_budget_meets_every_limit():
    def cost(c):
        return int(c[0] ** 2 + 4 * c[1] ** 2), int(4 * c[0] ** 2 + c[1] ** 2)

    for spec in ("params=0.5,flops=0.3", "params=0.3,flops=0.5"):
        plan = _plan(cost, spec)
        excess = {m: plan.reached[m] - f for m, f in Budget.parse(spec).fractions.items()}
        assert all(e <= 0.02 for e in excess.values()), (spec, plan.reached)
        assert max(excess.values()) == pytest.approx(0.0, abs=0.02)


def _crossed_cost(c):
    """Group 1 costs 4x group 0's parameters, group 0 4x group 1's MACs."""
    return int(c[0] ** 2 + 4 * c[1] ** 2), int(4 * c[0] ** 2 + c[1] ** 2)


def test_combined_budget_where_one_limit_binds_keeps_that_limit_s_own_plan():
    # flops=0.6 alone (W0 = 0.7 * 4/5, W1 = 0.9 * 1/5, hand optimum: c0 ~ 193, c1 ~ 219) keeps
    # 0.70 of the parameters, within params=0.9: it is the plan. Prices summed over both
    # metrics cut the parameter-heavy group 1 to 123 and kept 0.32 of the parameters.
    plan = _plan(_crossed_cost, "params=0.9,flops=0.6")
    c0, c1 = _hand_counts(0.7 * 0.8, 0.9 * 0.2, 4.0, 1.0, 0.6)
    assert (plan.counts[0], plan.counts[1]) == (
        pytest.approx(c0, abs=2),
        pytest.approx(c1, abs=2),
    )
    assert plan.reached["flops"] == pytest.approx(0.6, abs=0.01) and plan.reached["flops"] <= 0.6
    assert 0.65 < plan.reached["params"] <= 0.9
    assert plan.binding == ("flops",) and plan.priced == ("flops",)
    assert "original flops grows" in plan.formula


def test_combined_budget_where_both_limits_bind_meets_both_at_their_value():
    # Neither limit's own plan meets the other (flops alone keeps 0.70 of the parameters,
    # params alone 0.90 of the MACs): both bind at the optimum, c0 = c1 = 256 * sqrt(0.6)
    # ~ 198. Summed prices kept 0.32 of the parameters.
    plan = _plan(_crossed_cost, "params=0.6,flops=0.6")
    assert plan.counts[0] == pytest.approx(198, abs=4)
    assert plan.counts[1] == pytest.approx(198, abs=4)
    for metric in ("params", "flops"):
        assert plan.reached[metric] == pytest.approx(0.6, abs=0.02) and plan.reached[metric] <= 0.6
    assert plan.binding == ("params", "flops") and plan.priced == ("params", "flops")
    assert len(plan.price_weights) == 2 and sum(plan.price_weights) == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", COST_AWARE)
@pytest.mark.parametrize("spec", ["params=0.9,latency=0.6", "params=0.6,flops=0.7,latency=0.5"])
def test_combined_budget_with_a_latency_limit_meets_every_limit(strategy, spec):
    # Time grows with group 1's channels 9x as fast as with group 0's: a third price.
    def latency(counts):
        return 1e-6 * (counts[0] ** 2 + 9 * counts[1] ** 2)

    plan = _plan(_crossed_cost, spec, strategy=strategy, latency=latency)
    full = latency({0: 256, 1: 256})
    reached = {**plan.reached, "latency": latency(plan.counts) / full}
    excess = {m: reached[m] - f for m, f in Budget.parse(spec).limits}
    assert all(e <= 1e-9 for e in excess.values()), (spec, reached)
    assert max(excess.values()) == pytest.approx(0.0, abs=0.02), (spec, reached)
    assert plan.priced and set(plan.priced) <= set(Budget.parse(spec).fractions)


# -- mbs-branch: one residual stage -------------------------------------------------------
# A stem makes a stream of 64 channels (group 0, joined by the blocks' Adds); three blocks
# each read it into a branch of 64 (groups 1-3) and write it back: block i costs
# 2 * s * b_i MACs (and parameters), the stem 3 * s. With the MACs share as worth,
# W(stream) is the sum of the branches' W, so mbs-cost's ranking is indifferent to how
# s * b is split, and the importance within the groups decides.
STAGE = _analysis([1], [7])
STAGE_RHO = {layer.name: 1.0 for layer in STAGE.layers}
STAGE_GROUPS = [GroupInfo(0, 64, (0,), False, joined=True)] + [
    GroupInfo(i, 64, (0,), False) for i in (1, 2, 3)
]


def _stage_cost(c):
    macs = 3 * c[0] + sum(2 * c[0] * c[i] for i in (1, 2, 3))
    return macs, macs


def _stage_plan(strategy: str, budget: str, importance=None, **options):
    flat = {g.id: np.ones(64) for g in STAGE_GROUPS}
    return plan_widths(
        STAGE, STAGE_GROUPS, STAGE_RHO, _stage_cost, budget=Budget.parse(budget),
        strategy=strategy, channel_multiple=1, importance=importance or flat, **options,
    )  # fmt: skip


def test_branch_cuts_the_branches_before_the_stream_they_join():
    # flops=0.5: 3 s + 2 s (b1 + b2 + b3) <= 12384 with s = 64 leaves b ~ 31.75 a branch.
    plan = _stage_plan("mbs-branch", "flops=0.5")
    assert plan.counts[0] == 64
    assert all(31 <= plan.counts[i] <= 32 for i in (1, 2, 3)), plan.counts
    assert plan.reached["flops"] == pytest.approx(0.5, abs=0.02)
    assert "joined groups" in plan.formula and plan.strategy == "mbs-branch"
    # Past what the branches can give (beta_min 0.1: at least 7 of 64), the stream is cut:
    # 3 s + 2 s * 21 <= 0.1 * 24768 leaves s <= 55.
    small = _stage_plan("mbs-branch", "flops=0.1", beta_min=0.1)
    assert [small.counts[i] for i in (1, 2, 3)] == [7, 7, 7]
    assert 50 <= small.counts[0] <= 55
    assert small.reached["flops"] == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("strategy", COST_AWARE)
def test_without_a_budget_a_cost_aware_plan_is_matched_to_mbs_default_size(strategy):
    # The size is MBS's at its own default width map (linear:0.4), not at the cost-aware
    # worth's (linear:0, which keeps everything: matched to it, nothing was cut).
    def cost(c):
        return int(c[0] ** 2 + c[1] ** 2), int(c[0] ** 2 + c[1] ** 2)

    common = dict(channel_multiple=1, importance=FLAT)
    mbs = plan_widths(ANALYSIS, GROUPS, RHO, cost, channel_multiple=1)
    plan = plan_widths(ANALYSIS, GROUPS, RHO, cost, strategy=strategy, **common)
    assert mbs.reached["params"] < 0.9
    assert plan.reached["params"] == pytest.approx(mbs.reached["params"], abs=0.02)
    assert str(plan.width_map) == COST_WIDTH_MAP  # the worth keeps its own default
    assert any("matched to the size MBS reaches at linear:0.4" in n for n in plan.notes)
    # An asked width map is MBS's f for the size and the worth's f alike.
    asked = plan_widths(ANALYSIS, GROUPS, RHO, cost, strategy=strategy, width_map="linear:0.6",
                        **common)  # fmt: skip
    mbs_asked = plan_widths(ANALYSIS, GROUPS, RHO, cost, channel_multiple=1,
                            width_map="linear:0.6")  # fmt: skip
    assert asked.reached["params"] == pytest.approx(mbs_asked.reached["params"], abs=0.02)
    assert mbs_asked.reached["params"] < mbs.reached["params"] - 0.05


@pytest.mark.parametrize("strategy", COST_AWARE)
def test_reduce_without_a_budget_cuts_a_cost_aware_model_to_mbs_size(strategy):
    options = dict(limit=64, evaluate_accuracy=False, progress=False)
    _, mbs = reduce(BUNDLED_MODEL, FMNIST_SAMPLE, strategy="mbs", **options)
    _, cost_aware = reduce(BUNDLED_MODEL, FMNIST_SAMPLE, strategy=strategy, **options)
    assert mbs.plan.reached["params"] < 0.9
    assert cost_aware.plan.reached["params"] == pytest.approx(mbs.plan.reached["params"], abs=0.02)
    assert cost_aware.plan.changes_anything


def test_branch_ranks_as_mbs_cost_under_a_latency_limit():
    # A latency limit prices each conv as measured (on CPU a conv's time does not fall in
    # step with its width, docs/strategies.md): streams are not held back there, the plan
    # is mbs-cost's; here the stream's falling importance has it cut.
    def latency(c):
        return 1e-6 * _stage_cost(c)[1]

    stream_falls = {0: np.linspace(2.0, 0.01, 64), **{i: np.ones(64) for i in (1, 2, 3)}}
    for budget in ("latency=0.5", "latency=0.5,flops=0.6"):
        plans = {s: _stage_plan(s, budget, stream_falls, latency=latency) for s in COST_AWARE}
        assert plans["mbs-branch"].counts == plans["mbs-cost"].counts
        assert plans["mbs-branch"].counts[0] < 64
        assert "joined groups" not in plans["mbs-branch"].formula
    assert _stage_plan("mbs-branch", "flops=0.5", stream_falls).counts[0] == 64


def test_without_joined_last_the_importance_picks_the_split():
    # Where the stream's importance falls off faster than the branches', mbs-cost cuts the
    # stream and keeps the branches; the other way round, the branches. mbs-branch keeps
    # the stream whole both times.
    falling, flat = np.linspace(2.0, 0.01, 64), np.ones(64)
    stream_falls = {0: falling, 1: flat, 2: flat, 3: flat}
    branches_fall = {0: flat, 1: falling, 2: falling, 3: falling}
    cost_a = _stage_plan("mbs-cost", "flops=0.5", stream_falls)
    cost_b = _stage_plan("mbs-cost", "flops=0.5", branches_fall)
    assert cost_a.counts[0] < 48 and min(cost_a.counts[i] for i in (1, 2, 3)) > 40
    assert cost_b.counts[0] == 64
    for importance in (stream_falls, branches_fall):
        assert _stage_plan("mbs-branch", "flops=0.5", importance).counts[0] == 64


@pytest.mark.parametrize(
    ("name", "streams"),
    [("resnet20", [16, 32, 64]), ("mobilenet_v2", [24, 32, 64, 96, 160]),
     ("mobilenet_v1", []), ("densenet_bc", [])],
)  # fmt: skip
def test_joined_groups_are_the_residual_streams(zoo_onnx, name, streams):
    # MobileNetV2's depthwise convs and DenseNet's concats make several producers of a group
    # without a residual Add: they are not streams.
    analysis, channels, cost = _model_parts(zoo_onnx, name)
    joined = [GroupInfo.of(g) for g in channels.groups if g.joined]
    assert sorted(g.size for g in joined) == streams
    assert all(g.joined for g in joined)
    # Without a stream, mbs-branch is mbs-cost; with one, the streams stay whole at half the
    # MACs (the branches can give that much).
    groups = [GroupInfo.of(g) for g in channels.groups]
    free = [g for g, info in zip(channels.groups, groups) if info.free]
    importance = group_scores(free, weight_importance(load_model(zoo_onnx(name)), "l1"))
    rho = {layer.name: 1.0 for layer in analysis.layers}
    plans = {
        s: plan_widths(analysis, groups, rho, cost, budget=Budget.parse("flops=0.5"),
                       strategy=s, importance=importance)
        for s in COST_AWARE
    }  # fmt: skip
    if not streams:
        assert plans["mbs-branch"].counts == plans["mbs-cost"].counts
    assert all(plans["mbs-branch"].counts[g.id] == g.size for g in joined)


@pytest.mark.parametrize("strategy", COST_AWARE)
@pytest.mark.parametrize("name", REDUCIBLE_ZOO)
def test_budgets_are_met_on_the_zoo_under_every_metric(zoo_onnx, name, strategy):
    """mbs-cost and mbs-branch meet params, flops and latency budgets within 2 points
    (latency: the latency model with a deterministic timer, time proportional to each
    conv's MACs)."""
    analysis, channels, cost = _model_parts(zoo_onnx, name)
    model = load_model(zoo_onnx(name, "deploy"))
    groups = [GroupInfo.of(g) for g in channels.groups]
    free = [g for g, info in zip(channels.groups, groups) if info.free]
    importance = group_scores(free, weight_importance(model, "l1"))
    rho = {layer.name: 0.3 + 0.6 * (k % 5) / 4 for k, layer in enumerate(analysis.layers)}
    conv_seconds = 1e-9 * sum(x.macs for x in analysis.layers if x.op_type == "Conv")
    latency = LatencyModel(analysis, cost, 1.2 * conv_seconds, _linear_timer([]))
    for budget in ("params=0.5", "flops=0.5", "latency=0.6"):
        plan = plan_widths(
            analysis, groups, rho, cost, budget=Budget.parse(budget), strategy=strategy,
            importance=importance, latency=latency,
        )  # fmt: skip
        metric, fraction = Budget.parse(budget).limits[0]
        reached = latency(plan.counts) / latency({g.id: g.size for g in groups})
        reached = reached if metric == "latency" else plan.reached[metric]
        assert reached == pytest.approx(fraction, abs=0.02), (name, budget)
        assert all(plan.counts[g.id] == g.size for g in groups if g.pinned)
        assert all(min(g.multiple(8), g.size) <= plan.counts[g.id] <= g.size for g in groups)
    # Without a budget: MBS's size (its default width map), this strategy's shape.
    mbs = plan_widths(analysis, groups, rho, cost)
    matched = plan_widths(analysis, groups, rho, cost, strategy=strategy, importance=importance)
    assert matched.reached["params"] == pytest.approx(mbs.reached["params"], abs=0.03), name
    assert matched.reached["params"] <= mbs.reached["params"] + 1e-9


# -- auto ---------------------------------------------------------------------------------


def test_auto_chooses_per_metric_from_the_table():
    for metric in ("params", "flops", "latency"):
        strategy, why = choose_strategy(Budget.parse(f"{metric}=0.5"))
        assert (strategy, why) == (AUTO[metric][0], f"auto: {AUTO[metric][1]}")
    assert choose_strategy(None)[0] == "mbs"
    # Combined: the first compute metric decides, and the reason says so.
    strategy, why = choose_strategy(Budget.parse("params=0.5,latency=0.6"))
    assert strategy == AUTO["latency"][0]
    assert why.startswith("auto (of params, latency, latency decides): ")
    assert choose_strategy(Budget.parse("params=0.5"))[0] == AUTO["params"][0]


def test_reduce_runs_the_auto_choice_and_says_why(tmp_path):
    from onnx_mbs.report import markdown, report_dict

    _, report = reduce(
        BUNDLED_MODEL, FMNIST_SAMPLE, budget="flops=0.5", limit=64,
        evaluate_accuracy=False, progress=False,
    )  # fmt: skip
    plan = report.plan
    assert plan.strategy == AUTO["flops"][0]
    assert plan.strategy_reason == f"auto: {AUTO['flops'][1]}"
    assert plan.reached["flops"] == pytest.approx(0.5, abs=0.02)
    text = markdown(report)
    assert f"- strategy: {plan.strategy}; why: auto: at flops budgets" in text
    assert json.loads(json.dumps(report_dict(report)))["plan"]["strategy_reason"].startswith(
        "auto: "
    )
    # An explicit strategy always wins.
    _, asked = reduce(
        BUNDLED_MODEL, FMNIST_SAMPLE, budget="flops=0.5", strategy="mbs-cost", limit=64,
        evaluate_accuracy=False, progress=False,
    )  # fmt: skip
    assert asked.plan.strategy == "mbs-cost"
    assert asked.plan.strategy_reason == "asked with strategy='mbs-cost'"  # Python's spelling
    assert asked.plan.reached["flops"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    ("args", "strategy", "why"),
    [
        (["--budget", "flops=0.5"], AUTO["flops"][0], "auto: " + AUTO["flops"][1]),
        (["--budget", "params=0.5"], AUTO["params"][0], "auto: " + AUTO["params"][1]),
        (["--budget", "params=0.5", "--strategy", "mbs-cost"], "mbs-cost", "asked with"),
        (["--budget", "flops=0.5", "--strategy", "mbs-branch"], "mbs-branch", "asked with"),
    ],
)
def test_cli_says_which_strategy_ran_and_why(args, strategy, why, capsys):
    from onnx_mbs.cli import main

    code = main(["reduce", str(BUNDLED_MODEL), "--data", str(FMNIST_SAMPLE), "--limit", "32",
                 "--dry-run", "--no-eval", *args])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert f"strategy {strategy}: {why}" in out
