"""`--strategy global`: one importance ranking over every free group, end to end."""

from __future__ import annotations

import json

import graphs
import numpy as np
import onnx
import pytest
from conftest import random_images, write_npz
from graphs import Builder, assert_same_outputs, kill_channels, parameters_by_layer

from onnx_mbs.cli import main
from onnx_mbs.passes import count_parameters, load_model
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.pipeline import reduce
from onnx_mbs.plan import round_channels


def _assert_plan_written(reduced: onnx.ModelProto, report) -> None:
    """The counts the plan chose are the widths the written model has, group by group."""
    widths = graphs.written_widths(reduced, report)
    assert len(widths) >= 3
    assert widths == {g: report.plan.counts[g] for g in widths}


def _dead_channel_model():
    """Three conv+Relu layers and a head; 8 of the middle conv's 16 channels are provably
    zero. Returns the model, its channel analysis and the dead group's id."""
    b = Builder(seed=1)
    x = b.input("x", [1, 3, 16, 16])
    y = b.op("Relu", [b.conv(x, 3, 16, name="c1")])
    y = b.op("Relu", [b.conv(y, 16, 16, name="c2")])
    y = b.op("Relu", [b.conv(y, 16, 16, stride=2, name="c3")])
    model = load_model(b.model([b.gap_head(y, 16, 10)], ["logits"]))
    channels = analyze_channels(model)
    (dead,) = [g for g in channels.groups if "c2" in g.producers]
    return kill_channels(model, channels.groups, {dead.id: list(range(0, 16, 2))}), channels, dead


@pytest.mark.parametrize("with_data", [False, True])  # l2 importance, act importance
def test_global_removes_dead_channels_and_keeps_outputs(tmp_path, with_data):
    model, channels, dead = _dead_channel_model()
    live = list(range(1, 16, 2))
    without = shrink_channels(model, {dead.id: live}, channels)
    fraction = count_parameters(without) / count_parameters(model)
    data = write_npz(tmp_path / "x.npz", **random_images(16, (3, 16, 16))) if with_data else None
    options = dict(budget=f"params={fraction!r}", evaluate_accuracy=False, progress=False)
    reduced, report = reduce(model, data, strategy="global", **options)
    assert report.plan.counts[dead.id] == 8
    assert count_parameters(reduced) == count_parameters(without)
    _assert_plan_written(reduced, report)
    onnx.checker.check_model(reduced, full_check=True)
    assert_same_outputs(model, reduced, atol=1e-5)
    # Uniform scaling at the same budget cuts live channels: the outputs change.
    uniform, _ = reduce(model, data, strategy="uniform", **options)
    x = graphs.random_feeds(model)
    (a,), (b,) = graphs.run(model, x), graphs.run(uniform, x)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("budget", ["params=0.5", "flops=0.5", "params=0.5,flops=0.6"])
@pytest.mark.parametrize("name", ["resnet20", "resnet56", "mobilenet_v2"])
def test_global_meets_budgets_on_zoo_models(zoo_onnx, tmp_path, name, budget):
    model = zoo_onnx(name, "deploy")
    c_h_w = [d.dim_value for d in load_model(model).graph.input[0].type.tensor_type.shape.dim][1:]
    data = write_npz(tmp_path / "x.npz", **random_images(8, c_h_w))
    reduced, report = reduce(
        model, data, budget=budget, strategy="global", evaluate_accuracy=False, progress=False
    )
    plan = report.plan
    reached = {
        "params": count_parameters(reduced) / report.before.total_params,
        "flops": report.after.total_macs / report.before.total_macs,
    }
    fractions = plan.budget.fractions
    assert all(reached[m] <= f + 1e-9 for m, f in fractions.items()), reached
    assert max(reached[m] - f for m, f in fractions.items()) == pytest.approx(0, abs=0.02)
    for group in report.groups:
        count = plan.counts[group.id]
        if group.pinned:
            assert count == group.size
        else:
            assert count == group.size or count % 8 == 0, (group.id, count)
            assert count >= round_channels(group.size, 0.1, 8), (group.id, count)
    _assert_plan_written(reduced, report)
    onnx.checker.check_model(reduced, full_check=True)
    graphs.assert_runs_at_declared_shapes(model, reduced, [1, *c_h_w])


