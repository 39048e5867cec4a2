"""bench/experiment.py (issue 16): budget matching, the MBS-default match, resume, the verdict
rule and the table; the onnxsim arm's size matching on a BN-folded zoo model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import write_idx

from onnx_mbs.auto import choose_strategy
from onnx_mbs.bridge import RetrainResult
from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE
from onnx_mbs.plan import Budget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import experiment  # noqa: E402


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory) -> Path:
    """A tiny IDX folder: 512 training and 256 test images from the bundled samples."""
    folder = tmp_path_factory.mktemp("fmnist")
    for prefix, sample, n in (("train", FMNIST_TRAIN_SAMPLE, 512), ("t10k", FMNIST_SAMPLE, 256)):
        arrays = np.load(sample)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", arrays["x"][:n, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", arrays["y"][:n].astype(np.uint8))
    return folder


def spread(*values: float) -> dict[str, float]:
    return experiment.spread(list(values))


def test_verdict_rule_on_fixed_numbers():
    # Differences beyond twice the larger std are verdicts; within it, "within spread".
    assert experiment.verdict(spread(0.90, 0.91, 0.92), spread(0.85, 0.86, 0.87)) == "yes"
    assert experiment.verdict(spread(0.85, 0.86, 0.87), spread(0.90, 0.91, 0.92)) == "no"
    # 1 point apart, std 1 point: within 2 std.
    assert experiment.verdict(spread(0.90, 0.91, 0.92), spread(0.89, 0.90, 0.91)) == (
        "within spread"
    )
    assert experiment.verdict(spread(0.9), spread(0.8)) == "one seed: no spread"


def test_targets_and_matching():
    assert experiment.target("params=0.3", None) == ("params", 0.3)
    assert experiment.target("flops=0.5", None) == ("macs", 0.5)
    # MBS's default has no target; every other arm is matched to the params MBS reached.
    assert experiment.target("default", None) == ("params", None)
    assert experiment.target("default", 0.41) == ("params", 0.41)
    assert experiment.budget_text("macs", 0.5) == "flops=0.500000"
    assert experiment.match_error(0.49, 0.5) == pytest.approx(0.02)


def test_bisection_finds_the_nearest_size():
    # A size that falls in steps of 0.1 with sparsity: the nearest reachable value is chosen.
    def prune(s):
        return s

    def measure(s):
        return 1.0 - np.floor(10 * s) / 10

    model, sparsity, fraction, tried = experiment.bisect_sparsity(prune, measure, 0.33)
    assert fraction == pytest.approx(0.3)
    assert measure(sparsity) == pytest.approx(0.3)
    assert tried


def test_comparisons_and_default_loss_from_cells():
    cells = [
        {"arch": "a", "budget": "params=0.5", "arm": "mbs", "metric": "params",
         "after": spread(0.90, 0.91, 0.92)},
        {"arch": "a", "budget": "params=0.5", "arm": "uniform", "metric": "params",
         "after": spread(0.85, 0.86, 0.87)},
        {"arch": "a", "budget": "params=0.5", "arm": "onnxsim", "metric": "params",
         "after": None},  # not reachable: no comparison
        {"arch": "a", "budget": "flops=0.5", "arm": "mbs", "metric": "macs",
         "after": spread(0.88, 0.89, 0.90)},
        {"arch": "a", "budget": "flops=0.5", "arm": "global", "metric": "macs",
         "after": spread(0.89, 0.90, 0.91)},
        {"arch": "a", "budget": "default", "arm": "mbs", "metric": "params",
         "params_fraction": 0.4, "macs_fraction": 0.7, "after": spread(0.91, 0.92, 0.93)},
    ]  # fmt: skip
    rows = experiment.compare(cells)
    assert [(r["budget"], r["other"], r["cost"], r["verdict"]) for r in rows] == [
        ("params=0.5", "uniform", "params", "yes"),
        ("flops=0.5", "global", "MACs", "within spread"),
    ]
    assert rows[0]["difference"] == pytest.approx(0.05)
    (loss,) = experiment.default_loss(cells, {"a": {"test_top1": 0.93}})
    assert loss["loss_points"] == pytest.approx(1.0)
    assert loss["loss_points_range"] == pytest.approx([0.0, 2.0])
    assert not loss["negligible"]


def run_experiment(out: Path, idx_data: Path, *extra: str) -> int:
    return experiment.main(
        [
            "--out", str(out), "--archs", "resnet20", "--baseline", f"resnet20={BUNDLED_MODEL}",
            "--data", str(idx_data), "--arms", "mbs", "uniform", "--budgets", "params=0.5",
            "default", "--seeds", "2", "--train-images", "128", "--calib-size", "16",
            "--test-size", "64",
            "--allow-weak-baseline", *extra,
        ]
    )  # fmt: skip


@pytest.fixture
def no_training(monkeypatch):
    """Retraining replaced by handing the reduced model back: the run's logic alone."""

    def fake(self, model, data, teacher, seed, epochs=None):
        return RetrainResult(model=model, seconds=0.0, images_per_second=1.0)

    monkeypatch.setattr(experiment.Experiment, "retrain", fake)


