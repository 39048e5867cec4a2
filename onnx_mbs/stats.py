"""Per-channel activation statistics, reduced inside the graph by onnxruntime.

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

The session is built to be cheap in memory and time (issue 13): its large weights are
page-aligned external data that onnxruntime maps (and the pipeline lends it the analysis
form's weights meanwhile, `weights_aside`), its nodes run in priority-based order (each
reduction right after its tensor), its optimisation level is the highest that repays its
build over the calibration set, and single-sample runs on the CPU go two or more at a
time on one thread each.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_mbs.data import Batch, DataSource
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.passes.graph import default_opset
from onnx_mbs.passes.load import (
    WEIGHTS_FILE,
    LoadedModel,
    placed_apart,
    set_io,
    temporary_folder_error,
    weights_apart,
    without_weights,
)
from onnx_mbs.progress import progress_bar
from onnx_mbs.runtime import (
    batch_feeds,
    concurrent_runs,
    feed_dtype,
    in_order,
    make_session,
    release_freed_memory,
    session_provider,
)

STEP_ALPHA = 2.0**127
PREFIX = "onnx_mbs_stats"
PACKED = f"{PREFIX}/packed"  # every reduction whose channel count is known, concatenated
# Producers whose outputs are never negative, so sum |x| = sum x and Abs can be skipped.
NON_NEGATIVE = {"Relu", "Sigmoid", "Softplus"}


@dataclass
class TensorStats:
    positive: np.ndarray  # per channel count of x > 0
    abs_sum: np.ndarray | None  # per channel sum of |x| (None when not measured)
    elements_per_channel: int  # N*H*W summed over batches

    @property
    def channels(self) -> int:
        return len(self.positive)

    @property
    def ratio(self) -> float:
        """rho: the fraction of all elements that are > 0."""
        return float(self.positive.sum() / (self.elements_per_channel * self.channels))

    @property
    def channel_ratio(self) -> np.ndarray:
        return self.positive / self.elements_per_channel

    @property
    def channel_mean_abs(self) -> np.ndarray:
        if self.abs_sum is None:
            raise ValueError("magnitudes were not measured: collect_stats(..., magnitudes=True)")
        return self.abs_sum / self.elements_per_channel


@dataclass
class ActivationStats:
    tensors: dict[str, TensorStats]
    samples: int
    provider: str
    seconds: float


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
    result, outputs = _instrumented(model, tensors, input_shapes, magnitudes, spatial_mean)
    added = list(result.graph.initializer)
    del result.graph.initializer[:]
    result.graph.initializer.extend([*model.graph.initializer, *added])
    return result, outputs


def _instrumented(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    input_shapes: dict[str, Sequence[int]],
    magnitudes: bool,
    spatial_mean: str,
) -> tuple[onnx.ModelProto, list[StatOutputs]]:
    """`instrument` without `model`'s initializers (its own added ones only): the weights
    are not copied, but written once with it (`_write_with_weights`)."""
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
    mean = _spatial_mean_maker(spatial_mean, default_opset(model))
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
            name, f"{PREFIX}/{number}", non_negative, shape, element, magnitudes, mean
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
        axes = onnx.numpy_helper.from_array(np.array([2, 3], np.int64), SPATIAL_AXES)
        new_graph.initializer.append(axes)
    del new_graph.output[:]
    outputs = _pack(outputs, new_graph)
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


def _write_with_weights(model: onnx.ModelProto, weights: Sequence[TensorProto], path: Path) -> None:
    """Write `model` with `weights` as initializers ahead of its own, one tensor at a time:
    large ones as external data in WEIGHTS_FILE beside `path` (appended to it if it is
    there), the rest embedded; weights set aside there already stay references.
    onnxruntime maps page-aligned external tensors instead of copying them (CPU): the
    session holds them once, as file pages (memory: issue 13)."""
    own = list(model.graph.initializer)
    del model.graph.initializer[:]
    with open(path.parent / WEIGHTS_FILE, "ab") as data:
        model.graph.initializer.extend(placed_apart(t, data) for t in weights)
    model.graph.initializer.extend(own)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


@contextmanager
def weights_aside(read: LoadedModel) -> Iterator[tuple[onnx.ModelProto, Path]]:
    """Lend the analysis form's weights to onnxruntime while the statistics run.

    Yields (a copy of `read.model` whose large weights are references, the folder whose
    WEIGHTS_FILE holds them) for `collect_stats(..., weights_folder=)`, and meanwhile
    holds no parsed copy of them: `read.model` is let go (callers drop theirs too) and
    read back from the file afterwards, equal to what it was. Protobuf frees a model's
    memory only with the whole model, so emptying its tensors would not do (issue 13).
    """
    with tempfile.TemporaryDirectory(prefix="onnx-mbs-") as name:
        folder = Path(name)
        try:
            light, apart = weights_apart(read.model, folder)
        except OSError as e:
            raise temporary_folder_error(e) from None
        # name -> whether its data_location field was set, to give each back as it was
        lent = {t.name: t.HasField("data_location") for t in apart}
        del apart
        read.model = None  # type: ignore[assignment]  # read back below
        release_freed_memory()
        try:
            yield light, folder
        finally:
            read.model = _taken_back(light, folder, lent)


def _taken_back(model: onnx.ModelProto, folder: Path, lent: dict[str, bool]) -> onnx.ModelProto:
    """`model` with the weights `weights_aside` lent from it read back in place, each
    tensor's fields as they were."""
    with open(folder / WEIGHTS_FILE, "rb") as data:
        for tensor in model.graph.initializer:
            if tensor.name not in lent:
                continue
            where = {e.key: e.value for e in tensor.external_data}
            data.seek(int(where["offset"]))
            tensor.raw_data = data.read(int(where["length"]))
            del tensor.external_data[:]
            if lent[tensor.name]:
                tensor.data_location = TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
    return model