def test_global_at_budget_one_keeps_everything(zoo_onnx):
    model = zoo_onnx("resnet20", "deploy")
    same, report = reduce(
        model, budget="params=1", strategy="global", evaluate_accuracy=False, progress=False
    )
    assert not report.plan.changes_anything
    assert same.SerializeToString() == model.SerializeToString()


def _bundled_args(bundled_model_path, *extra: str) -> list[str]:
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    return ["reduce", str(bundled_model_path), "--data", data, "--limit", "64", *extra]


def test_cli_global_end_to_end_on_the_bundled_model(bundled_model_path, tmp_path, capsys):
    out, folder = tmp_path / "g.onnx", tmp_path / "report"
    args = _bundled_args(bundled_model_path, "-o", str(out), "--report", str(folder))
    assert main([*args, "--strategy", "global", "--budget", "params=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "reached (global, one importance ranking over all free groups" in printed
    report = json.loads((folder / "report.json").read_text())
    assert report["plan"]["strategy"] == "global" and report["plan"]["mapping"] is None
    assert all(m["beta"] is None for m in report["macroblocks"])
    assert 0.48 <= report["budget"]["reached"]["params"] <= 0.5
    assert report["totals"]["params"][1] == parameters_by_layer(onnx.load(out))
    assert any("act importance" in n for n in report["plan"]["notes"])
    md = (folder / "report.md").read_text()
    assert "- strategy: global;" in md and "global ranking" in md and "c = " not in md
    # An unreachable budget: one line, exit 2, nothing written.
    bad = tmp_path / "bad.onnx"
    code = main(
        _bundled_args(bundled_model_path, "-o", str(bad), "--strategy", "global")
        + ["--budget", "params=0.01"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be reached" in err, err
    assert not bad.exists()


def test_global_without_budget_matches_mbs_size_with_another_shape(bundled_model_path):
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    options = dict(limit=64, evaluate_accuracy=False, progress=False)
    _, mbs_default = reduce(str(bundled_model_path), data, **options)
    _, global_default = reduce(str(bundled_model_path), data, strategy="global", **options)
    assert any("matched to the size MBS reaches" in n for n in global_default.plan.notes)
    sizes = [r.plan.reached["params"] for r in (mbs_default, global_default)]
    assert sizes[0] < 0.95 and sizes[1] == pytest.approx(sizes[0], abs=0.02)
    # At params=0.5 the shapes differ: per macroblock, the kept fractions are not MBS's.
    _, mbs = reduce(str(bundled_model_path), data, budget="params=0.5", **options)
    _, glob = reduce(
        str(bundled_model_path), data, budget="params=0.5", strategy="global", **options
    )
    kept_mbs = np.array([m.kept for m in mbs.plan.macroblocks])
    kept_global = np.array([m.kept for m in glob.plan.macroblocks])
    assert np.abs(kept_mbs - kept_global).max() > 0.05, (kept_mbs, kept_global)


def test_cli_says_nothing_was_cut_not_a_threshold_of_0(bundled_model_path, capsys):
    # At a budget of 1 no channel is cut: the summary said "cut at 0" (global) and
    # "worth per unit of params cut below 0" (mbs-cost), a threshold no channel had.
    for strategy in ("global", "mbs-cost"):
        argv = ["reduce", str(bundled_model_path), "--dry-run", "--budget", "params=1"]
        assert main([*argv, "--strategy", strategy]) == 0
        printed = capsys.readouterr().out
        assert "reached (" in printed and "nothing cut)" in printed, printed
        assert "cut at 0" not in printed and "cut below 0" not in printed
