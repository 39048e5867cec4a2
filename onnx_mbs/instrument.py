"""The instrumented model: per-channel activation statistics reduced inside the graph.

For each watched tensor x (N, C, H, W) the instrumented copy of the model adds

    HardSigmoid(x, alpha=2**127, beta=0) -> GlobalAveragePool   fraction of x > 0
    x (or Abs(x) when x may be negative)  -> GlobalAveragePool   mean |x|

and returns only these (N, C, 1, 1) reductions, so a batch costs a few small
vectors instead of every activation. They leave the graph concatenated along
the channel axis as one output (`PACKED`), so a batch brings back one array,
one device-to-host copy on CUDA, however many tensors are watched; only a
tensor whose channel count shape inference cannot tell keeps outputs of its own.
HardSigmoid(2**127 * x) clipped to [0, 1] is exactly the step x > 0 for every
normal float (2**127 times the smallest normal float is 2); only subnormal
positives count fractionally.
These ops were chosen over Greater -> Cast -> ReduceSum because onnxruntime's
CPU provider runs them on its blocked NCHWc layout: no layout conversion of
the watched tensors, see bench/stats.py. `spatial_mean="reduce"` uses a
ReduceMean over H, W instead; on CUDA it measured no faster than pooling
(bench/results/gpu.json), so pooling is the default everywhere. Tensors that are not float32 are
cast to float32 first (float16 can hold neither alpha nor exact averages).
Counts are recovered inside the graph by multiplying by H*W and rounding, so the host
only sums each batch's rows in float64: per-tensor host arithmetic on (N, C) arrays had
cost as much as the added kernels on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.passes.graph import default_opset, value_types
from onnx_mbs.passes.protos import without_weights

STEP_ALPHA = 2.0**127

PREFIX = "onnx_mbs_stats"


def packed_name(prefix: str) -> str:
    """The output every reduction whose channel count is known is concatenated into."""
    return f"{prefix}/packed"


def axes_name(prefix: str) -> str:
    """The (2, 3) initializer ReduceMean reads its axes from (opset 18 on)."""
    return f"{prefix}/spatial_axes"


PACKED, SPATIAL_AXES = packed_name(PREFIX), axes_name(PREFIX)  # in a model without PREFIX


def free_prefix(model: onnx.ModelProto) -> str:
    """PREFIX, or PREFIX_k where the model names something PREFIX/...: its names are its own,
    and the instrumented copy's must not meet them."""
    graph = model.graph
    names = {t for node in graph.node for t in (*node.input, *node.output)}
    names.update(v.name for v in (*graph.input, *graph.initializer))
    prefix, k = PREFIX, 0
    while any(n == prefix or n.startswith(f"{prefix}/") for n in names):
        k += 1
        prefix = f"{PREFIX}_{k}"
    return prefix


# Producers whose outputs are never negative, so sum |x| = sum x and Abs can be skipped.
NON_NEGATIVE = {"Relu", "Sigmoid", "Softplus"}


@dataclass(frozen=True)
class StatOutputs:
    """Names of the outputs the instrumented model adds for one watched tensor."""

    tensor: str
    positive: str  # (N, C, 1, 1) fraction of x > 0 per sample and channel
    mean_abs: str | None  # (N, C, 1, 1) mean |x| per sample and channel, if measured
    shape: str | None  # Shape(x), only when H*W is not known statically
    spatial: int | None  # H*W when known statically
    channels: int | None = None  # C when known statically: then both reductions are packed
    packed_at: int | None = None  # first column of this tensor's counts of x > 0 in PACKED
    abs_at: int | None = None  # first column of its sums of |x| in PACKED, if measured
    packed: str = PACKED  # the packed output's name (another prefix where the model has PREFIX)

    def columns(self) -> tuple[slice, slice | None]:
        """Where this tensor's per-sample counts and sums of |x| lie along PACKED's axis 1."""
        assert self.packed_at is not None and self.channels is not None
        channels = self.channels
        sums = None if self.abs_at is None else slice(self.abs_at, self.abs_at + channels)
        return slice(self.packed_at, self.packed_at + channels), sums


