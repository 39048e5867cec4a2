"""One model, re-expressed the ways other exporters write it.

Paddle2ONNX puts every weight in a Constant node and marks dynamic dims with
-1; old exporters write IR 3 with initializers listed as graph inputs; some
tools leave node names empty or repeat them; others write scalar constants as
`value_float` / `value_ints`. Each function returns a new model that computes
the same function as its input (a raw ModelProto, opset 17 form).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from random_cnn import merge_equal_initializers


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def weights_in_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a Constant node (Paddle2ONNX)."""
    out = _copy(model)
    names = {t.name for t in out.graph.initializer}
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in out.graph.initializer
    ]
    nodes = constants + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def minus_one_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic dims (and the batch) written as dim_value -1 (Paddle2ONNX)."""
    out = _copy(model)
    for vi in [*out.graph.input, *out.graph.output]:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k == 0 or not d.HasField("dim_value"):
                d.dim_value = -1
    return out


def opset(version: int) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def convert(model: onnx.ModelProto) -> onnx.ModelProto:
        return version_converter.convert_version(_copy(model), version)

    convert.__name__ = f"opset_{version}"
    return convert


def ir3_initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 3 (opset 8 era): every initializer is also declared as a graph input."""
    out = _copy(model)
    declared = {i.name for i in out.graph.input}
    for t in out.graph.initializer:
        if t.name not in declared:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    out.ir_version = 3
    return out


def duplicate_and_empty_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every other node unnamed, the rest all called 'node'."""
    out = _copy(model)
    for k, node in enumerate(out.graph.node):
        node.name = "" if k % 2 else "node"
    return out


def scalar_attribute_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Scalar float and 1-D int64 constants as Constant(value_float / value_ints)."""
    out = _copy(model)
    lifted, keep = [], []
    for t in out.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.dtype == np.float32 and array.ndim == 0:
            lifted.append(helper.make_node("Constant", [], [t.name], value_float=float(array)))
        elif array.dtype == np.int64 and array.ndim == 1:
            lifted.append(helper.make_node("Constant", [], [t.name], value_ints=array.tolist()))
        else:
            keep.append(t)
    for node in out.graph.node:  # Clip bounds and the like written as Constant(value=...)
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            if array.dtype == np.float32 and array.ndim == 0:
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value_float", float(array)))
    nodes = lifted + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


VARIANTS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "constants": weights_in_constants,
    "minus_one": minus_one_dims,
    "opset21": opset(21),  # newer; older opsets are exported directly (see test_exporters)
    "ir3": ir3_initializers_as_inputs,
    "names": duplicate_and_empty_names,
    "value_attrs": scalar_attribute_constants,
}


# -- equivalent rewrites of one graph (the metamorphic hunt of the plan) ------------------------
# Each computes what its input computes, written as another exporter or tool could have
# written it. tests/test_plan_metamorphic.py checks that the plan does not follow the form.


class _Edit:
    """A copy of a model with helpers for fresh names, constants and consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = _copy(model)
        self.graph = self.model.graph
        self.taken = {n for node in self.graph.node for n in (*node.input, *node.output)}
        self.taken |= {t.name for t in self.graph.initializer} | {n.name for n in self.graph.node}
        self.taken |= {v.name for v in (*self.graph.input, *self.graph.output)}
        self.inits = {t.name: t for t in self.graph.initializer}

    def name(self, base: str) -> str:
        k = 0
        while f"{base}_{k}" in self.taken:
            k += 1
        self.taken.add(f"{base}_{k}")
        return f"{base}_{k}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def opset(self) -> int:
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))

    def set_nodes(self, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {n for node in nodes for n in node.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        return self.model


def _after(model: onnx.ModelProto, ops: tuple[str, ...], make) -> onnx.ModelProto:
    """After each node of `ops`, `make(edit, x, y)` nodes computing y = x."""
    edit = _Edit(model)
    outputs = {o.name for o in edit.graph.output}
    nodes = []
    for node in edit.graph.node:
        nodes.append(node)
        if node.op_type not in ops or node.output[0] in outputs:
            continue
        y, x = node.output[0], edit.name(node.output[0] + "_pre")
        node.output[0] = x
        nodes.extend(make(edit, x, y))
    return edit.set_nodes(nodes)


def identity_after_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """An Identity after every Conv (tf2onnx and graph editors leave them)."""
    return _after(model, ("Conv",), lambda e, x, y: [helper.make_node("Identity", [x], [y])])


def dropout_after_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Dropout in inference (no training_mode) after every Conv and Relu."""
    return _after(
        model,
        ("Conv", "Relu"),
        lambda e, x, y: [helper.make_node("Dropout", [x, e.const(np.float32(0.3), "ratio")], [y])],
    )


