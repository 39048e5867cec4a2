"""Where each Conv's "activation ratio" is measured.

rho_k is the fraction of outputs > 0 of the first activation reached from
layer k's output through channel-preserving ops and channel-axis Concats, over the
channels layer k makes (docs/design.md). This module finds
that tensor; onnx_mbs.stats measures it with onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from .analysis import ConvLayer, ModelAnalysis
from .domains import FUSED_CONV, op_id
from .graph import GraphIndex, attributes
from .load import indexed

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
    "Sum",  # Add of several inputs (a residual join written as Sum)
    "Sub",
    "Mul",
    "Div",
    "Identity",
    "Cast",  # precision changes: onnxruntime's fp16 conversion around float32 ops
    "Dropout",
    "InstanceNormalization",
}


@dataclass(frozen=True)
class Site:
    """Where a conv's activation is read: the tensor, and the first of its channels along the
    channel axis that the conv makes (past 0 when a Concat joined it after others: DenseNet)."""

    tensor: str
    channel: int = 0


def activation_tensors(
    model: onnx.ModelProto, analysis: ModelAnalysis, index: GraphIndex | None = None
) -> dict[str, str | None]:
    """Map each conv layer to the output of the first activation after it (None if none).

    Walks breadth-first through channel-preserving ops; SiLU exported as
    Sigmoid*Mul counts as the Sigmoid's Mul output, since that is the activation's value.
    `index` is `GraphIndex.build(model)` if the caller has it.
    """
    return site_tensors(activation_sites(model, analysis, index))


def site_tensors(sites: Mapping[str, Site | None]) -> dict[str, str | None]:
    """conv -> the tensor of its Site (None where it has none)."""
    return {layer: None if site is None else site.tensor for layer, site in sites.items()}


def activation_sites(
    model: onnx.ModelProto, analysis: ModelAnalysis, index: GraphIndex | None = None
) -> dict[str, Site | None]:
    """`activation_tensors` with where in each tensor the conv's channels lie: a Concat along
    the channel axis is walked through too (DenseNet's growth convs reach their activation
    after one), its earlier inputs' channels counted before the conv's."""
    model, index = indexed(model, index)
    analysis.check_model(model)
    return {
        layer.name: Site(layer.output)
        if _fused(index, layer)
        else _first_activation(index, layer.output)
        for layer in analysis.layers
    }


def _fused(index: GraphIndex, layer: ConvLayer) -> bool:
    """A FusedConv whose activation is fused: its output is the activation's."""
    node = index.producer.get(layer.output)
    return layer.op_type == FUSED_CONV and bool(attributes(node).get("activation"))


def _first_activation(index: GraphIndex, start: str) -> Site | None:
    frontier, seen = [(start, 0)], {start}
    rank = len(index.shapes.get(start, ()))  # 3 for Conv1d, 4 for Conv2d, 5 for Conv3d
    while frontier:
        tensor, channel = frontier.pop(0)
        for node in index.consumers.get(tensor, []):
            if op_id(node) in ACTIVATION_OPS or _clamps_below(index, node, tensor):
                return Site(_silu_output(index, node, tensor), channel)
            at = channel
            if op_id(node) == "Concat":
                before = _channels_before(index, node, tensor, rank)
                if before is None:
                    continue
                at += before
                out = node.output[0]
            elif op_id(node) in CHANNEL_PRESERVING_OPS:
                out = node.output[0]
            else:
                out = _through_groupnorm(index, node, tensor)
            if out and out not in seen and len(index.shapes.get(out, ())) == rank:
                seen.add(out)
                frontier.append((out, at))
    return None


def _clamps_below(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """Max(x, c) with one constant c: Relu (c = 0) or Clip(x, c) as TensorFlow exporters
    and hand-written graphs write it (`tf.maximum(x, 0)`)."""
    if op_id(node) != "Max" or len(node.input) != 2 or tensor not in node.input:
        return False
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    bound = index.constant(other)
    return bound is not None and bound.size == 1


def _through_groupnorm(index: GraphIndex, node: onnx.NodeProto, source: str) -> str | None:
    """GroupNorm as torch exports it, Reshape -> InstanceNormalization -> Reshape back to
    the shape it came from, keeps every value where it was: the Reshape back's output
    (None for any other Reshape)."""
    shape = index.shapes.get(source)
    if op_id(node) != "Reshape" or node.input[0] != source or shape is None:
        return None
    for norm in index.consumers.get(node.output[0], []):
        if op_id(norm) != "InstanceNormalization" or norm.input[0] != node.output[0]:
            continue
        for back in index.consumers.get(norm.output[0], []):
            if op_id(back) == "Reshape" and index.shapes.get(back.output[0]) == shape:
                return back.output[0]
    return None


def _channels_before(index: GraphIndex, node: onnx.NodeProto, tensor: str, rank: int) -> int | None:
    """The channels a channel-axis Concat puts before `tensor`'s (None: another axis, or
    an input whose channel count is unknown)."""
    axis = int(attributes(node).get("axis", 1))
    if not rank or axis % rank != 1:  # rank 0: the shapes are not known
        return None
    channels = []
    for name in node.input[: list(node.input).index(tensor)]:
        shape = index.shapes.get(name)
        if not shape or len(shape) != rank or not isinstance(shape[1], int) or shape[1] < 1:
            return None
        channels.append(shape[1])
    return sum(channels)


def _silu_output(index: GraphIndex, node: onnx.NodeProto, source: str) -> str:
    """x * sigmoid(x) is one activation: measure the product, not the sigmoid."""
    if op_id(node) == "Sigmoid":
        for mul in index.consumers.get(node.output[0], []):
            if op_id(mul) == "Mul" and source in mul.input:
                return mul.output[0]
    return node.output[0]
