"""The paper's regime, measured: reduce, then retrain long enough, and compare with the baseline.

Both converged baselines (ResNet-20 and ResNet-56 on Fashion-MNIST) are reduced to MBS's default
size, to params=0.3 and to flops=0.5, by MBS, by the default strategy (`--strategy auto`) and
by uniform scaling at the same size (at "default", uniform matches MBS's parameter fraction).
Where `auto` writes the graph of another arm (nodes, weights; it picks MBS or uniform per budget
metric), its rows are that arm's rows, marked `same_as`, and are not retrained twice. Each
reduced model is retrained with the full recipe -- the baseline as teacher plus the labels,
standard augmentation, warm-up then cosine at the batch-scaled default learning rate -- for
`--epochs` passes over the 60,000 training images, with `--seeds` seeds, and scored top-1 on the
10,000 test images (onnxruntime).

Rows are written to the JSON as they finish; a rerun skips finished rows and resumes an
unfinished row from its checkpoint (one per row under --work), so the run continues across
sessions. Until every row of its design is done the file says "partial": true: the design
("design") joins the archs, budgets, arms, seeds and epochs of every run made into the file.

    python bench/long_regime.py [--archs resnet20,resnet56] [--seeds 2] [--epochs 3]
        [--out bench/results/long_regime.json] [--work bench/results/tmp/long_regime]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from experiment import MATCH_TOLERANCE, budget_text, match_error, sizes, target

from onnx_mbs.auto import choose_strategy
from onnx_mbs.bridge import retrain
from onnx_mbs.evaluate import evaluate
from onnx_mbs.passes import BadInputError, load_model
from onnx_mbs.pipeline import open_for_model, reduce
from onnx_mbs.plan import STRATEGIES, Budget

BASELINES = {
    "resnet20": "models/bundled/resnet20_fmnist_e8.onnx",
    "resnet56": "models/bundled/resnet56_fmnist_e7.onnx",
}
BUDGETS = ("default", "params=0.3", "flops=0.5")
ARMS = ("mbs", "auto", "uniform")
DATA = "/usr/share/datasets/fashion-mnist"
PROVIDERS = ["CPUExecutionProvider"]
# A row needs no more work: retrained, or the same graph as another arm's (auto).
FINISHED = ("done", "same_as")
CALIBRATION_IMAGES = 1024  # the reduction's statistics: the first images of the train split
RECIPE = (
    "onnx_mbs.bridge.retrain defaults with the baseline as teacher: loss = 0.5 KL(T=4) + 0.5 "
    "cross-entropy on the labels; SGD momentum 0.9, wd 5e-4 (not on BN/bias); lr 0.01 x batch "
    "/ 64, linear warm-up over 5% of the steps then cosine to 0; --augment standard (random "
    "28x28 crop of the image padded by 4 px, horizontal flip); no label smoothing; the last "
    "epoch is kept (no validation split: the test set is never looked at during training)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet20,resnet56")
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-images", type=int, default=None, help="default: all 60,000")
    p.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 ran 5-7x slower than 1 when shared)",
    )
    p.add_argument("--workers", type=int, default=None, help="data workers (default: cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default="bench/results/long_regime.json")
    p.add_argument("--work", default="bench/results/tmp/long_regime")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="only forget what auto no longer runs and rewrite --out's summary; no retraining",
    )
    return p.parse_args(argv)


def joined_commands(record: dict[str, Any], command: str) -> list[str]:
    """Every command run into `record`, in order, `command` last unless it ran before: the
    first made the record (with the whole design when it was the default), later ones added
    cells to it."""
    commands = list(record.get("commands") or ([record["command"]] if "command" in record else []))
    return commands if command in commands else [*commands, command]


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = (
            json.loads(self.out.read_text())
            if self.out.exists()
            else {"baselines": {}, "reductions": [], "rows": []}
        )
        if not args.refresh:  # a refresh retrains nothing: the record's run stays its own
            self.record_run()
        self.archs = args.archs.split(",")
        self.budgets = args.budgets.split(",")
        self.arms = args.arms.split(",")
        self.results["design"] = joined_design(self.results.get("design", {}), args)
        self.drop_stale_auto()

    def record_run(self) -> None:
        """The commands, recipe and machine of the runs that retrain into the record."""
        commands = joined_commands(self.results, "nice -n 15 python " + " ".join(sys.argv))
        self.results.update(
            command=commands[0],
            commands=commands,
            recipe=RECIPE,
            environment={
                "torch": torch.__version__,
                "threads": self.a.threads,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
            },
        )

    def drop_stale_auto(self) -> None:
        """Forget the reductions and rows of `auto` made when it ran another strategy than it
        runs now (its table is regenerated from the experiment's results): they are redone,
        not kept as the default's figures."""
        stale = {
            (c["arch"], c["budget"])
            for c in self.results["reductions"]
            if c["arm"] == "auto" and c.get("strategy", c.get("same_as")) != auto_now(c["budget"])
        }
        for arch, budget in sorted(stale):
            print(f"{arch} {budget}: auto now runs {auto_now(budget)}; its rows are redone")

        def kept(entry: dict[str, Any]) -> bool:
            return entry["arm"] != "auto" or (entry["arch"], entry["budget"]) not in stale

        for key in ("reductions", "rows"):
            self.results[key] = [e for e in self.results[key] if kept(e)]

    def save(self) -> None:
        self.results["summary"] = summary(self.results)
        d = self.results["design"]
        wanted = (
            len(d["archs"]) * len(d["budgets"]) * len(d["arms"]) * d["seeds"] * len(d["epochs"])
        )
        done = len(
            [
                r
                for r in self.results["rows"]
                if r.get("status") in FINISHED
                and r["arch"] in d["archs"]
                and r["budget"] in d["budgets"]
                and r["arm"] in d["arms"]
                and r["seed"] < d["seeds"]
                and r["epochs"] in d["epochs"]
            ]
        )
        self.results["partial"] = done < wanted
        self.results["rows_done"] = f"{done} of {wanted}"
        partial = self.out.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.results, indent=1) + "\n")
        os.replace(partial, self.out)

    def source(self, split: str, model: onnx.ModelProto, limit: int | None):
        return open_for_model(f"{self.a.data}:{split}", load_model(model), limit=limit)

    def top1(self, model: onnx.ModelProto) -> float:
        source = self.source("test", model, self.a.test_images)
        return evaluate(model, source, PROVIDERS, progress=False).top1

    def baseline(self, arch: str) -> dict[str, Any]:
        if arch not in self.results["baselines"]:
            model = onnx.load(BASELINES[arch])
            params, macs = sizes(model)
            self.results["baselines"][arch] = {
                "path": BASELINES[arch],
                "params": params,
                "macs": macs,
                "test_top1": self.top1(model),
            }
            self.save()
        return self.results["baselines"][arch]

    def reduction(self, arch: str, budget: str, arm: str) -> dict[str, Any]:
        """The reduced model of (arch, budget, arm), reduced once and kept under --work."""
        for cell in self.results["reductions"]:
            if (cell["arch"], cell["budget"], cell["arm"]) == (arch, budget, arm):
                if "path" not in cell or Path(cell["path"]).exists():
                    return cell
                # Another checkout (--work is not committed): reduce again, same inputs.
                self.results["reductions"].remove(cell)
                break
        cell: dict[str, Any] = {"arch": arch, "budget": budget, "arm": arm}
        if arm == "auto":
            cell["strategy"] = auto_now(budget)
        strategy = arm
        if strategy not in ("auto", *STRATEGIES):
            raise BadInputError(f"unknown arm {arm!r}: use auto, {', '.join(STRATEGIES)}")
        # At "default" MBS and auto run without a budget (what `onnx-mbs reduce` does unasked);
        # the other arms are matched to MBS's size there.
        matched = budget == "default" and arm not in ("mbs", "auto")
        default = self.reduction(arch, "default", "mbs") if matched else None
        metric, fraction = target(budget, default.get("params_fraction") if default else None)
        base = self.baseline(arch)
        model, _ = reduce(
            onnx.load(BASELINES[arch]),
            f"{self.a.data}:train",
            budget=None if fraction is None else budget_text(metric, fraction),
            strategy=strategy,
            providers="cpu",
            channel_multiple=1,
            limit=CALIBRATION_IMAGES,
            evaluate_accuracy=False,
            progress=False,
        )
        params, macs = sizes(model)
        same = self.same_as(arch, budget, arm, model)
        if same:
            cell.update(status="same_as", same_as=same, reason=f"auto wrote {same}'s model")
            self.results["reductions"].append(cell)
            self.save()
            print(f"{arch} {budget} {arm}: the same model as {same}", flush=True)
            return cell
        path = self.work / f"{arch}_{budget.replace('=', '')}_{arm}.onnx"
        onnx.save(model, path)
        cell.update(
            status="reduced",
            path=str(path),
            metric=metric,
            target_fraction=fraction,
            params_fraction=params / base["params"],
            macs_fraction=macs / base["macs"],
            top1_before_retraining=self.top1(model),
        )
        if fraction is not None:
            cell["match_error"] = match_error(cell[f"{metric}_fraction"], fraction)
            if cell["match_error"] > MATCH_TOLERANCE:
                cell["status"] = "unmatched"
        self.results["reductions"].append(cell)
        self.save()
        print(
            f"{arch} {budget} {arm}: params {cell['params_fraction']:.1%}, MACs "
            f"{cell['macs_fraction']:.1%}, top-1 before retraining "
            f"{cell['top1_before_retraining']:.2%} ({cell['status']})",
            flush=True,
        )
        return cell

    def same_as(self, arch: str, budget: str, arm: str, model: onnx.ModelProto) -> str | None:
        """The other arm whose written model has `model`'s graph, if any: `auto`
        picks one of the strategies, and the same model is not retrained twice."""
        if arm != "auto":
            return None
        for other in self.arms:
            if other != arm and other in STRATEGIES:
                cell = self.reduction(arch, budget, other)
                if cell["status"] == "reduced" and same_graph(onnx.load(cell["path"]), model):
                    return other
        return None

    def row(self, arch: str, budget: str, arm: str, seed: int) -> None:
        key = (arch, budget, arm, seed, self.a.epochs)
        rows = self.results["rows"]
        if any(
            (r["arch"], r["budget"], r["arm"], r["seed"], r["epochs"]) == key
            and r["status"] in FINISHED
            for r in rows
        ):
            return
        cell = self.reduction(arch, budget, arm)
        row: dict[str, Any] = {
            "arch": arch,
            "arm": arm,
            "budget": budget,
            "epochs": self.a.epochs,
            "seed": seed,
        }
        if cell["status"] == "same_as":
            row.update(status="same_as", same_as=cell["same_as"])
            self._put(row)
            return
        if cell["status"] != "reduced":
            row.update(status=cell["status"], reason=cell.get("reason", "size not matched"))
            self._put(row)
            return
        model = onnx.load(cell["path"])
        teacher = onnx.load(BASELINES[arch])
        train = self.source("train", model, self.a.train_images)
        name = f"{arch}_{budget.replace('=', '')}_{arm}_s{seed}_e{self.a.epochs}"
        print(f"{name}: retraining on {train.description}", flush=True)
        t0 = time.perf_counter()
        result = retrain(
            model,
            train,
            teacher=teacher,
            epochs=self.a.epochs,
            batch_size=self.a.batch_size,
            seed=seed,
            device=self.a.device,
            checkpoint=self.work / "checkpoints" / name,
            resume=True,
            workers=self.a.workers,
        )
        test_top1 = self.top1(result.model)
        base = self.results["baselines"][arch]["test_top1"]
        row.update(
            status="done",
            train_images=len(train),
            device=result.device,
            test_top1=test_top1,
            baseline_top1=base,
            loss_points=100 * (base - test_top1),
            params_fraction=cell["params_fraction"],
            macs_fraction=cell["macs_fraction"],
            augment=result.augment,
            schedule=result.schedule,
            final_train_loss=result.history[-1].train_loss,
            resumed_from_epoch=result.resumed_from,
            seconds_this_session=time.perf_counter() - t0,
            images_per_second=result.images_per_second,
        )
        self._put(row)
        print(
            f"{name}: test top-1 {test_top1:.2%} (baseline {base:.2%}, "
            f"loss {row['loss_points']:+.2f} points)",
            flush=True,
        )

    def _put(self, row: dict[str, Any]) -> None:
        key = ("arch", "budget", "arm", "seed", "epochs")
        rows = self.results["rows"]
        rows[:] = [r for r in rows if any(r[k] != row[k] for k in key)] + [row]
        self.save()

    def run(self) -> None:
        for arch in self.archs:  # ResNet-20 first: all its rows before ResNet-56
            self.baseline(arch)
            for seed in range(self.a.seeds):  # one seed of every cell before the next seed
                for budget in self.budgets:
                    for arm in self.arms:
                        self.row(arch, budget, arm, seed)
        self.save()
        print(f"wrote {self.out} ({self.results['rows_done']} rows done)", flush=True)


