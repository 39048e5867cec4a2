"""The shrink pass: cut channels out of a model according to a keep plan.

A keep plan maps a channel group id to the channels it keeps. Shrinking slices
every initializer axis recorded as a slot of the group (weights on both axes,
biases, BatchNorm vectors, per-channel constants, head weights over the
flattened channel-major rows), rewrites what counts channels (Conv group,
Split sizes, Slice bounds, Reshape and Resize constants) and updates the
recorded shapes. Graph inputs and outputs are pinned, so their names and shapes
stay; node names, opsets and metadata are copied.

An initializer read by several nodes (directly or through Identity, as exporters
share equal tensors) is sliced once if every reader wants the same cut, and
copied per distinct cut otherwise.

The output is built field by field and initializers are sliced one at a time,
so memory stays near the size of the input plus the (smaller) output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .base import Pass, PassResult
from .channel_groups import ChannelAnalysis, analyze_channels
from .channel_walk import Edit, constant_source
from .domains import op_id
from .graph import GraphIndex, default_opset, is_weight, subgraph_names
from .load import indexed, indexed_loaded
from .parameters import count_parameters, is_parameter_use
from .protos import with_notes, without_weights

KeepPlan = Mapping[int, Sequence[int]]


@dataclass
class _Cut:
    """One output tensor made from `source`: axis -> kept positions, and its readers."""

    source: str
    name: str
    axes: dict[int, np.ndarray]
    shape: tuple[int, ...]
    uses: list[tuple[int, int]] = field(default_factory=list)  # (node number, input number)


def kept_channels(analysis: ChannelAnalysis, keep: KeepPlan) -> np.ndarray:
    """Whether each channel id is kept under `keep`; checks the plan first.

    A wrong plan is a programming error (the planner made it), hence ValueError.
    """
    kept_class = np.ones(len(analysis.root), dtype=bool)
    for gid, channels in keep.items():
        if not 0 <= gid < len(analysis.groups):
            raise ValueError(f"keep plan names group {gid}; the model has {len(analysis.groups)}")
        group = analysis.groups[gid]
        idx = np.asarray(list(channels), dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"group {gid}: keep at least one channel")
        if np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= group.size:
            raise ValueError(
                f"group {gid}: channels to keep must be sorted, unique and in [0, {group.size})"
            )
        if group.pinned and idx.size < group.size:
            raise ValueError(
                f"group {gid} is pinned ({'; '.join(group.pin_reasons)}) and cannot lose channels"
            )
        dropped = np.ones(group.size, dtype=bool)
        dropped[idx] = False
        kept_class[analysis.classes[gid][dropped]] = False
    return kept_class[analysis.root]


def _source_tensor(index: GraphIndex, source: str) -> onnx.TensorProto:
    """The initializer, or the Constant node's tensor, `source` names."""
    if source in index.initializers:
        return index.initializers[source]
    node = index.producer[source]
    return next(a.t for a in node.attribute if a.name == "value")


def _plan_cuts(
    index: GraphIndex, analysis: ChannelAnalysis, kept: np.ndarray
) -> dict[str, list[_Cut]]:
    """For every constant that loses entries: the distinct cuts its readers need."""
    wanted: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    positions: dict[int, np.ndarray | None] = {}  # per id array (slots share them)
    for slot in analysis.slots:
        if id(slot.ids) not in positions:
            mask = kept[slot.ids]
            positions[id(slot.ids)] = None if mask.all() else np.flatnonzero(mask)
        if (where := positions[id(slot.ids)]) is not None:
            wanted.setdefault((slot.node, slot.input), {})[slot.axis] = where
    sources = {constant_source(index, index.nodes[n].input[i]) for n, i in wanted}
    if not sources:
        return {}
    # Every reader of those constants; graph outputs come first so that they keep the original.
    readers = index.readers(sources)
    plan: dict[str, list[_Cut]] = {}
    for src, uses in readers.items():
        dims = tuple(_source_tensor(index, src).dims)
        cuts: dict[tuple, _Cut] = {}
        for use in uses:
            axes = wanted.get(use, {})
            key = tuple((a, axes[a].tobytes()) for a in sorted(axes))
            if key not in cuts:
                name = src if not cuts else ""  # copies are named by shrink_channels
                shape = tuple(len(axes[a]) if a in axes else d for a, d in enumerate(dims))
                cuts[key] = _Cut(src, name, dict(axes), shape)
            cuts[key].uses.append(use)
        plan[src] = list(cuts.values())
    return plan


