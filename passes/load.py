"""Loading: read a model, refuse what MBS cannot work on, fix input shapes, infer shapes.

Everything later assumes a float graph whose every tensor has a static shape,
so this is the one place that checks it and says clearly what to do otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
from onnx import numpy_helper

from .base import Pass, PassResult
from .errors import BadInputError
from .graph import GraphIndex, attributes, static_shape
from .normalise import normalise_in_place, unique_names
from .scratch import scratch_folder, temporary_folder_error

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
            # The external data is read only once what it should hold is known (stored_sizes).
            model = onnx.load(str(path), load_external_data=False)
            check_stored_sizes(model, path.parent)
            onnx.load_external_data_for_model(model, str(path.parent))
        except DecodeError as e:
            raise BadInputError(undecodable(path, e)) from None
        except (FileNotFoundError, OSError) as e:
            raise BadInputError(f"cannot read {path} or its external data: {e}") from None
        except BadInputError:
            raise
        except Exception as e:  # onnx raises assorted errors on corrupt files
            raise BadInputError(f"{path} could not be loaded as ONNX: {e}") from None
        if not model.graph.node:
            raise BadInputError(f"{path} is not an ONNX model (no graph nodes found)")
    check_stored_sizes(model)
    if model.graph.sparse_initializer:
        names = ", ".join(repr(t.values.name) for t in model.graph.sparse_initializer[:3])
        raise BadInputError(
            f"the model stores {len(model.graph.sparse_initializer)} tensor(s) as "
            f"sparse_initializer ({names}), which onnx-mbs does not read; store them as dense "
            "initializers"
        )
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


def check_stored_sizes(model: onnx.ModelProto, folder: Path | None = None) -> None:
    """Every stored tensor holds exactly the data its shape asks for, so nothing later
    reads past it or reshapes it wrongly. With `folder` (before the external data is read):
    external data lies inside `folder` and its files hold exactly that much, so a reference
    can make the run read neither another file nor more than the shape asks for."""
    for tensor in _stored_tensors(model.graph):
        where = f"tensor {tensor.name!r} (shape {list(tensor.dims)})"
        wanted = _stored_bytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if folder is not None and wanted is not None:
                _check_external(tensor, folder, wanted, where)
            continue
        if tensor.HasField("raw_data"):
            held = len(tensor.raw_data)
            if wanted is not None and held != wanted:
                raise BadInputError(
                    f"{where} stores {held} bytes of data where its shape needs {wanted}; "
                    "the file is corrupt or crafted: export the model again"
                )
            continue
        count = _typed_count(tensor)
        elements = math.prod(tensor.dims)
        if count is not None and count[0] != count[1] * elements:
            raise BadInputError(
                f"{where} stores {count[0]} values where its shape needs {count[1] * elements}; "
                "the file is corrupt or crafted: export the model again"
            )


def _stored_tensors(graph: onnx.GraphProto):
    """Initializers and attribute tensors of `graph` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _stored_tensors(sub)


_PACKED_4BIT = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data `tensor`'s shape needs (None for strings and unknown types)."""
    elements = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (elements + 1) // 2
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return elements * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


_TYPED_FIELDS = {  # data_type -> (field, values per element)
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    **{
        t: ("int32_data", 1)
        for t in (
            onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
            onnx.TensorProto.UINT16, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
            onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
        )
    },
}  # fmt: skip


def _typed_count(tensor: onnx.TensorProto) -> tuple[int, int] | None:
    """(values stored, values per element) of a tensor kept in its typed field, or None
    when its type is not checked here."""
    if tensor.data_type not in _TYPED_FIELDS:
        return None
    name, per = _TYPED_FIELDS[tensor.data_type]
    return len(getattr(tensor, name)), per


def _check_external(tensor: onnx.TensorProto, folder: Path, wanted: int, where: str) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    path = (folder / location).resolve()
    if not location or not path.is_relative_to(folder.resolve()):
        raise BadInputError(
            f"{where} names external data {location!r} outside the model's folder {folder}; "
            "onnx-mbs reads external data only from the model's own folder"
        )
    try:
        size = path.stat().st_size
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else size - offset
    except OSError as error:
        raise BadInputError(
            f"cannot read external data {path} of {where}: {error.strerror}"
        ) from None
    except ValueError:
        raise BadInputError(f"{where} has a malformed external data offset or length") from None
    if offset < 0 or length != wanted or offset + length > size:
        raise BadInputError(
            f"{where} reads {length} bytes at offset {offset} of {path.name} ({size} bytes) "
            f"where its shape needs {wanted}; the file is corrupt or crafted: export the model "
            "again"
        )