def joined_design(old: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The cells a record is for: the design it was made with (archs, budgets, arms, seeds,
    epochs), joined with this run's. A run of some cells into a record leaves it partial
    until every cell of its design is done, not just the cells asked now."""

    def joined(key: str, asked: list[Any]) -> list[Any]:
        return list(dict.fromkeys([*old.get(key, []), *asked]))

    return {
        "archs": joined("archs", args.archs.split(",")),
        "budgets": joined("budgets", args.budgets.split(",")),
        "arms": joined("arms", args.arms.split(",")),
        "seeds": max(old.get("seeds", 0), args.seeds),
        "epochs": joined("epochs", [args.epochs]),
    }


def auto_now(budget: str) -> str:
    """The strategy `auto` runs at `budget` with this checkout's table ("default": none)."""
    return choose_strategy(None if budget == "default" else Budget.parse(budget))[0]


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """The same nodes, inputs, outputs and weights (by value: an older checkout may have
    stored the same tensors in another encoding)."""

    def weights(m: onnx.ModelProto) -> dict[str, Any]:
        return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}

    wa, wb = weights(a), weights(b)
    return (
        (a.graph.node, a.graph.input, a.graph.output)
        == (b.graph.node, b.graph.input, b.graph.output)
        and wa.keys() == wb.keys()
        and all(wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa)
    )


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (arch, budget, arm, epochs): mean top-1 over seeds, baseline, loss in points, and the
    difference from uniform at the same size."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results["rows"]:
        if r.get("status") == "done":
            groups.setdefault((r["arch"], r["budget"], r["arm"], r["epochs"]), []).append(r)
    out = []
    for (arch, budget, arm, epochs), rows in sorted(groups.items()):
        tops = [r["test_top1"] for r in rows]
        base = rows[0]["baseline_top1"]
        entry = {
            "arch": arch,
            "budget": budget,
            "arm": arm,
            "epochs": epochs,
            "seeds": len(rows),
            "test_top1_mean": statistics.mean(tops),
            "test_top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
            "baseline": base,
            "loss_points": 100 * (base - statistics.mean(tops)),
            "params_fraction": rows[0]["params_fraction"],
            "macs_fraction": rows[0]["macs_fraction"],
        }
        uniform = groups.get((arch, budget, "uniform", epochs))
        if arm != "uniform" and uniform:
            entry["points_above_uniform"] = 100 * (
                statistics.mean(tops) - statistics.mean(r["test_top1"] for r in uniform)
            )
        out.append(entry)
    by_key = {(e["arch"], e["budget"], e["arm"], e["epochs"]): e for e in out}
    for r in results["rows"]:  # an arm that wrote another arm's model reports its figures
        twin = by_key.get((r["arch"], r["budget"], r.get("same_as"), r["epochs"]))
        if r.get("status") == "same_as" and twin and r["seed"] == 0:
            out.append({**twin, "arm": r["arm"], "same_as": r["same_as"]})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.refresh and not Path(args.out).is_file():
            raise BadInputError(f"--refresh rewrites a record: {args.out} is not one")
        run = Run(args)
        if args.refresh:
            run.save()
            print(f"wrote {run.out} ({run.results['rows_done']} rows done)")
        else:
            run.run()
    except BadInputError as error:
        print(f"long_regime: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
