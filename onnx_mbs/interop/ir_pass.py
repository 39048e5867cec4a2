"""onnx-mbs passes inside onnx-ir's pass infrastructure.

    import onnx_ir as ir
    from onnx_mbs import MacroblockScaling
    from onnx_mbs.interop.ir_pass import OnnxMbsPass

    manager = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling("calib/", budget="params=0.5"))])
    small = manager(ir.load("model.onnx")).model

onnx-mbs passes work on ModelProtos and never modify their input, so the
wrapper is a FunctionalPass: it serialises the ir.Model, runs the pass and
deserialises the result. `modified` is the wrapped pass's own.
"""

from __future__ import annotations

from typing import Any

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
        result = self.mbs_pass(ir.to_proto(model))
        self.analyses = result.analyses
        return ir.passes.PassResult(ir.from_proto(result.model), modified=result.modified)

    def __repr__(self) -> str:
        return f"OnnxMbsPass({self.mbs_pass!r})"