def instrument(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    input_shapes: dict[str, Sequence[int]],
    magnitudes: bool = True,
    spatial_mean: str = "pool",
) -> tuple[onnx.ModelProto, list[StatOutputs]]:
    """A copy of `model` whose only outputs are the per-channel reductions of `tensors`.

    `magnitudes=False` skips sum |x| (one memory pass per tensor fewer) when only the
    activation ratio is needed. `spatial_mean`: "pool" (GlobalAveragePool) or "reduce"
    (ReduceMean over H, W).

    `input_shapes` (the shapes that will be fed) lets shape inference find H*W; tensors
    whose shape stays unknown also get a Shape output. The original nodes are untouched.
    """
    result, outputs = instrument_without_weights(
        model, tensors, input_shapes, magnitudes, spatial_mean
    )
    added = list(result.graph.initializer)
    del result.graph.initializer[:]
    result.graph.initializer.extend([*model.graph.initializer, *added])
    return result, outputs


def instrument_without_weights(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    input_shapes: dict[str, Sequence[int]],
    magnitudes: bool,
    spatial_mean: str,
) -> tuple[onnx.ModelProto, list[StatOutputs]]:
    """`instrument` without `model`'s initializers (its own added ones only): the weights
    are not copied, but written once with it (`write_with_weights`)."""
    tensors = list(dict.fromkeys(tensors))
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    missing = [t for t in tensors if t not in producers and t not in graph_inputs]
    if missing:
        raise BadInputError(
            f"tensor {missing[0]!r} is not produced by any node of the model; "
            "pass activation output names"
        )
    if spatial_mean not in SPATIAL_MEANS:
        raise ValueError(f"spatial_mean must be one of {SPATIAL_MEANS}, not {spatial_mean!r}")
    types, shapes = _static_types_and_shapes(model, input_shapes)
    prefix = free_prefix(model)
    mean = _spatial_mean_maker(spatial_mean, default_opset(model), axes_name(prefix))
    added: dict[str, list[onnx.NodeProto]] = {}
    outputs: list[StatOutputs] = []
    for number, name in enumerate(tensors):
        shape = shapes.get(name)
        if shape is not None and len(shape) < 3:
            raise BadInputError(
                f"tensor {name!r} has shape {tuple(shape)}; statistics need (N, C, ...) "
                "activations with at least one spatial axis"
            )
        producer = producers.get(name)
        non_negative = producer is not None and _never_negative(producer, model)
        element = types.get(name, TensorProto.FLOAT)
        nodes, out = _reductions(
            name, f"{prefix}/{number}", non_negative, shape, element, magnitudes, mean
        )
        added.setdefault(name, []).extend(nodes)
        outputs.append(out)

    result = without_weights(model)
    new_graph = result.graph
    nodes = [n for t in tensors if t in graph_inputs and t not in producers for n in added[t]]
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            nodes.extend(added.get(out, []))
    del new_graph.node[:]
    new_graph.node.extend(nodes)
    if spatial_mean == "reduce" and default_opset(model) >= 18:
        axes = onnx.numpy_helper.from_array(np.array([2, 3], np.int64), axes_name(prefix))
        new_graph.initializer.append(axes)
    del new_graph.output[:]
    outputs = _pack(outputs, new_graph, prefix)
    for out in outputs:
        if out.packed_at is None:
            dims = [None, None, 1, 1]  # the batch size may change on the last batch
            new_graph.output.extend(
                helper.make_tensor_value_info(n, TensorProto.FLOAT, dims)
                for n in (out.positive, out.mean_abs)
                if n is not None
            )
        if out.shape:
            shape_info = helper.make_tensor_value_info(out.shape, TensorProto.INT64, [None])
            new_graph.output.append(shape_info)
    return result, outputs