def test_run_matches_sizes_and_resumes(tmp_path, idx_data, capsys, monkeypatch, no_training):
    check_run(tmp_path, idx_data, capsys, monkeypatch)


@pytest.mark.slow
def test_run_with_retraining(tmp_path, idx_data, capsys, monkeypatch):
    check_run(tmp_path, idx_data, capsys, monkeypatch)


def check_run(tmp_path, idx_data, capsys, monkeypatch):
    out = tmp_path / "exp.json"
    assert run_experiment(out, idx_data) == 0
    results = json.loads(out.read_text())
    assert results["complete"]
    cells = {(c["budget"], c["arm"]): c for c in results["cells"]}
    mbs_default = cells[("default", "mbs")]
    assert mbs_default["target_fraction"] is None
    # uniform at "default" is reduced to the params MBS's default reached.
    uniform_default = cells[("default", "uniform")]
    assert uniform_default["target_fraction"] == mbs_default["params_fraction"]
    for c in results["cells"]:
        if c["target_fraction"] is not None and c["status"] == "reduced":
            assert abs(c["params_fraction"] / c["target_fraction"] - 1) <= 0.02
        if c["status"] == "reduced":
            assert [r["seed"] for r in c["runs"]] == [0, 1]
            assert c["after"]["n"] == 2
            assert 0.0 <= c["acc_before"] <= 1.0
    assert results["settings"]["train_images"] == {"resnet20": 128}
    assert (tmp_path / "exp.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| resnet20 | default | uniform |" in table
    assert "(3) MBS default" in table

    # Resume: a run taken out is the only one retrained again.
    reduced = [c for c in results["cells"] if c["status"] == "reduced"]
    removed = reduced[0]["runs"].pop()
    results["complete"] = False
    out.write_text(json.dumps(results))
    calls = []
    real = experiment.Experiment.retrain_cell

    def counting(self, cell, seed):
        calls.append((cell["budget"], cell["arm"], seed))
        real(self, cell, seed)

    monkeypatch.setattr(experiment.Experiment, "retrain_cell", counting)
    monkeypatch.setattr(experiment, "reduce", None)  # nothing is reduced again
    assert experiment.main(["--out", str(out), "--resume"]) == 0
    assert calls == [(reduced[0]["budget"], reduced[0]["arm"], removed["seed"])]
    assert json.loads(out.read_text())["complete"]


def test_weak_baseline_is_refused(tmp_path, idx_data, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "MIN_BASELINE_TOP1", 1.01)  # no baseline reaches it
    out = tmp_path / "exp.json"
    code = experiment.main(
        ["--out", str(out), "--archs", "resnet20", "--baseline", f"resnet20={BUNDLED_MODEL}",
         "--data", str(idx_data), "--test-size", "100"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "below the 101%" in err and "--allow-weak-baseline" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything is written


def test_table_refuses_the_old_format(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"complete": True, "archs": {}}))
    assert experiment.main(["--out", str(old), "--table"]) == 2
    assert "earlier experiment" in capsys.readouterr().err


def test_onnxsim_arm_matches_the_target_on_a_folded_model(tmp_path):
    pytest.importorskip("onnxsim")
    from onnxsim.pruning import apply_structured_pruning

    folded = experiment.folded_form(BUNDLED_MODEL, tmp_path / "folded.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    params, _ = experiment.sizes(folded)

    def measure(model):
        return experiment.sizes(model)[0] / params

    model, sparsity, fraction, _ = experiment.bisect_sparsity(
        lambda s: apply_structured_pruning(folded, s), measure, 0.5
    )
    assert 0 < sparsity < 1
    assert experiment.match_error(fraction, 0.5) <= experiment.MATCH_TOLERANCE
    assert experiment.sizes(model)[0] == pytest.approx(0.5 * params, rel=0.02)


def test_add_runs_of_new_arms(tmp_path, idx_data, capsys, no_training):
    """A later run of a new arm (and budget) on the same archs and recipe joins a result:
    its cells (a failed one gives way to its retry, an added one to a later added run's),
    the arms and budgets, the comparisons; without the mbs arm its "default" cell is
    matched to MBS's default size all the same. A cell of the result that did not fail,
    or another recipe, is refused."""
    base, extra, failed = (tmp_path / f"{n}.json" for n in ("base", "extra", "failed"))
    assert run_experiment(base, idx_data) == 0
    assert run_experiment(extra, idx_data, "--arms", "mbs-branch", "--budgets",
                          "params=0.5", "flops=0.5", "default") == 0  # fmt: skip
    before = json.loads(base.read_text())
    added = json.loads(extra.read_text())
    mbs_default = next(c for c in before["cells"] if (c["budget"], c["arm"]) == ("default", "mbs"))
    branch_default = next(c for c in added["cells"] if c["budget"] == "default")
    assert branch_default["status"] == "reduced"
    assert branch_default["params_fraction"] == pytest.approx(
        mbs_default["params_fraction"], abs=0.02
    )
    gone = json.loads(json.dumps(added))
    for cell in gone["cells"]:
        cell.update(status="failed", runs=[], after=None)
    failed.write_text(json.dumps(gone))
    assert experiment.main(["--out", str(base), "--add", str(failed), str(extra)]) == 0
    result = json.loads(base.read_text())
    assert result["settings"]["arms"] == ["mbs", "mbs-branch", "uniform"]
    assert result["settings"]["budgets"] == ["params=0.5", "default", "flops=0.5"]
    assert sorted(map(json.dumps, result["cells"])) == sorted(
        map(json.dumps, before["cells"] + added["cells"])
    )
    order = [(c["budget"], c["arm"]) for c in result["cells"]]
    assert order[:3] == [("params=0.5", "mbs"), ("params=0.5", "mbs-branch"),
                         ("params=0.5", "uniform")]  # fmt: skip
    assert [a["command"] for a in result["added"]] == [gone["command"], added["command"]]
    assert [r["by"] for r in result["replaced"]] == [added["command"]] * len(added["cells"])
    assert any(
        r["reference"] == "mbs" and r["other"] == "mbs-branch" and r["budget"] == "params=0.5"
        for r in result["comparisons"]
    )
    assert "mbs-branch" in capsys.readouterr().out

    assert experiment.main(["--out", str(base), "--add", str(extra)]) == 2
    assert "has that cell already" in capsys.readouterr().err
    added["settings"]["lr"] = 0.1
    extra.write_text(json.dumps(added))
    (tmp_path / "base2.json").write_text(json.dumps(before))
    assert experiment.main(["--out", str(tmp_path / "base2.json"), "--add", str(extra)]) == 2
    assert "setting lr differs" in capsys.readouterr().err


def test_merge_runs_of_other_archs(tmp_path, idx_data, capsys, no_training):
    """Runs of disjoint archs (one process per arch, side by side) merge into one result; runs
    under another recipe, or sharing an arch, are refused."""
    first = tmp_path / "a.json"
    assert run_experiment(first, idx_data) == 0
    a = json.loads(first.read_text())
    b = json.loads(json.dumps(a).replace('"resnet20"', '"resnet56"'))
    b["settings"]["deadline_minutes"] = 30.0  # each run's own time may differ
    b["started_at"], b["finished_at"] = a["started_at"] + 5, a["finished_at"] + 7
    second = tmp_path / "b.json"
    second.write_text(json.dumps(b))
    out = tmp_path / "merged.json"
    assert experiment.main(["--out", str(out), "--merge", str(first), str(second)]) == 0
    merged = json.loads(out.read_text())
    assert merged["settings"]["archs"] == ["resnet20", "resnet56"]
    assert set(merged["baselines"]) == {"resnet20", "resnet56"}
    assert len(merged["cells"]) == 2 * len(a["cells"])
    assert len(merged["comparisons"]) == 2 * len(a["comparisons"])
    assert merged["total_seconds"] == pytest.approx(b["finished_at"] - a["started_at"])
    assert [r["archs"] for r in merged["runs"]] == [["resnet20"], ["resnet56"]]
    assert merged["settings"]["target_minutes"] == [60.0, 60.0]
    assert "| resnet56 | default | uniform |" in capsys.readouterr().out

    b["settings"]["lr"] = 0.1
    second.write_text(json.dumps(b))
    assert experiment.main(["--out", str(out), "--merge", str(first), str(second)]) == 2
    assert "setting lr differs" in capsys.readouterr().err
    assert experiment.main(["--out", str(out), "--merge", str(first), str(first)]) == 2
    assert "share an arch" in capsys.readouterr().err


def _results(arms_means: dict[str, dict[str, list[float]]], seeds: int = 2) -> dict:
    """Results whose cells at each budget hold, per arm, `seeds` runs per arch at the means
    given (budget -> arm -> one mean per arch)."""
    budgets = list(arms_means)
    arms = list(next(iter(arms_means.values())))
    cells = []
    for budget, by_arm in arms_means.items():
        for arm, means in by_arm.items():
            for arch, mean in zip(("a", "b"), means):
                runs = [{"seed": s, "test_top1": mean} for s in range(seeds)]
                cells.append(
                    {"arch": arch, "budget": budget, "arm": arm, "status": "reduced",
                     "runs": runs, "after": spread(*[mean] * seeds)}
                )  # fmt: skip
    settings = {"archs": ["a", "b"], "budgets": budgets, "arms": arms, "seeds": [0, 1]}
    return {"settings": settings, "cells": cells}


def test_auto_table_reads_the_settled_winner_per_metric():
    new = _results(
        {
            "params=0.5": {"mbs": [0.9, 0.8], "mbs-cost": [0.88, 0.8], "uniform": [0.85, 0.8]},
            "flops=0.5": {"mbs": [0.7, 0.7], "mbs-cost": [0.9, 0.86], "uniform": [0.88, 0.87]},
        }
    )
    table = experiment.auto_table([("new.json", new)])
    assert table["params"][0] == "mbs"
    assert table["flops"][0] == "mbs-cost"  # 0.88 on average against uniform's 0.875
    assert "0.8800 (mbs-cost)" in table["flops"][1] and "global not measured" in table["flops"][1]
    assert table["latency"] == ("mbs-cost", table["latency"][1])
    assert "not measured yet" in table["latency"][1]
    # One run short at flops=0.5 on arch b: alone, the results settle flops on arch a, and
    # say so; older results that settle flops on every arch outrank them.
    b_uniform = next(
        c
        for c in new["cells"]
        if (c["arch"], c["budget"], c["arm"]) == ("b", "flops=0.5", "uniform")
    )
    b_uniform["runs"].pop()
    table = experiment.auto_table([("new.json", new)])
    assert table["flops"][0] == "mbs-cost" and "0.9000 (mbs-cost)" in table["flops"][1]
    assert "; a at flops=0.5 (b still running), new.json" in table["flops"][1]
    assert "; a, b at params=0.5, new.json" in table["params"][1]
    assert table["latency"][0] == "mbs-cost"  # flops' winner, from arch a
    old = _results({"flops=0.5": {"mbs": [0.7, 0.7], "uniform": [0.9, 0.9]}})
    table = experiment.auto_table([("new.json", new), ("old.json", old)])
    assert table["flops"][0] == "uniform" and table["flops"][1].endswith(
        "; a, b at flops=0.5, old.json"
    )
    assert table["params"][1].endswith("new.json")
    # A metric only the newer results measure is read from them, partial as they are.
    new_latency = _results({"latency=0.6": {"mbs": [0.6, 0.5], "uniform": [0.7, 0.9]}})
    new_latency["cells"] = [c for c in new_latency["cells"] if c["arch"] == "a"]
    table = experiment.auto_table([("newest.json", new_latency), ("old.json", old)])
    assert (
        table["latency"][0] == "uniform"
        and "; a at latency=0.6 (b still running)" in table["latency"][1]
    )
    assert table["flops"][1].endswith("old.json")


def test_auto_strategy_table_matches_the_recorded_results():
    """onnx_mbs/auto.py's table is what `--auto-table` derives from the results in
    bench/results: when an experiment settles a metric, regenerate it."""
    from onnx_mbs.auto import AUTO

    paths = [experiment.DEFAULT_OUT, experiment.EARLIER_OUT]
    sources = [(experiment.shown(p), experiment.read_results(p)) for p in paths if p.exists()]
    assert experiment.auto_table(sources) == AUTO, (
        "regenerate onnx_mbs/auto.py's AUTO with python bench/experiment.py --auto-table"
    )


def test_resume_retries_the_runs_a_deadline_skipped(tmp_path, idx_data, capsys, no_training):
    out = tmp_path / "exp.json"
    assert run_experiment(out, idx_data, "--deadline", "0") == 0  # every run skipped
    results = json.loads(out.read_text())
    assert results["skipped"] and not results["complete"] and results["partial"]
    assert all(not c["runs"] for c in results["cells"])
    assert "PARTIAL" in capsys.readouterr().out
    assert experiment.main(["--out", str(out), "--resume", "--deadline", "1000"]) == 0
    results = json.loads(out.read_text())
    assert results["complete"] and not results["partial"] and not results["skipped"]
    assert all(len(c["runs"]) == 2 for c in results["cells"] if c["status"] == "reduced")
    assert results["settings"]["deadline_minutes"] == 1000


def test_table_marks_the_default_arm_this_checkout_runs():
    """A run records `reduce`'s default arm per budget when it starts; auto's table may have
    changed since (it is regenerated from partial results): --table, --plot and --resume use
    the checkout's, and compare it with every other arm at once."""
    results = _results(
        {"latency=0.6": {"mbs": [0.6, 0.5], "uniform": [0.7, 0.6], "global": [0.8, 0.7]}}
    )
    for c in results["cells"]:
        c["metric"] = "latency"
    results.update(format=experiment.FORMAT)
    results["settings"]["default_arm"] = {"latency=0.6": "stale"}
    now = experiment.with_current_defaults(results)
    expected = choose_strategy(Budget.parse("latency=0.6"))[0]
    assert now["settings"]["default_arm"] == {"latency=0.6": expected}
    defaults = {(r["arch"], r["other"]) for r in now["comparisons"] if r["default"]}
    others = {"mbs", "uniform", "global"} - {expected}
    assert defaults == {(arch, other) for arch in ("a", "b") for other in others}
    assert results["settings"]["default_arm"] == {"latency=0.6": "stale"}  # not modified


def test_resume_reduces_latency_misses_again():
    """A latency cell off its target by more than the tolerance missed because of the
    machine's load as much as the arm: a resumed run reduces it again. A size miss stays."""
    cells = [
        {"arch": "a", "budget": "latency=0.6", "arm": "x", "metric": "latency", "status": s}
        for s in ("unmatched", "reduced")
    ] + [{"arch": "a", "budget": "flops=0.3", "arm": "x", "metric": "macs", "status": "unmatched"}]
    kept = experiment.retried_latency_misses(cells)
    assert [(c["metric"], c["status"]) for c in kept] == [
        ("latency", "reduced"),
        ("macs", "unmatched"),
    ]


def test_long_regime_forgets_what_auto_no_longer_runs(tmp_path, capsys):
    """bench/long_regime.py keeps `auto`'s rows only where auto still runs what it ran when
    they were made (its table is regenerated from the results): the others are redone."""
    import long_regime

    from onnx_mbs.auto import AUTO

    now = AUTO["flops"][0]
    other = next(s for s in ("uniform", "global") if s != now)

    def auto_rows(budget: str, strategy: str) -> tuple[dict, list[dict]]:
        reduction = {"arch": "resnet20", "budget": budget, "arm": "auto",
                     "status": "same_as", "same_as": strategy}  # fmt: skip
        rows = [{**reduction, "seed": s, "epochs": 3} for s in (0, 1)]
        return reduction, rows

    stale, stale_rows = auto_rows("flops=0.5", other)
    current, current_rows = auto_rows("flops=0.3", now)
    unasked, unasked_rows = auto_rows("default", "mbs")
    recorded = {"baselines": {}, "reductions": [stale, current, unasked],
                "rows": stale_rows + current_rows + unasked_rows}  # fmt: skip
    out = tmp_path / "long.json"
    out.write_text(json.dumps(recorded))
    args = ["--out", str(out), "--work", str(tmp_path / "work"), "--refresh"]
    assert long_regime.main(args) == 0
    kept = json.loads(out.read_text())
    assert kept["reductions"] == [current, unasked]
    assert kept["rows"] == current_rows + unasked_rows
    said = capsys.readouterr().out
    assert f"resnet20 flops=0.5: auto now runs {now}; its rows are redone" in said
    # --refresh rewrites a record: without one it says so in one line and writes nothing.
    missing = tmp_path / "none" / "long.json"
    assert long_regime.main(["--out", str(missing), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing} is not one" in err
    assert not missing.parent.exists()


def test_long_regime_is_partial_until_every_cell_it_was_asked_for_is_done(tmp_path):
    """A run of some cells into a record keeps the record's own design: rows of one arm
    finished do not make a record of several arms and both baselines complete."""
    import long_regime

    row = {"arch": "resnet20", "budget": "default", "arm": "mbs", "epochs": 3,
           "status": "done", "test_top1": 0.9, "baseline_top1": 0.9,
           "params_fraction": 0.5, "macs_fraction": 0.7}  # fmt: skip
    out = tmp_path / "long.json"
    out.write_text(json.dumps({"baselines": {}, "reductions": [], "command": "the run's",
                               "rows": [{**row, "seed": 0}, {**row, "seed": 1}]}))  # fmt: skip
    work = ["--out", str(out), "--work", str(tmp_path / "work"), "--refresh"]
    assert long_regime.main(work) == 0  # the default design: 2 archs, 3 budgets, 3 arms
    record = json.loads(out.read_text())
    assert record["partial"] and record["rows_done"] == "2 of 36"
    assert record["design"]["archs"] == ["resnet20", "resnet56"]
    assert record["command"] == "the run's"  # a refresh retrains nothing: not its command
    # Asked for the one finished cell alone, the record is still the design's.
    one = ["--archs", "resnet20", "--budgets", "default", "--arms", "mbs"]
    assert long_regime.main([*one, *work]) == 0
    record = json.loads(out.read_text())
    assert record["partial"] and record["rows_done"] == "2 of 36"
    # A new record of that cell alone is complete; a later run's new arm joins its design.
    alone = tmp_path / "alone.json"
    alone.write_text(out.read_text().replace('"design"', '"old_design"'))
    assert long_regime.main([*one, "--out", str(alone), *work[2:]]) == 0
    assert not json.loads(alone.read_text())["partial"]
    assert long_regime.main([*one[:4], "--arms", "uniform", "--out", str(alone), *work[2:]]) == 0
    record = json.loads(alone.read_text())
    assert record["partial"] and record["rows_done"] == "2 of 4"
    assert record["design"]["arms"] == ["mbs", "uniform"]


def test_long_regime_keeps_the_command_of_every_run_into_a_record(tmp_path, monkeypatch):
    """A run of some cells into a record adds its command; the one that made it stays first."""
    import long_regime

    out = tmp_path / "long.json"
    out.write_text(json.dumps({"baselines": {}, "reductions": [], "rows": [],
                               "command": "nice -n 15 python bench/long_regime.py"}))  # fmt: skip
    args = ["--archs", "resnet20", "--arms", "auto", "--out", str(out), "--work", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["bench/long_regime.py", *args])
    for _ in range(2):  # the same run resumed is one command
        run = long_regime.Run(long_regime.parse_args(args))
        out.write_text(json.dumps(run.results))
    record = json.loads(out.read_text())
    assert record["command"] == "nice -n 15 python bench/long_regime.py"
    assert record["commands"] == [record["command"], "nice -n 15 python " + " ".join(sys.argv)]
