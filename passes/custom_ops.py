"""Custom ops: default-domain ops without an ONNX schema (TensorRT plugins) hidden in a
custom domain while the checker and shape inference look, and put back after.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from .domains import is_default

OPAQUE_DOMAIN = "onnx_mbs.opaque"


def is_unknown_op(node: onnx.NodeProto) -> bool:
    """A default-domain op without an ONNX schema (a TensorRT plugin such as
    EfficientNMS_TRT): opaque, kept as it is and never followed."""
    return is_default(node.domain) and not onnx.defs.has(node.op_type)


def uninferable_outputs(model: onnx.ModelProto) -> set[str]:
    """The tensors of `model`'s graph that shape inference cannot size: the outputs of ops
    without an ONNX schema (plugins, custom domains) that are no function of the model's
    own. Only the shapes the model records size them, and what follows them."""
    functions = {(f.domain, f.name) for f in model.functions}
    return {
        name
        for node in model.graph.node
        if (node.domain, node.op_type) not in functions
        and (
            is_unknown_op(node)
            if is_default(node.domain)
            else not onnx.defs.has(node.op_type, node.domain)
        )
        for name in node.output
        if name
    }


def hide_unknown_ops(
    model: onnx.ModelProto, hidden: Callable[[onnx.NodeProto], bool] = is_unknown_op
) -> tuple[onnx.ModelProto, list[int]]:
    """`model` with its unknown default-domain ops (those `hidden` says) moved to
    OPAQUE_DOMAIN (the checker and shape inference treat custom domains as opaque), and
    where they are. A model some of whose nodes are hidden already may hide more."""
    where = [k for k, n in enumerate(model.graph.node) if hidden(n)]
    if not where:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k in where:
        out.graph.node[k].domain = OPAQUE_DOMAIN
    if all(o.domain != OPAQUE_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(OPAQUE_DOMAIN, 1))
    return out, where


def restore_unknown_ops(model: onnx.ModelProto, where: list[int]) -> onnx.ModelProto:
    if not where:
        return model
    for k in where:
        model.graph.node[k].domain = ""
    kept = [o for o in model.opset_import if o.domain != OPAQUE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
