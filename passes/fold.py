"""Fold shape arithmetic to constants once input shapes are fixed.

Exporters often compute a Reshape target at run time (Shape -> Gather ->
Unsqueeze -> Concat -> Reshape). The channel-group walk cannot cut channels
against a count read at run time, so it pins such groups. With static shapes
everywhere (`load_model`), those computations are constants: Shape of a
tensor with a static shape is known, and a node whose inputs are all
constants can be evaluated. Folding them leaves the Reshape with a constant
shape the shrink pass can rewrite.

Only small values are folded (shape arithmetic, not weights): a node is
evaluated when its inputs are folded values, Constant nodes or small
initializers, and its output is small. Identity of an initializer is left
alone, because exporters use it to share weights, and so is a Cast of a stored
weight to another float type (`stored_casts`: load reads the exact ones as the
weight, stored.py). Constant nodes become initializers.

A small weight computed in the graph (a conv's weight standardised from a stored
one, as torch exports timm's ScaledStdConv2d) folds too, to the weight the conv
reads; it is not marked as folded arithmetic, so it counts as the parameter it is.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from .base import Pass, PassResult
from .domains import is_default, op_id, opset_ids, opset_versions
from .graph import FOLDED, GraphIndex, attributes, constant_value, is_weight, stored_casts

MAX_ELEMENTS = 4096  # larger values are data, not shape arithmetic
NOT_FOLDED = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Identity", "If", "Loop", "Scan",
}  # fmt: skip


def fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (in `load_model` form) with its shape arithmetic folded: a new model, or
    `model` itself when there is nothing to fold."""
    index = GraphIndex.build(model)
    outputs = set(index.graph_outputs)
    values, folded, learned = _folded(model, index)
    # A Constant read only by nodes that stay is left as it is: turning it into an
    # initializer changes nothing but would count, say, Clip bounds as parameters.
    readers_kept = {
        name for k, node in enumerate(index.nodes) if k not in folded for name in node.input
    }
    feeds_folded = {name for k in folded for name in index.nodes[k].input}
    left = {
        k
        for k in folded
        if op_id(index.nodes[k]) == "Constant"
        and index.nodes[k].output[0] not in feeds_folded
        and index.nodes[k].output[0] in readers_kept
    }
    folded -= left
    for k in left:
        values.pop(index.nodes[k].output[0])
    if not folded:
        return model

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept_nodes = [n for k, n in enumerate(out.graph.node) if k not in folded]
    needed = {name for n in kept_nodes for name in n.input} | outputs
    del out.graph.node[:]
    out.graph.node.extend(kept_nodes)
    for name, value in values.items():
        if name in needed:
            tensor = folded_constant(value, name)
            if name in learned:  # computed from a weight: a weight, not shape arithmetic
                tensor.doc_string = ""
            out.graph.initializer.append(tensor)
    # Initializers only the folded nodes read are now unused: drop them.
    was_read = {name for k in folded for name in index.nodes[k].input}
    dead = [k for k, t in enumerate(out.graph.initializer) if t.name in was_read - needed]
    for k in reversed(dead):
        del out.graph.initializer[k]
    infos = [vi for vi in out.graph.value_info if vi.name not in values]
    del out.graph.value_info[:]
    out.graph.value_info.extend(infos)
    return out


