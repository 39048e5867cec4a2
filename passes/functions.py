"""Model-local functions: calls of those that hold layers are inlined at load.

A call of a model-local function (`model.functions`) is one node to the analysis: a Conv in
its body was neither counted (MACs) nor planned, and the report read as if the whole model
had been analysed. `inline_layers` replaces, in place, each call of a function whose body
holds a layer (a Conv, or an op whose multiply-adds are counted) by the body, so it is
analysed and cut like the rest; the written model holds the inlined nodes, computing the
same. A function a handler is registered for (`register_handler`) stays a call: the handler
follows it. Functions without layers stay calls, opaque as any op the walk does not know.
"""

from __future__ import annotations

import onnx
import onnx.inliner

from .channel_walk import handler_for
from .domains import LAYER_OPS, op_id, opset_versions
from .errors import BadInputError
from .graph import nested_nodes
from .protos import without_weights


def inline_layers(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every call of a local function holding a layer inlined, in place (the
    weights are not copied: the inliner sees their names only). The body is read at the
    model's opset: the checker (at read) refused a function whose ops differ there."""
    chosen = functions_to_inline(model)
    if not chosen:
        return model
    light = without_weights(model)
    for tensor in model.graph.initializer:  # names the inlined bodies must not reuse
        light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
    try:
        inlined = onnx.inliner.inline_selected_functions(light, sorted(chosen))
    except Exception as error:  # the inliner raises RuntimeError on what it cannot do
        first = str(error).strip().splitlines()[0]
        names = ", ".join(f"{d}.{n}" for d, n in sorted(chosen))
        raise BadInputError(
            f"cannot inline the model-local functions that hold layers ({names}), which "
            f"onnx-mbs must see to count and cut: {first}"
        ) from None
    graph = model.graph
    del graph.node[:]
    graph.node.extend(inlined.graph.node)
    del model.functions[:]
    model.functions.extend(inlined.functions)
    del model.opset_import[:]
    model.opset_import.extend(inlined.opset_import)
    return model


def functions_to_inline(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(domain, name) of each local function holding a layer, directly or through the
    functions it calls, that no registered handler follows."""
    functions = {(f.domain, f.name): f for f in model.functions}
    opsets = opset_versions(model)
    holds: dict[tuple[str, str], bool] = {}

    def holds_layer(key: tuple[str, str]) -> bool:
        if key not in holds:
            holds[key] = False  # a call of itself (invalid ONNX) adds nothing
            holds[key] = any(
                op_id(node) in LAYER_OPS
                or ((node.domain, node.op_type) in functions and holds_layer(_key(node)))
                for node in nested_nodes(functions[key])
            )
        return holds[key]

    called = {
        _key(node): node
        for graph in [model.graph, *model.functions]
        for node in nested_nodes(graph)
        if _key(node) in functions
    }
    followed = {key for key, node in called.items() if handler_for(node, opsets) is not None}
    return {key for key in called if holds_layer(key) and key not in followed}


def _key(node: onnx.NodeProto) -> tuple[str, str]:
    return node.domain, node.op_type
