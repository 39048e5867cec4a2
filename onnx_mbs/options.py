"""`ReduceOptions`: every setting of a reduction, in one typed value.

The command line builds one from its flags, `reduce` and the `MacroblockScaling` pass
take one (or the same names as keywords), and the interop loaders hand theirs on: one
place for each setting's name, default and check.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from onnx_mbs.auto import choose_strategy
from onnx_mbs.passes import (
    CRITERIA,
    DEFAULT_CRITERION,
    DEFAULT_RECEPTIVE_FIELD,
    BadInputError,
    Importance,
    ImportanceFactory,
    check_reading,
    option,
)
from onnx_mbs.plan import STRATEGIES, Budget, WidthMap


def most_threads() -> int:
    """The largest `latency_threads`: one per core. More only time the written model against
    threads that wait for a core (100000 had onnxruntime start as many, for minutes)."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ReduceOptions:
    """How to reduce a model (see `onnx_mbs.reduce` and `onnx-mbs reduce --help`)."""

    budget: Budget | str | None = None
    width_map: WidthMap | str | None = None  # None: the strategy's default (plan.py)
    receptive_field: str = DEFAULT_RECEPTIVE_FIELD
    strategy: str = "auto"
    providers: str = "auto"
    input_shapes: Mapping[str, Sequence[int]] | None = None
    channel_multiple: int | str = 8
    beta_min: float = 0.1
    # a registered name (CRITERIA), act, auto, an Importance built for the loaded model
    # (`load_model` of the same input), or a factory building one (model, index)
    importance: str | Importance | ImportanceFactory = "auto"
    mean: Any = None
    std: Any = None
    limit: int | None = None
    batch_size: int = 64
    latency_threads: int = 0
    evaluate_accuracy: bool = True
    # the output top-1 reads where several are (batch, classes); "none": the model has none
    logits: str | None = None
    progress: bool = True
    strategy_reason: str = ""  # why `strategy` runs: set by checked() (auto's choice, or asked)

    @classmethod
    def of(cls, options: ReduceOptions | None = None, **overrides: Any) -> ReduceOptions:
        """`options` (default: the defaults) with `overrides` by name; an unknown name is a
        TypeError, as for any keyword argument."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown reduce option(s): {', '.join(sorted(unknown))}")
        return replace(options or cls(), **overrides)

    def checked(self, has_data: bool) -> ReduceOptions:
        """These options parsed and checked, `importance="auto"` resolved (act with data:
        it ranks best in bench/importance.py; else DEFAULT_CRITERION); a BadInputError
        names the first that cannot be used. (act without data is refused once the model
        is read: `fit_data`.)"""
        if self.budget is not None and not isinstance(self.budget, (str, Budget)):
            raise BadInputError(
                f"{option('--budget')}: a spec such as 'params=0.5' or a Budget, "
                f"not {self.budget!r}"
            )
        budget = Budget.parse(self.budget) if isinstance(self.budget, str) else self.budget
        if self.limit is not None and not has_data:
            raise BadInputError(
                f"{option('--limit')} takes N samples of {option('--data')}; without data it "
                f"would be ignored: drop it or give {option('--data')}"
            )
        if isinstance(self.beta_min, bool) or not isinstance(self.beta_min, numbers.Real):
            # the range is plan_widths' check; text would fail it with a TypeError
            raise BadInputError(
                f"{option('--beta-min')} must be a number in (0, 1], got {self.beta_min!r}"
            )
        width_map = None if self.width_map is None else WidthMap.parse(self.width_map)
        check_reading(self.receptive_field)
        threads = self.latency_threads
        if type(threads) is not int or not 0 <= threads <= most_threads():
            raise BadInputError(
                f"{option('--latency-threads')} must be a whole number in [0, {most_threads()}] "
                f"(0: one per core, at most this machine's {most_threads()} cores), got {threads!r}"
            )
        if self.strategy == "auto":
            strategy, reason = choose_strategy(budget)
        elif self.strategy in STRATEGIES:
            strategy, reason = self.strategy, f"asked with {option('--strategy', self.strategy)}"
        else:
            raise BadInputError(
                f"unknown {option('--strategy')} {self.strategy!r}: use auto, "
                f"{', '.join(STRATEGIES)}"
            )
        importance = self.importance
        if isinstance(importance, str):
            if importance not in (*CRITERIA, "act", "auto"):
                raise BadInputError(
                    f"unknown {option('--importance')} {importance!r}: use auto, act or one of "
                    f"{', '.join(CRITERIA)}"
                )
            if importance == "auto":
                importance = "act" if has_data else DEFAULT_CRITERION
        return replace(
            self,
            budget=budget,
            width_map=width_map,
            strategy=strategy,
            strategy_reason=reason,
            importance=importance,
        )

    @property
    def plans_latency(self) -> bool:
        """A `latency=` budget: planned with measured conv times, checked on the written model."""
        return isinstance(self.budget, Budget) and "latency" in self.budget.fractions