def _pack(outputs: list[StatOutputs], graph: onnx.GraphProto) -> list[StatOutputs]:
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
    for out in packable:
        abs_at = None
        if out.mean_abs is not None:
            abs_at, column = column, column + out.channels
        placed[out.tensor] = replace(out, packed_at=counts_at, abs_at=abs_at)
        counts_at += out.channels
    parts = [_scaled_sums(graph, "counts", [o.positive for o in packable], packable, True)]
    if with_abs:
        parts.append(_scaled_sums(graph, "abs", [o.mean_abs for o in with_abs], with_abs, False))
    graph.node.append(helper.make_node("Concat", parts, [PACKED], axis=1))
    graph.output.append(
        helper.make_tensor_value_info(PACKED, TensorProto.FLOAT, [None, column, 1, 1])
    )
    return [placed.get(o.tensor, o) for o in outputs]


def _scaled_sums(
    graph: onnx.GraphProto, name: str, means: list[str], outputs: list[StatOutputs], whole: bool
) -> str:
    """Nodes turning per-channel means (N, C, 1, 1) into sums over H*W, concatenated; `whole`
    rounds them (Floor(x + 0.5): every opset has it)."""
    prefix = f"{PREFIX}/{name}"
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


def _concat_tree(inputs: list[str], output: str) -> list[onnx.NodeProto]:
    """Concat nodes joining `inputs` along axis 1 into `output`, at most CONCAT_FAN_IN
    inputs each: a session around one Concat of ResNet-1202's 1,201 reductions took 2.6 s to
    build (extended level), 1.35 s with the tree; CUDA graphs refuse a Concat of over 32."""
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
SPATIAL_AXES = f"{PREFIX}/spatial_axes"