def predicted_params(
    model: onnx.ModelProto, keep: KeepPlan, analysis: ChannelAnalysis | None = None
) -> int:
    """The parameter count (`count_parameters`) `shrink_channels(model, keep)` will have,
    without building it; `model` is brought to `load_model` form as shrink brings it, and
    `analysis` of another model is refused."""
    model, index = indexed(model)
    if analysis is None:
        analysis = analyze_channels(model, index=index)
    else:
        analysis.check_model(model)
    kept = kept_channels(analysis, keep)
    total = count_parameters(model)
    for src, cuts in _plan_cuts(index, analysis, kept).items():
        tensor = _source_tensor(index, src)
        if not is_weight(tensor):
            continue
        dims = tuple(tensor.dims)
        uses = [u for c in cuts for u in c.uses]
        if src in index.initializers and _counted(index, uses, src, dims):
            total -= int(np.prod(dims, dtype=np.int64))
        for k, cut in enumerate(cuts):
            # the first cut keeps the source's name (and stays a Constant if it was one)
            if k == 0:
                counted = src in index.initializers and _counted(index, cut.uses, src, cut.shape)
            else:
                counted = _counted(index, cut.uses, None, cut.shape)
            if counted:
                total += int(np.prod(cut.shape, dtype=np.int64))
    return total


def _counted(
    index: GraphIndex, uses: list[tuple[int, int]], via: str | None, dims: Sequence[int]
) -> bool:
    """Mirror of `parameter_sizes` for a tensor of shape `dims`: counted unless read, and by
    no reader as a learned value (`is_parameter_use`). A copy is read directly by all its
    uses; the original only by the uses that name it (`via`), the others reach it through
    Identity, which reads it as a learned value would."""
    read = False
    for n, i in uses:
        if n < 0:
            continue
        node = index.nodes[n]
        through_identity = via is not None and node.input[i] != via
        if through_identity or is_parameter_use(node, i, dims, index.constant):
            return True
        read = True
    return not read


def shrink_channels(
    model: onnx.ModelProto,
    keep: KeepPlan,
    analysis: ChannelAnalysis | None = None,
    index: GraphIndex | None = None,
) -> onnx.ModelProto:
    """A new model keeping, in each group of `keep`, only the listed channels.

    `model` is brought to `load_model` form (the one `analysis` was computed on, if
    given; `index` is its `GraphIndex.build(model)`, if the caller has it); groups
    missing from `keep` keep all their channels. A model that had to be loaded (a
    plainly read one) comes back as `load` writes it: its declared inputs and outputs,
    dynamic dims included, and shape arithmetic that follows them. The input is not
    modified.
    """
    model, index, read = indexed_loaded(model, index)
    if analysis is None:
        analysis = analyze_channels(model, index=index)
    else:
        analysis.check_model(model)
    kept = kept_channels(analysis, keep)
    plan = _plan_cuts(index, analysis, kept)
    names = _Names(index)
    for cuts in plan.values():
        for k, cut in enumerate(cuts[1:], start=1):
            cut.name = names.fresh(f"{cut.source}__{k}")
    out = without_weights(model)
    nodes = out.graph.node

    new_shapes: dict[str, tuple[int, ...]] = {}  # constants sliced in place
    for tensor in model.graph.initializer:
        cuts = plan.get(tensor.name)
        if not cuts:
            out.graph.initializer.append(tensor)
            continue
        array = numpy_helper.to_array(tensor)
        for cut in cuts:
            part = numpy_helper.from_array(_take(array, cut.axes), cut.name)
            # folded shape arithmetic stays marked
            out.graph.initializer.append(with_notes(part, tensor))
        new_shapes[tensor.name] = cuts[0].shape
    for src, cuts in plan.items():
        if src in index.initializers:
            continue
        node = next(n for n in nodes if src in n.output)  # a Constant node
        value = next(a for a in node.attribute if a.name == "value")
        array = numpy_helper.to_array(value.t)
        value.t.CopyFrom(numpy_helper.from_array(_take(array, cuts[0].axes), src))
        for cut in cuts[1:]:
            out.graph.initializer.append(numpy_helper.from_array(_take(array, cut.axes), cut.name))
        new_shapes[src] = cuts[0].shape
    for cuts in plan.values():
        for cut in cuts[1:]:
            for n, i in cut.uses:
                nodes[n].input[i] = cut.name

    _apply_edits(out, analysis, kept, names)
    _update_shapes(out, index, analysis, kept, new_shapes)
    return out if read is None else read.write_form(out)


