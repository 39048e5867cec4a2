"""Channel groups: the sets of channel axes that must keep the same channels.

Removing channel 5 of a Conv's output means removing row 5 of its weight, entry 5
of its bias and BatchNorm vectors, input channel 5 of every Conv that reads it,
and channel 5 of everything added to it in a residual join. Each such set is a
channel group; MBS decides how many channels each group keeps.

How they are found (per-channel bookkeeping, in the spirit of Torch-Pruning's
dependency graph but on single channels): every channel a Conv, Gemm or
unfollowable op produces gets an integer id. Ops that pass channels on (BatchNorm,
activations, pooling, Resize) give their output the same id array; Concat
concatenates the arrays, Split and Slice cut them, Transpose and Reshape move them
(a channel shuffle is a Reshape-Transpose-Reshape that permutes them). Joins (Add,
Mul of two maps, an SE gate times its map) union the ids position by position with
a union-find, and a grouped Conv unions each conv-group's channels into one class,
because conv-groups are kept or dropped whole. A class of ids is one channel of
the model: all of its positions are kept or dropped together. Classes that appear
in exactly the same tensors the same number of times form one group; a group's
size is its number of classes. Anything the walk cannot follow pins the classes
it touches, with a reason, so they are kept whole instead of guessed.

Initializer axes that must be cut with a channel axis are recorded as slots, and
attributes or shape constants that count channels (Conv group, Split sizes, Slice
bounds, Reshape shapes, Resize sizes) as edits; `shrink.py` applies both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .analysis import ModelAnalysis, analyze_model
from .graph import GraphIndex, attributes
from .load import in_load_form, is_unknown_op

# Roles of initializer members, so importance and tests know what an axis is.
ACTIVATION = "activation"
FILTERS = "filters"  # the weights that produce the channels (Conv/Gemm/MatMul output axis)
WEIGHTS_IN = "weights_in"  # weights that read the channels (Conv/Gemm/MatMul input axis)
BIAS = "bias"
BN_SCALE, BN_BIAS, BN_MEAN, BN_VAR = "bn_scale", "bn_bias", "bn_mean", "bn_var"
NORM_SCALE, NORM_BIAS = "norm_scale", "norm_bias"
SHIFT = "shift"  # per-channel constant added or subtracted (Add, Sub)
SCALE = "scale"  # per-channel constant multiplied or divided (Mul, Div, PRelu slope)
CONST = "const"  # any other per-channel constant of an element-wise op

UNARY = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "ThresholdedRelu",
    "Identity", "Dropout", "Cast", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
}  # fmt: skip
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
}  # fmt: skip
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
REDUCES = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}  # fmt: skip
ROLE_OF_CONST = {
    "Add": SHIFT,
    "Sub": SHIFT,
    "Sum": SHIFT,
    "Mul": SCALE,
    "Div": SCALE,
    "PRelu": SCALE,
}


@dataclass
class Member:
    """One axis carrying a group: `positions[i]` are where group channel i sits on it.

    `positions` has shape (group size, width); width is 1 for a plain channel axis,
    H*W after a Flatten, the conv-group size for a grouped conv's input, 2 after a
    channel shuffle. `tensor` is an activation or, for initializer axes, the
    initializer (or Constant output) name; `node` is the node whose slot it is.
    """

    tensor: str
    axis: int
    positions: np.ndarray
    role: str = ACTIVATION
    node: str = ""

    @property
    def width(self) -> int:
        return int(self.positions.shape[1])


@dataclass
class ChannelGroup:
    id: int
    size: int
    members: list[Member]
    producers: list[str]  # Conv/ConvTranspose (and Gemm/MatMul) nodes whose filters make it
    macroblocks: list[int]  # where its channels are made (its producers' macroblocks)
    pinned: bool
    pin_reasons: list[str] = field(default_factory=list)

    def member(self, tensor: str) -> Member:
        return next(m for m in self.members if m.tensor == tensor)


@dataclass
class Slot:
    """Initializer input `input` of node number `node`: its `axis` follows channel ids `ids`."""

    node: int
    input: int
    axis: int
    ids: np.ndarray
    role: str


@dataclass
class Edit:
    """A node attribute or shape constant that counts channels and must be recomputed.

    kind: "group" (ids: the channels counting conv-groups, per: channels per
    conv-group), "split" (ids: one array per output; value: the sizes), "slice" (ids:
    the input; start/end on the channel axis, which is entry `axis` of the starts
    `value` and ends `value2`), "reshape" (ids: the output; value: the shape, entry
    `axis` counts channels), "resize" (ids: the input; value: sizes, entry `axis`).
    """

    kind: str
    node: int
    ids: tuple[np.ndarray, ...]
    axis: int = 0
    per: int = 1
    start: int = 0
    end: int = 0
    value: np.ndarray | None = None  # the constant being edited (shape, sizes, starts...)
    value2: np.ndarray | None = None


@dataclass
class ChannelAnalysis:
    """Everything shrink needs: the groups, plus how channel ids map to them."""

    groups: list[ChannelGroup]
    root: np.ndarray  # channel id -> its class (union-find root)
    classes: list[np.ndarray]  # group id -> class roots in group channel order
    tensors: dict[str, tuple[int, np.ndarray]]  # activation -> (channel axis, channel ids)
    slots: list[Slot]
    edits: list[Edit]


class _Walk:
    """One topological walk that gives every channel an id and records joins and pins."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.index = GraphIndex.build(model)
        self.parent: list[int] = []
        self.chan: dict[str, tuple[int, np.ndarray]] = {}
        self.slots: list[Slot] = []
        self.edits: list[Edit] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.node_no: dict[int, int] = {}
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17
        )

    # -- union-find over channel ids ---------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[rx] = ry

    def varies(self, ids: np.ndarray) -> bool:
        first = self.find(int(ids.flat[0]))
        return any(self.find(x) != first for x in ids.flat[1:].tolist())

    # -- helpers ------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.index.shapes.get(name)

    def source(self, name: str) -> str | None:
        return constant_source(self.index, name)

    def const(self, name: str) -> np.ndarray | None:
        return self.index.constant(name) if name else None

    def pin(self, ids: np.ndarray, reason: str) -> None:
        self.pins.append((ids, reason))

    def slot(self, node: onnx.NodeProto, i: int, axis: int, ids: np.ndarray, role: str) -> None:
        self.slots.append(Slot(self.node_no[id(node)], i, axis, ids, role))

    def edit(self, kind: str, node: onnx.NodeProto, ids: tuple[np.ndarray, ...], **kw) -> None:
        self.edits.append(Edit(kind, self.node_no[id(node)], ids, **kw))

    def opaque(self, node: onnx.NodeProto, why: str) -> None:
        """An op the walk cannot follow: pin what goes in, and give what comes out new
        pinned channels (axis 1) so nothing downstream is cut against it."""
        reason = f"{node.op_type} '{node.name}': {why}"
        for name in node.input:
            if name in self.chan:
                self.pin(self.chan[name][1], reason)
        for name in node.output:
            shape = self.shape(name)
            if name and shape is not None and len(shape) >= 2 and shape[1] > 0:
                ids = self.fresh(shape[1])
                self.pin(ids, reason)
                self.chan[name] = (1, ids)

    def pass_on(self, node: onnx.NodeProto, axis: int, ids: np.ndarray, outputs=None) -> None:
        for name in node.output if outputs is None else outputs:
            if name:
                self.chan[name] = (axis, ids)

    # -- the walk -----------------------------------------------------------------------
    def run(self) -> None:
        for name in self.index.graph_inputs:
            shape = self.shape(name)
            if shape is not None and len(shape) >= 2:
                ids = self.fresh(shape[1])
                self.pin(ids, f"graph input '{name}'")
                self.chan[name] = (1, ids)
        for k, node in enumerate(self.index.nodes):
            self.node_no[id(node)] = k
            self.visit(node)
        for name in self.index.graph_outputs:
            if name in self.chan:
                self.pin(self.chan[name][1], f"graph output '{name}'")

    def visit(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        inputs = [name for name in node.input if name in self.chan]
        custom = node.domain not in ("", "ai.onnx") or is_unknown_op(node)
        if not inputs and op not in ("Conv", "ConvTranspose"):
            if custom or _subgraphs(node):
                self.opaque(node, "op not followed")
            return  # shape arithmetic and constants carry no channels
        if custom:
            self.opaque(node, f"custom op (domain '{node.domain}') not followed")
            return
        if _subgraphs(node):
            for name in subgraph_names(node):
                if name in self.chan:
                    self.pin(self.chan[name][1], f"{op} '{node.name}': used in a subgraph")
            self.opaque(node, "control flow not followed")
            return
        if any(self.shape(name) is None for name in [*inputs, node.output[0]]):
            self.opaque(node, "shapes are not static")
            return
        handler = HANDLERS.get(op)
        if handler is None and op in UNARY:
            handler = _unary
        elif handler is None and op in ELEMENTWISE:
            handler = _elementwise
        elif handler is None and op in POOLS:
            handler = _pool
        elif handler is None and op in REDUCES:
            handler = _reduce
        if handler is None:
            self.opaque(node, "op not followed")
        else:
            handler(self, node)


def constant_source(index: GraphIndex, name: str) -> str | None:
    """The initializer or Constant node output behind `name`, looking through Identity
    (exporters share equal tensors that way); None if `name` is computed at run time."""
    while name not in index.initializers:
        node = index.producer.get(name)
        if node is None or node.op_type not in ("Identity", "Constant"):
            return None
        if node.op_type == "Constant":
            return name
        name = node.input[0]
    return name


# -- handlers -------------------------------------------------------------------------------


def _unary(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    w.pass_on(node, axis, ids)


def _elementwise(w: _Walk, node: onnx.NodeProto) -> None:
    out_shape = w.shape(node.output[0])
    if out_shape is None:
        w.opaque(node, "no static output shape")
        return
    rank = len(out_shape)
    aligned = []  # (output axis, ids) of inputs that carry channels
    for name in node.input:
        if name in w.chan:
            axis, ids = w.chan[name]
            aligned.append((axis + rank - len(w.shape(name) or out_shape), ids))
    if len({axis for axis, _ in aligned}) > 1:
        w.opaque(node, "inputs carry channels on different axes")
        return
    axis = aligned[0][0]
    full = [ids for _, ids in aligned if len(ids) == out_shape[axis]]
    if not full:  # every channel input broadcasts (size 1) into a wider output
        w.opaque(node, "channels come from a broadcast constant")
        return
    for ids in full[1:]:
        w.union(full[0], ids)
    out = full[0]
    for i, name in enumerate(node.input):
        if not name or name in w.chan:
            continue
        shape = w.shape(name)
        if shape is None:
            w.opaque(node, f"input '{name}' has no static shape")
            return
        k = axis - (rank - len(shape))
        if k < 0 or shape[k] == 1:
            continue  # scalar or broadcast along the channels: nothing to cut
        if w.source(name) is None:
            w.opaque(node, f"per-channel input '{name}' is computed at run time")
            return
        w.slot(node, i, k, out, ROLE_OF_CONST.get(node.op_type, CONST))
    w.pass_on(node, axis, out)


def _conv(w: _Walk, node: onnx.NodeProto) -> None:
    """Conv: new channels out; input channels are cut from the weight's axis 1. Grouped:
    each conv-group's input and output channels form one class (kept or dropped whole);
    a depthwise conv thereby ties each input channel to its outputs."""
    transpose = node.op_type == "ConvTranspose"
    x, weight = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w_shape, out_shape = w.shape(weight), w.shape(node.output[0])
    if w_shape is None or out_shape is None or w.source(weight) is None:
        w.opaque(node, "weight is not a constant with a static shape")
        return
    if bias and w.source(bias) is None:
        w.opaque(node, "bias is computed at run time")
        return
    group = int(attributes(node).get("group", 1))
    cin = w_shape[0] if transpose else w_shape[1] * group
    cout = out_shape[1]
    in_ids = None
    if x in w.chan:
        axis, in_ids = w.chan[x]
        if axis != 1:
            w.pin(in_ids, f"{node.op_type} '{node.name}': channels arrive on axis {axis}")
            in_ids = None
    out_axis, in_axis = (1, 0) if transpose else (0, 1)
    if group == 1:
        out = w.fresh(cout)
        w.slot(node, 1, out_axis, out, FILTERS)
        if in_ids is not None:
            w.slot(node, 1, in_axis, in_ids, WEIGHTS_IN)
    else:
        if in_ids is None:
            in_ids = w.fresh(cin)
            w.pin(in_ids, f"{node.op_type} '{node.name}': grouped conv on channels not followed")
        blocks = in_ids.reshape(group, cin // group)
        for j in range(1, blocks.shape[1]):
            w.union(blocks[:, 0], blocks[:, j])
        out = np.repeat(blocks[:, 0], cout // group)
        # The weight axis that counts conv-groups is the output axis for Conv, the
        # input axis for ConvTranspose; the other one stays (it is per conv-group).
        w.slot(node, 1, 0, out if not transpose else in_ids, FILTERS)
        per = cin // group if transpose else cout // group
        w.edit("group", node, (in_ids if transpose else out,), per=per)
    if bias:
        w.slot(node, 2, 0, out, BIAS)
    w.pass_on(node, 1, out, node.output[:1])


def _batchnorm(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    if axis != 1:
        w.opaque(node, f"channels on axis {axis}")
        return
    roles = [BN_SCALE, BN_BIAS, BN_MEAN, BN_VAR]
    for i, role in enumerate(roles, start=1):
        if w.source(node.input[i]) is None:
            w.opaque(node, f"input '{node.input[i]}' is computed at run time")
            return
        w.slot(node, i, 0, ids, role)
    w.pass_on(node, 1, ids, node.output[:1])
    for name in node.output[1:]:  # training-mode running statistics
        if name:
            w.chan[name] = (0, ids)


def _instancenorm(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    if axis != 1 or w.source(node.input[1]) is None or w.source(node.input[2]) is None:
        w.opaque(node, "channels not on axis 1 or scale/bias not constant")
        return
    w.slot(node, 1, 0, ids, NORM_SCALE)
    w.slot(node, 2, 0, ids, NORM_BIAS)
    w.pass_on(node, 1, ids)


def _gemm(w: _Walk, node: onnx.NodeProto) -> None:
    """Gemm A(M,K) x B(K,N): the channels of A index K, i.e. rows of B (columns if
    transB). After Flatten, A's ids repeat each channel H*W times, matching the
    channel-major layout of the flattened rows."""
    a, b = node.input[0], node.input[1]
    attrs = attributes(node)
    k_axis_a = 0 if attrs.get("transA") else 1
    b_shape, out_shape = w.shape(b), w.shape(node.output[0])
    in_ids = None
    if a in w.chan:
        axis, in_ids = w.chan[a]
        if axis != k_axis_a:
            w.opaque(node, "channels on the batch axis")
            return
    if b in w.chan or w.source(b) is None or b_shape is None or out_shape is None:
        w.opaque(node, "weight is not a constant")
        return
    k_axis_b, n_axis_b = (1, 0) if attrs.get("transB") else (0, 1)
    out = w.fresh(out_shape[1])
    if in_ids is not None:
        w.slot(node, 1, k_axis_b, in_ids, WEIGHTS_IN)
    w.slot(node, 1, n_axis_b, out, FILTERS)
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        c_shape = w.shape(c)
        if c in w.chan or w.source(c) is None or c_shape is None:
            w.opaque(node, "bias is not a constant")
            return
        if c_shape and c_shape[-1] > 1:
            w.slot(node, 2, len(c_shape) - 1, out, BIAS)
    w.pass_on(node, 1, out)


def _matmul(w: _Walk, node: onnx.NodeProto) -> None:
    a, b = node.input
    a_shape, b_shape, out_shape = w.shape(a), w.shape(b), w.shape(node.output[0])
    if b in w.chan or a not in w.chan or None in (a_shape, b_shape, out_shape):
        w.opaque(node, "both operands carry channels, or shapes are not static")
        return
    axis, ids = w.chan[a]
    rank = len(out_shape)
    if axis != len(a_shape) - 1:  # channels ride along a batch or row axis
        w.pass_on(node, axis + rank - len(a_shape), ids)
        return
    if w.source(b) is None or len(b_shape) != 2:
        w.opaque(node, "channels contracted with a weight that is not a constant matrix")
        return
    out = w.fresh(out_shape[-1])
    w.slot(node, 1, 0, ids, WEIGHTS_IN)
    w.slot(node, 1, 1, out, FILTERS)
    w.pass_on(node, rank - 1, out)


def _concat(w: _Walk, node: onnx.NodeProto) -> None:
    out_shape = w.shape(node.output[0])
    if out_shape is None or not all(name in w.chan for name in node.input):
        w.opaque(node, "an input with no channel source, or no static shape")
        return
    cat_axis = int(attributes(node)["axis"]) % len(out_shape)
    axes = {w.chan[name][0] for name in node.input}
    if axes == {cat_axis}:  # channel concat: the output is made of the inputs' segments
        w.pass_on(node, cat_axis, np.concatenate([w.chan[name][1] for name in node.input]))
    elif len(axes) == 1:  # concat along space: the inputs share their channels
        first = w.chan[node.input[0]][1]
        for name in node.input[1:]:
            w.union(first, w.chan[name][1])
        w.pass_on(node, axes.pop(), first)
    else:
        w.opaque(node, "inputs carry channels on different axes")


def _split(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    shape = w.shape(node.input[0])
    attrs = attributes(node)
    split_axis = int(attrs.get("axis", 0)) % len(shape)
    if split_axis != axis:
        w.pass_on(node, axis, ids)
        return
    if len(node.input) > 1 and node.input[1]:
        sizes = w.const(node.input[1])
        if sizes is None:
            w.opaque(node, "split sizes computed at run time")
            return
        sizes = [int(s) for s in sizes]
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    else:
        n = len(node.output)
        if shape[axis] % n:
            w.opaque(node, "uneven split without sizes")
            return
        sizes = [shape[axis] // n] * n
    bounds = np.cumsum([0, *sizes])
    parts = tuple(ids[bounds[k] : bounds[k + 1]] for k in range(len(sizes)))
    for name, part in zip(node.output, parts):
        w.chan[name] = (axis, part)
    w.edit("split", node, parts, axis=axis, value=np.array(sizes, dtype=np.int64))


def _slice(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    shape = w.shape(node.input[0])
    values = [
        w.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))
    ]
    starts, ends, axes, steps = values
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None):
        w.opaque(node, "bounds computed at run time")
        return
    if len(node.input) > 4 and node.input[4] and steps is None:
        w.opaque(node, "steps computed at run time")
        return
    axes = [int(a) % len(shape) for a in (axes if axes is not None else range(len(starts)))]
    if axis not in axes:
        w.pass_on(node, axis, ids)
        return
    k = axes.index(axis)
    step = 1 if steps is None else int(steps[k])
    if step != 1:
        w.opaque(node, f"step {step} on the channel axis")
        return
    start, end, _ = slice(int(starts[k]), int(ends[k])).indices(shape[axis])
    end = max(start, end)
    if (start, end) == (0, shape[axis]):
        w.pass_on(node, axis, ids)
        return
    w.pass_on(node, axis, ids[start:end])
    w.edit("slice", node, (ids,), axis=k, start=start, end=end, value=starts, value2=ends)


def _reshape_ids(
    w: _Walk, in_shape: tuple[int, ...], axis: int, ids: np.ndarray, out_shape: tuple[int, ...]
) -> tuple[int, np.ndarray] | None:
    """Follow channel ids through a reshape. Only the block of dims merged or split
    together with the channel axis is materialized. If channels end up varying along
    several output axes (a channel shuffle's (g, C/g) split), all but the last are
    tied so that every kept set stays a box: the leading axes keep their size."""
    in_dims, out_dims = _reshape_blocks(in_shape, out_shape)
    block = next((b for b, dims in enumerate(in_dims) if axis in dims), None)
    if block is None or not out_dims[block]:
        return None
    src, dst = in_dims[block], out_dims[block]
    sub = [in_shape[d] if d == axis else 1 for d in src]
    full = np.broadcast_to(ids.reshape(sub), [in_shape[d] for d in src])
    out = full.reshape([out_shape[d] for d in dst])
    varying = [k for k in range(out.ndim) if out.shape[k] > 1 and _axis_varies(w, out, k)]
    last = varying[-1] if varying else out.ndim - 1
    moved = np.moveaxis(out, last, -1).reshape(-1, out.shape[last])
    for row in moved[1:]:
        w.union(moved[0], row)
    return dst[last], moved[0].copy()


def _axis_varies(w: _Walk, arr: np.ndarray, k: int) -> bool:
    """Whether the class changes along axis k anywhere in `arr`."""
    moved = np.moveaxis(arr, k, 0).reshape(arr.shape[k], -1)
    return any(w.varies(moved[:, j]) for j in range(moved.shape[1]))


def _reshape_blocks(
    a: tuple[int, ...], b: tuple[int, ...]
) -> tuple[list[list[int]], list[list[int]]]:
    """Pair up runs of dims of `a` and `b` with equal products (size-1 dims on their own)."""
    ia = ib = 0
    blocks_a: list[list[int]] = []
    blocks_b: list[list[int]] = []
    while ia < len(a) or ib < len(b):
        if ia < len(a) and a[ia] == 1:
            blocks_a.append([ia])
            blocks_b.append([])
            ia += 1
            continue
        if ib < len(b) and b[ib] == 1:
            blocks_a.append([])
            blocks_b.append([ib])
            ib += 1
            continue
        if ia >= len(a) or ib >= len(b):
            raise ValueError(f"cannot pair reshape {a} -> {b}")
        da, db = [ia], [ib]
        pa, pb = a[ia], b[ib]
        ia += 1
        ib += 1
        while pa != pb:
            if pa < pb:
                pa *= a[ia]
                da.append(ia)
                ia += 1
            else:
                pb *= b[ib]
                db.append(ib)
                ib += 1
        blocks_a.append(da)
        blocks_b.append(db)
    return blocks_a, blocks_b


def _reshape(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    in_shape, out_shape = w.shape(node.input[0]), w.shape(node.output[0])
    literal = w.const(node.input[1]) if node.op_type == "Reshape" else None
    if in_shape is None or out_shape is None or (node.op_type == "Reshape" and literal is None):
        w.opaque(node, "shape computed at run time (run FoldShapes first)")
        return
    moved = _reshape_ids(w, in_shape, axis, ids, out_shape)
    if moved is None:
        w.opaque(node, "cannot follow the channel axis through this reshape")
        return
    out_axis, out_ids = moved
    if node.op_type == "Reshape":
        literal = literal.astype(np.int64)
        if literal[out_axis] == 0 and out_axis != axis:
            w.opaque(node, "copies a dim (0) that moves the channel axis")
            return
        w.edit("reshape", node, (out_ids,), axis=out_axis, value=literal)
    w.pass_on(node, out_axis, out_ids)


def _transpose(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    perm = list(attributes(node).get("perm") or reversed(range(rank)))
    w.pass_on(node, perm.index(axis), ids)


def _axes_of(w: _Walk, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """`axes` from the attribute or the second input, normalized; None if not constant."""
    attrs = attributes(node)
    if "axes" in attrs:
        values = attrs["axes"]
    elif len(node.input) > 1 and node.input[1]:
        values = w.const(node.input[1])
        if values is None:
            return None
    else:
        values = []
    return [int(a) % rank for a in values]


def _unsqueeze(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    out_rank = len(w.shape(node.output[0]))
    axes = _axes_of(w, node, out_rank)
    if axes is None:
        w.opaque(node, "axes computed at run time")
        return
    kept = [k for k in range(out_rank) if k not in axes]
    w.pass_on(node, kept[axis], ids)


def _squeeze(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    shape = w.shape(node.input[0])
    axes = _axes_of(w, node, len(shape))
    if axes is None:
        w.opaque(node, "axes computed at run time")
        return
    axes = axes or [k for k, d in enumerate(shape) if d == 1]
    if axis in axes:
        w.opaque(node, "squeezes the channel axis")
        return
    w.pass_on(node, axis - sum(a < axis for a in axes), ids)


def _pool(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    if axis != 1:
        w.opaque(node, f"channels on axis {axis}")
        return
    if len(node.output) > 1 and node.output[1] and w.index.consumers.get(node.output[1]):
        w.opaque(node, "indices output encodes channel positions")
        return
    w.pass_on(node, 1, ids, node.output[:1])


def _reduce(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    attrs = attributes(node)
    axes = _axes_of(w, node, rank)
    if axes is None:
        w.opaque(node, "axes computed at run time")
        return
    if not axes and not attrs.get("noop_with_empty_axes"):
        axes = list(range(rank))
    if axis in axes:
        w.opaque(node, "reduces over the channel axis")
        return
    keep = attrs.get("keepdims", 1)
    w.pass_on(node, axis if keep else axis - sum(a < axis for a in axes), ids)


def _softmax(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    default = -1 if w.opset >= 13 else 1
    along = int(attributes(node).get("axis", default)) % rank
    if along == axis or (w.opset < 13 and along <= axis):
        w.opaque(node, "normalizes over the channel axis")
        return
    w.pass_on(node, axis, ids)


def _resize(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    scales_name = node.input[2] if len(node.input) > 2 else ""
    if node.op_type == "Upsample":
        scales_name = node.input[1] if len(node.input) > 1 else ""
    scales = w.const(scales_name) if scales_name else attributes(node).get("scales")
    if scales_name and scales is None:
        w.opaque(node, "scales computed at run time")
        return
    if scales is not None and len(scales) and float(scales[axis]) != 1.0:
        w.opaque(node, "resizes the channel axis")
        return
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        sizes = w.const(node.input[3])
        if sizes is None:
            w.opaque(node, "sizes computed at run time")
            return
        w.edit("resize", node, (ids,), axis=axis, value=sizes.astype(np.int64))
    w.pass_on(node, axis, ids)


def _pad(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    pads = attributes(node).get("pads")
    if pads is None:
        pads = w.const(node.input[1]) if len(node.input) > 1 else None
    if pads is None:
        w.opaque(node, "pads computed at run time")
        return
    pad_axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        pad_axes = _axes_of_input(w, node.input[3], rank)
        if pad_axes is None:
            w.opaque(node, "axes computed at run time")
            return
    pads = [int(p) for p in pads]
    n = len(pad_axes)
    if axis in pad_axes:
        k = pad_axes.index(axis)
        if pads[k] or pads[k + n]:
            w.opaque(node, "pads the channel axis")
            return
    w.pass_on(node, axis, ids)


def _axes_of_input(w: _Walk, name: str, rank: int) -> list[int] | None:
    values = w.const(name)
    return None if values is None else [int(a) % rank for a in values]


def _gather(w: _Walk, node: onnx.NodeProto) -> None:
    if node.input[1] in w.chan or node.input[0] not in w.chan:
        w.opaque(node, "indices carry channels")
        return
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    along = int(attributes(node).get("axis", 0)) % rank
    if along == axis:
        w.opaque(node, "gathers along the channel axis")
        return
    idx_shape = w.shape(node.input[1])
    if idx_shape is None:
        w.opaque(node, "indices have no static shape")
        return
    w.pass_on(node, axis if axis < along else axis + len(idx_shape) - 1, ids)


def _shape(w: _Walk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    attrs = attributes(node)
    start, end, _ = slice(attrs.get("start", 0), attrs.get("end", rank)).indices(rank)
    if start <= axis < end:
        w.pin(ids, f"Shape '{node.name}': reads the channel count at run time (run FoldShapes)")


HANDLERS: dict[str, Callable[[_Walk, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Hardmax": _softmax,
    "Resize": _resize,
    "Upsample": _resize,
    "Pad": _pad,
    "Gather": _gather,
    "Shape": _shape,
}


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node's subgraphs read (outer-scope values included)."""
    names: set[str] = set()
    for graph in _subgraphs(node):
        for inner in graph.node:
            names.update(inner.input)
            names |= subgraph_names(inner)
    return names


# -- from classes to groups -------------------------------------------------------------------


def analyze_channels(
    model: onnx.ModelProto, macroblocks: ModelAnalysis | None = None
) -> ChannelAnalysis:
    """Channel groups of a model in `load_model` form, plus the bookkeeping shrink needs.

    Run `FoldShapes` first if the model computes Reshape shapes at run time;
    otherwise the groups those shapes read are pinned. `macroblocks` is
    `analyze_model(model)` if the caller has it already. A model not in `load_model`
    form is loaded first.
    """
    model = in_load_form(model)
    walk = _Walk(model)
    walk.run()
    root = _roots(walk.parent)
    classes = _classes_by_signature(walk, root)
    where = _Positions(root, classes)

    members: list[list[Member]] = [[] for _ in classes]
    for name, (axis, ids) in walk.chan.items():
        for g, positions in where(ids):
            members[g].append(Member(name, axis, positions))
    layers = (macroblocks or analyze_model(model)).layers
    layer_block = {layer.name: layer.macroblock for layer in layers}
    producers: list[list[str]] = [[] for _ in classes]
    blocks: list[set[int]] = [set() for _ in classes]
    for slot in walk.slots:
        node = walk.index.nodes[slot.node]
        tensor = walk.source(node.input[slot.input]) or node.input[slot.input]
        for g, positions in where(slot.ids):
            members[g].append(Member(tensor, slot.axis, positions, slot.role, node.name))
            if slot.role == FILTERS and node.name not in producers[g]:
                producers[g].append(node.name)
            # A group belongs to the macroblocks where its channels are made, not to
            # those of the convs that read them.
            if slot.role == FILTERS and node.name in layer_block:
                blocks[g].add(layer_block[node.name])
    reasons: list[list[str]] = [[] for _ in classes]
    for ids, reason in walk.pins:
        for g in np.unique(where.group_of[root[ids]]).tolist():
            if reason not in reasons[g]:
                reasons[g].append(reason)
    groups = [
        ChannelGroup(
            id=g,
            size=len(cls),
            members=members[g],
            producers=producers[g],
            macroblocks=sorted(blocks[g]),
            pinned=bool(reasons[g]),
            pin_reasons=reasons[g],
        )
        for g, cls in enumerate(classes)
    ]
    return ChannelAnalysis(groups, root, classes, dict(walk.chan), walk.slots, walk.edits)


def _classes_by_signature(walk: _Walk, root: np.ndarray) -> list[np.ndarray]:
    """Group classes that appear in the same id arrays the same number of times; in
    order of first appearance. Aliased tensors (Conv -> BN -> Relu) share one array,
    so the signature is over arrays, not tensors."""
    arrays = {id(ids): ids for _, ids in walk.chan.values()}
    signature: dict[int, list[tuple[int, int]]] = {}
    first_seen: dict[int, tuple[int, int]] = {}
    for k, ids in enumerate(arrays.values()):
        found, first, counts = np.unique(root[ids], return_index=True, return_counts=True)
        for cls, pos, count in zip(found.tolist(), first.tolist(), counts.tolist()):
            if cls not in signature:
                signature[cls] = []
                first_seen[cls] = (k, pos)
            signature[cls].append((k, count))
    by_signature: dict[tuple, list[int]] = {}
    for cls in sorted(signature, key=first_seen.__getitem__):
        by_signature.setdefault(tuple(signature[cls]), []).append(cls)
    return [np.array(c, dtype=np.int64) for c in by_signature.values()]


class _Positions:
    """For an id array: which groups it holds, and where each group channel sits in it
    (an array (group size, width)); cached per array, as tensors share arrays."""

    def __init__(self, root: np.ndarray, classes: list[np.ndarray]) -> None:
        self.root = root
        self.sizes = [len(c) for c in classes]
        self.group_of = np.full(len(root), -1, dtype=np.int64)  # indexed by class root
        self.rank_of = np.zeros(len(root), dtype=np.int64)
        for g, cls in enumerate(classes):
            self.group_of[cls] = g
            self.rank_of[cls] = np.arange(len(cls))
        self.cache: dict[int, list[tuple[int, np.ndarray]]] = {}

    def __call__(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        if id(ids) not in self.cache:
            cls = self.root[ids]
            groups = self.group_of[cls]
            parts = []
            for g in np.unique(groups).tolist():
                where = np.flatnonzero(groups == g)
                where = where[np.argsort(self.rank_of[cls[where]], kind="stable")]
                parts.append((g, where.reshape(self.sizes[g], -1)))
            self.cache[id(ids)] = parts
        return self.cache[id(ids)]


def _roots(parent: list[int]) -> np.ndarray:
    """Union-find roots of every id, by pointer jumping in numpy."""
    root = np.array(parent, dtype=np.int64)
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def find_channel_groups(
    model: onnx.ModelProto, macroblocks: ModelAnalysis | None = None
) -> list[ChannelGroup]:
    """Every set of channel axes that must keep the same channels (see module docstring)."""
    return analyze_channels(model, macroblocks).groups
