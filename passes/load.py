"""Loading: read a model, refuse what MBS cannot work on, fix input shapes, infer shapes.

Everything later assumes a float graph whose every tensor has a static shape,
so this is the one place that checks it and says clearly what to do otherwise.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, Message

from .base import Pass, PassResult
from .dynamic import RunTimeShapes, keep_dynamic, other_shapes
from .errors import BadInputError
from .graph import GraphIndex, static_shape
from .normalise import normalise_in_place, unique_names

InputShapes = Mapping[str, Sequence[int]]

QUANTIZED_OPS = {
    "QLinearConv",
    "ConvInteger",
    "QLinearMatMul",
    "MatMulInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """Parse `NAME:1,3,224,224` (or `1,3,224,224` for a single-input model, name '')."""
    name, _, dims = spec.rpartition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        raise BadInputError(
            f"bad --input-shape {spec!r}: expected NAME:D0,D1,... with integer dims, "
            "e.g. input:1,3,224,224"
        ) from None
    if any(not 0 < d < 2**63 for d in shape):
        raise BadInputError(
            f"bad --input-shape {spec!r}: dims must be positive integers below 2^63"
        )
    return name, shape


def read_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX file (with external data) or copy a ModelProto.

    Refuses what MBS cannot work on: not ONNX, truncated, invalid, quantized.
    """
    path = None
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise BadInputError(f"{path} is a folder; give the path of an .onnx model file")
        if not path.is_file():
            raise BadInputError(f"model file not found: {path}")
        try:
            model = onnx.load(str(path))
        except DecodeError as e:
            raise BadInputError(
                f"{path} is not a valid ONNX file (truncated or not ONNX: {e})"
            ) from None
        except (FileNotFoundError, OSError) as e:
            raise BadInputError(f"cannot read {path} or its external data: {e}") from None
        except Exception as e:  # onnx raises assorted errors on corrupt files
            raise BadInputError(f"{path} could not be loaded as ONNX: {e}") from None
        if not model.graph.node:
            raise BadInputError(f"{path} is not an ONNX model (no graph nodes found)")
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise BadInputError(
            f"quantized graph ({', '.join(quantized)}): MBS works on float models; "
            "reduce the float model first, then quantize"
        )
    try:
        check_model(model)  # the weights checked a tensor at a time: no copy of them
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise BadInputError(f"the model is not valid ONNX: {first}") from None
    return model


OPAQUE_DOMAIN = "onnx_mbs.opaque"


def is_unknown_op(node: onnx.NodeProto) -> bool:
    """A default-domain op without an ONNX schema (a TensorRT plugin such as
    EfficientNMS_TRT): opaque, kept as it is and never followed."""
    return node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)


def _as_custom(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[int]]:
    """`model` with its unknown default-domain ops moved to OPAQUE_DOMAIN (the checker
    and shape inference treat custom domains as opaque), and where they are."""
    where = [k for k, n in enumerate(model.graph.node) if is_unknown_op(n)]
    if not where:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k in where:
        out.graph.node[k].domain = OPAQUE_DOMAIN
    out.opset_import.append(onnx.helper.make_opsetid(OPAQUE_DOMAIN, 1))
    return out, where


