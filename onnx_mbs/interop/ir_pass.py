"""onnx-mbs passes inside onnx-ir's pass infrastructure.

    import onnx_ir as ir
    from onnx_mbs import MacroblockScaling
    from onnx_mbs.interop.ir_pass import OnnxMbsPass

    manager = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling("calib/", budget="params=0.5"))])
    small = manager(ir.load("model.onnx")).model

onnx-mbs passes work on ModelProtos and never modify their input, so the
wrapper is a FunctionalPass: it serialises the ir.Model, runs the pass and
deserialises the result. `modified` is the wrapped pass's own, except on a model
it wrote itself (the conv widths it cut to, whatever passes ran between): a PassManager
with steps > 1 runs every pass again until none modifies, and MBS would cut its own
output again each step (params=0.5 over 3 steps kept 0.125). A pass that changed no
width (FixInputShapes, Normalise) runs on every model: its widths are any checkpoint's. Weights that
`ir.load` left in an external data file (torch's exporter writes one by
default), in any graph or Constant node, are read into the serialised model, whose
tensors no longer know the file's folder; the result holds its weights in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from onnx_mbs.passes import BadInputError
from onnx_mbs.passes.base import Pass
from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.integrity import check_stored_sizes, read_external_data

from . import missing

try:
    import onnx_ir as ir
except Exception as e:  # pragma: no cover - depends on the environment; a broken
    # install raises other errors than ImportError (onnx-graphsurgeon 0.5.5 under onnx 1.23)
    raise missing("onnx-ir", e) from None


class OnnxMbsPass(ir.passes.FunctionalPass):
    """Run an onnx-mbs `Pass` on an `ir.Model`; its analyses stay in `self.analyses`."""

    def __init__(self, mbs_pass: Pass) -> None:
        super().__init__()
        if not isinstance(mbs_pass, Pass):
            raise TypeError(f"OnnxMbsPass wraps an onnx_mbs Pass, not {type(mbs_pass).__name__}")
        self.mbs_pass = mbs_pass
        self.analyses: dict[str, Any] = {}
        self._written: list[tuple[int, ...]] | None = None  # conv widths of its last output

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = to_proto(model)
        if self._written is not None and conv_widths(proto) == self._written:
            return ir.passes.PassResult(ir.from_proto(proto), modified=False)  # its own output
        self.analyses = {}  # none of an earlier call's, should this one raise
        result = self.mbs_pass(proto)
        self.analyses = result.analyses
        if result.modified:  # a pass that kept every width cannot tell its output by them
            written = conv_widths(result.model)
            self._written = written if written != conv_widths(proto) else None
        return ir.passes.PassResult(ir.from_proto(result.model), modified=result.modified)

    def __repr__(self) -> str:
        return f"OnnxMbsPass({self.mbs_pass!r})"


def conv_widths(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """The shapes of the main graph's Conv and ConvTranspose weights, sorted: what a cut
    changes and renaming, cleanup or deduplicating passes do not."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sorted(
        shapes.get(n.input[1], ())
        for n in model.graph.node
        if op_id(n) in ("Conv", "ConvTranspose") and len(n.input) > 1
    )


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """`model` as a ModelProto holding every weight, external ones read from their folder
    (initializers of every graph, Constant nodes' and functions' tensors) as `reduce` reads
    a file's: references outside that folder are refused."""
    proto = ir.to_proto(model)
    folders = {t.base_dir for t in _tensors(model) if isinstance(t, ir.ExternalTensor)}
    if len(folders) > 1:
        shown = ", ".join(sorted(str(f) for f in folders))
        raise BadInputError(f"the model's external data lies in several folders ({shown})")
    if folders:
        folder = Path(next(iter(folders)))
        check_stored_sizes(proto, folder)
        read_external_data(proto, folder)
    return proto


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor `model` holds: initializers and attributes, in subgraphs and functions."""
    for graph in model.graphs():
        yield from (v.const_value for v in graph.initializers.values() if v.const_value)
    for root in [model.graph, *model.functions.values()]:
        for node in ir.traversal.RecursiveGraphIterator(root):
            for attr in node.attributes.values():
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value