def _pack(outputs: list[StatOutputs], graph: onnx.GraphProto, prefix: str) -> list[StatOutputs]:
    """Gather the reductions of every tensor of known channel count and H*W into PACKED (a
    graph output appended to `graph`); `outputs` with their columns in it.

    PACKED holds whole sums per sample, so the host only adds rows up: first every tensor's
    count of x > 0 (its fraction times H*W, rounded: exact), then every sum of |x|."""
    packable = [o for o in outputs if o.channels is not None and o.spatial is not None]
    if not packable:
        return outputs
    with_abs = [o for o in packable if o.mean_abs is not None]
    placed = {}
    counts_at, column = 0, sum(o.channels for o in packable)  # counts first, then |x| sums
    packed = packed_name(prefix)
    for out in packable:
        abs_at = None
        if out.mean_abs is not None:
            abs_at, column = column, column + out.channels
        placed[out.tensor] = replace(out, packed_at=counts_at, abs_at=abs_at, packed=packed)
        counts_at += out.channels
    positive = [o.positive for o in packable]
    parts = [_scaled_sums(graph, f"{prefix}/counts", positive, packable, True)]
    if with_abs:
        absolute = [o.mean_abs for o in with_abs]
        parts.append(_scaled_sums(graph, f"{prefix}/abs", absolute, with_abs, False))
    graph.node.append(helper.make_node("Concat", parts, [packed], axis=1))
    graph.output.append(
        helper.make_tensor_value_info(packed, TensorProto.FLOAT, [None, column, 1, 1])
    )
    return [placed.get(o.tensor, o) for o in outputs]


def _scaled_sums(
    graph: onnx.GraphProto, prefix: str, means: list[str], outputs: list[StatOutputs], whole: bool
) -> str:
    """Nodes turning per-channel means (N, C, 1, 1) into sums over H*W, concatenated; `whole`
    rounds them (Floor(x + 0.5): every opset has it). Their names start with `prefix`."""
    area = np.concatenate([np.full(o.channels, o.spatial, np.float32) for o in outputs])
    nodes = [
        *_concat_tree(means, f"{prefix}/means"),
        _constant(f"{prefix}/area", area.reshape(1, -1, 1, 1)),
        helper.make_node("Mul", [f"{prefix}/means", f"{prefix}/area"], [f"{prefix}/sums"]),
    ]
    result = f"{prefix}/sums"
    if whole:
        nodes += [
            _constant(f"{prefix}/half", np.array(0.5, np.float32)),
            helper.make_node("Add", [result, f"{prefix}/half"], [f"{prefix}/up"]),
            helper.make_node("Floor", [f"{prefix}/up"], [f"{prefix}/whole"]),
        ]
        result = f"{prefix}/whole"
    graph.node.extend(nodes)
    return result


CONCAT_FAN_IN = 32
# Watched tensors from which a graph counts as deep: the Concat tree and onnxruntime's
# priority-based order (stats.py) pay there, and below cost time (issue 23: ResNet-56, 55
# watched, batch 64: 1.14x plain inference per batch without both, 1.28x with both).
DEEP = 128


def _concat_tree(inputs: list[str], output: str) -> list[onnx.NodeProto]:
    """Concat nodes joining `inputs` along axis 1 into `output`: one Concat, or past DEEP
    inputs a tree of at most CONCAT_FAN_IN inputs each (a session around one Concat of
    ResNet-1202's 1,201 reductions took 2.6 s to build at the extended level, 1.35 s with
    the tree)."""
    if len(inputs) <= DEEP:
        return [helper.make_node("Concat", inputs, [output], axis=1)]
    nodes = []
    level = 0
    while len(inputs) > CONCAT_FAN_IN:
        joined = []
        for start in range(0, len(inputs), CONCAT_FAN_IN):
            name = f"{output}/{level}/{start}"
            chunk = inputs[start : start + CONCAT_FAN_IN]
            nodes.append(helper.make_node("Concat", chunk, [name], axis=1))
            joined.append(name)
        inputs, level = joined, level + 1
    nodes.append(helper.make_node("Concat", inputs, [output], axis=1))
    return nodes


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    """A Constant node (not an initializer: IR 3 graphs would need it as an input too)."""
    tensor = onnx.numpy_helper.from_array(value, name)
    return helper.make_node("Constant", [], [name], value=tensor)


SPATIAL_MEANS = ("pool", "reduce")


def _spatial_mean_maker(kind: str, opset: int, axes: str):
    """A function making the nodes that average x (N, C, H, W) to (N, C, 1, 1); `axes` names
    the (2, 3) initializer ReduceMean reads from opset 18."""
    if kind == "pool":
        return lambda src, out: [helper.make_node("GlobalAveragePool", [src], [out])]
    if opset >= 18:  # axes became an input
        return lambda src, out: [helper.make_node("ReduceMean", [src, axes], [out])]
    return lambda src, out: [helper.make_node("ReduceMean", [src], [out], axes=[2, 3])]


