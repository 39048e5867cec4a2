"""Weights computed in the graph: follow a conv's weight back to its initializers.

NFNet-style weight standardisation (timm's StdConv2d and ScaledStdConv2d) computes a
conv's weight at run time from an initializer: a Reshape to (1, O, -1), a
BatchNormalization in training mode (or ReduceMean, Sub, Mul, Div, Sqrt written
out) with a per-output-channel gain, a Reshape back. Cutting output channel k of
such a conv means cutting entry k of every per-output-channel constant on the way,
and cutting input channel j means cutting it from the initializer the weight is
computed from.

The chain is followed backwards from the conv's weight with its channel axes as
positions: each tensor carries the output (and input) channel ids on the axes where
its size equals theirs; an axis of size 1 broadcasts and is not cut. Reshape and
Transpose move the axes (a merged axis repeats each channel's id, as after a Flatten),
reductions keep them where they keep the dim. A constant reached this way gets a slot
per axis it carries, a Reshape shape that counts channels an edit. Anything else
raises `Unfollowed`, naming the node, and the conv is pinned with that reason; so does
a tensor of the computation that something else reads too (a second conv, the tied
ConvTranspose of an autoencoder), which a cut for this conv alone would change.

Cutting input channels changes what the standardisation averages over: the cut is not
exact for such a conv (keeping every channel is); `cut_note` says so in the report.
"""

from __future__ import annotations

import numpy as np
import onnx

from .channel_reshape import reshape_ids
from .channel_walk import CONST, FILTERS, WEIGHTS_IN, ChannelWalk, Edit, Slot
from .domains import op_id
from .graph import attributes

# Element-wise ops with one input whose axes pass through unchanged.
SAME_AXES = {
    "Identity", "Cast", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Relu", "Sigmoid",
    "Tanh", "Softplus", "Clip",
}  # fmt: skip
BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
REDUCES = {"ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare", "ReduceMax", "ReduceMin"}
Roles = dict[int, tuple[np.ndarray, str]]  # axis -> (channel ids, slot role)


class Unfollowed(Exception):
    """The weight's computation cannot be followed; the message names the node."""


def follow_weight(w: ChannelWalk, conv: onnx.NodeProto, roles: Roles) -> set[str]:
    """Record the slots and edits that cut `conv`'s computed weight (input 1) with its
    channels: `roles` gives the weight's channel axes. Returns the roles whose channels
    a reduction mixes (standardisation over the input channels: cutting them changes the
    kept ones); raises Unfollowed, recording nothing, when a node cannot be followed."""
    owner = w.node_no[id(conv)]
    weight_shape = w.shape(conv.input[1]) or ()
    slots: dict[tuple[int, int, int], Slot] = {}
    edits: dict[tuple[int, int], Edit] = {}
    seen: dict[str, Roles] = {}
    computed: dict[str, dict[int, np.ndarray]] = {}
    # Each node's data input with its channel axes, merged over every path that reaches it:
    # a reduction's own path may not carry the axes it reduces (torch's dynamo exporter
    # writes the standardisation's mean as a ReduceMean that drops them).
    frames: dict[str, Roles] = {}
    reading: list[onnx.NodeProto] = []
    pending = [(conv.input[1], roles)]
    while pending:
        name, carried = pending.pop()
        if name in seen:
            carried = _merged(seen[name], carried, name)
            if carried.keys() == seen[name].keys():
                continue  # nothing new: followed already
        seen[name] = carried
        computed[name] = {a: ids for a, (ids, _) in _effective(w.shape(name), carried).items()}
        node = w.index.producer.get(name)
        if node is None:
            raise Unfollowed(f"'{name}' is a graph input")
        if id(node) not in w.node_no:
            raise Unfollowed(f"{node.op_type} '{node.name}' runs after the conv")
        number = w.node_no[id(node)]
        inputs = _input_roles(w, node, name, carried)
        first, first_roles = inputs[0]
        frames[first] = {**frames.get(first, {}), **first_roles}
        reading.append(node)
        for i, (input_name, input_roles) in enumerate(inputs):
            if w.source(input_name) is not None:
                shape = w.shape(input_name) or ()
                for axis, (ids, role) in _effective(shape, input_roles).items():
                    role = slot_role(role, shape, weight_shape)
                    slots[number, i, axis] = Slot(number, i, axis, ids, role, owner)
            elif input_roles or w.shape(input_name) is None:
                pending.append((input_name, input_roles))
        for edit in _reshape_edits(w, node, number, _effective(w.shape(name), carried)):
            edits[number, edit.axis] = edit
    _read_by_the_conv_alone(w, conv, seen)
    mixed: set[str] = set()
    for node in reading:
        mixed |= _mixed(w, node, _effective(w.shape(node.input[0]), frames[node.input[0]]))
    w.slots += slots.values()
    w.edits += edits.values()
    for name, axes in computed.items():
        w.computed.setdefault(name, {}).update(axes)
    return mixed


