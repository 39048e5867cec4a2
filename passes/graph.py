"""A read-only index over an ONNX graph: producers, consumers, shapes, constants.

Analyses need three questions answered fast on graphs with thousands of nodes
(who makes this tensor, who reads it, what shape is it); one pass over the
ModelProto builds the maps, so every later query is a dict lookup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass
class GraphIndex:
    nodes: list[onnx.NodeProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    shapes: dict[str, tuple[int, ...]]
    initializers: dict[str, onnx.TensorProto]
    graph_inputs: list[str]
    graph_outputs: list[str]

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        graph = model.graph
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    producer[name] = node
            for name in node.input:
                if name:
                    consumers.setdefault(name, []).append(node)
        shapes: dict[str, tuple[int, ...]] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            shape = static_shape(vi)
            if shape is not None:
                shapes[vi.name] = shape
        initializers = {t.name: t for t in graph.initializer}
        for t in graph.initializer:
            shapes[t.name] = tuple(t.dims)
        inits = set(initializers)
        return cls(
            nodes=list(graph.node),
            producer=producer,
            consumers=consumers,
            shapes=shapes,
            initializers=initializers,
            graph_inputs=[i.name for i in graph.input if i.name not in inits],
            graph_outputs=[o.name for o in graph.output],
        )

    def source_initializer(self, name: str) -> str | None:
        """The initializer behind `name`, looking through Identity nodes (exporters share
        equal tensors that way)."""
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, or Identity of one)."""
        source = self.source_initializer(name)
        if source is not None:
            return numpy_helper.to_array(self.initializers[source])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None


def structure_key(model: onnx.ModelProto) -> str:
    """A digest of what structural analyses read: nodes, recorded types and shapes,
    initializer names, types and dims; not weight values, which they never read (a
    model retrained in place keeps its key)."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in [*graph.node, *graph.input, *graph.value_info, *graph.output]:
        digest.update(part.SerializeToString())
    for t in graph.initializer:
        digest.update(f"{t.name}:{t.data_type}:{list(t.dims)};".encode())
    return digest.hexdigest()


def static_shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known integer, else None."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def attributes(node: onnx.NodeProto) -> dict:
    """Node attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of all float weight initializers: the parameter count DESIGN.md budgets against.

    BatchNorm running mean and variance are statistics, not parameters, and are
    not counted, so a training-form export counts like torch's `parameters()`.
    """
    statistics = {
        name
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        for name in node.input[3:5]
    }
    return sum(
        int(np.prod(t.dims, dtype=np.int64))
        for t in model.graph.initializer
        if t.data_type in FLOAT_TYPES and t.name not in statistics
    )
