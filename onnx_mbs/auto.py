"""`--strategy auto`: the strategy each budget metric gets, from what the experiment measured.

The table below is generated from the experiment's results by
`python bench/experiment.py --auto-table` (tests/test_experiment.py checks it still
matches them): per metric, the strategy whose retrained models were the most accurate on
average over that metric's budgets and the baselines where every arm has every seed at
every one of them. Results that settle a metric on every baseline outrank newer ones that
settle it on some; a metric only partial results measure is read from them, and its why
says which baselines are still running. A metric no experiment measured follows the
nearest one measured, and says so. An explicit `--strategy` always wins over this table.
"""

from __future__ import annotations

from onnx_mbs.plan import Budget

# metric -> (strategy, why). Generated: do not edit by hand.
AUTO = {
    "params": (
        "mbs-branch",
        "at params budgets mbs-branch was the most accurate after retraining: mean top-1 "
        "0.8793 (mbs-branch) against 0.8740 (mbs), 0.8560 (mbs-cost), 0.8618 (uniform), "
        "0.8436 (global); resnet20, resnet56 at params=0.5, params=0.3, "
        "bench/results/experiment.json",
    ),
    "flops": (
        "mbs-branch",
        "at flops budgets mbs-branch was the most accurate after retraining: mean top-1 "
        "0.8759 (mbs-branch) against 0.7098 (mbs), 0.8554 (mbs-cost), 0.8597 (uniform), "
        "0.8541 (global); resnet20, resnet56 at flops=0.5, flops=0.3, "
        "bench/results/experiment.json",
    ),
    "latency": (
        "global",
        "at latency budgets global was the most accurate after retraining: mean top-1 "
        "0.8113 (global) against 0.5744 (mbs), 0.8099 (mbs-cost), 0.8100 (mbs-branch), "
        "0.7566 (uniform); resnet20, resnet56 at latency=0.6, "
        "bench/results/experiment.json",
    ),
}


def choose_strategy(budget: Budget | None) -> tuple[str, str]:
    """(strategy, why) for `budget`. Without one MBS runs (the paper's own widths, which the
    other strategies are matched to). With several metrics, the first that is not `params`
    decides: compute budgets are where the strategies differ most."""
    if budget is None:
        return "mbs", "auto: no budget, so MBS's own widths (the paper's method)"
    metrics = [m for m, _ in budget.limits]
    metric = next((m for m in metrics if m != "params"), metrics[0])
    strategy, why = AUTO[metric]
    also = f" (of {', '.join(metrics)}, {metric} decides)" if len(metrics) > 1 else ""
    return strategy, f"auto{also}: {why}"
