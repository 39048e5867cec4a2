"""The channel walk: one topological pass that gives every channel an id, and the
registry of op handlers that tells it what each op does to channels.

Every channel a Conv, Gemm or unfollowable op produces gets an integer id. A
handler per op type passes ids on to the op's outputs, unions ids that must be
kept together (a union-find), records constant axes to cut with them (slots)
and attributes or shape constants that count them (edits), or pins what it
cannot follow. The built-in handlers live in `channel_handlers.py`; users add
their own with `register_handler` (a custom or plugin op, without editing the
package). `channel_groups.py` turns the walk's ids into channel groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .custom_ops import is_unknown_op
from .domains import COUNTED_CONVS, canonical, is_default, op_id, opset_versions
from .graph import GraphIndex, channels_last, subgraph_names, subgraphs

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


@dataclass
class Slot:
    """Initializer input `input` of node number `node`: its `axis` follows channel ids `ids`.
    `owner` is the node whose weight it is when that differs (a conv whose weight is
    computed in the graph: `weight_chain.py`); None: node `node` itself."""

    node: int
    input: int
    axis: int
    ids: np.ndarray
    role: str
    owner: int | None = None


@dataclass
class Edit:
    """A node attribute or shape constant that counts channels and must be recomputed.

    kind: a handler's own name with `apply` (its edit function), or one of the built-in
    kinds: "group" (ids: the channels counting conv-groups, per: channels per
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
    # A handler's own edit, `apply(context, node, edit)` at shrink time (see shrink.EDITS);
    # None for the built-in kinds above.
    apply: Callable | None = None


def pinned_by(node: onnx.NodeProto) -> str:
    """How the pin reasons of an op the walk cannot follow begin (`ChannelWalk.opaque`): what
    the report shows, and how a caller tells which node pinned a group."""
    return f"{node.op_type} '{node.name}': "


class ChannelWalk:
    """One topological walk that gives every channel an id and records joins and pins.

    Handlers (`register_handler`) read and extend it: `chan` maps a tensor to its
    (channel axis, channel ids); `pass_on` gives outputs ids, `union` joins ids,
    `fresh` makes new ones, `slot` records a constant axis to cut with ids, `edit` an
    attribute or shape constant to recompute, `pin`/`opaque` keep channels whole;
    `not_exact` marks cuts that change what the kept channels compute."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex | None = None) -> None:
        self.index = GraphIndex.of(model, index)
        self.parent: list[int] = []
        self.chan: dict[str, tuple[int, np.ndarray]] = {}
        self.slots: list[Slot] = []
        self.edits: list[Edit] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.inexact: list[tuple[np.ndarray, str]] = []  # cuts that change the kept outputs
        self.group_norms: list[np.ndarray] = []  # channels a GroupNorm cuts in units
        # tensors of a conv weight computed in the graph (`weight_chain.py`): axis -> the
        # channel ids it carries, so that shrink records their new shapes
        self.computed: dict[str, dict[int, np.ndarray]] = {}
        self.node_no: dict[int, int] = {}
        self.opsets = opset_versions(model)
        self.opset = self.opsets.get("", 17)

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
        parent = self.parent
        for x, y in zip(a.tolist(), b.tolist()):
            while parent[x] != x:  # `find`, inline: a residual join unions every channel
                parent[x] = parent[parent[x]]
                x = parent[x]
            while parent[y] != y:
                parent[y] = parent[parent[y]]
                y = parent[y]
            if x != y:
                parent[x] = y

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

    def not_exact(self, ids: np.ndarray, reason: str) -> None:
        """Cutting any of `ids` changes what the kept channels compute (a normalisation
        over the channel axis): allowed, and said in the report."""
        self.inexact.append((ids, reason))

    def slot(self, node: onnx.NodeProto, i: int, axis: int, ids: np.ndarray, role: str) -> None:
        self.slots.append(Slot(self.node_no[id(node)], i, axis, ids, role))

    def edit(self, kind: str, node: onnx.NodeProto, ids: tuple[np.ndarray, ...], **kw) -> None:
        """Record that `node` counts channels `ids`: shrink recomputes it with the built-in
        edit of `kind`, or with `apply=` (a handler's own: `apply(context, node, edit)`)."""
        self.edits.append(Edit(kind, self.node_no[id(node)], ids, **kw))

    def opaque(self, node: onnx.NodeProto, why: str) -> None:
        """An op the walk cannot follow: pin what goes in, and give what comes out new
        pinned channels (axis 1) so nothing downstream is cut against it."""
        reason = pinned_by(node) + why
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
                # an NHWC input (tf2onnx) holds its channels last
                axis = 3 if len(shape) == 4 and channels_last(self.index, name) else 1
                ids = self.fresh(shape[axis])
                self.pin(ids, f"graph input '{name}'")
                self.chan[name] = (axis, ids)
        for k, node in enumerate(self.index.nodes):
            self.node_no[id(node)] = k
            self.visit(node)
        for name in self.index.graph_outputs:
            if name in self.chan:
                self.pin(self.chan[name][1], f"graph output '{name}'")
        self._pin_overridable()

    def _pin_overridable(self) -> None:
        """An initializer also listed as a graph input (IR >= 4) may be fed by the caller
        at its declared shape: every channel axis of it stays whole."""
        graph = self.index.graph
        if graph is None:
            return
        listed = {i.name for i in graph.input} & set(self.index.initializers)
        if not listed:
            return
        nodes = self.index.nodes
        reads = [(nodes[s.node].input[s.input], (s.ids,)) for s in self.slots]
        # a shape constant counting channels (Reshape, Slice, ...)
        reads += [(name, e.ids) for e in self.edits for name in nodes[e.node].input]
        for name, channels in reads:
            source = self.source(name) or name
            if source in listed:
                for ids in channels:
                    self.pin(ids, f"graph input '{source}' (an overridable initializer)")

    def visit(self, node: onnx.NodeProto) -> None:
        op = op_id(node)
        inputs = [name for name in node.input if name in self.chan]
        # Custom domains and default-domain ops without a schema (TensorRT plugins) are opaque
        # unless a handler was registered for them.
        custom = (not is_default(node.domain) or is_unknown_op(node)) and handler_for(
            node, self.opsets
        ) is None
        if not inputs and op not in COUNTED_CONVS:
            if custom or subgraphs(node):
                self.opaque(node, "op not followed")
            return  # shape arithmetic and constants carry no channels
        if custom:
            self.opaque(node, f"custom op (domain '{node.domain}') not followed")
            return
        if subgraphs(node):
            for name in subgraph_names(node):
                if name in self.chan:
                    self.pin(self.chan[name][1], f"{op} '{node.name}': used in a subgraph")
            self.opaque(node, "control flow not followed")
            return
        if any(self.shape(name) is None for name in [*inputs, node.output[0]]):
            self.opaque(node, "shapes are not static")
            return
        handler = handler_for(node, self.opsets)
        if handler is None:
            self.opaque(node, "op not followed")
        else:
            handler(self, node)


def constant_source(index: GraphIndex, name: str) -> str | None:
    """The initializer or Constant node output behind `name`, looking through Identity
    (exporters share equal tensors that way); None if `name` is computed at run time."""
    while name not in index.initializers:
        node = index.producer.get(name)
        if node is None or op_id(node) not in ("Identity", "Constant"):
            return None
        if op_id(node) == "Constant":
            return name
        name = node.input[0]
    return name


# -- the handler registry ----------------------------------------------------------------

Handler = Callable[[ChannelWalk, onnx.NodeProto], None]
_REGISTRY: dict[tuple[str, str], dict[int, Handler]] = {}


def register_handler(
    op_type: str, handler: Handler, domain: str = "", since_opset: int = 1
) -> None:
    """Teach the walk `op_type` of `domain`, for models importing that domain at opset
    `since_opset` or later: `handler(walk, node)` is called for each such node that
    reads channels. Replaces a handler registered for the same op, domain and opset."""
    if not callable(handler):
        raise TypeError(f"handler for {op_type} must be callable, not {type(handler).__name__}")
    if since_opset < 1:
        raise ValueError(f"since_opset must be at least 1, not {since_opset}")
    _REGISTRY.setdefault((canonical(domain), op_type), {})[since_opset] = handler


def unregister_handler(op_type: str, domain: str = "", since_opset: int = 1) -> None:
    """Remove a handler `register_handler` added."""
    versions = _REGISTRY.get((canonical(domain), op_type), {})
    if since_opset not in versions:
        raise KeyError(f"no handler for {op_type} (domain {domain!r}) since opset {since_opset}")
    del versions[since_opset]


def handler_for(node: onnx.NodeProto, opsets: dict[str, int]) -> Handler | None:
    """The handler for `node` under the model's opsets: the one registered for the
    latest opset not after the model's."""
    domain = canonical(node.domain)
    versions = _REGISTRY.get((domain, node.op_type), {})
    usable = [v for v in versions if v <= opsets.get(domain, 1)]
    return versions[max(usable)] if usable else None
