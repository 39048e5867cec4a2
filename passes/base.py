"""Pass protocol and Sequential composition, in the style of onnx-ir's passes.

A pass takes a ModelProto and returns a PassResult: the model and any analyses
it computed. The contract every pass here keeps (`in_place = False`): the input
is never modified; a transform that changes something returns a new model with
`modified` True, and one that changes nothing returns its input itself with
`modified` False; analysis passes return the model unchanged and add a named
analysis. Sequential threads the model through its passes and merges the
analyses, so `Sequential(FixInputShapes(...), FindMacroblocks())(model)` gives
the fixed model and its macroblocks in one result; an analysis computed before
a later pass modified the model is dropped, never handed on stale.
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
    in_place: bool = False  # onnx-mbs passes never modify their input

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
            # analyses of the model before this step describe a model that is gone
            earlier = {} if step.modified else result.analyses
            result = PassResult(
                step.model, result.modified or step.modified, {**earlier, **step.analyses}
            )
        return result

    def __repr__(self) -> str:
        return f"Sequential({', '.join(map(repr, self.passes))})"