def _as_nchw_mean(shape: str):
    """The mean maker for tensors of rank other than 4 (Conv1d (N, C, L), Conv3d (N, C, D,
    H, W)): GlobalAveragePool, then a Reshape to (N, C, 1, 1) by the constant `shape`, the
    form every reduction is packed in."""

    def mean(src: str, out: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("GlobalAveragePool", [src], [f"{out}/pooled"]),
            helper.make_node("Reshape", [f"{out}/pooled", shape], [out]),
        ]

    return mean


def _reductions(
    name: str,
    prefix: str,
    non_negative: bool,
    shape: Sequence[int] | None,
    element: int,
    magnitudes: bool,
    mean,
) -> tuple[list[onnx.NodeProto], StatOutputs]:
    step, absolute = f"{prefix}/step", f"{prefix}/abs"
    positive, mean_abs = f"{prefix}/positive", f"{prefix}/mean_abs"
    nodes = []
    if shape is not None and len(shape) != 4:
        nodes.append(_constant(f"{prefix}/nchw", np.array([0, -1, 1, 1], np.int64)))
        mean = _as_nchw_mean(f"{prefix}/nchw")
    source = name
    if element != TensorProto.FLOAT:
        source = f"{prefix}/float"
        nodes.append(helper.make_node("Cast", [name], [source], to=TensorProto.FLOAT))
    nodes += [
        helper.make_node("HardSigmoid", [source], [step], alpha=STEP_ALPHA, beta=0.0),
        *mean(step, positive),
    ]
    if not magnitudes:
        mean_abs = None
    elif non_negative:
        nodes += mean(source, mean_abs)
    else:
        nodes.append(helper.make_node("Abs", [source], [absolute]))
        nodes += mean(absolute, mean_abs)
    spatial = None
    if shape is not None and all(isinstance(d, int) and d > 0 for d in shape[2:]):
        spatial = int(np.prod(shape[2:]))
    shape_out = None
    if spatial is None:
        shape_out = f"{prefix}/shape"
        nodes.append(helper.make_node("Shape", [name], [shape_out]))
    channels = shape[1] if shape is not None and isinstance(shape[1], int) else None
    return nodes, StatOutputs(name, positive, mean_abs, shape_out, spatial, channels)


def _never_negative(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    if op_id(node) in NON_NEGATIVE:
        return True
    if op_id(node) != "Clip":
        return False
    for attribute in node.attribute:  # opset < 11: min is an attribute
        if attribute.name == "min":
            return attribute.f >= 0
    if len(node.input) < 2 or not node.input[1]:
        return False
    constants = {t.name: t for t in model.graph.initializer}
    for other in model.graph.node:
        if op_id(other) == "Constant" and other.attribute:
            constants[other.output[0]] = other.attribute[0].t
    minimum = constants.get(node.input[1])
    return minimum is not None and float(onnx.numpy_helper.to_array(minimum)) >= 0


def _static_types_and_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]]
) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    """Element types and shapes from shape inference, the inputs fixed to what will be fed.

    A model whose inputs already declare the fed shapes (the batch aside, which no
    statistic reads) and that carries shapes for its tensors is read as it is:
    inferring a copy again costs seconds on large models.
    """
    if _declares_fed_shapes(model, input_shapes):
        return _types_and_shapes(model.graph)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for graph_input in fixed.graph.input:
        if graph_input.name in input_shapes:
            dims = graph_input.type.tensor_type.shape.dim
            del dims[:]
            for size in input_shapes[graph_input.name]:
                dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False)
    except Exception:  # shape inference is only a shortcut; Shape outputs cover the rest
        inferred = fixed
    return _types_and_shapes(inferred.graph)


def _declares_fed_shapes(model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]]) -> bool:
    """True when every fed input's declared dims, but the batch, are static and equal to the
    fed ones, and the graph carries inferred shapes (value_info)."""
    if not model.graph.value_info:
        return False
    declared = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for name, fed in input_shapes.items():
        dims = declared.get(name)
        if dims is None or len(dims) != len(fed):
            return False
        if any(not d.HasField("dim_value") or d.dim_value != f for d, f in zip(dims[1:], fed[1:])):
            return False
    return True


def _types_and_shapes(
    graph: onnx.GraphProto,
) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    shapes: dict[str, list[int | None]] = {}
    for info in chain(graph.input, graph.value_info, graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    return value_types(graph), shapes