def _read_by_the_conv_alone(w: ChannelWalk, conv: onnx.NodeProto, names) -> None:
    """Raise Unfollowed when a tensor of the weight's computation is read outside it (by
    another conv, a tied transposed conv, a penalty, a graph output): the cut that suits
    this conv would change what that reader is given."""
    inside = {id(conv)}
    stack = [conv.input[1]]
    while stack:  # every node the weight is computed by, followed or not
        node = w.index.producer.get(stack.pop())
        if node is not None and id(node) not in inside:
            inside.add(id(node))
            stack.extend(name for name in node.input if name)
    outputs = set(w.index.graph_outputs)
    for name in names:
        if name in outputs:
            raise Unfollowed(f"'{name}' is a graph output too")
        for reader in w.index.consumers.get(name, []):
            if id(reader) not in inside:
                raise Unfollowed(f"'{name}' is read by {reader.op_type} '{reader.name}' too")


def _merged(a: Roles, b: Roles, name: str) -> Roles:
    """Two frames reaching one tensor: their union, if they agree where both have an axis."""
    for axis in a.keys() & b.keys():
        if not np.array_equal(a[axis][0], b[axis][0]):
            raise Unfollowed(f"'{name}' is reached with its channels on different axes")
    return {**a, **b}


def _effective(shape: tuple[int, ...] | None, roles: Roles) -> Roles:
    """The roles a tensor of `shape` really carries: not those it broadcasts (size 1)."""
    return {a: v for a, v in roles.items() if shape is not None and shape[a] == len(v[0])}


def _mixed(w: ChannelWalk, node: onnx.NodeProto, roles: Roles) -> set[str]:
    """The roles whose channels `node` (reading them on `roles`) averages together: a
    reduction over their axis, or a BatchNormalization whose statistics span it."""
    if op_id(node) == "BatchNormalization":
        training = attributes(node).get("training_mode", 0)
        return {role for axis, (_, role) in roles.items() if training and axis != 1}
    if op_id(node) not in REDUCES:
        return set()
    reduced = _reduced_axes(w, node, len(w.shape(node.input[0]) or ()))
    return {role for axis, (_, role) in roles.items() if axis in reduced}


def _reduced_axes(w: ChannelWalk, node: onnx.NodeProto, rank: int) -> set[int]:
    """The axes a Reduce* node reduces (all of them when it names none)."""
    axes = attributes(node).get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = w.const(node.input[1])
        if axes is None:
            raise Unfollowed(f"{node.op_type} '{node.name}': axes computed at run time")
    return set(range(rank)) if axes is None else {int(a) % rank for a in axes}


def _carried(shape: tuple[int, ...], roles: Roles, shift: int, what: str) -> Roles:
    """`roles` on an input of `shape` aligned `shift` axes to the right of the output. An
    axis of size 1 broadcasts: it keeps its role in the frame (a reduction's output keeps
    the axes it reduced, size 1) but is not cut."""
    out: Roles = {}
    for axis, (ids, role) in roles.items():
        k = axis - shift
        if k < 0:
            continue
        if shape[k] not in (1, len(ids)):
            raise Unfollowed(f"{what}: axis {k} has {shape[k]} entries for {len(ids)} channels")
        out[k] = (ids, role)
    return out


