"""How should a MACs budget be split between a residual stream and its branches? (issue 28)

At a MACs budget a ResNet block costs (stream width) x (branch width): every split of the
product meets the budget alike, and mbs-cost's ranking cannot tell them apart (see
docs/strategies.md). This probe keeps every joined group (a residual stream) at fraction A of
its channels, solves one common fraction for the other free groups so that the MACs meet the
budget (then grows them one channel at a time while the budget allows), keeps each group's
top channels by the importance `reduce` uses, and retrains with bench/experiment.py's recipe,
reading top-1 on a validation split (the last 5,000 train images, never trained on), one
seed. It is how mbs-branch (streams cut last: A = 1 while the branches can give the budget)
was found; it tunes nothing in the code.

    python bench/stream_split.py --arch resnet20 --budget flops=0.3 --fractions 0.7 0.8 0.9 1.0
    python bench/stream_split.py --collect      # bench/results/stream_split.json from the runs

Each fraction is one `experiment.py` run (arm `uniform`, whose plan this replaces) written to
bench/results/tmp/stream_split/ARCH_BUDGET_aA.json; the split plan's own line starts "SPLIT".
The arms uniform, global and mbs-branch run beside them, unpatched, on the same split
(ARCH_BUDGET_arms.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "results" / "tmp" / "stream_split"
OUT = HERE / "results" / "stream_split.json"
RECIPE = ["--seeds", "1", "--train-images", "4000", "--validation", "5000", "--threads", "1"]


def split_planner(stream_fraction: float):
    """onnx_mbs.pipeline's plan_widths and Planner.build, patched so that the uniform
    strategy plans the split: streams at `stream_fraction`, the rest solved to the budget."""
    import onnx_mbs.pipeline as pipeline
    from onnx_mbs.plan import round_channels

    real_plan = pipeline.plan_widths

    def plan_widths(analysis, groups, rho, cost, **options):
        plan = real_plan(analysis, groups, rho, cost, **options)
        ((metric, fraction),) = options["budget"].limits
        if metric != "flops":
            raise SystemExit("stream_split: a flops=F budget only")
        full = {g.id: g.size for g in groups}
        params_before, macs_before = cost(full)
        free = [g for g in groups if g.free]

        def counts(branch: float) -> dict[int, int]:
            kept = dict(full)
            for g in free:
                kept[g.id] = round_channels(g.size, stream_fraction if g.joined else branch, 1)
            return kept

        lo, hi = 0.02, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(counts(mid))[1] / macs_before <= fraction else (lo, mid)
        kept = counts(lo)
        grown = True
        while grown:  # round_channels rounds up: land on the budget one channel at a time
            grown = False
            for g in sorted((g for g in free if not g.joined), key=lambda g: kept[g.id] / g.size):
                more = {**kept, g.id: kept[g.id] + 1}
                if kept[g.id] < g.size and cost(more)[1] / macs_before <= fraction:
                    kept, grown = more, True
                    break
        params, macs = cost(kept)
        print(
            f"SPLIT a={stream_fraction} b={lo:.3f} streams={sum(g.joined for g in free)} "
            f"macs {macs / macs_before:.3f} params {params / params_before:.3f}",
            flush=True,
        )
        return dataclasses.replace(
            plan, counts=kept, params=(params_before, params), macs=(macs_before, macs)
        )

    pipeline.plan_widths = plan_widths


def run_one(arch: str, budget: str, fraction: float) -> int:
    split_planner(fraction)
    sys.path.insert(0, str(HERE))
    import experiment

    out = RUNS / f"{arch}_{budget}_a{fraction:g}.json"
    args = ["--archs", arch, "--budgets", budget, "--arms", "uniform", *RECIPE, "--out", str(out)]
    return experiment.main(args)


def collect() -> dict:
    rows = []
    for path in sorted(RUNS.glob("*.json")):
        results = json.loads(path.read_text())
        arch, budget, tag = path.stem.rsplit("_", 2)
        for cell in results["cells"]:
            split = tag != "arms"
            rows.append(
                {
                    "arch": arch,
                    "budget": budget,
                    "arm": "split" if split else cell["arm"],
                    "stream_fraction": float(tag[1:]) if split else None,
                    "params_fraction": cell.get("params_fraction"),
                    "macs_fraction": cell.get("macs_fraction"),
                    "status": cell["status"],
                    "reason": cell.get("reason"),
                    "validation_top1": cell["after"]["mean"] if cell.get("after") else None,
                    "command": results["command"],
                }
            )
    return {"recipe": RECIPE, "split": "validation: the last 5,000 train images", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--budget", default="flops=0.3")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.7, 0.8, 0.9, 1.0])
    p.add_argument("--collect", action="store_true", help=f"write {OUT.name} from the runs")
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)  # a child process's fraction
    args = p.parse_args(argv)
    if args.collect:
        OUT.write_text(json.dumps(collect(), indent=1) + "\n")
        print(f"wrote {OUT}")
        return 0
    if args.one is not None:
        return run_one(args.arch, args.budget, args.one)
    RUNS.mkdir(parents=True, exist_ok=True)
    arms = RUNS / f"{args.arch}_{args.budget}_arms.json"
    plain = [HERE / "experiment.py", "--archs", args.arch, "--budgets", args.budget]
    commands = [[*plain, "--arms", "uniform", "global", "mbs-branch", *RECIPE, "--out", arms]]
    for fraction in args.fractions:  # one process each: the patch stays in its own process
        split = [__file__, "--arch", args.arch, "--budget", args.budget, "--one", fraction]
        commands.append(split)
    for command in commands:
        code = subprocess.call([sys.executable, *map(str, command)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