def _spatial_mean_maker(kind: str, opset: int):
    """A function making the nodes that average x (N, C, H, W) to (N, C, 1, 1)."""
    if kind == "pool":
        return lambda src, out: [helper.make_node("GlobalAveragePool", [src], [out])]
    if opset >= 18:  # axes became an input
        return lambda src, out: [helper.make_node("ReduceMean", [src, SPATIAL_AXES], [out])]
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
    if node.op_type in NON_NEGATIVE and node.domain in ("", "ai.onnx"):
        return True
    if node.op_type != "Clip" or node.domain not in ("", "ai.onnx"):
        return False
    for attribute in node.attribute:  # opset < 11: min is an attribute
        if attribute.name == "min":
            return attribute.f >= 0
    if len(node.input) < 2 or not node.input[1]:
        return False
    constants = {t.name: t for t in model.graph.initializer}
    for other in model.graph.node:
        if other.op_type == "Constant" and other.attribute:
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
    types: dict[str, int] = {}
    shapes: dict[str, list[int | None]] = {}
    for info in chain(graph.input, graph.value_info, graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            types[info.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    return types, shapes


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: DataSource,
    providers: list[str],
    batch_size: int = 64,
    progress: bool = True,
    magnitudes: bool = True,
    spatial_mean: str = "pool",
    declared: onnx.ModelProto | None = None,
    macs_per_sample: int | None = None,
    weights_folder: Path | None = None,
) -> ActivationStats:
    """Per-channel count of x > 0 and sum |x| for each tensor, over all of `data`.

    Memory stays flat in the number of samples: batches are streamed and only the
    per-channel reductions leave onnxruntime. `model` is not modified. `declared`
    (a LoadedModel's) gives the graph inputs to run with when `model` is the analysis
    form, whose inferred shapes then spare inferring them again. `macs_per_sample`, when
    known, lets a deep graph run on few samples skip onnxruntime's slow-to-build layout
    optimisation levels (see `optimization_level`). `weights_folder` holds the large
    weights `model` references (`weights_aside`); the instrumented model is written there.
    """
    start = time.perf_counter()
    batches = data.batches(batch_size)
    first = next(batches, None)
    if first is None:
        raise BadInputError(f"no samples in {data.description}")
    fed = {name: array.shape for name, array in first.feeds(data.input_name).items()}
    _check_inputs(model, list(fed))
    instrumented, outputs = _instrumented(model, tensors, fed, magnitudes, spatial_mean)
    if declared is not None:
        set_io(instrumented, declared)
    workers = concurrent_runs(providers, len(first.x), len(data))
    # onnxruntime reads the model from a file written a tensor at a time: no copy of the
    # weights, serialized or not, beside `model`'s; the large ones it maps (issue 13).
    try:
        with contextlib.ExitStack() as stack:
            folder = weights_folder or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx-mbs-"))
            )
            path = folder / "instrumented.onnx"
            _write_with_weights(instrumented, model.graph.initializer, path)
            level = "full"
            if macs_per_sample is not None:
                weight_mb = (folder / WEIGHTS_FILE).stat().st_size / 2**20
                nodes = len(instrumented.graph.node)
                level = optimization_level(nodes, weight_mb, len(data), macs_per_sample)
            del instrumented
            session = make_session(
                path,
                providers,
                threads=1 if workers > 1 else 0,
                level=level,
                side_branches_early=True,
            )
    except OSError as e:
        raise temporary_folder_error(e) from None
    feed_type = feed_dtype(session, data.input_name)
    names = [o.name for o in session.get_outputs()]

    run = functools.partial(_run, session, data.input_name, feed_type)

    packed = _PackedSums(outputs)
    loose = {o: _Accumulator() for o in outputs if o.packed_at is None}
    samples = 0
    bar = progress_bar(len(data), "activation statistics", progress)
    with bar:
        for (_, batch), results in in_order(run, enumerate(chain([first], batches)), workers):
            values = dict(zip(names, results, strict=True))
            rows = len(batch.x)
            if packed.outputs:
                packed.add(values[PACKED], rows)
            for out, accumulator in loose.items():
                accumulator.add(out, values, rows)
            samples += rows
            bar.update(rows)
    provider = session_provider(session)
    del session, run  # closes the session: its memory can go back
    release_freed_memory()
    found = packed.result(samples) | {o.tensor: acc.result() for o, acc in loose.items()}
    tensors_stats = {o.tensor: found[o.tensor] for o in outputs}
    return ActivationStats(tensors_stats, samples, provider, time.perf_counter() - start)


# Measured on the CPU provider (2 cores, instrumented ResNet-50, -101 and -1202, deploy
# and BatchNorm forms, runs as `collect_stats` makes them): each level's build cost over
# the one below, per node and per MB of weights, and what its runs save per GMAC. The
# layout (NCHWc) level reorders every weight: 0.3 ms a node, 2 ms a MB (ResNet-101 at
# 224: 0.3 s); it saves 1.2 to 3.7 ms a GMAC. The extended level over none (fusions,
# constant folding): 0.04 to 0.11 ms a node, 1.4 to 2.1 ms a GMAC; the cheap build and
# large saving are taken, so the doubtful case keeps it.
_LEVEL_COSTS = (("full", 3e-4, 2e-3, 2e-3), ("extended", 4e-5, 0.0, 2.5e-3))


def optimization_level(nodes: int, weight_mb: float, samples: int, macs_per_sample: int) -> str:
    """The highest onnxruntime optimisation level ("full", "extended" or "none") whose
    build cost over the level below is repaid over `samples` runs: ResNet-1202 on 16
    images would spend 2 s building the layout level to save 0.5 s, and 0.3 to 0.9 s
    building the fusions to save 0.1 s; ResNet-101 0.3 s on the layout to save 0.15 s."""
    gmacs = samples * macs_per_sample / 1e9
    for level, s_per_node, s_per_mb, saves_s_per_gmac in _LEVEL_COSTS:
        if gmacs * saves_s_per_gmac >= nodes * s_per_node + weight_mb * s_per_mb:
            return level
    return "none"