# Protobuf's parser stops at 100 nested messages; each If/Loop/Scan body nests three.
_PARSER_DEPTH = 100
_GRAPH, _NODE, _ATTRIBUTE = 7, 1, 5  # ModelProto.graph, GraphProto.node, NodeProto.attribute
_SUBGRAPHS = (6, 11)  # AttributeProto.g, AttributeProto.graphs


def undecodable(path: Path, error: DecodeError) -> str:
    """Why protobuf could not parse `path`: subgraphs nested too deep, or not ONNX at all."""
    depth = subgraph_depth(path.read_bytes())
    if 3 * depth + 2 >= _PARSER_DEPTH:
        return (
            f"{path} nests subgraphs (If/Loop/Scan bodies) {depth} levels deep; protobuf "
            f"parses at most {_PARSER_DEPTH} nested messages (about {_PARSER_DEPTH // 3 - 1} "
            "subgraph levels), so onnx cannot load it: flatten the control flow"
        )
    return f"{path} is not a valid ONNX file (truncated or not ONNX: {error})"


def subgraph_depth(data: bytes) -> int:
    """How deep subgraphs nest in serialized ModelProto `data`, read from the wire format
    without parsing it (so without protobuf's depth limit); malformed parts are skipped."""
    deepest = 0
    stack = [(0, len(data), "model", 0)]
    wanted = {"model": (_GRAPH,), "graph": (_NODE,), "node": (_ATTRIBUTE,), "attr": _SUBGRAPHS}
    inner = {"model": "graph", "graph": "node", "node": "attr", "attr": "graph"}
    while stack:
        start, end, kind, level = stack.pop()
        deepest = max(deepest, level)
        for number, begin, finish in _length_fields(data, start, end):
            if number in wanted[kind]:
                stack.append((begin, finish, inner[kind], level + (kind == "attr")))
    return deepest


def _length_fields(data: bytes, position: int, end: int):
    """(field number, start, end) of each length-delimited field in data[position:end]."""
    while position < end:
        key, position = _read_varint(data, position, end)
        if key is None:
            return
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _read_varint(data, position, end)
            if _ is None:
                return
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
        elif wire == 2:
            size, position = _read_varint(data, position, end)
            if size is None or position + size > end:
                return
            yield number, position, position + size
            position += size
        else:
            return


