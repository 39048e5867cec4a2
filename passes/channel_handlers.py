"""The built-in op handlers of the channel walk, registered at import.

Each handler is `handler(walk, node)` (see `channel_walk.ChannelWalk`): ops that
pass channels on give their output the input's ids, joins union them, Conv-like
ops make new ones and record the weight axes to cut. Whole op families
(activations, element-wise ops, pools, reductions) share one handler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .channel_reshape import reshape_ids
from .channel_walk import (
    BIAS,
    BN_BIAS,
    BN_MEAN,
    BN_SCALE,
    BN_VAR,
    CONST,
    FILTERS,
    NORM_BIAS,
    NORM_SCALE,
    SCALE,
    SHIFT,
    WEIGHTS_IN,
    ChannelWalk,
    register_handler,
)
from .domains import FUSED, FUSED_ACTIVATIONS, FUSED_GEMM, op_id
from .graph import attributes
from .weight_chain import Unfollowed, follow_weight, weight_roles

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


def _unary(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    w.pass_on(node, axis, ids)


def _elementwise(w: ChannelWalk, node: onnx.NodeProto) -> None:
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
        w.slot(node, i, k, out, ROLE_OF_CONST.get(op_id(node), CONST))
    w.pass_on(node, axis, out)


def _fused(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """onnxruntime's FusedConv, activation(Conv(X, W, B) + Z), and FusedGemm,
    activation(Gemm(A, B, C)): their channels are the Conv's or Gemm's (the weights cut as
    theirs); a FusedConv's Z, a residual of the output's shape, joins them as an Add does.
    An activation onnxruntime does not run fused into the op (`FUSED_ACTIVATIONS`) is not
    followed."""
    activation = attributes(node).get("activation", b"")
    if isinstance(activation, bytes):
        activation = activation.decode()
    if activation and activation not in FUSED_ACTIVATIONS[op_id(node)]:
        w.opaque(node, f"fused activation {activation!r} not followed")
        return
    if op_id(node) == FUSED_GEMM:
        _gemm(w, node)
        return
    z = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if z is not None and (z not in w.chan or w.chan[z][0] != 1):
        w.opaque(node, "its residual input Z carries no channels on axis 1")
        return
    _conv(w, node)
    if z is not None:
        w.union(w.chan[node.output[0]][1], w.chan[z][1])


def _conv(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """Conv: new channels out; input channels are cut from the weight's axis 1. Grouped:
    each conv-group's input and output channels form one class (kept or dropped whole);
    a depthwise conv thereby ties each input channel to its outputs. Conv-groups that tie
    every channel into one with a GroupNorm's units before them are pinned, saying so. A
    weight computed in the graph (weight standardisation) is followed back to its
    initializers."""
    transpose = op_id(node) == "ConvTranspose"
    x, weight = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w_shape, out_shape = w.shape(weight), w.shape(node.output[0])
    if w_shape is None or out_shape is None:
        w.opaque(node, "weight has no static shape")
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
        roles = weight_roles(out_axis, out, in_axis, in_ids)
    else:
        if in_ids is None:
            in_ids = w.fresh(cin)
            w.pin(in_ids, f"{node.op_type} '{node.name}': grouped conv on channels not followed")
        blocks = in_ids.reshape(group, cin // group)
        varied = w.varies(in_ids)
        for j in range(1, blocks.shape[1]):
            w.union(blocks[:, 0], blocks[:, j])
        if varied and not w.varies(in_ids) and _group_norm_read(w, in_ids):
            w.pin(
                in_ids,
                f"{node.op_type} '{node.name}' (group {group}): its conv-groups and the units "
                "its channels come in (a GroupNorm's: one channel of each group) together tie "
                "every channel into one, so none can be cut",
            )
        out = np.repeat(blocks[:, 0], cout // group)
        # The weight axis that counts conv-groups is the output axis for Conv, the
        # input axis for ConvTranspose; the other one stays (it is per conv-group).
        roles = {0: (out if not transpose else in_ids, FILTERS)}
        per = cin // group if transpose else cout // group
        w.edit("group", node, (in_ids if transpose else out,), per=per)
    if w.source(weight) is not None:
        for axis, (ids, role) in roles.items():
            w.slot(node, 1, axis, ids, role)
    else:
        try:
            mixed = follow_weight(w, node, roles)
        except Unfollowed as why:
            w.opaque(node, f"weight computed in the graph and not followed: {why}")
            return
        for ids, role in roles.values():
            if role in mixed:
                w.not_exact(
                    ids,
                    f"{node.op_type} '{node.name}': its weight is standardised over these "
                    "channels; the kept ones are standardised again without the cut ones",
                )
    if bias:
        w.slot(node, 2, 0, out, BIAS)
    w.pass_on(node, 1, out, node.output[:1])


def _group_norm_read(w: ChannelWalk, ids: np.ndarray) -> bool:
    """Whether a GroupNorm cut `ids`' class in its units (conv-groups a channel shuffle
    mixes tie every channel too: a single unit, which the plan explains, not a pin)."""
    root = w.find(int(ids.flat[0]))
    return any(w.find(int(units.flat[0])) == root for units in w.group_norms)


def _batchnorm(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _instancenorm(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """InstanceNormalization normalises each (sample, axis-1 entry) over the axes after.
    Channels on axis 1: scale and bias are cut with them, exactly. Channels on a later
    axis: GroupNorm as torch exports it, Reshape (N, C, H, W) -> (N, G, -1) first. That
    Reshape ties channel j of each of the G blocks into one class (`reshape_ids`), so a
    cut takes the same channels from every block and each keeps its own statistics; the
    scale and bias (one per block) stay. The kept channels are then normalised without
    the cut ones: GroupNorm over the kept channels, not exact. Channels that reach the
    GroupNorm all one unit (its units and a grouped conv's tie every channel) are pinned,
    saying so."""
    axis, ids = w.chan[node.input[0]]
    if axis == 0 or w.source(node.input[1]) is None or w.source(node.input[2]) is None:
        w.opaque(node, "channels on the batch axis or scale/bias not constant")
        return
    made = w.index.producer.get(node.input[0])
    if (
        made is not None
        and op_id(made) == "Reshape"
        and len(ids) > 1
        and not w.varies(ids)
        and not _group_norm_read(w, ids)  # an earlier GroupNorm's: the grouped conv said so
    ):
        w.pin(
            ids,
            f"InstanceNormalization '{node.name}' (GroupNorm): its units (one channel of each "
            "group) and those its channels come in (a grouped conv's conv-groups) together "
            "tie every channel into one, so none can be cut",
        )
    if axis > 1:
        w.group_norms.append(ids)
        w.not_exact(
            ids,
            f"InstanceNormalization '{node.name}': normalises each group over its channels "
            "(GroupNorm), so the kept channels' mean and variance change",
        )
        w.pass_on(node, axis, ids)
        return
    w.slot(node, 1, 0, ids, NORM_SCALE)
    w.slot(node, 2, 0, ids, NORM_BIAS)
    w.pass_on(node, 1, ids)


def _layernorm(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """LayerNormalization normalises over the axes from `axis` on. Over the channel axis
    alone (ConvNeXt's channels-last blocks) its scale and bias are cut with the channels,
    as Torch-Pruning does; the kept channels' mean and variance then change, so the cut
    is marked not exact. Over other axes only, channels pass through, exactly."""
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    first = int(attributes(node).get("axis", -1)) % rank
    if any(w.index.consumers.get(name) for name in node.output[1:] if name):
        w.opaque(node, "its mean or inverse deviation output is used")
        return
    if axis < first:
        w.pass_on(node, axis, ids, node.output[:1])
        return
    if first != rank - 1:
        w.opaque(node, "normalises over the channel axis and others together")
        return
    for i, role in ((1, NORM_SCALE), (2, NORM_BIAS)):
        if len(node.input) <= i or not node.input[i]:
            continue
        shape = w.shape(node.input[i])
        if shape is None or w.source(node.input[i]) is None:
            w.opaque(node, f"input '{node.input[i]}' is not a constant")
            return
        if shape and shape[-1] > 1:
            w.slot(node, i, len(shape) - 1, ids, role)
    w.not_exact(
        ids,
        f"LayerNormalization '{node.name}': normalises over the channels, so the kept "
        "channels' mean and variance change",
    )
    w.pass_on(node, axis, ids, node.output[:1])


def _gemm(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _matmul(w: ChannelWalk, node: onnx.NodeProto) -> None:
    a, b = node.input
    a_shape, b_shape, out_shape = w.shape(a), w.shape(b), w.shape(node.output[0])
    if b in w.chan or a not in w.chan or None in (a_shape, b_shape, out_shape):
        w.opaque(node, "both operands carry channels, or shapes are not static")
        return
    axis, ids = w.chan[a]
    rank = len(out_shape)
    if axis != len(a_shape) - 1:  # channels ride along a batch or row axis
        out_axis = axis + rank - len(a_shape)
        k = out_axis - (rank - len(b_shape))  # B's batch axis broadcast against them
        if out_axis < rank - 2 and len(b_shape) > 2 and k >= 0 and b_shape[k] > 1:
            if w.source(b) is None:
                w.opaque(node, "a matrix per channel computed at run time")
                return
            w.slot(node, 1, k, ids, CONST)  # one matrix per channel: cut with them
        w.pass_on(node, out_axis, ids)
        return
    if w.source(b) is None or len(b_shape) != 2:
        w.opaque(node, "channels contracted with a weight that is not a constant matrix")
        return
    out = w.fresh(out_shape[-1])
    w.slot(node, 1, 0, ids, WEIGHTS_IN)
    w.slot(node, 1, 1, out, FILTERS)
    w.pass_on(node, rank - 1, out)


def _concat(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _split(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _slice(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _reshape(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    in_shape, out_shape = w.shape(node.input[0]), w.shape(node.output[0])
    literal = w.const(node.input[1]) if op_id(node) == "Reshape" else None
    if in_shape is None or out_shape is None or (op_id(node) == "Reshape" and literal is None):
        w.opaque(node, "shape computed at run time (run FoldShapes first)")
        return
    moved = reshape_ids(w, in_shape, axis, ids, out_shape)
    if moved is None:
        w.opaque(node, "cannot follow the channel axis through this reshape")
        return
    out_axis, out_ids = moved
    if op_id(node) == "Reshape":
        literal = literal.astype(np.int64)
        if literal[out_axis] == 0 and out_axis != axis:
            w.opaque(node, "copies a dim (0) that moves the channel axis")
            return
        w.edit("reshape", node, (out_ids,), axis=out_axis, value=literal)
    w.pass_on(node, out_axis, out_ids)


def _transpose(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    perm = list(attributes(node).get("perm") or reversed(range(rank)))
    w.pass_on(node, perm.index(axis), ids)


def _depth_to_space(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """DepthToSpace makes output channel c of b * b input channels: (i * b + j) * C + c under
    DCR (the default), c * b * b + i * b + j under CRD (torch's PixelShuffle). Those are tied
    into one unit, so a cut takes whole blocks in the mode's order; nothing to edit (the
    op has only attributes)."""
    axis, ids = w.chan[node.input[0]]
    if axis != 1:
        w.opaque(node, f"channels on axis {axis}")
        return
    attrs = attributes(node)
    b2 = int(attrs["blocksize"]) ** 2
    if len(ids) % b2:  # no run of the op takes it (the checker does not say so)
        w.opaque(node, f"{len(ids)} channels in blocks of {b2}")
        return
    crd = attrs.get("mode", "DCR") in ("CRD", b"CRD")
    blocks = ids.reshape(-1, b2).T if crd else ids.reshape(b2, -1)
    for row in blocks[1:]:
        w.union(blocks[0], row)
    w.pass_on(node, 1, blocks[0].copy())


def _space_to_depth(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """SpaceToDepth makes channel (i * b + j) * C + c of input channel c: each channel once
    per block position."""
    axis, ids = w.chan[node.input[0]]
    if axis != 1:
        w.opaque(node, f"channels on axis {axis}")
        return
    w.pass_on(node, 1, np.tile(ids, int(attributes(node)["blocksize"]) ** 2))


def _axes_of(w: ChannelWalk, node: onnx.NodeProto, rank: int) -> list[int] | None:
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


def _unsqueeze(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    out_rank = len(w.shape(node.output[0]))
    axes = _axes_of(w, node, out_rank)
    if axes is None:
        w.opaque(node, "axes computed at run time")
        return
    kept = [k for k in range(out_rank) if k not in axes]
    w.pass_on(node, kept[axis], ids)


def _squeeze(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _pool(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    if axis != 1:
        w.opaque(node, f"channels on axis {axis}")
        return
    if len(node.output) > 1 and node.output[1] and w.index.consumers.get(node.output[1]):
        w.opaque(node, "indices output encodes channel positions")
        return
    w.pass_on(node, 1, ids, node.output[:1])


def _reduce(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _softmax(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    default = -1 if w.opset >= 13 else 1
    along = int(attributes(node).get("axis", default)) % rank
    if along == axis or (w.opset < 13 and along <= axis):
        w.opaque(node, "normalizes over the channel axis")
        return
    w.pass_on(node, axis, ids)


def _resize(w: ChannelWalk, node: onnx.NodeProto) -> None:
    """Resize and Upsample pass channels on where they do not scale them. Since opset 18
    Resize's `axes` names the axes its scales and sizes are for: the channel axis's entry
    is the one at its place in `axes`, and there is none when `axes` leaves it out."""
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    axes = attributes(node).get("axes") if op_id(node) == "Resize" else None
    entry = axis
    if axes is not None:
        axes = [int(a) % rank for a in axes]
        entry = axes.index(axis) if axis in axes else None
    scales_name = node.input[2] if len(node.input) > 2 else ""
    if op_id(node) == "Upsample":
        scales_name = node.input[1] if len(node.input) > 1 else ""
    scales = w.const(scales_name) if scales_name else attributes(node).get("scales")
    if scales_name and scales is None:
        w.opaque(node, "scales computed at run time")
        return
    if entry is not None and scales is not None and len(scales) and float(scales[entry]) != 1.0:
        w.opaque(node, "resizes the channel axis")
        return
    if op_id(node) == "Resize" and len(node.input) > 3 and node.input[3]:
        sizes = w.const(node.input[3])
        if sizes is None:
            w.opaque(node, "sizes computed at run time")
            return
        if entry is not None:
            w.edit("resize", node, (ids,), axis=entry, value=sizes.astype(np.int64))
    w.pass_on(node, axis, ids)


def _pad(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _axes_of_input(w: ChannelWalk, name: str, rank: int) -> list[int] | None:
    values = w.const(name)
    return None if values is None else [int(a) % rank for a in values]


def _gather(w: ChannelWalk, node: onnx.NodeProto) -> None:
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


def _shape(w: ChannelWalk, node: onnx.NodeProto) -> None:
    axis, ids = w.chan[node.input[0]]
    rank = len(w.shape(node.input[0]))
    attrs = attributes(node)
    start, end, _ = slice(attrs.get("start", 0), attrs.get("end", rank)).indices(rank)
    if start <= axis < end:
        w.pin(ids, f"Shape '{node.name}': reads the channel count at run time (run FoldShapes)")


HANDLERS: dict[str, Callable[[ChannelWalk, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    "LayerNormalization": _layernorm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Transpose": _transpose,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
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

for _op, _handler in HANDLERS.items():
    register_handler(_op, _handler)
for _fused_op in FUSED:
    _domain, _op = _fused_op.split(":")
    register_handler(_op, _fused, domain=_domain)
for _family, _handler in (
    (UNARY, _unary),
    (ELEMENTWISE, _elementwise),
    (POOLS, _pool),
    (REDUCES, _reduce),
):
    for _op in _family:
        register_handler(_op, _handler)
