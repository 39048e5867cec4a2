"""Custom ops: default-domain ops without an ONNX schema (TensorRT plugins) hidden in a
custom domain while the checker and shape inference look, and put back after.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from .domains import FUSED, is_default, op_id

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
        and op_id(node) not in FUSED  # sized as the op it fuses (`as_fused_ops`)
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


def as_fused_ops(model: onnx.ModelProto) -> list[tuple[int, onnx.NodeProto]]:
    """onnxruntime's FusedConv and FusedGemm nodes of `model` (in place: a weightless copy)
    made the ONNX op they fuse (`FUSED`), their inputs read as that op reads them, so that
    shape inference sizes their output (that op's: the activation is elementwise, and the
    residual Z a FusedConv adds has its shape); where they are and what they were, for
    `restore_fused_ops`."""
    fused = []
    for k, node in enumerate(model.graph.node):
        if op_id(node) not in FUSED:
            continue
        fused.append((k, onnx.NodeProto.FromString(node.SerializeToString())))
        node.domain, node.op_type = "", FUSED[op_id(node)]
        del node.input[3:]  # FusedConv's Z
        kept = [a for a in node.attribute if not a.name.startswith("activation")]
        del node.attribute[:]
        node.attribute.extend(kept)
    return fused


def restore_fused_ops(model: onnx.ModelProto, fused: list[tuple[int, onnx.NodeProto]]) -> None:
    """Put back, in place, the nodes `as_fused_ops` made ONNX ops."""
    for k, node in fused:
        model.graph.node[k].CopyFrom(node)