def folded_constant(value: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer holding a value folding computed, marked as such (`FOLDED`)."""
    tensor = numpy_helper.from_array(np.asarray(value), name)
    tensor.doc_string = FOLDED
    return tensor


def shape_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The value of every tensor of `model` that folding computes (from its recorded
    shapes and small constants), graph outputs included."""
    return _folded(model, GraphIndex.build(model), outputs=False)[0]


def _folded(
    model: onnx.ModelProto, index: GraphIndex, outputs: bool = True
) -> tuple[dict[str, np.ndarray], set[int], set[str]]:
    """The folded tensors' values, the positions of the nodes folded and the folded tensors
    computed from a weight (a float initializer of more than one element, not itself
    folded arithmetic); with `outputs`, nodes that write a graph output are left alone."""
    opsets = opset_versions(model)
    # An initializer also listed as a graph input (IR >= 4) is the caller's to feed: its
    # value is known only at run time.
    listed = {i.name for i in model.graph.input}
    small = {
        t.name
        for t in model.graph.initializer
        if math.prod(t.dims) <= MAX_ELEMENTS and t.name not in listed
    }
    kept = set(index.graph_outputs) if outputs else set()
    kept |= set(stored_casts(model.graph))  # a weight in another precision: not arithmetic
    learned = {t.name for t in model.graph.initializer if is_weight(t) and math.prod(t.dims) > 1}
    values: dict[str, np.ndarray] = {}
    folded: set[int] = set()
    for k, node in enumerate(index.nodes):
        if not is_default(node.domain) or any(o in kept for o in node.output):
            continue
        result = _fold(node, index, values, small, opsets)
        if result is None:
            continue
        folded.add(k)
        values.update(zip(node.output, result))
        if learned.intersection(node.input):
            learned.update(node.output)
    return values, folded, learned - {t.name for t in model.graph.initializer}


def _fold(
    node: onnx.NodeProto,
    index: GraphIndex,
    values: dict[str, np.ndarray],
    small: set[str],
    opsets: dict[str, int],
) -> list[np.ndarray] | None:
    """The node's outputs if it can be folded, else None."""
    op = op_id(node)
    if op == "Constant":
        value = constant_value(node)
        return None if value is None else [value]
    if op in ("Shape", "Size"):
        shape = index.shapes.get(node.input[0])
        if shape is None:
            return None
        if op == "Size":
            return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
        attrs = attributes(node)
        start, end, _ = slice(attrs.get("start", 0), attrs.get("end", len(shape))).indices(
            len(shape)
        )
        return [np.array(shape[start:end], dtype=np.int64)]
    if op in NOT_FOLDED or not node.input:
        return None
    feeds = {}
    for name in node.input:
        if not name:
            continue
        if name in values:
            feeds[name] = values[name]
        elif name in small and name in index.initializers:
            feeds[name] = numpy_helper.to_array(index.initializers[name])
        else:
            return None
    if any(np.asarray(v).size > MAX_ELEMENTS for v in feeds.values()):
        return None
    made = output_elements(node, feeds, index.shapes)
    if made is None or made > MAX_ELEMENTS:  # sized before anything is made (a file's
        return None  # few bytes can ask ConstantOfShape for 1.5e9 floats)
    from onnx.reference import ReferenceEvaluator  # 0.15 s to import: only when folding

    try:
        results = ReferenceEvaluator(_one_node_model(node, opsets)).run(None, feeds)
    except Exception:  # an op the reference runtime cannot evaluate: leave it
        return None
    results = [np.asarray(r) for r in results]
    if any(r.size > MAX_ELEMENTS for r in results):
        return None
    return results


# Ops whose output size the values of their inputs set, and how.
def _constant_of_shape(values: list) -> int:
    return _product(values[0])


def _expand(values: list) -> int:
    return math.prod(np.broadcast_shapes(values[0].shape, tuple(_dims(values[1]))))


def _tile(values: list) -> int:
    return values[0].size * _product(values[1])


def _range(values: list) -> int:
    start, limit, delta = (float(np.asarray(v).reshape(())) for v in values[:3])
    return max(0, math.ceil((limit - start) / delta))


VALUE_SIZED = {"ConstantOfShape": _constant_of_shape, "Expand": _expand, "Tile": _tile,
               "Range": _range}  # fmt: skip
# Ops that make at most the broadcast of their inputs, or at most as many elements as their
# inputs hold together (Gather: indices times a row): never more than MAX_ELEMENTS squared.
BROADCASTING = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "And", "Or", "Xor", "Where", "Min", "Max", "Sum", "Mean", "BitShift",
}  # fmt: skip
BOUNDED = {
    "Shape", "Size", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast",
    "CastLike", "Slice", "Gather", "GatherElements", "GatherND", "Concat", "Split", "Neg",
    "Abs", "Floor", "Ceil", "Round", "Sqrt", "Reciprocal", "Sign", "Not", "Relu", "Clip",
    "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "ReduceMean", "ArgMax", "ArgMin",
    "Exp", "Log", "NonZero", "CumSum", "Identity", "Trilu", "ScatterND",
    "ScatterElements", "ReverseSequence", "Compress", "MatMul",
}  # fmt: skip


def output_elements(
    node: onnx.NodeProto, feeds: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> int | None:
    """How many elements `node` makes from `feeds`, worked out without making them (an
    upper bound); None when that cannot be known beforehand."""
    outputs = [shapes.get(name) for name in node.output if name]
    if outputs and all(shape is not None for shape in outputs):
        return sum(math.prod(shape) for shape in outputs)
    values = [np.asarray(feeds[name]) if name in feeds else None for name in node.input]
    try:
        if op_id(node) in VALUE_SIZED:
            return VALUE_SIZED[op_id(node)](values)
        arrays = [v for v in values if v is not None]
        if op_id(node) in BROADCASTING:
            return math.prod(np.broadcast_shapes(*(v.shape for v in arrays)))
        if op_id(node) in BOUNDED:
            sizes = [max(v.size, 1) for v in arrays]
            return max(sum(sizes), max(sizes) * min(sizes))
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None
    return None


def _dims(value: np.ndarray) -> list[int]:
    dims = [int(d) for d in np.asarray(value).ravel()]
    if any(d < 0 for d in dims):
        raise ValueError("negative dim")
    return dims


def _product(value: np.ndarray) -> int:
    return math.prod(_dims(value))


def _one_node_model(node: onnx.NodeProto, opsets: dict[str, int]) -> onnx.ModelProto:
    """`node` as a model of its own, so the reference runtime evaluates it at the model's
    opset (given a bare node, it takes the latest: Unsqueeze-13 for an opset-11 node)."""
    untyped = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [untyped(name, 0, None) for name in node.input if name],
        [untyped(name, 0, None) for name in node.output if name],
    )
    return onnx.helper.make_model(graph, opset_imports=opset_ids(opsets))


class FoldShapes(Pass):
    """Transform pass: fold shape arithmetic (see module docstring)."""

    name = "fold_shapes"

    def call(self, model: onnx.ModelProto) -> PassResult:
        folded = fold_shapes(model)
        return PassResult(folded, folded is not model)