def _take(array: np.ndarray, axes: dict[int, np.ndarray]) -> np.ndarray:
    for axis, positions in axes.items():
        array = np.take(array, positions, axis=axis)
    return array


@dataclass
class EditContext:
    """What a shrink edit works with: the model being written (`out`), which channel ids
    are kept, and a way to replace a node's constant input."""

    out: onnx.ModelProto
    kept: np.ndarray  # bool per channel id
    names: _Names
    replaced: set[str] = field(default_factory=set)  # constants no longer read by their node
    # node number -> the shape constant edits wrote for it so far (a computed weight's
    # (O, I, kh, kw) counts channels twice)
    shapes: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def opset(self) -> int:
        return default_opset(self.out)

    def count(self, ids: np.ndarray) -> int:
        """How many of `ids` are kept."""
        return int(self.kept[ids].sum())

    def set_input(self, node: onnx.NodeProto, i: int, value: np.ndarray, what: str) -> None:
        """Make input `i` of `node` a new initializer holding `value`."""
        name = self.names.fresh(f"{node.name}_{what}")
        self.out.graph.initializer.append(numpy_helper.from_array(value, name))
        while len(node.input) <= i:
            node.input.append("")
        self.replaced.add(node.input[i])
        node.input[i] = name


EditFunction = Callable[[EditContext, onnx.NodeProto, Edit], None]


