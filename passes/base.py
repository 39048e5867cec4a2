"""Pass protocol and Sequential composition, in the style of onnx-ir's passes.

A pass takes a ModelProto and returns a PassResult: the model and any analyses it
computed. The contract, which `Pass.__call__` enforces around every `call` (as onnx-ir's
`PassBase.__call__` does):

- a functional pass (`in_place = False`, every pass here) never modifies its input; when
  it changes something it returns a new model with `modified` True, and when it changes
  nothing it returns its input itself with `modified` False;
- an in-place pass (`in_place = True`) returns the model it was given, changed or not;
- `modified` True on a model equal to the input is a misreport too.

A pass that breaks it raises PassContractError naming the pass. Analysis passes return
the model unchanged and add a named analysis. Sequential threads the model through its
passes and merges the analyses, so `Sequential(FixInputShapes(...), FindMacroblocks())`
gives the fixed model and its macroblocks in one result; an analysis computed before a
later pass modified the model is dropped, never handed on stale. An error in a pass of a
Sequential names that pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import onnx

from .errors import BadInputError
from .protos import without_weights


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool = False
    analyses: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.analyses[name]


class PassContractError(RuntimeError):
    """A pass broke the pass contract (see the module docstring): a bug in that pass."""


class Pass:
    """Base class: subclasses implement `call`; calling the pass checks the contract."""

    name: str = "pass"
    in_place: bool = False  # onnx-mbs passes never modify their input

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        result = self.call(model)
        if not isinstance(result, PassResult):
            raise PassContractError(
                f"pass {self.name!r} returned {type(result).__name__}, not a PassResult"
            )
        self._check(model, result)
        return result

    def _check(self, model: onnx.ModelProto, result: PassResult) -> None:
        same = result.model is model
        if self.in_place and not same:
            raise PassContractError(f"in-place pass {self.name!r} returned another model")
        if not self.in_place and not result.modified and not same:
            raise PassContractError(
                f"pass {self.name!r} reports modified=False but returned a new model "
                "(a pass that changes nothing returns its input itself)"
            )
        if not self.in_place and result.modified and (same or equal_models(model, result.model)):
            raise PassContractError(
                f"pass {self.name!r} reports modified=True but returned "
                + ("its input itself" if same else "a model equal to its input")
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def equal_models(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two models are equal, compared without serializing either whole: the
    weightless parts first, then the initializers one at a time."""
    if len(a.graph.initializer) != len(b.graph.initializer):
        return False
    if without_weights(a) != without_weights(b):
        return False
    return all(x == y for x, y in zip(a.graph.initializer, b.graph.initializer))


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
        for k, p in enumerate(self.passes):
            step = self._run(k, p, result.model)
            # analyses of the model before this step describe a model that is gone
            earlier = {} if step.modified else result.analyses
            result = PassResult(
                step.model, result.modified or step.modified, {**earlier, **step.analyses}
            )
        return result

    def _run(self, k: int, p: Pass, model: onnx.ModelProto) -> PassResult:
        """Pass `p` (number `k`) on `model`; an error it raises names it."""
        where = f"pass {k + 1} of {len(self.passes)} ({p.name!r})"
        try:
            return p(model)
        except PassContractError as error:
            raise PassContractError(f"{where}: {error}") from None
        except BadInputError as error:  # its own type: QuantizedModelError stays one
            raise type(error)(f"{where}: {error}") from None
        except Exception as error:
            if hasattr(error, "add_note"):  # Python 3.11: the message itself stays as it was
                error.add_note(f"raised by {where} of {self!r}")
            raise

    def __repr__(self) -> str:
        return f"Sequential({', '.join(map(repr, self.passes))})"
