"""Where each Conv's "activation ratio" is measured.

rho_k is the fraction of outputs > 0 of the first activation reached from
layer k's output through channel-preserving ops (docs/design.md). This module finds
that tensor; onnx_mbs.stats measures it with onnxruntime.
"""

from __future__ import annotations

import onnx

from .analysis import ModelAnalysis
from .graph import GraphIndex

ACTIVATION_OPS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Gelu",
    "Mish",
}
# Ops that keep each channel where it is and do not activate: walked through.
CHANNEL_PRESERVING_OPS = {
    "BatchNormalization",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Identity",
    "Cast",  # precision changes: onnxruntime's fp16 conversion around float32 ops
    "Dropout",
    "InstanceNormalization",
}


def activation_tensors(
    model: onnx.ModelProto, analysis: ModelAnalysis, index: GraphIndex | None = None
) -> dict[str, str | None]:
    """Map each conv layer to the output of the first activation after it (None if none).

    Walks breadth-first through channel-preserving ops; SiLU exported as
    Sigmoid*Mul counts as the Sigmoid's Mul output, since that is the activation's value.
    `index` is `GraphIndex.build(model)` if the caller has it.
    """
    index = GraphIndex.of(model, index)
    found: dict[str, str | None] = {}
    for layer in analysis.layers:
        found[layer.name] = _first_activation(index, layer.output)
    return found


def _first_activation(index: GraphIndex, start: str) -> str | None:
    frontier, seen = [start], {start}
    rank = len(index.shapes.get(start, ()))  # 3 for Conv1d, 4 for Conv2d, 5 for Conv3d
    while frontier:
        tensor = frontier.pop(0)
        for node in index.consumers.get(tensor, []):
            if node.op_type in ACTIVATION_OPS:
                return _silu_output(index, node, tensor)
            out = node.output[0] if node.op_type in CHANNEL_PRESERVING_OPS else None
            out = out or _through_groupnorm(index, node, tensor)
            if out and out not in seen and len(index.shapes.get(out, ())) == rank:
                seen.add(out)
                frontier.append(out)
    return None


def _through_groupnorm(index: GraphIndex, node: onnx.NodeProto, source: str) -> str | None:
    """GroupNorm as torch exports it, Reshape -> InstanceNormalization -> Reshape back to
    the shape it came from, keeps every value where it was: the Reshape back's output
    (None for any other Reshape)."""
    shape = index.shapes.get(source)
    if node.op_type != "Reshape" or node.input[0] != source or shape is None:
        return None
    for norm in index.consumers.get(node.output[0], []):
        if norm.op_type != "InstanceNormalization" or norm.input[0] != node.output[0]:
            continue
        for back in index.consumers.get(norm.output[0], []):
            if back.op_type == "Reshape" and index.shapes.get(back.output[0]) == shape:
                return back.output[0]
    return None


def _silu_output(index: GraphIndex, node: onnx.NodeProto, source: str) -> str:
    """x * sigmoid(x) is one activation: measure the product, not the sigmoid."""
    if node.op_type == "Sigmoid":
        for mul in index.consumers.get(node.output[0], []):
            if mul.op_type == "Mul" and source in mul.input:
                return mul.output[0]
    return node.output[0]