class _PackedSums:
    """Running float64 sums of PACKED's columns, which hold whole per-sample sums already:
    one numpy call a batch, however many tensors are watched (per-tensor host arithmetic
    cost as much as the statistics' kernels on CUDA)."""

    def __init__(self, outputs: list[StatOutputs]) -> None:
        self.outputs = [o for o in outputs if o.packed_at is not None]
        self.total: np.ndarray | None = None

    def add(self, packed: np.ndarray, rows: int) -> None:
        """Add the first `rows` samples (the rest pads a short batch to a fixed one)."""
        sums = packed[:rows].reshape(rows, -1).sum(axis=0, dtype=np.float64)
        self.total = sums if self.total is None else self.total + sums

    def result(self, samples: int) -> dict[str, TensorStats]:
        """Each packed tensor's statistics over the `samples` added."""
        stats = {}
        for out in self.outputs:
            assert self.total is not None and out.spatial is not None
            counts, sums = out.columns()
            abs_sum = None if sums is None else self.total[sums]
            elements = samples * out.spatial
            stats[out.tensor] = TensorStats(self.total[counts], abs_sum, elements)
        return stats


class _Accumulator:
    """Running float64 sums for one tensor with outputs of its own (not packed)."""

    def __init__(self) -> None:
        self.positive: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.elements = 0

    def add(self, out: StatOutputs, values: dict[str, np.ndarray], rows: int) -> None:
        """Add the first `rows` samples of a tensor's own outputs (not packed)."""
        fraction = values[out.positive][:rows].astype(np.float64)
        batch, channels = fraction.shape[:2]
        spatial = out.spatial or int(np.prod(values[out.shape][2:]))
        # GAP returns means; counts are whole numbers, so rounding undoes the division.
        positive = np.rint(fraction.reshape(batch, channels) * spatial).sum(axis=0)
        abs_sum = None
        if out.mean_abs is not None:
            mean_abs = values[out.mean_abs][:rows].astype(np.float64).reshape(batch, channels)
            abs_sum = (mean_abs * spatial).sum(axis=0)
        if self.positive is None:
            self.positive, self.abs_sum = positive, abs_sum
        else:
            self.positive = self.positive + positive
            if abs_sum is not None:
                self.abs_sum = self.abs_sum + abs_sum
        self.elements += batch * spatial

    def result(self) -> TensorStats:
        assert self.positive is not None
        return TensorStats(self.positive, self.abs_sum, self.elements)


def _check_inputs(model: onnx.ModelProto, fed: list[str]) -> None:
    """The data must feed exactly the model's inputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    unknown = [name for name in fed if name not in inputs]
    if unknown:
        raise BadInputError(
            f"the data is for input {unknown[0]!r} but the model's inputs are {inputs}"
        )
    if len(inputs) > len(fed):
        raise BadInputError(
            f"the model has several inputs {inputs}; give an .npz with one array per input, "
            "named after it (model-ready data)"
        )


def _run(
    session: ort.InferenceSession,
    input_name: str,
    feed_type: np.dtype,
    numbered: tuple[int, Batch],
) -> list[np.ndarray]:
    """Run batch number `numbered[0]`; on the first, data that does not fit becomes a
    BadInputError."""
    index, batch = numbered
    feeds = batch_feeds(session, input_name, feed_type, batch)
    x = feeds[input_name]
    if index > 0:
        return session.run(None, feeds)
    declared = next(i for i in session.get_inputs() if i.name == input_name)
    expected = tuple(declared.shape)
    fits = len(expected) == x.ndim and all(
        not isinstance(d, int) or d == s for d, s in zip(expected, x.shape, strict=True)
    )
    if not fits:
        raise BadInputError(
            f"data does not fit model input {input_name!r}: expected shape {expected}, "
            f"got {x.shape}"
        )
    try:
        return session.run(None, feeds)
    except Exception as error:  # onnxruntime raises its own exception types
        raise BadInputError(
            f"onnxruntime cannot run the model on this data (input {input_name!r} expects "
            f"{expected}, got {x.shape} {x.dtype}): {str(error).strip().splitlines()[0]}"
        ) from None