def cast_after_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Cast to float (the type it already has) after every Conv."""
    return _after(
        model,
        ("Conv",),
        lambda e, x, y: [helper.make_node("Cast", [x], [y], to=onnx.TensorProto.FLOAT)],
    )


def mul_one_after_relus(model: onnx.ModelProto) -> onnx.ModelProto:
    """x * 1 after every Relu."""
    return _after(
        model,
        ("Relu",),
        lambda e, x, y: [helper.make_node("Mul", [x, e.const(np.float32(1), "one")], [y])],
    )


def _replace(model: onnx.ModelProto, op: str, make) -> onnx.ModelProto:
    """Every node of type `op` replaced by `make(edit, node)` (a list of nodes) or kept (None)."""
    edit = _Edit(model)
    nodes = []
    for node in edit.graph.node:
        made = make(edit, node) if node.op_type == op else None
        nodes.extend([node] if made is None else made)
    return edit.set_nodes(nodes)


def relu_as(op: str, *bounds: float) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """Relu as `op`(x, *bounds): Clip(x, 0), Clip(x, 0, inf), Max(x, 0)."""

    def rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
        def make(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto]:
            limits = [edit.const(np.float32(b), "bound") for b in bounds]
            return [helper.make_node(op, [node.input[0], *limits], list(node.output))]

        return _replace(model, "Relu", make)

    rewrite.__name__ = f"relu_as_{op.lower()}_{len(bounds)}"
    return rewrite


def conv_bias_as_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Conv's bias as an Add of a (1, C, 1, 1) constant after a bias-free Conv."""

    def split(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        bias = edit.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        weight = edit.array(node.input[1])
        if bias is None or weight is None:
            return None
        y, x = node.output[0], edit.name(node.output[0] + "_nobias")
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[2:]
        conv.output[0] = x
        shape = (1, -1) + (1,) * (weight.ndim - 2)
        return [conv, helper.make_node("Add", [x, edit.const(bias.reshape(shape), "bias")], [y])]

    return _replace(model, "Conv", split)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each BatchNormalization that alone reads a Conv's output folded into the Conv
    (onnxruntime's basic optimisations, the deployment form)."""
    edit = _Edit(model)
    producer = {o: n for n in edit.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in edit.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in edit.graph.output}
    folded: set[int] = set()
    for node in edit.graph.node:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or readers[node.input[0]] != 1:
            continue
        if node.input[0] in outputs or edit.array(conv.input[1]) is None:
            continue
        gamma, beta, mean, var = (edit.array(node.input[k]) for k in (1, 2, 3, 4))
        eps = _attrs(node).get("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        weight = edit.array(conv.input[1])
        bias = edit.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else 0 * mean
        shape = (-1,) + (1,) * (weight.ndim - 1)
        new_w = (weight * scale.reshape(shape)).astype(np.float32)
        new_b = ((bias - mean) * scale + beta).astype(np.float32)
        del conv.input[1:]
        conv.input.extend([edit.const(new_w, "w_folded"), edit.const(new_b, "b_folded")])
        conv.output[0] = node.output[0]
        folded.add(id(node))
    return edit.set_nodes([n for n in edit.graph.node if id(n) not in folded])


def flatten_as_reshape(model: onnx.ModelProto) -> onnx.ModelProto:
    """Flatten(axis=1) as Reshape(x, [0, -1])."""

    def reshape(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if _attrs(node).get("axis", 1) != 1:
            return None
        target = edit.const(np.array([0, -1], np.int64), "shape")
        return [helper.make_node("Reshape", [node.input[0], target], list(node.output))]

    return _replace(model, "Flatten", reshape)


def gap_as_reducemean(model: onnx.ModelProto) -> onnx.ModelProto:
    """GlobalAveragePool of NCHW as ReduceMean over axes 2, 3 (keepdims)."""

    def mean(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        if edit.opset() >= 18:
            axes = edit.const(np.array([2, 3], np.int64), "axes")
            return [
                helper.make_node("ReduceMean", [node.input[0], axes], list(node.output), keepdims=1)
            ]
        return [
            helper.make_node(
                "ReduceMean", [node.input[0]], list(node.output), axes=[2, 3], keepdims=1
            )
        ]

    return _replace(model, "GlobalAveragePool", mean)


def gemm_as_matmul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(alpha=beta=1, transA=0) as MatMul with the weight transposed to (in, out), then Add."""

    def split(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        a = _attrs(node)
        weight = edit.array(node.input[1])
        if (
            a.get("alpha", 1.0) != 1.0
            or a.get("beta", 1.0) != 1.0
            or a.get("transA", 0)
            or weight is None
        ):
            return None
        weight = weight.T if a.get("transB", 0) else weight
        w = edit.const(np.ascontiguousarray(weight), "w_matmul")
        if len(node.input) < 3 or not node.input[2]:
            return [helper.make_node("MatMul", [node.input[0], w], list(node.output))]
        x = edit.name(node.output[0] + "_matmul")
        return [
            helper.make_node("MatMul", [node.input[0], w], [x]),
            helper.make_node("Add", [x, node.input[2]], list(node.output)),
        ]

    return _replace(model, "Gemm", split)


def pad_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Conv's zero padding written as a Pad node before an unpadded Conv."""

    def split(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        a = _attrs(node)
        pads = list(a.get("pads", []))
        if not any(pads) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        half = len(pads) // 2
        full = [0, 0, *pads[:half], 0, 0, *pads[half:]]
        x = edit.name(node.input[0] + "_padded")
        if edit.opset() >= 11:
            pad = helper.make_node(
                "Pad", [node.input[0], edit.const(np.array(full, np.int64), "pads")], [x]
            )
        else:
            pad = helper.make_node("Pad", [node.input[0]], [x], pads=full)
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        for attr in conv.attribute:
            if attr.name == "pads":
                del attr.ints[:]
                attr.ints.extend([0] * len(pads))
        conv.input[0] = x
        return [pad, conv]

    return _replace(model, "Conv", split)


def _passes_channels(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Relu", "MaxPool", "Identity", "Dropout", "Clip")


def concat_reversed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each channel Concat's inputs in reverse order, the input channels of the Convs that
    read it (through Relu/MaxPool/Dropout) permuted to match. Concats read by anything else
    are left as they are."""
    edit = _Edit(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in onnx.shape_inference.infer_shapes(edit.model).graph.value_info
    }
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in edit.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in edit.graph.output}
    for node in list(edit.graph.node):
        if node.op_type != "Concat" or _attrs(node).get("axis") not in (1, -3):
            continue
        sizes = [shapes.get(x, [0, 0])[1] for x in node.input]
        if not all(sizes) or len(sizes) < 2:
            continue
        convs, todo, ok = [], [node.output[0]], True
        while todo and ok:
            tensor = todo.pop()
            ok = tensor not in outputs
            for reader in readers.get(tensor, []):
                if (
                    reader.op_type == "Conv"
                    and reader.input[0] == tensor
                    and _attrs(reader).get("group", 1) == 1
                ):
                    convs.append(reader)
                elif _passes_channels(reader) and reader.input[0] == tensor:
                    todo.append(reader.output[0])
                else:
                    ok = False
        if not ok or not convs or any(edit.array(c.input[1]) is None for c in convs):
            continue
        starts = np.cumsum([0, *sizes])
        order = np.concatenate(
            [np.arange(starts[k], starts[k + 1]) for k in reversed(range(len(sizes)))]
        )
        inputs = list(node.input)[::-1]
        del node.input[:]
        node.input.extend(inputs)
        for conv in convs:
            weight = edit.array(conv.input[1])
            conv.input[1] = edit.const(np.ascontiguousarray(weight[:, order]), "w_permuted")
    return edit.set_nodes(list(edit.graph.node))


def shared_initializers_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each initializer read by several inputs given one copy per reader."""
    edit = _Edit(model)
    seen: set[str] = set()
    for node in edit.graph.node:
        for k, name in enumerate(node.input):
            if name not in edit.inits:
                continue
            if name in seen:
                copy = numpy_helper.from_array(edit.array(name), edit.name(name + "_copy"))
                edit.graph.initializer.append(copy)
                node.input[k] = copy.name
            seen.add(name)
    return edit.model


def renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node, initializer and inner tensor renamed (the graph's inputs and outputs
    keep their names)."""
    out = _copy(model)
    g = out.graph
    keep = {v.name for v in (*g.input, *g.output)}
    names: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}_{name[::-1][:6]}")

    for t in g.initializer:
        t.name = new(t.name)
    for k, node in enumerate(g.node):
        node.name = f"n{k}"
        for i, name in enumerate(node.input):
            node.input[i] = new(name)
        for i, name in enumerate(node.output):
            node.output[i] = new(name)
    for v in g.value_info:
        v.name = new(v.name)
    return out


def with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every inner tensor's shape recorded in value_info (onnx's shape inference)."""
    return onnx.shape_inference.infer_shapes(_copy(model))


def without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """No value_info at all."""
    out = _copy(model)
    del out.graph.value_info[:]
    return out


def doc_strings(model: onnx.ModelProto) -> onnx.ModelProto:
    """Doc strings on the model, graph and every node; producer fields and an unrelated
    metadata entry."""
    out = _copy(model)
    out.doc_string = "a model"
    out.graph.doc_string = "a graph"
    out.producer_name, out.producer_version, out.domain, out.model_version = "tool", "9", "x.y", 7
    for k, node in enumerate(out.graph.node):
        node.doc_string = f"node {k}"
    helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, "author": "me"})
    return out


def reversed_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """Another topological order of the nodes: a depth-first one taking the last input first."""
    out = _copy(model)
    made = {o: n for n in out.graph.node for o in n.output}
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def visit(node: onnx.NodeProto) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for name in reversed(node.input):
            if name in made:
                visit(made[name])
        order.append(node)

    for node in reversed(out.graph.node):
        visit(node)
    del out.graph.node[:]
    out.graph.node.extend(order)
    return out


def add_as_sum(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add of two tensors as Sum."""
    return _replace(
        model,
        "Add",
        lambda e, n: (
            None
            if any(x in e.inits for x in n.input)
            else [helper.make_node("Sum", list(n.input), list(n.output))]
        ),
    )


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.value_info, *inferred.input, *inferred.output)
    }


def gap_as_average_pool(model: onnx.ModelProto) -> onnx.ModelProto:
    """GlobalAveragePool as an AveragePool whose kernel is the whole map."""
    shapes = _shapes(model)

    def pool(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        spatial = shapes.get(node.input[0], [])[2:]
        if not spatial or not all(spatial):
            return None
        return [
            helper.make_node(
                "AveragePool", list(node.input), list(node.output), kernel_shape=spatial
            )
        ]

    return _replace(model, "GlobalAveragePool", pool)


def transposes_after_relus(model: onnx.ModelProto) -> onnx.ModelProto:
    """NCHW -> NHWC -> NCHW after every Relu (tf2onnx leaves such pairs)."""
    return _after(
        model,
        ("Relu",),
        lambda e, x, y: [
            helper.make_node("Transpose", [x], [x + "_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [x + "_nhwc"], [y], perm=[0, 3, 1, 2]),
        ],
    )


def batchnorm_as_affine(model: onnx.ModelProto) -> onnx.ModelProto:
    """BatchNormalization (inference) as Mul by a (1, C, 1, 1) scale and Add of a shift."""

    def affine(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        gamma, beta, mean, var = (edit.array(node.input[k]) for k in (1, 2, 3, 4))
        if any(v is None for v in (gamma, beta, mean, var)) or len(node.output) > 1:
            return None
        scale = gamma / np.sqrt(var + _attrs(node).get("epsilon", 1e-5))
        shift = beta - mean * scale
        x = edit.name(node.output[0] + "_scaled")
        return [
            helper.make_node(
                "Mul", [node.input[0], edit.const(scale.reshape(1, -1, 1, 1), "scale")], [x]
            ),
            helper.make_node(
                "Add", [x, edit.const(shift.reshape(1, -1, 1, 1), "shift")], list(node.output)
            ),
        ]

    return _replace(model, "BatchNormalization", affine)


def same_padding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A stride-1 Conv's explicit symmetric padding of (k - 1) / 2 as auto_pad SAME_UPPER."""

    def same(edit: _Edit, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        a = _attrs(node)
        kernel, pads = list(a.get("kernel_shape", [])), list(a.get("pads", []))
        if not kernel or set(a.get("strides", [1])) != {1} or set(a.get("dilations", [1])) != {1}:
            return None
        if pads != [(k - 1) // 2 for k in kernel] * 2 or any(k % 2 == 0 for k in kernel):
            return None
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        kept = [x for x in conv.attribute if x.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("auto_pad", "SAME_UPPER")])
        return [conv]

    return _replace(model, "Conv", same)


def commuted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inputs of every Add, Mul, Sum and Max in reverse order."""
    out = _copy(model)
    for node in out.graph.node:
        if node.op_type in ("Add", "Mul", "Sum", "Max"):
            inputs = list(node.input)[::-1]
            del node.input[:]
            node.input.extend(inputs)
    return out


def conv_bias_as_add_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """`conv_bias_as_add` with the bias as a (C, 1, 1) constant, the Add's first input."""
    out = commuted(conv_bias_as_add(model))
    biases = {n.input[0] for n in out.graph.node if n.op_type == "Add"}
    for tensor in out.graph.initializer:
        if tensor.name in biases and len(tensor.dims) > 1 and tensor.dims[0] == 1:
            dims = list(tensor.dims)[1:]
            del tensor.dims[:]
            tensor.dims.extend(dims)
    return out


EQUIVALENT: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    **VARIANTS,
    "identity": identity_after_convs,
    "dropout": dropout_after_convs,
    "cast": cast_after_convs,
    "mul_one": mul_one_after_relus,
    "clip": relu_as("Clip", 0.0),
    "clip_inf": relu_as("Clip", 0.0, np.inf),
    "max0": relu_as("Max", 0.0),
    "bias_add": conv_bias_as_add,
    "bn_folded": fold_batchnorm,
    "reshape": flatten_as_reshape,
    "reducemean": gap_as_reducemean,
    "matmul": gemm_as_matmul_add,
    "pad": pad_apart,
    "concat": concat_reversed,
    "unshared": shared_initializers_apart,
    "merged": merge_equal_initializers,
    "renamed": renamed,
    "value_info": with_value_info,
    "no_value_info": without_value_info,
    "doc": doc_strings,
    "order": reversed_order,
    "sum": add_as_sum,
    "avgpool": gap_as_average_pool,
    "transposes": transposes_after_relus,
    "bn_affine": batchnorm_as_affine,
    "same_pad": same_padding,
    "commuted": commuted,
    "bias_first": conv_bias_as_add_first,
}
