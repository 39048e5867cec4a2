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

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import channel_handlers  # noqa: F401  (registers the built-in handlers)
from .analysis import ModelAnalysis, analyze_model
from .channel_walk import ACTIVATION, FILTERS, WEIGHTS_IN, ChannelWalk, Edit, Slot
from .domains import FUSED_CONV, op_id
from .dynamic_dims import RunTimeShapes
from .graph import GraphIndex, structure_key
from .load import indexed


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
    # why cutting this group changes what its kept channels compute (a normalisation over
    # the channels); empty where removing a dead channel leaves the outputs exact
    inexact: list[str] = field(default_factory=list)
    # a residual stream: an Add (or Sum) of two activations joins its channels, so a cut
    # channel is cut from every block that reads or writes the stream at once
    joined: bool = False
    # channels one unit holds on the narrowest layer axis that makes or reads it (the gcd of
    # the filter and input-weight widths), which `--channel-multiple` must step by: the conv
    # after a pixel shuffle (the op or its views) reads 1 of each b * b block its producer
    # made, a depthwise conv with multiplier 2 makes 2 of each input channel, a grouped
    # conv 96 -> 48 (12 groups) reads 8 and makes 4; None: no layer makes or reads it
    narrowest: int | None = None

    def member(self, tensor: str) -> Member:
        return next(m for m in self.members if m.tensor == tensor)

    @property
    def unit(self) -> int:
        """Channels one of its units holds where it is made, kept or cut whole: 1, a
        conv-group's channels, or G after an exported GroupNorm(G) (one of each group)."""
        return max((m.width for m in self.members if m.role == FILTERS), default=1)


@dataclass
class ChannelAnalysis:
    """Everything shrink needs: the groups, plus how channel ids map to them."""

    groups: list[ChannelGroup]
    root: np.ndarray  # channel id -> its class (union-find root)
    classes: list[np.ndarray]  # group id -> class roots in group channel order
    tensors: dict[str, tuple[int, np.ndarray]]  # activation -> (channel axis, channel ids)
    slots: list[Slot]
    edits: list[Edit]
    model_key: str  # `structure_key` of the model the analysis was computed on
    # tensors of conv weights computed in the graph: axis -> channel ids (`weight_chain.py`)
    computed: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def check_model(self, model: onnx.ModelProto) -> None:
        """Refuse a model other than the one analysed: slots and edits index its nodes."""
        if structure_key(model) != self.model_key:
            raise ValueError(
                "this ChannelAnalysis was computed on another model; run analyze_channels "
                "on the model you shrink"
            )


def _residual_joins(walk: ChannelWalk, where: _Positions) -> set[int]:
    """The groups whose channels an Add or Sum of two or more activations joins, or a
    FusedConv's residual input Z."""
    joined: set[int] = set()
    for node in walk.index.nodes:
        operands = [name for name in node.input if name in walk.chan]
        if op_id(node) == FUSED_CONV:  # X is convolved; Z, its input 3, is added to it
            adds = len(node.input) > 3 and node.input[3] in walk.chan
        else:
            adds = op_id(node) in ("Add", "Sum") and len(operands) > 1
        if adds and node.output[0] in walk.chan:
            joined |= {g for g, _ in where(walk.chan[node.output[0]][1])}
    return joined


def _tie_twins(walk: ChannelWalk, classes: list[np.ndarray], where: _Positions) -> bool:
    """Union, channel by channel, groups cut in exactly the same constants at the same
    positions, filters included, and read by the same weights (at any positions: the
    two towers' maps concatenated for one head): one tower applied to two inputs (a
    siamese network, a shared encoder, a stereo pair), each application a group of its
    own. Cut apart, they would keep different channels of one weight (the towers no
    longer the same function) or, cut alike, one tensor the cost model counted twice.
    Returns whether any were tied."""
    cuts: list[set[tuple]] = [set() for _ in classes]
    for slot in walk.slots:
        name = walk.index.nodes[slot.node].input[slot.input]
        tensor = walk.source(name) or name
        for g, positions in where(slot.ids):
            where_cut = positions.tobytes() if slot.role != WEIGHTS_IN else b""
            cuts[g].add((tensor, slot.axis, slot.role, positions.shape, where_cut))
    first: dict[frozenset, int] = {}
    tied = False
    for g, cut in enumerate(cuts):
        if not any(role == FILTERS for _, _, role, _, _ in cut):
            continue
        twin = first.setdefault(frozenset(cut), g)
        if twin != g:
            walk.union(classes[g], classes[twin])
            tied = True
    return tied


# -- from classes to groups -------------------------------------------------------------------


