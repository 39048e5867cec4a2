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
# Ops that keep each channel where it is and do not activate: walked through. Local pools
# too: in `relu(max_pool2d(conv(x)))` the Relu after the pool is the conv's activation.
CHANNEL_PRESERVING_OPS = {
    "MaxPool",
    "AveragePool",
    "LpPool",
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
            if node.op_type in CHANNEL_PRESERVING_OPS:
                out = node.output[0]
                if out not in seen and len(index.shapes.get(out, ())) == rank:
                    seen.add(out)
                    frontier.append(out)
    return None


def _silu_output(index: GraphIndex, node: onnx.NodeProto, source: str) -> str:
    """x * sigmoid(x) is one activation: measure the product, not the sigmoid."""
    if node.op_type == "Sigmoid":
        for mul in index.consumers.get(node.output[0], []):
            if mul.op_type == "Mul" and source in mul.input:
                return mul.output[0]
    return node.output[0]