def _restore(model: onnx.ModelProto, where: list[int]) -> onnx.ModelProto:
    if not where:
        return model
    for k in where:
        model.graph.node[k].domain = ""
    kept = [o for o in model.opset_import if o.domain != OPAQUE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """`onnx.checker.check_model`, with unknown default-domain ops taken as opaque.

    Handed a ModelProto, onnx serializes it whole; handed a file, it reads the bytes and
    then parses them: two copies of the weights (issue 13). So each large tensor is
    checked on its own (the checker's tensor check) and the model is checked from a
    file that holds those tensors as external data."""
    custom = _as_custom(model)[0]
    try:
        with tempfile.TemporaryDirectory(prefix="onnx-mbs-") as name:
            folder = Path(name)
            light, apart = weights_apart(custom, folder)
            for tensor in apart:
                onnx.checker.check_tensor(tensor)
            (folder / "checked.onnx").write_bytes(light.SerializeToString())
            onnx.checker.check_model(str(folder / "checked.onnx"), full_check=full_check)
    except OSError as error:
        raise temporary_folder_error(error) from None


def temporary_folder_error(error: OSError) -> BadInputError:
    """What a run says when its temporary folder cannot be written."""
    return BadInputError(
        f"cannot write to a temporary folder ({error}); set TMPDIR to a writable folder"
    )


# Tensors of a page or more go to WEIGHTS_FILE at page-aligned offsets: what onnxruntime
# maps instead of copying (CPU), and what lets a checker skip the weights.
PAGE = 4096
WEIGHTS_FILE = "weights.bin"


def placed_apart(tensor: onnx.TensorProto, data: BinaryIO) -> onnx.TensorProto:
    """`tensor`, or a reference to its raw bytes appended to `data` (WEIGHTS_FILE) at a page
    boundary when it holds a page or more of them."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return tensor
    raw = tensor.raw_data
    if len(raw) < PAGE:
        return tensor
    data.write(bytes(-data.tell() % PAGE))
    offset = data.tell()
    data.write(raw)
    reference = onnx.TensorProto()
    copy_fields(tensor, reference, skip="raw_data")
    reference.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", len(raw))):
        reference.external_data.add(key=key, value=str(value))
    return reference


def weights_apart(
    model: onnx.ModelProto, folder: Path
) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` whose tensors of a page or more are references into
    `folder`/WEIGHTS_FILE, written there (`placed_apart`); and those tensors, `model`'s own."""
    light = without_weights(model)
    apart = []
    with open(folder / WEIGHTS_FILE, "wb") as data:
        for tensor in model.graph.initializer:
            placed = placed_apart(tensor, data)
            if placed is not tensor:
                apart.append(tensor)
            light.graph.initializer.append(placed)
    return light, apart


_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` a tensor at a time: the same bytes as
    `model.SerializeToString()`, without that copy of its weights. Protobuf writes fields
    in number order, so the model is the fields before its graph, the graph's header,
    the graph's fields before its initializers, each initializer, the graph's other
    fields, then the model's other fields."""
    sizes = [t.ByteSize() for t in model.graph.initializer]
    head, tail = _split_at(model, _GRAPH_FIELD)
    graph_head, graph_tail = _split_at(model.graph, _INITIALIZER_FIELD)
    with open(path, "wb") as f:
        f.write(head)
        if model.HasField("graph"):
            graph_size = len(graph_head) + _weights_size(sizes) + len(graph_tail)
            f.write(_header(_GRAPH_FIELD, graph_size))
            f.write(graph_head)
            for tensor, size in zip(model.graph.initializer, sizes, strict=True):
                f.write(_header(_INITIALIZER_FIELD, size))
                f.write(tensor.SerializeToString())
            f.write(graph_tail)
        f.write(tail)


def _split_at(message: Message, number: int) -> tuple[bytes, bytes]:
    """The serialized fields of `message` numbered below `number`, and above it."""
    fields = [d for d, _ in message.ListFields() if d.number != number]
    parts = []
    for names in (
        [d.name for d in fields if d.number < number],
        [d.name for d in fields if d.number > number],
    ):
        part = type(message)()
        copy_fields_of(message, part, names)
        parts.append(part.SerializeToString())
    return parts[0], parts[1]


def serialized_size(model: onnx.ModelProto) -> int:
    """`model.ByteSize()`, which Python's protobuf computes by serializing the whole model
    (a copy of its weights); here a tensor at a time, as `write_model` writes it."""
    head, tail = _split_at(model, _GRAPH_FIELD)
    if not model.HasField("graph"):
        return len(head) + len(tail)
    graph_head, graph_tail = _split_at(model.graph, _INITIALIZER_FIELD)
    sizes = [t.ByteSize() for t in model.graph.initializer]
    graph_size = len(graph_head) + _weights_size(sizes) + len(graph_tail)
    return len(head) + len(_header(_GRAPH_FIELD, graph_size)) + graph_size + len(tail)


def _weights_size(sizes: list[int]) -> int:
    """Bytes of a graph field's initializers of serialized `sizes`, headers included."""
    return sum(len(_header(_INITIALIZER_FIELD, n)) + n for n in sizes)


def _header(field: int, size: int) -> bytes:
    """The wire-format key and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class FixInputShapes(Pass):
    """Make every graph input fully static.

    A dynamic batch dimension alone becomes `batch` (1; None leaves it dynamic);
    any other dynamic dimension must be given (`--input-shape NAME:1,3,224,224`),
    because MACs, macroblocks and channel plans all depend on spatial sizes.
    """

    name = "fix_input_shapes"

    def __init__(self, shapes: InputShapes | None = None, batch: int | None = 1) -> None:
        self.shapes = dict(shapes or {})
        self.batch = batch

    def call(self, model: onnx.ModelProto) -> PassResult:
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        shapes = dict(self.shapes)
        if "" in shapes:
            if len(inputs) != 1:
                raise BadInputError(
                    "--input-shape without a name needs a single-input model; use NAME:dims with "
                    f"one of: {', '.join(i.name for i in inputs)}"
                )
            shapes[inputs[0].name] = shapes.pop("")
        unknown = set(shapes) - {i.name for i in inputs}
        if unknown:
            raise BadInputError(
                f"--input-shape names unknown input(s) {sorted(unknown)}; "
                f"the model's inputs are: {', '.join(i.name for i in inputs)}"
            )
        if not shapes and all(static_shape(i) is not None for i in inputs):
            return PassResult(model)  # nothing to fix: no copy of a large model
        out = onnx.ModelProto()
        out.CopyFrom(model)
        modified = False
        for vi in out.graph.input:
            if vi.name in initializers:
                continue
            dims = vi.type.tensor_type.shape.dim
            if vi.name in shapes:
                wanted = list(shapes[vi.name])
                if len(wanted) != len(dims):
                    raise BadInputError(
                        f"--input-shape for {vi.name!r} has {len(wanted)} dims, "
                        f"the model's input has {len(dims)}"
                    )
                for d, w in zip(dims, wanted):
                    if d.HasField("dim_value") and d.dim_value != w:
                        raise BadInputError(
                            f"--input-shape for {vi.name!r} gives {wanted}, but the model "
                            f"fixes dim {list(dims).index(d)} to {d.dim_value}"
                        )
                    modified |= not d.HasField("dim_value")
                    d.dim_value = w
                continue
            if static_shape(vi) is not None:
                continue
            dynamic = [k for k, d in enumerate(dims) if not d.HasField("dim_value")]
            if dynamic == [0]:
                if self.batch is not None:
                    dims[0].dim_value = self.batch
                    modified = True
                continue
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            sizes = [
                str(d.dim_value) if d.HasField("dim_value") else "1" if k == 0 else _size_name(d, k)
                for k, d in enumerate(dims)
            ]
            unknown = ", ".join(x for x in sizes if not x.isdigit())
            raise BadInputError(
                f"input {vi.name!r} has dynamic dims {shown}: give the size to analyse at, "
                f"--input-shape {vi.name}:{','.join(sizes)} with your {unknown} (the written "
                "model keeps the dims dynamic)"
            )
        return PassResult(out if modified else model, modified)


def _size_name(dim: onnx.TensorShapeProto.Dimension, k: int) -> str:
    """A dynamic dim's name as a placeholder for its size: HEIGHT for 'height', D2 for none."""
    name = dim.dim_param
    return name.upper() if name.isidentifier() and len(name) <= 16 else f"D{k}"


class InferShapes(Pass):
    """Run ONNX shape inference and (by default) insist every Conv-family output got a
    static shape."""

    name = "infer_shapes"

    def __init__(self, check_static: bool = True) -> None:
        self.check_static = check_static

    def call(self, model: onnx.ModelProto) -> PassResult:
        inferred = _inferred(model)
        if inferred is None:
            if self.check_static:
                _check_static(model)
            return PassResult(model)  # nothing new was inferred
        out = onnx.ModelProto()
        out.CopyFrom(model)
        _take_types(out, inferred)
        if self.check_static:
            _check_static(out)
        return PassResult(out, True)


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The weightless model shape inference returns, or None when it adds nothing.

    Recorded shapes that inference contradicts (value_info or outputs left from another
    input size or an edit: onnxruntime runs such models) are inferred afresh."""
    custom, where = _as_custom(weightless(model))
    try:
        inferred = _infer(custom)
    except Exception as error:
        stale = _contradicted(custom)
        if not stale:
            raise _inference_failed(error) from None
        _forget_shapes(custom.graph, stale)
        try:
            inferred = _infer(custom)
        except Exception as again:
            raise _inference_failed(again) from None
    inferred = _restore(inferred, where)
    return None if _recorded_types(inferred) == _recorded_types(model) else inferred


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def _inference_failed(error: Exception) -> BadInputError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return BadInputError(f"shape inference failed: {first}")


def _contradicted(model: onnx.ModelProto) -> set[str]:
    """The tensors whose recorded type or shape (value_info, outputs) inference without
    them contradicts; none when inference fails without them too."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)  # weightless: small
    _forget_shapes(bare.graph, {vi.name for vi in [*bare.graph.value_info, *bare.graph.output]})
    try:
        inferred = _infer(bare)
    except Exception:
        return set()
    found = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    recorded = [*model.graph.value_info, *model.graph.output]
    return {vi.name for vi in recorded if vi.name in found and _disagree(vi, found[vi.name])}


def _forget_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop the value_info of `names` and the shapes their graph outputs declare."""
    kept = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for output in graph.output:
        if output.name in names and output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")


def _disagree(recorded: onnx.ValueInfoProto, inferred: onnx.ValueInfoProto) -> bool:
    """Whether two records of a tensor contradict: other element types, ranks or sizes."""
    a, b = recorded.type.tensor_type, inferred.type.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    if not (a.HasField("shape") and b.HasField("shape")):
        return False
    if len(a.shape.dim) != len(b.shape.dim):
        return True
    return any(
        x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
        for x, y in zip(a.shape.dim, b.shape.dim)
    )


def _take_types(model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    """Record `inferred`'s value_info and output types in `model`, in place."""
    for name in ("value_info", "output"):
        del getattr(model.graph, name)[:]
        getattr(model.graph, name).extend(getattr(inferred.graph, name))


# What shape inference and its data propagation may read: integer shape data (Reshape
# targets, Slice bounds, pads) up to this many elements, and any tensor this small (Resize
# scales). Everything else is a weight: declared, not copied.
SHAPE_DATA_LIMIT = 4096
SMALL_VALUES = 64
_SHAPE_DATA_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large initializers are graph inputs of the same type and
    shape: what shape inference and its data propagation read (values only of small
    tensors, such as shapes), without serializing and parsing the weights twice."""
    out = without_weights(model)
    graph, light = model.graph, out.graph
    declared = {i.name for i in graph.input}
    for tensor in graph.initializer:
        size = math.prod(tensor.dims)
        shape_data = tensor.data_type in _SHAPE_DATA_TYPES and size <= SHAPE_DATA_LIMIT
        if size <= SMALL_VALUES or shape_data:
            light.initializer.append(tensor)
        elif tensor.name not in declared:
            light.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return out


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its initializers: what reading, inferring or running it
    needs but the weights, which are not copied (and written apart: see stats.py)."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    return out


def copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every set field of `source` but `skip` into `target`, in field order."""
    names = [d.name for d, _ in source.ListFields() if d.name != skip]
    copy_fields_of(source, target, names)


def copy_fields_of(source: Message, target: Message, names: Sequence[str]) -> None:
    """Copy the fields `names` of `source` into `target`."""
    for name in names:
        descriptor = source.DESCRIPTOR.fields_by_name[name]
        value = getattr(source, name)
        if descriptor.is_repeated:
            getattr(target, name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, name).CopyFrom(value)
        else:
            setattr(target, name, value)


def _recorded_types(model: onnx.ModelProto) -> list[bytes]:
    """What shape inference writes: value_info and the declared output types."""
    graph = model.graph
    return [vi.SerializeToString() for vi in [*graph.value_info, *graph.output]]


def _check_static(inferred: onnx.ModelProto) -> None:
    """Every Conv-family output needs a static shape: MACs and widths depend on it."""
    known = {vi.name for vi in inferred.graph.value_info if static_shape(vi) is not None}
    known |= {vi.name for vi in inferred.graph.output if static_shape(vi) is not None}
    for node in inferred.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.output[0] not in known:
            raise BadInputError(
                f"the output shape of {node.op_type} {node.name!r} is not static after "
                "shape inference; fix the input shapes with --input-shape"
            )


class NameNodes(Pass):
    """Give empty and repeated node names a stable unique name (`OpType_k`) so plans and
    reports can refer to them."""

    name = "name_nodes"

    def call(self, model: onnx.ModelProto) -> PassResult:
        names = [n.name for n in model.graph.node]
        if all(names) and len(set(names)) == len(names):
            return PassResult(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        unique_names(out.graph)
        return PassResult(out, True)


@dataclass
class LoadedModel:
    """A model as read, in the analysis form, and what a written model keeps of the input.

    `original` is the input as read (handed back unchanged when nothing is cut);
    `model` is normalised, shapes fixed and inferred, shape arithmetic folded:
    what every pass expects; `declared` holds only the graph inputs and outputs
    every written model declares (normalised, no shape fixed), not a third copy
    of the weights; `run_time` the original's computation of the folded constants
    that follow the input size (dynamic.py), which a written model computes again.
    """

    model: onnx.ModelProto
    declared: onnx.ModelProto
    path: Path | None = None  # the file read, when the input was one
    read: onnx.ModelProto | None = field(default=None, repr=False)  # the input, if not a file
    run_time: RunTimeShapes = field(default_factory=RunTimeShapes, repr=False)

    @property
    def original(self) -> onnx.ModelProto:
        """The input as read. A file is read again when asked (only when nothing is cut,
        or the written model fails the checker), so a run does not hold a third copy."""
        if self.read is None:
            return read_model(self.path)
        copy = onnx.ModelProto()  # the caller's own model is never handed back to be changed
        copy.CopyFrom(self.read)
        return copy

    def written(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` (the analysis form, or a shrunk or retrained one) as it is written: a new
        model that takes every input shape the original took."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return self.write_form(out)

    def write_form(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`written` in place, for a copy of one's own (no second copy of the weights):
        the shape arithmetic that follows the input size computed at run time again, then
        the declared I/O."""
        return set_io(self.run_time.apply(model), self.declared)

    @property
    def runnable(self) -> onnx.ModelProto:
        """The analysis form with the declared I/O: what onnxruntime runs."""
        return self.written(self.model)

    @property
    def batch(self) -> int | None:
        """The batch the declared input fixes, or None when it is dynamic."""
        return static_batch(self.declared)


def load(
    source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None
) -> LoadedModel:
    """Read, check and normalise, then fix input shapes and infer shapes and fold shape
    arithmetic until both settle.

    Exporters compute Reshape targets at run time (Shape -> Gather -> Concat); shape
    inference cannot see through all of that, folding it can, and then inference
    goes further. A dynamic batch is taken as 1, dynamic image sizes as `input_shapes`
    or the model's own (`analysis_shapes`). Fixing shapes serves the analysis only:
    folded constants that follow a dynamic dim are kept dynamic (dynamic.py), so the
    written model accepts every shape the original did.
    """
    # One copy of the weights at a time where it can be (memory: issue 13): the copy
    # read is normalised in place; shapes are inferred into the fixed model, which is
    # that same copy when no input shape needs fixing, and then holds all load needs.
    declared = normalise_in_place(read_model(source))
    fixed = FixInputShapes(analysis_shapes(declared, input_shapes), batch=1)(declared).model
    io = _io_only(declared)
    model, folded = _settle(fixed)
    _without_contradictions(io, model)
    others = []
    for kind in ("batch", "spatial") if folded else ():
        other = other_shapes(declared, fixed, kind)
        try:
            if other:
                others.append(_settle(FixInputShapes(other)(declared).model)[0])
        except BadInputError:
            pass  # the original does not run at that size either: nothing to keep
    model, run_time = keep_dynamic(model, others, declared)
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(model, io, run_time=run_time, read=source)
    return LoadedModel(model, io, run_time=run_time, path=Path(source))


def analysis_shapes(model: onnx.ModelProto, given: InputShapes | None) -> InputShapes | None:
    """The input shapes to analyse at: `given`, else for an image input whose height and
    width are dynamic the size the model records it was made for (the `imgsz` metadata
    Ultralytics exports write), else None (FixInputShapes then says what to give)."""
    if given:
        return given
    recorded = {p.key: p.value for p in model.metadata_props}.get("imgsz", "")
    size = [int(d) for d in re.findall(r"\d+", recorded)]
    if len(size) == 1:
        size *= 2
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(size) != 2 or len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value"):
        return None
    if any(d.HasField("dim_value") for d in dims[2:]):
        return None
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else 1
    return {inputs[0].name: [batch, dims[1].dim_value, *size]}


def _io_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding only `model`'s graph inputs (initializers aside) and outputs."""
    initializers = {t.name for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.graph.input.extend(i for i in model.graph.input if i.name not in initializers)
    out.graph.output.extend(model.graph.output)
    return out


def _without_contradictions(io: onnx.ModelProto, analysed: onnx.ModelProto) -> None:
    """Declared outputs that inference at the analysed size contradicts (a stale record,
    which onnxruntime ignores and the checker refuses) take the inferred element type,
    and the contradicted sizes become dynamic."""
    inferred = {o.name: o for o in analysed.graph.output}
    for output in io.graph.output:
        other = inferred.get(output.name)
        if other is None or not _disagree(output, other):
            continue
        declared, found = output.type.tensor_type, other.type.tensor_type
        declared.elem_type = found.elem_type or declared.elem_type
        if len(declared.shape.dim) != len(found.shape.dim):
            declared.ClearField("shape")
            continue
        for k, (a, b) in enumerate(zip(declared.shape.dim, found.shape.dim)):
            if a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value:
                a.dim_param = f"{output.name}_dim{k}"


def load_model(
    source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None
) -> onnx.ModelProto:
    """The analysis form of `source` (see `load`): the model every pass expects."""
    return load(source, input_shapes).model


def in_load_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself if it is in `load_model` form, else `load_model(model)`: every public
    analysis and transform accepts a plainly loaded model this way (a model whose
    shapes cannot be fixed raises the BadInputError `load_model` would)."""
    graph = model.graph
    static = {vi.name for vi in [*graph.value_info, *graph.output] if static_shape(vi)}
    return model if _is_load_form(graph, static) else load_model(model)


def indexed(
    model: onnx.ModelProto, index: GraphIndex | None = None
) -> tuple[onnx.ModelProto, GraphIndex]:
    """`in_load_form(model)` and its GraphIndex: where every analysis starts. `index` is the
    caller's `GraphIndex.build(model)` when it has one; the form is read off the index."""
    model, index, _ = indexed_loaded(model, index)
    return model, index


def indexed_loaded(
    model: onnx.ModelProto, index: GraphIndex | None = None
) -> tuple[onnx.ModelProto, GraphIndex, LoadedModel | None]:
    """`indexed`, and the LoadedModel when `model` had to be loaded: where every transform
    starts, so that its result, written by `LoadedModel.write_form`, keeps the declared
    inputs and outputs of the model it was given (dynamic dims included)."""
    index = GraphIndex.of(model, index)
    if _is_load_form(model.graph, index.shapes):
        return model, index, None
    read = load(model)
    return read.model, GraphIndex.build(read.model), read


def _is_load_form(graph: onnx.GraphProto, static: Container[str]) -> bool:
    """Unique node names, static graph inputs and Conv outputs (`static`: names of tensors
    with a static shape): what `load` makes."""
    names = [n.name for n in graph.node]
    initializers = {t.name for t in graph.initializer}
    return (
        all(names)
        and len(set(names)) == len(names)
        and all(static_shape(i) for i in graph.input if i.name not in initializers)
        and all(n.output[0] in static for n in graph.node if n.op_type in ("Conv", "ConvTranspose"))
    )


def _settle(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Infer shapes and fold shape arithmetic until nothing more folds; and whether
    anything did (only folded constants can depend on the input size). Infers into
    `model` itself: pass a copy of one's own."""
    from .fold import fold_shapes  # fold builds on this module's load form

    # Each round can only fold Shapes whose inputs the last inference reached, so a
    # chain of k dependent Shape computations needs up to k + 1 rounds.
    rounds = 2 + sum(n.op_type == "Shape" for n in model.graph.node)
    anything = False
    for _ in range(rounds):
        inferred = _inferred(model)
        if inferred is not None:  # in place: the model is load's own (one copy of the weights)
            _take_types(model, inferred)
        folded = fold_shapes(model)
        if folded is model:
            break
        model, anything = folded, True
    _check_static(model)
    return model, anything


def with_io_of(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the graph input and output declarations of `reference`.

    Analysis fixes shapes (a dynamic batch becomes 1); a written model must keep
    the original's inputs and outputs, dynamic dims included, so they are put
    back and the intermediate shapes, which assumed the fixed batch, are dropped.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return set_io(out, reference)


def set_io(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """`with_io_of` in place, for a copy of one's own (no second copy of the weights)."""
    declared = {vi.name: vi for vi in [*reference.graph.input, *reference.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    del model.graph.value_info[:]
    return model


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's (first) input fixes, or None when the batch is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in initializers:
            dims = vi.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return None