def _edit_group(ctx: EditContext, node: onnx.NodeProto, edit: Edit) -> None:
    _set_attribute(node, "group", ctx.count(edit.ids[0]) // edit.per)


def _edit_split(ctx: EditContext, node: onnx.NodeProto, edit: Edit) -> None:
    sizes = np.array([ctx.count(part) for part in edit.ids], dtype=np.int64)
    if np.array_equal(sizes, edit.value):
        return
    if ctx.opset >= 13:
        ctx.set_input(node, 1, sizes, "split")
        _remove_attribute(node, "num_outputs")
    else:
        _set_attribute(node, "split", sizes.tolist())


def _edit_slice(ctx: EditContext, node: onnx.NodeProto, edit: Edit) -> None:
    assert edit.value is not None and edit.value2 is not None
    mask = ctx.kept[edit.ids[0]]
    start = int(mask[: edit.start].sum())
    end = start + int(mask[edit.start : edit.end].sum())
    starts, ends = edit.value.copy(), edit.value2.copy()
    if (starts[edit.axis], ends[edit.axis]) == (start, end):
        return
    starts[edit.axis], ends[edit.axis] = start, end
    ctx.set_input(node, 1, starts, "starts")
    ctx.set_input(node, 2, ends, "ends")


def _edit_shape_entry(ctx: EditContext, node: onnx.NodeProto, edit: Edit) -> None:
    """Reshape targets and Resize sizes: the entry that counts channels."""
    assert edit.value is not None
    value = ctx.shapes.get(edit.node, edit.value).copy()
    if edit.kind == "reshape" and value[edit.axis] <= 0:
        return  # -1 or 0: the runtime infers or copies it
    count = ctx.count(edit.ids[0])
    if value[edit.axis] == count:
        return
    value[edit.axis] = count
    i = 1 if edit.kind == "reshape" else 3
    if edit.node in ctx.shapes:  # a second entry of a shape edited already: rewrite it
        tensor = next(t for t in ctx.out.graph.initializer if t.name == node.input[i])
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    else:
        ctx.set_input(node, i, value, edit.kind)
    ctx.shapes[edit.node] = value


# The built-in handlers' edits, by kind; a handler of its own brings its edit along
# (`ChannelWalk.edit(..., apply=)`), as Torch-Pruning pairs a layer's grouping and cutting.
EDITS: dict[str, EditFunction] = {
    "group": _edit_group,
    "split": _edit_split,
    "slice": _edit_slice,
    "reshape": _edit_shape_entry,
    "resize": _edit_shape_entry,
}


def _apply_edits(
    out: onnx.ModelProto, analysis: ChannelAnalysis, kept: np.ndarray, names: _Names
) -> None:
    """Rewrite attributes and shape constants that count channels."""
    ctx = EditContext(out, kept, names)
    for edit in analysis.edits:
        apply = edit.apply or EDITS.get(edit.kind)
        if apply is None:
            raise ValueError(
                f"no shrink edit for {edit.kind!r}: a handler recording its own kind of edit "
                "passes its edit function (ChannelWalk.edit(..., apply=))"
            )
        apply(ctx, out.graph.node[edit.node], edit)
    replaced = ctx.replaced
    if replaced:  # drop the constants the edits replaced, unless something else reads them
        used = {name for node in out.graph.node for name in node.input}
        used |= {name for node in out.graph.node for name in subgraph_names(node)}
        used |= {o.name for o in out.graph.output}
        unused = [k for k, t in enumerate(out.graph.initializer) if t.name in replaced - used]
        for k in reversed(unused):
            del out.graph.initializer[k]
        dead = [
            k for k, n in enumerate(out.graph.node)
            if op_id(n) == "Constant" and n.output[0] in replaced - used
        ]  # fmt: skip
        for k in reversed(dead):
            del out.graph.node[k]


def _update_shapes(
    out: onnx.ModelProto,
    index: GraphIndex,
    analysis: ChannelAnalysis,
    kept: np.ndarray,
    new_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Recorded shapes: channel axes take their kept counts; aliases of sliced constants
    (Identity outputs) take the new constant's shape, and the tensors a computed conv
    weight is made of their kept counts on every channel axis they carry."""
    for node in index.nodes:
        if op_id(node) == "Identity":
            src = constant_source(index, node.input[0])
            if src in new_shapes:
                new_shapes[node.output[0]] = new_shapes[src]
    counts: dict[str, tuple[int, int]] = {}
    for name, (axis, ids) in analysis.tensors.items():
        counts[name] = (axis, int(kept[ids].sum()))
    for vi in [*out.graph.value_info, *out.graph.output, *out.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in analysis.computed and vi.name not in new_shapes:
            for axis, ids in analysis.computed[vi.name].items():
                if axis < len(dims) and dims[axis].HasField("dim_value"):
                    dims[axis].dim_value = int(kept[ids].sum())
        elif vi.name in new_shapes:
            for d, size in zip(dims, new_shapes[vi.name]):
                d.dim_value = size
        elif vi.name in counts:
            axis, size = counts[vi.name]
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                dims[axis].dim_value = size


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    _remove_attribute(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    for k, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[k]
            return


class _Names:
    """Hands out tensor names the model does not use yet."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.new: set[str] = set()

    def taken(self, name: str) -> bool:
        index = self.index
        return (
            name in self.new
            or name in index.initializers
            or name in index.producer
            or name in index.consumers
            or name in index.graph_inputs
            or name in index.graph_outputs
        )

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while self.taken(name):
            name, k = f"{base}_{k}", k + 1
        self.new.add(name)
        return name


class ShrinkChannels(Pass):
    """Transform pass: `shrink_channels` with a keep plan made for one model.

    Group ids mean something only for the model they were found on, so the pass
    takes that model's ChannelAnalysis and refuses any other model. Keeping every
    channel is no change: the input comes back, with `modified` False.
    """

    name = "shrink_channels"

    def __init__(self, keep: KeepPlan, analysis: ChannelAnalysis) -> None:
        self.keep = {gid: list(channels) for gid, channels in keep.items()}
        self.analysis = analysis

    def call(self, model: onnx.ModelProto) -> PassResult:
        analysed, index, read = indexed_loaded(model)
        self.analysis.check_model(analysed)
        if kept_channels(self.analysis, self.keep).all():
            return PassResult(model)
        out = shrink_channels(analysed, self.keep, self.analysis, index)
        return PassResult(out if read is None else read.write_form(out), True)
