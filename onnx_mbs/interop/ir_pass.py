"""onnx-mbs passes inside onnx-ir's pass infrastructure.

    import onnx_ir as ir
    from onnx_mbs import MacroblockScaling
    from onnx_mbs.interop.ir_pass import OnnxMbsPass

    manager = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling("calib/", budget="params=0.5"))])
    small = manager(ir.load("model.onnx")).model

onnx-mbs passes work on ModelProtos and never modify their input, so the
wrapper is a FunctionalPass: it serialises the ir.Model, runs the pass and
deserialises the result. `modified` is the wrapped pass's own. Weights that
`ir.load` left in an external data file (torch's exporter writes one by
default) are read into the serialised model, whose tensors no longer know the
file's folder; the result holds its weights in memory.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx.external_data_helper import load_external_data_for_tensor

from onnx_mbs.passes.base import Pass

from . import missing

try:
    import onnx_ir as ir
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing("onnx-ir", e) from None


class OnnxMbsPass(ir.passes.FunctionalPass):
    """Run an onnx-mbs `Pass` on an `ir.Model`; its analyses stay in `self.analyses`."""

    def __init__(self, mbs_pass: Pass) -> None:
        super().__init__()
        if not isinstance(mbs_pass, Pass):
            raise TypeError(f"OnnxMbsPass wraps an onnx_mbs Pass, not {type(mbs_pass).__name__}")
        self.mbs_pass = mbs_pass
        self.analyses: dict[str, Any] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.mbs_pass(to_proto(model))
        self.analyses = result.analyses
        return ir.passes.PassResult(ir.from_proto(result.model), modified=result.modified)

    def __repr__(self) -> str:
        return f"OnnxMbsPass({self.mbs_pass!r})"


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """`model` as a ModelProto holding every weight, external ones read from their files."""
    proto = ir.to_proto(model)
    folders = {
        name: value.const_value.base_dir
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in folders:
            load_external_data_for_tensor(tensor, folders[tensor.name])
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto
