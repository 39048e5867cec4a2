"""Normalise: one graph form for every exporter's model.

Exporters write the same CNN in many ways: weights as initializers or as
Constant nodes (Paddle2ONNX), scalars as `value_float` / `value_ints`,
weights shared through Identity, initializers listed as graph inputs (IR 3),
node names empty or repeated, dynamic dims as -1, 0 or a `dim_param`. Every
later module reads one form, so this runs once, at load:

- every Constant tensor becomes an initializer;
- Identity of an initializer is collapsed: its readers read the initializer;
- initializers are no longer listed as graph inputs (IR >= 4);
- node names are unique and non-empty;
- a dim of -1 or 0 is dynamic (a `dim_param`), like any named dim.

It computes the same function as its input.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from .base import Pass, PassResult
from .domains import op_id
from .graph import constant_value, subgraphs


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` in the one form (see the module docstring): a new model."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return normalise_in_place(out)


def normalise_in_place(out: onnx.ModelProto) -> onnx.ModelProto:
    """`normalise` on a copy of one's own (load's: no second copy of the weights)."""
    graph = out.graph
    outputs = {o.name for o in graph.output}
    initializers = {t.name for t in graph.initializer}
    alias: dict[str, str] = {}  # Identity output -> the initializer it passes on
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        _rename_inputs(node, alias)
        if op_id(node) == "Constant":
            value = constant_value(node)
            if value is not None and node.output[0] not in outputs:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                initializers.add(node.output[0])
                continue
        if (
            op_id(node) == "Identity"
            and node.input[0] in initializers
            and node.output[0] not in outputs
        ):
            alias[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    if out.ir_version < 4:  # initializers need no graph input from IR 4 on
        inputs = [i for i in graph.input if i.name not in initializers]
        del graph.input[:]
        graph.input.extend(inputs)
        out.ir_version = 4
    unique_names(graph)
    for vi in [*graph.input, *graph.output]:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = f"{vi.name}_dim{k}"
    for vi in graph.value_info:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.ClearField("dim_value")
    return out


def _rename_inputs(node: onnx.NodeProto, alias: dict[str, str]) -> None:
    """Point `node`'s inputs (and those of its subgraphs) at the aliased initializers."""
    if not alias:
        return
    for k, name in enumerate(node.input):
        if name in alias:
            node.input[k] = alias[name]
    for graph in subgraphs(node):
        for inner in graph.node:
            _rename_inputs(inner, alias)


def unique_names(graph: onnx.GraphProto) -> None:
    """Empty and repeated node names become `OpType_k` (k: the node's position)."""
    seen: set[str] = set()
    taken = {n.name for n in graph.node}
    for k, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
        seen.add(node.name)


def needs_normalising(model: onnx.ModelProto) -> bool:
    """Whether `normalise` would change `model` (each of its steps, checked without a copy)."""
    graph = model.graph
    if model.ir_version < 4:
        return True
    outputs = {o.name for o in graph.output}
    initializers = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.output and node.output[0] in outputs:
            continue
        constant = op_id(node) == "Constant"
        if constant and constant_value(node) is not None:
            return True
        if op_id(node) == "Identity" and node.input[0] in initializers:
            return True
    names = [n.name for n in graph.node]
    if not all(names) or len(set(names)) != len(names):
        return True
    return any(
        d.HasField("dim_value") and d.dim_value <= 0
        for vi in [*graph.input, *graph.output, *graph.value_info]
        for d in vi.type.tensor_type.shape.dim
    )


class Normalise(Pass):
    """Transform pass: `normalise` (see the module docstring); a model already in the
    one form comes back itself, with `modified` False."""

    name = "normalise"

    def call(self, model: onnx.ModelProto) -> PassResult:
        if not needs_normalising(model):
            return PassResult(model)
        return PassResult(normalise(model), True)