def _read_varint(data: bytes, position: int, end: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while position < end and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    return None, position


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
    with scratch_folder() as folder:
        try:
            light, apart = weights_apart(custom, folder)
            for tensor in apart:
                onnx.checker.check_tensor(tensor)
            (folder / "checked.onnx").write_bytes(light.SerializeToString())
        except OSError as error:
            raise temporary_folder_error(error) from None
        onnx.checker.check_model(str(folder / "checked.onnx"), full_check=full_check)


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
            raise BadInputError(
                f"input {vi.name!r} has dynamic dims {shown}; fix them with "
                f"--input-shape {vi.name}:1,3,224,224 (your sizes)"
            )
        return PassResult(out if modified else model, modified)


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
    """The weightless model shape inference returns, or None when it adds nothing."""
    try:
        custom, where = _as_custom(weightless(model))
        inferred = onnx.shape_inference.infer_shapes(custom, strict_mode=True, data_prop=True)
        inferred = _restore(inferred, where)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"shape inference failed: {first}") from None
    return None if _recorded_types(inferred) == _recorded_types(model) else inferred


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
    """A model as read, in the analysis form, and the I/O a written model declares.

    `original` is the input as read (handed back unchanged when nothing is cut);
    `model` is normalised, shapes fixed and inferred, shape arithmetic folded:
    what every pass expects; `declared` holds only the graph inputs and outputs
    every written model declares (normalised, no shape fixed), not a third copy
    of the weights.
    """

    model: onnx.ModelProto
    declared: onnx.ModelProto
    path: Path | None = None  # the file read, when the input was one
    read: onnx.ModelProto | None = field(default=None, repr=False)  # the input, if not a file

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
        """`model` (an analysis-form model or a shrunk one) with the declared I/O."""
        return with_io_of(model, self.declared)

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
    goes further. A dynamic batch is taken as 1. Fixing shapes serves the analysis
    only: folded constants that follow a dynamic dim are made size-agnostic (see
    `_keep_dynamic`), so the written model accepts every shape the original did.
    """
    # One copy of the weights at a time where it can be (memory: issue 13): the copy
    # read is normalised in place; shapes are inferred into the fixed model, which is
    # that same copy when no input shape needs fixing, and then holds all load needs.
    declared = normalise_in_place(read_model(source))
    fixed = FixInputShapes(input_shapes, batch=1)(declared).model
    io = _io_only(declared)
    model, folded = _settle(fixed)
    check_made_sizes(model)
    others = []
    for kind in ("batch", "spatial") if folded else ():
        other = _other_shapes(declared, fixed, kind)
        try:
            if other:
                others.append(_settle(FixInputShapes(other)(declared).model)[0])
        except BadInputError:
            pass  # the original does not run at that size either: nothing to keep
    try:
        model = _keep_dynamic(model, others)
    except BadInputError:
        if not input_shapes:
            raise
        # The user fixed these shapes: the written model takes exactly them.
        io = _io_only(FixInputShapes(input_shapes, batch=None)(declared).model)
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(model, io, read=source)
    return LoadedModel(model, io, path=Path(source))


def _io_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding only `model`'s graph inputs (initializers aside) and outputs."""
    initializers = {t.name for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.graph.input.extend(i for i in model.graph.input if i.name not in initializers)
    out.graph.output.extend(model.graph.output)
    return out


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
    index = GraphIndex.of(model, index)
    if _is_load_form(model.graph, index.shapes):
        return model, index
    model = load_model(model)
    return model, GraphIndex.build(model)


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


# Ops whose output size numbers stored in the file set, not the size of their inputs.
SIZED_BY_VALUES = {"ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample",
                   "OneHot", "CenterCropPad", "Col2Im"}  # fmt: skip
# Such an output may hold this many times the elements of its largest input (or of the graph
# input), and always up to MADE_ELEMENTS_FREE elements.
MADE_RATIO = 64
MADE_ELEMENTS_FREE = 2**24


def check_made_sizes(model: onnx.ModelProto) -> None:
    """Refuse a tensor made by an op whose output size numbers in the file set (ConstantOfShape,
    Tile, Expand, Resize...) when it dwarfs everything the model reads: a 136 KB file can ask
    for 1.5e9 floats, and every run of the model would make them."""
    index = GraphIndex.build(model)
    biggest_input = max((math.prod(index.shapes.get(i, ())) for i in index.graph_inputs), default=1)
    for node in index.nodes:
        if node.op_type not in SIZED_BY_VALUES or node.output[0] not in index.shapes:
            continue
        made = math.prod(index.shapes[node.output[0]])
        read = max([math.prod(index.shapes[i]) for i in node.input if i in index.shapes] + [1])
        if made > MADE_ELEMENTS_FREE and made > MADE_RATIO * max(read, biggest_input):
            raise BadInputError(
                f"{node.op_type} {node.name!r} makes a tensor of {made:,} elements "
                f"({list(index.shapes[node.output[0]])}) from sizes stored in the file, "
                f"{made // max(read, biggest_input):,} times what the model reads; the model is "
                "corrupt or crafted"
            )


def _other_shapes(
    declared: onnx.ModelProto, fixed: onnx.ModelProto, kind: str
) -> dict[str, list[int]]:
    """`fixed`'s input shapes with the dims `declared` leaves dynamic doubled: the batch
    (dim 0) or the spatial dims (2 on); empty when no such dim is dynamic."""
    initializers = {t.name for t in declared.graph.initializer}
    static = {vi.name: static_shape(vi) for vi in fixed.graph.input}
    other: dict[str, list[int]] = {}
    for vi in declared.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        wanted = (lambda k: k == 0) if kind == "batch" else (lambda k: k >= 2)
        dynamic = [k for k, d in enumerate(dims) if not d.HasField("dim_value") and wanted(k)]
        if dynamic:
            shape = list(static[vi.name] or ())
            for k in dynamic:
                shape[k] *= 2
            other[vi.name] = shape
    return other


def _keep_dynamic(base: onnx.ModelProto, others: list[onnx.ModelProto]) -> onnx.ModelProto:
    """Make folded constants that follow a dynamic input dim size-agnostic.

    The same model folded at several input sizes: constants that differ follow the
    size. In a Reshape target, an entry that equals the data's own dim at every
    size becomes 0 (ONNX: copy that dim), and a single entry left varying becomes
    -1 (infer it); Resize sizes that scale with the data become scales. Anything
    else is refused rather than written for one size only.
    """
    if not others:
        return base
    index = GraphIndex.build(base)
    folded = [
        ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, GraphIndex.build(m))
        for m in [base, *others]
    ]
    new: dict[str, np.ndarray] = {}
    resized: dict[str, list[str]] = {}  # Resize node -> its new inputs
    for tensor in base.graph.initializer:
        values = [v.get(tensor.name) for v, _ in folded]
        if any(v is None or v.shape != values[0].shape for v in values):
            continue
        if all(np.array_equal(v, values[0]) for v in values):
            continue
        readers = index.consumers.get(tensor.name, [])
        reader = readers[0] if len(readers) == 1 else None
        data = [i.shapes.get(reader.input[0]) for _, i in folded] if reader else [None]
        fixed = None
        if reader is not None and None not in data:
            if reader.op_type == "Reshape" and reader.input[1] == tensor.name:
                fixed = _agnostic_reshape(values, data, attributes(reader))
            elif reader.op_type == "Resize" and reader.input[-1] == tensor.name:
                fixed = _sizes_as_scales(values, data)
        if fixed is None:
            raise BadInputError(_not_dynamic(tensor.name, readers, index.graph_inputs))
        if reader.op_type == "Resize":
            scales = f"{tensor.name}_scales"
            new[scales] = fixed
            roi = reader.input[1] if len(reader.input) > 1 else ""
            resized[reader.name] = [reader.input[0], roi, scales]
        else:
            new[tensor.name] = fixed
    out = onnx.ModelProto()
    out.CopyFrom(base)
    for node in out.graph.node:
        if node.name in resized:
            del node.input[:]
            node.input.extend(resized[node.name])
    used = {name for node in out.graph.node for name in node.input}
    kept = [t for t in out.graph.initializer if t.name not in new and t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for name, value in new.items():
        out.graph.initializer.append(numpy_helper.from_array(value, name))
    return out


def _not_dynamic(name: str, readers: list[onnx.NodeProto], inputs: list[str]) -> str:
    """Why a value computed from the input size cannot follow it, and the one way on."""
    flow = [r for r in readers if r.op_type in ("Loop", "If", "Scan")]
    how = (
        f"{flow[0].op_type} {flow[0].name!r} reads it, and onnx-mbs does not follow control flow"
        if flow
        else f"{', '.join(sorted({r.op_type for r in readers})) or 'a graph output'} reads it "
        "in a way onnx-mbs cannot keep dynamic"
    )
    return (
        f"the model computes {name!r} from the input size and {how}; onnx-mbs can work on it "
        f"at one input size only: give it with --input-shape ({', '.join(inputs)}), and any "
        "model written takes that shape only"
    )


def _agnostic_reshape(values: list, data: list, attrs: dict) -> np.ndarray | None:
    """A Reshape target valid at every size (`values[i]` is the target when the data
    has shape `data[i]`), or None."""
    first = values[0]
    differ = [k for k in range(len(first)) if any(v[k] != first[k] for v in values)]
    fixed = first.copy()
    for k in differ:
        if not attrs.get("allowzero", 0) and all(
            k < len(d) and v[k] == d[k] for v, d in zip(values, data)
        ):
            fixed[k] = 0
    varying = [k for k in differ if fixed[k] != 0]
    if len(varying) > 1 or (varying and -1 in first.tolist()):
        return None
    for k in varying:
        fixed[k] = -1
    return fixed


def _sizes_as_scales(values: list, data: list) -> np.ndarray | None:
    """Resize `sizes` that are the data's shape times fixed factors, as `scales`."""
    if any(len(v) != len(d) for v, d in zip(values, data)):
        return None
    scales = values[0] / np.asarray(data[0], dtype=np.float64)
    if not all(np.allclose(v, np.asarray(d) * scales) for v, d in zip(values, data)):
        return None
    return scales.astype(np.float32)


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
