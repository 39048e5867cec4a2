"""bench/retrain.py: its rows and options reach reduce and retrain as their labels say, unknown
rows are refused, and a partial result file is resumed from the seeds it has."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from onnx_mbs.bridge import RetrainResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import retrain as bench  # noqa: E402


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """retrain replaced by one that records its options and returns the student untouched."""
    seen: list[dict] = []

    def fake(model, data, **options):
        seen.append({"model": model, "labels": data[1] is not None, **options})
        return RetrainResult(model=model)

    monkeypatch.setattr(bench, "retrain", fake)
    return seen


def test_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "kept,nowarmpu"])
    assert "unknown --rows nowarmpu" in capsys.readouterr().err


def test_nowarmup_and_mbs_rows_reach_retrain_and_reduce(calls, tmp_path):
    out = tmp_path / "r.json"
    bench.main(["--rows", "nowarmup,mbs", "--seeds", "2", "--threads", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["partial"] is False
    assert set(record["runs"]) == {
        "kept, labels + teacher, no warm-up",
        "kept, labels + teacher, --strategy mbs",
    }
    # seed by seed over the rows: nowarmup, mbs, nowarmup, mbs
    assert [c["seed"] for c in calls] == [0, 0, 1, 1]
    assert [c.get("warmup") for c in calls] == [0, None, 0, None]  # nowarmup: --warmup 0
    assert all(c["labels"] and c["teacher"] is not None for c in calls)
    forms = record["forms"]
    assert forms["kept"]["strategy"] == "mbs-branch"  # auto at a params budget
    assert forms["kept-mbs"]["strategy"] == "mbs"
    for form in forms.values():  # both at params=0.5, as the rows they are compared with
        assert form["params_kept"] == pytest.approx(0.5, abs=0.01)
    # the untouched students score what the reduced models scored
    kept = record["runs"]["kept, labels + teacher, no warm-up"]
    assert kept["runs"] == [forms["kept"]["top1_reduced"]] * 2


def test_width_maps_run_each_row_at_each_map(calls, tmp_path):
    out = tmp_path / "r.json"
    bench.main(
        ["--rows", "kept", "--seeds", "1", "--budget", "none", "--threads", "1", "--out", str(out),
         "--width-map", "default,linear:0.44"]
    )  # fmt: skip
    record = json.loads(out.read_text())
    forms = record["forms"]
    assert forms["kept @ default"]["width_map"] == "linear:0.4"  # MBS's own size, its default
    assert forms["kept @ linear:0.44"]["width_map"] == "linear:0.44"
    assert forms["kept @ linear:0.44"]["params"] < forms["kept @ default"]["params"]
    assert set(record["runs"]) == {
        "kept, labels + teacher (demo) @ default",
        "kept, labels + teacher (demo) @ linear:0.44",
    }
    assert calls[0]["model"] is not calls[1]["model"]


def test_resume_keeps_the_seeds_a_partial_file_has(calls, tmp_path):
    out = tmp_path / "r.json"
    args = ["--rows", "nowarmup", "--seeds", "2", "--threads", "1", "--out", str(out)]
    bench.main(args)
    record = json.loads(out.read_text())
    label = "kept, labels + teacher, no warm-up"
    record["runs"][label] = bench.summary([0.5])  # one seed done, as a killed run leaves it
    record["partial"] = True
    out.write_text(json.dumps(record))
    calls.clear()
    bench.main([*args, "--resume"])
    assert [c["seed"] for c in calls] == [1]
    assert json.loads(out.read_text())["runs"][label]["runs"][0] == 0.5


@pytest.mark.parametrize("strategy", ["auto", "mbs"])
def test_width_map_parameter_leaves_the_params_budget_model_alone(strategy):
    """docs/results.md: c decides only plans without a budget. At params=0.5 `mbs` solves c and
    `auto` runs mbs-branch, whose worth map is its own, so the retraining rows' reduced models
    are the same at linear:0.44 as at the default."""
    model = bench.onnx.load(bench.BUNDLED_MODEL)

    def counts(width_map: str | None) -> dict[int, int]:
        _, report = bench.reduce(
            model,
            str(bench.FMNIST_SAMPLE),
            budget="params=0.5",
            strategy=strategy,
            width_map=width_map,
            evaluate_accuracy=False,
            providers="cpu",
            progress=False,
        )
        return report.plan.counts

    assert counts(None) == counts("linear:0.44")
