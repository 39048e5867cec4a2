"""What each strategy keeps under a combined budget (params=F,flops=G): planning only.

Both limits must be met and the model should be as large as they allow: the limit that binds
lands on its fraction, the other keeps its room (docs/strategies.md, "Combined budgets").
Per model, strategy and budget this prints and records the params and MACs fractions the
plan reaches, which limits bind and what the cost-aware strategies priced by. The bundled
ResNet-20 is read with its 512 sample images; torchvision's MobileNetV2 and ResNet-18
(random weights, seed 0, 224x224, exported to bench/results/tmp/) without data, so their
channels are ranked by weight norms.

    python bench/combined_budgets.py            # bench/results/combined_budgets.json
    python bench/combined_budgets.py --models resnet20 --budgets params=0.6,flops=0.6
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "combined_budgets.json"
EXPORTS = HERE / "results" / "tmp" / "combined_budgets"
MODELS = ("resnet20", "mobilenet_v2", "resnet18")
BUDGETS = (
    "params=0.6,flops=0.6",
    "params=0.5,flops=0.7",
    "params=0.7,flops=0.5",
    "params=0.3,flops=0.6",
    "params=0.8,flops=0.4",
)
STRATEGIES = ("mbs", "mbs-cost", "mbs-branch", "auto")


def model_and_data(name: str) -> tuple[str, str | None]:
    """The model's path (torchvision's exported on first use) and its data, if any."""
    from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE

    if name == "resnet20":
        return str(BUNDLED_MODEL), str(FMNIST_SAMPLE)
    path = EXPORTS / f"{name}.onnx"
    if not path.exists():
        import torch

        from onnx_mbs.models.torchvision_cpu import import_torchvision

        torch.manual_seed(0)
        model = getattr(import_torchvision().models, name)().eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), dynamo=False)
    return str(path), None


def planner_for(path: str, data: str | None):
    """What `reduce` gathers before planning (onnx_mbs.pipeline.reduce's first steps)."""
    from onnx_mbs import pipeline
    from onnx_mbs.options import ReduceOptions
    from onnx_mbs.passes import GraphIndex

    options = ReduceOptions.of(budget="params=0.5", progress=False).checked(data is not None)
    providers = pipeline.runtime_providers(options, has_data=data is not None)
    loaded = pipeline.load(pipeline.as_model(path), options.input_shapes)
    held = pipeline.HeldModel(loaded.model)
    source = pipeline.fit_data(data, held.model, options)
    analysed, _ = pipeline.analyse(held.model, options.receptive_field, loaded.origin)
    form, measured = pipeline.measure(held, loaded.origin, analysed, source, providers, options)
    index = GraphIndex.build(form)
    return pipeline.Planner.build(
        form, index, loaded.origin, analysed, measured, providers, options
    ), (data is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--budgets", nargs="+", default=BUDGETS)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    from onnx_mbs.options import ReduceOptions

    rows = []
    print("| model | budget | strategy | params | flops | binds | priced by | plan s |")
    print("|---|---|---|---:|---:|---|---|---:|")
    for name in args.models:
        planner, has_data = planner_for(*model_and_data(name))
        for budget in args.budgets:
            for strategy in args.strategies:
                options = ReduceOptions.of(planner.options, budget=budget, strategy=strategy)
                options = options.checked(has_data)
                start = time.perf_counter()
                plan = replace(planner, options=options).plan(options.budget)
                row = {
                    "model": name,
                    "budget": budget,
                    "strategy": strategy,
                    "ran": plan.strategy,
                    "params": round(plan.reached["params"], 4),
                    "flops": round(plan.reached["flops"], 4),
                    "binding": list(plan.binding),
                    "priced": plan.price_text,
                    "plan_s": round(time.perf_counter() - start, 3),
                }
                rows.append(row)
                ran = strategy if strategy == plan.strategy else f"auto ({plan.strategy})"
                print(
                    f"| {name} | {budget} | {ran} | {row['params']:.3f} | {row['flops']:.3f} | "
                    f"{', '.join(row['binding'])} | {row['priced'] or '-'} | {row['plan_s']} |"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
