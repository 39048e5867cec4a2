"""GroupNormalization written as torch exports GroupNorm, so it is analysed, cut and trained
as that form is.

The ONNX op (opset 18, whose scale and bias hold one value per group, deprecated by ONNX
for it; opset 21 on, one per channel) is one node that shape inference does not see
through and the channel walk does not follow. Torch's exporter writes GroupNorm(G) as

    Reshape(x, [0, G, -1]) -> InstanceNormalization -> Reshape(·, Shape(x)) -> Mul -> Add

(the InstanceNormalization over the groups, with ones and zeros; the affine per channel
after), which every part of onnx-mbs already handles: the walk cuts it in whole units (one
channel of each group), the bridge trains it. `expand_group_norms` rewrites each
GroupNormalization so, at load; it computes the same function (at opset 18 the per-group
scale and bias are the InstanceNormalization's own, and no Mul or Add follows; from opset 21
a Cast each side of the norm computes it in the op's `stash_type`, float32 unless set).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .custom_ops import hide_unknown_ops
from .domains import op_id
from .errors import BadInputError
from .graph import attributes, default_opset, fresh_name, subgraph_names
from .shapes import weightless

OP = "GroupNormalization"
PER_CHANNEL_SINCE = 21  # before: one scale and bias per group


def is_group_norm(node: onnx.NodeProto) -> bool:
    return op_id(node) == OP


def deprecated_group_norms(model: onnx.ModelProto) -> Callable[[onnx.NodeProto], bool]:
    """Which nodes of `model` are a GroupNormalization whose schema ONNX deprecated (opset
    18 to 20), for the checker to take as opaque: onnxruntime runs it as its schema says,
    and `expand_group_norms` writes it out at load."""
    if default_opset(model) >= PER_CHANNEL_SINCE:
        return lambda node: False
    return is_group_norm


def expand_group_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every GroupNormalization written as torch exports GroupNorm, in place
    (see the module docstring). Refuses, naming the node, one whose input rank is not
    known (the per-channel affine is broadcast over the dims after the channels)."""
    graph = model.graph
    if not any(is_group_norm(n) for n in graph.node):
        return model
    per_channel = default_opset(model) >= PER_CHANNEL_SINCE
    inputs = _input_types(model) if per_channel else {}
    constants = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {o.name: 1 for o in graph.output}
    for node in graph.node:
        for name in [*node.input, *subgraph_names(node)]:
            readers[name] = readers.get(name, 0) + 1
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken |= {name for n in graph.node for name in [n.name, *n.input, *n.output]}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not is_group_norm(node):
            nodes.append(node)
            continue
        attrs = attributes(node)
        name = node.name or fresh_name("GroupNormalization", taken)
        if len(node.input) != 3 or not all(node.input) or int(attrs.get("num_groups", 0)) < 1:
            raise BadInputError(  # the checker takes the opset-18 op as opaque
                f"the model is not valid ONNX: {OP} {name!r} needs its 3 inputs (X, scale, "
                "bias) and num_groups >= 1"
            )
        groups, epsilon = int(attrs["num_groups"]), float(attrs.get("epsilon", 1e-5))
        x, scale, bias = node.input[0], node.input[1], node.input[2]

        def new(base: str, _name: str = name) -> str:
            return fresh_name(f"{_name}/{base}", taken)

        def constant(value: np.ndarray, base: str) -> str:
            tensor = numpy_helper.from_array(value, new(base))
            graph.initializer.append(tensor)
            return tensor.name

        grouped, normalised, shape = new("grouped"), new("normalised"), new("shape_of_input")
        source, cast_back = x, None  # what the norm reads; the dtype its output goes back to
        if per_channel:
            if x not in inputs:
                raise BadInputError(
                    f"{OP} {name!r}: the rank of its input {x!r} is not known, so it cannot "
                    "be written as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add; "
                    "give the graph input shapes (or export GroupNorm with torch.onnx at "
                    "opset 17, which writes that form)"
                )
            rank, dtype = inputs[x]
            # The mean and variance are computed in stash_type (float32 unless set), the
            # output cast back: a float16 model normalises in float32, as the op does.
            stash = int(attrs.get("stash_type", onnx.TensorProto.FLOAT))
            if helper.tensor_dtype_to_np_dtype(stash) != dtype:
                source = new("stashed")
                nodes.append(helper.make_node("Cast", [x], [source], name=source, to=stash))
                cast_back = helper.np_dtype_to_tensor_dtype(dtype)
                dtype = helper.tensor_dtype_to_np_dtype(stash)
            # In Constant nodes, as torch exports them: the affine is the Mul and Add after,
            # and the bridge trains no weight held in a Constant of an InstanceNormalization.
            norm_scale, norm_bias = new("ones"), new("zeros")
            for value, held in (
                (np.ones(groups, dtype), norm_scale),
                (np.zeros(groups, dtype), norm_bias),
            ):
                tensor = numpy_helper.from_array(value, held)
                nodes.append(helper.make_node("Constant", [], [held], name=held, value=tensor))
        else:
            norm_scale, norm_bias = scale, bias
        target = constant(np.array([0, groups, -1], np.int64), "groups")
        out = node.output[0] if not per_channel else new("unscaled")
        back = out if cast_back is None else new("unstashed")
        nodes += [
            helper.make_node("Reshape", [source, target], [grouped], name=new("to_groups")),
            helper.make_node(
                "InstanceNormalization",
                [grouped, norm_scale, norm_bias],
                [normalised],
                name=name,
                epsilon=epsilon,
            ),
            helper.make_node("Shape", [x], [shape], name=new("shape")),
            helper.make_node("Reshape", [normalised, shape], [back], name=new("back")),
        ]
        if cast_back is not None:
            nodes.append(helper.make_node("Cast", [back], [out], name=new("cast"), to=cast_back))
        if per_channel:
            trailing = [1] * (rank - 2)
            affine = []
            for value, base in ((scale, "scale"), (bias, "bias")):
                if value in constants and readers[value] == 1:  # reshaped where it is
                    tensor = constants[value]
                    size = int(np.prod(tensor.dims))
                    del tensor.dims[:]
                    tensor.dims.extend([size, *trailing])
                    affine.append(value)
                    continue
                view = new(base)
                per = constant(np.array([-1, *trailing], np.int64), f"{base}_shape")
                nodes.append(helper.make_node("Reshape", [value, per], [view], name=view))
                affine.append(view)
            scaled = new("scaled")
            nodes += [
                helper.make_node("Mul", [out, affine[0]], [scaled], name=new("scale")),
                helper.make_node("Add", [scaled, affine[1]], node.output[:1], name=new("bias")),
            ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _input_types(model: onnx.ModelProto) -> dict[str, tuple[int, np.dtype]]:
    """The rank and dtype of each GroupNormalization input whose rank is known, from shape
    inference of a weightless copy
    in which each GroupNormalization passes its input on (its output has its input's shape;
    onnx infers no type for the op itself)."""
    light = weightless(model)
    for node in light.graph.node:
        if is_group_norm(node):
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "Identity"
    inferred = onnx.shape_inference.infer_shapes(hide_unknown_ops(light)[0])
    graph = inferred.graph
    known = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor = vi.type.tensor_type
        if tensor.HasField("shape") and tensor.elem_type:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            known[vi.name] = (len(tensor.shape.dim), dtype)
    return known