def _input_roles(
    w: ChannelWalk, node: onnx.NodeProto, output: str, roles: Roles
) -> list[tuple[str, Roles]]:
    """(input name, the channel axes it carries) for every input of `node` that matters."""
    op, what = op_id(node), f"{node.op_type} '{node.name}'"
    out_shape = w.shape(output)
    shapes = [w.shape(name) if name else None for name in node.input]
    if out_shape is None or any(s is None for s, n in zip(shapes, node.input) if n):
        raise Unfollowed(f"{what}: shapes are not static")
    if op in SAME_AXES:
        return [(node.input[0], roles)] + [(n, {}) for n in node.input[1:] if n]
    if op in BROADCASTING:
        rank = len(out_shape)
        return [(n, _carried(s, roles, rank - len(s), what)) for n, s in zip(node.input, shapes)]
    if op in REDUCES:
        rank = len(shapes[0])
        axes = _reduced_axes(w, node, rank)
        kept = [k for k in range(rank) if attributes(node).get("keepdims", 1) or k not in axes]
        placed = {kept[axis]: value for axis, value in roles.items()}
        return [(node.input[0], _carried(shapes[0], placed, 0, what))] + [
            (n, {}) for n in node.input[1:] if n
        ]
    if op == "Transpose":
        perm = list(attributes(node).get("perm") or reversed(range(len(out_shape))))
        return [(node.input[0], {perm[axis]: value for axis, value in roles.items()})]
    if op in ("Reshape", "Flatten"):
        moved: Roles = {}
        for axis, (ids, role) in _effective(out_shape, roles).items():
            back = reshape_ids(w, out_shape, axis, ids, shapes[0])
            if back is None:
                raise Unfollowed(f"{what}: cannot follow the channel axis through it")
            moved[back[0]] = (back[1], role)
        return [(node.input[0], moved)] + [(n, {}) for n in node.input[1:] if n]
    if op == "BatchNormalization":
        return _batchnorm_roles(w, node, shapes, roles, what)
    raise Unfollowed(f"{what}: op not followed")


def _batchnorm_roles(
    w: ChannelWalk, node: onnx.NodeProto, shapes, roles: Roles, what: str
) -> list[tuple[str, Roles]]:
    """X keeps the axes; its per-channel inputs carry the channels of axis 1 on axis 0.
    Training mode (weight standardisation) normalises by its own batch statistics; its
    running-statistics outputs must be unused."""
    if any(w.index.consumers.get(name) for name in node.output[1:] if name):
        raise Unfollowed(f"{what}: its running statistics are used")
    per_channel = {0: roles[1]} if 1 in _effective(shapes[0], roles) else {}
    return [(node.input[0], roles)] + [
        (n, _carried(s, per_channel, 0, what)) for n, s in zip(node.input[1:], shapes[1:])
    ]


def _reshape_edits(w: ChannelWalk, node: onnx.NodeProto, number: int, roles: Roles) -> list[Edit]:
    """A Reshape shape constant counts channels where it gives their axis literally."""
    if op_id(node) != "Reshape":
        return []  # Flatten: nothing to edit
    literal = w.const(node.input[1])
    if literal is None:  # computed from the weight's own Shape: follows by itself
        return []
    literal = literal.astype(np.int64)
    return [
        Edit("reshape", number, (ids,), axis=axis, value=literal)
        for axis, (ids, _) in roles.items()
        if literal[axis] > 0
    ]


def weight_roles(out_axis: int, out: np.ndarray, in_axis: int, in_ids: np.ndarray | None) -> Roles:
    """The roles of a conv weight's channel axes: filters on `out_axis`, the channels it
    reads on `in_axis` (when they are followed)."""
    roles: Roles = {out_axis: (out, FILTERS)}
    if in_ids is not None:
        roles[in_axis] = (in_ids, WEIGHTS_IN)
    return roles


def slot_role(role: str, shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str:
    """Only the constant as large as the weight scores as its filters; per-channel gains
    and biases are plain constants."""
    return role if int(np.prod(shape)) == int(np.prod(weight_shape)) else CONST
