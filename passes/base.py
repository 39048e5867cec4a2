"""Pass protocol and Sequential composition, in the style of onnx-ir's passes.

A pass takes a ModelProto and returns a PassResult: the (possibly new) model
and any analyses it computed. Transform passes return a new model and never
modify their input; analysis passes return the model unchanged and add a named
analysis. Sequential threads the model through its passes and merges the
analyses, so `Sequential(FixInputShapes(...), FindMacroblocks())(model)` gives
the fixed model and its macroblocks in one result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool = False
    analyses: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.analyses[name]


class Pass:
    """Base class: subclasses implement `call`."""

    name: str = "pass"

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.call(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Pass):
    """Run passes in order; later passes see the model the earlier ones produced."""

    name = "sequential"

    def __init__(self, *passes: Pass | Iterable[Pass]) -> None:
        flat: list[Pass] = []
        for p in passes:
            flat.extend([p] if isinstance(p, Pass) else p)
        self.passes = flat

    def call(self, model: onnx.ModelProto) -> PassResult:
        result = PassResult(model)
        for p in self.passes:
            step = p(result.model)
            result = PassResult(
                step.model,
                result.modified or step.modified,
                {**result.analyses, **step.analyses},
            )
        return result

    def __repr__(self) -> str:
        return f"Sequential({', '.join(map(repr, self.passes))})"