def analyze_channels(
    model: onnx.ModelProto,
    macroblocks: ModelAnalysis | None = None,
    index: GraphIndex | None = None,
    run_time: RunTimeShapes | None = None,
) -> ChannelAnalysis:
    """Channel groups of a model in `load_model` form, plus the bookkeeping shrink needs.

    Run `FoldShapes` first if the model computes Reshape shapes at run time;
    otherwise the groups those shapes read are pinned. `macroblocks` is
    `analyze_model(model)` and `index` `GraphIndex.build(model)` if the caller has them
    already. A model not in `load_model` form is loaded first. `run_time` (the loaded
    model's `origin.run_time`) pins the groups whose channel count its run-time shape
    arithmetic reads into a value that follows the input size, which no cut can keep.
    """
    model, index = indexed(model, index)
    walk = ChannelWalk(model, index)
    walk.run()
    for tensor, reason in run_time.counted_channels(model, index, walk.chan) if run_time else ():
        walk.pin(walk.chan[tensor][1], reason)
    root = _roots(walk.parent)
    classes = _classes_by_signature(walk, root)
    if _tie_twins(walk, classes, _Positions(root, classes)):
        root = _roots(walk.parent)
        classes = _classes_by_signature(walk, root)
    where = _Positions(root, classes)

    members: list[list[Member]] = [[] for _ in classes]
    for name, (axis, ids) in walk.chan.items():
        for g, positions in where(ids):
            members[g].append(Member(name, axis, positions))
    if macroblocks is None:
        macroblocks = analyze_model(model, index=index)
    else:
        macroblocks.check_model(model)
    layers = macroblocks.layers
    layer_block = {layer.name: layer.macroblock for layer in layers}
    producers: list[list[str]] = [[] for _ in classes]
    blocks: list[set[int]] = [set() for _ in classes]
    for slot in walk.slots:
        node = walk.index.nodes[slot.node]
        tensor = walk.source(node.input[slot.input]) or node.input[slot.input]
        if slot.owner is not None:  # a computed weight's initializer: its conv makes it
            node = walk.index.nodes[slot.owner]
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
    inexact: list[list[str]] = [[] for _ in classes]
    for ids, reason in walk.inexact:
        for g in np.unique(where.group_of[root[ids]]).tolist():
            if reason not in inexact[g]:
                inexact[g].append(reason)
    joined = _residual_joins(walk, where)
    groups = [
        ChannelGroup(
            id=g,
            size=len(cls),
            members=members[g],
            producers=producers[g],
            macroblocks=sorted(blocks[g]),
            pinned=bool(reasons[g]),
            pin_reasons=reasons[g],
            inexact=inexact[g],
            joined=g in joined,
        )
        for g, cls in enumerate(classes)
    ]
    for group in groups:
        widths = [m.width for m in group.members if m.role in (FILTERS, WEIGHTS_IN)]
        group.narrowest = math.gcd(*widths) or None
    return ChannelAnalysis(
        groups,
        root,
        classes,
        dict(walk.chan),
        walk.slots,
        walk.edits,
        structure_key(model),
        walk.computed,
    )


def _classes_by_signature(walk: ChannelWalk, root: np.ndarray) -> list[np.ndarray]:
    """Group classes that appear in the same id arrays the same number of times; in
    order of first appearance. Aliased tensors (Conv -> BN -> Relu) share one array,
    so the signature is over arrays, not tensors. Vectorised over all arrays at once:
    a deep ResNet has thousands of them."""
    arrays = list({id(ids): ids.ravel() for _, ids in walk.chan.values()}.values())
    if not arrays:
        return []
    lengths = np.array([len(ids) for ids in arrays], dtype=np.int64)
    cls = root[np.concatenate(arrays)]
    array = np.repeat(np.arange(len(arrays)), lengths)
    pos = np.arange(len(cls)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    # One entry per (array, class) pair, in that order: first position and count.
    order = np.lexsort((cls, array))  # stable: the first position of a pair comes first
    array, cls, pos = array[order], cls[order], pos[order]
    starts = np.flatnonzero(np.r_[True, (array[1:] != array[:-1]) | (cls[1:] != cls[:-1])])
    counts = np.diff(np.r_[starts, len(cls)])
    array, cls, pos = array[starts], cls[starts], pos[starts]
    # Per class, its pairs in array order: its signature (array, count)*.
    by_class = np.argsort(cls, kind="stable")
    signatures = np.stack([array[by_class], counts[by_class]], axis=1)
    bounds = np.flatnonzero(np.r_[True, cls[by_class][1:] != cls[by_class][:-1], True])
    first = by_class[bounds[:-1]]  # each class's first pair: where it is first seen
    by_signature: dict[bytes, list[int]] = {}
    b = bounds.tolist()
    for j in np.lexsort((pos[first], array[first])).tolist():
        key = signatures[b[j] : b[j + 1]].tobytes()
        by_signature.setdefault(key, []).append(int(cls[first[j]]))
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
            one = groups.size and (groups == groups.flat[0]).all()  # most arrays: one group
            for g in [int(groups.flat[0])] if one else np.unique(groups).tolist():
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
