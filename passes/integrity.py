"""Integrity: the numbers a model file states are what they claim, before they are trusted.

Stored tensors hold exactly the data their shapes need (external data from the model's own
folder only); subgraphs nested past protobuf's depth are named as such; tensors whose size
numbers in the file set (ConstantOfShape, Tile...) are bounded; a conv's weight fits the
channels it reads. A crafted file of a few bytes can otherwise ask for gigabytes, or be
misread silently.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_tensor

from .domains import COUNTED_CONVS, op_id
from .errors import BadInputError
from .graph import GraphIndex, attributes


def check_stored_sizes(model: onnx.ModelProto, folder: Path | None = None) -> bool:
    """Every stored tensor holds exactly the data its shape asks for, so nothing later
    reads past it or reshapes it wrongly. With `folder` (before the external data is read):
    external data lies inside `folder` and its files hold exactly that much, so a reference
    can make the run read neither another file nor more than the shape asks for.
    Returns whether any tensor is stored as external data."""
    external = False
    for tensor in model_tensors(model):
        wanted = _stored_bytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external = True
            if folder is not None and wanted is not None:
                _check_external(tensor, folder, wanted, _where(tensor))
            continue
        if tensor.HasField("raw_data"):
            held = len(tensor.raw_data)
            if wanted is not None and held != wanted:
                raise BadInputError(
                    f"{_where(tensor)} stores {held} bytes of data where its shape needs "
                    f"{wanted}; the file is corrupt or crafted: export the model again"
                )
            continue
        count = _typed_count(tensor)
        elements = math.prod(tensor.dims)
        if count is not None and count[0] != count[1] * elements:
            raise BadInputError(
                f"{_where(tensor)} stores {count[0]} values where its shape needs "
                f"{count[1] * elements}; the file is corrupt or crafted: export the model again"
            )
    return external


def _where(tensor: onnx.TensorProto) -> str:
    return f"tensor {tensor.name!r} (shape {list(tensor.dims)})"


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor `model` stores: its graphs' and its functions' (onnx.load reads both)."""
    yield from stored_tensors(model.graph)
    for function in model.functions:
        yield from stored_tensors(function)


def read_external_data(model: onnx.ModelProto, folder: str | os.PathLike) -> None:
    """Read every external tensor of `model` (its graphs' and its functions') from `folder`,
    in place. onnx.load_external_data_for_model reads functions' only from onnx 1.17 on; below
    (onnx >= 1.16 is declared) a function's tensor stayed a reference, refused later."""
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def refuse_unread_external_data(model: onnx.ModelProto, what: str, remedy: str) -> None:
    """Refuse a model holding external-data references (onnx.load(..., load_external_data=
    False)): only its own file's folder resolves them, which a ModelProto no longer knows."""
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise BadInputError(
                f"tensor {tensor.name!r} of {what} is external data that was not read "
                f"(onnx.load(..., load_external_data=False)?); {remedy}"
            )


def stored_tensors(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of `graph` (or a function's body) and its
    subgraphs (save reads them too). Subgraphs by the fields set, not by the attribute's
    type as `graph.subgraphs` finds them: protobuf parses a crafted attribute whose type says
    INT but whose `g` holds a graph, tensors and all, and they are checked before anything
    reads them (the checker refuses the attribute only later)."""
    if isinstance(graph, onnx.GraphProto):
        yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from stored_tensors(sub)


# Types stored packed, bits per element (onnx writes 2 int4, 4 int2, or 4 float6 in 3 bytes).
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)
}  # fmt: skip


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data `tensor`'s shape needs (None for strings and unknown types)."""
    elements = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_BITS:
        return (elements * _PACKED_BITS[tensor.data_type] + 7) // 8
    itemsize = _itemsize(tensor.data_type)
    return None if itemsize is None else elements * itemsize


@functools.cache
def _itemsize(data_type: int) -> int | None:
    """Bytes per element of an ONNX data type (None for strings and unknown types)."""
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
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
    named = Path(os.path.normpath(folder.absolute() / location))
    inside = location and named.is_relative_to(folder.absolute())
    if inside and not path.is_relative_to(folder.resolve()):
        raise BadInputError(  # a file beside the model, linked there (Hugging Face's cache)
            f"{where} names external data {location!r}, a link to {path} outside the model's "
            f"folder {folder}; onnx-mbs reads external data only from the model's own folder: "
            "copy it there in place of the link (cp -L)"
        )
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


# The file identifier of onnxruntime's flatbuffers format (.ort), at bytes 4 to 8.
ORT_FORMAT = b"ORTM"


def undecodable(path: Path, error: DecodeError) -> str:
    """Why protobuf could not parse `path`: onnxruntime's own format, subgraphs nested too
    deep, or not ONNX at all."""
    data = path.read_bytes()
    if data[4:8] == ORT_FORMAT:
        return (
            f"{path} is an onnxruntime ORT format model (flatbuffers), not ONNX: give the .onnx "
            "model it was converted from"
        )
    depth = subgraph_depth(data)
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


# Ops whose output size numbers stored in the file set, not the size of their inputs.
SIZED_BY_VALUES = {"ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample",
                   "OneHot", "CenterCropPad", "Col2Im"}  # fmt: skip
# Such an output may hold this many times the elements of its largest input (or of the graph
# input), and always up to MADE_ELEMENTS_FREE elements.
MADE_RATIO = 64
MADE_ELEMENTS_FREE = 2**24


def check_made_sizes(model: onnx.ModelProto, index: GraphIndex | None = None) -> None:
    """Refuse a tensor made by an op whose output size numbers in the file set (ConstantOfShape,
    Tile, Expand, Resize...) when it dwarfs everything the model reads: a 136 KB file can ask
    for 1.5e9 floats, and every run of the model would make them."""
    if not any(op_id(node) in SIZED_BY_VALUES for node in model.graph.node):
        return  # most CNNs: no index to build
    index = GraphIndex.of(model, index)
    biggest_input = max((math.prod(index.shapes.get(i, ())) for i in index.graph_inputs), default=1)
    for node in index.nodes:
        if op_id(node) not in SIZED_BY_VALUES or node.output[0] not in index.shapes:
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


def check_conv_channels(model: onnx.ModelProto, index: GraphIndex | None = None) -> None:
    """Refuse a Conv or ConvTranspose whose weight does not fit the channels it reads or its
    `group` (the checker and shape inference let it through; onnxruntime refuses to run it):
    the channel walk would cut a weight axis by channels it does not have."""
    shapes = GraphIndex.of(model, index).shapes
    for node in model.graph.node:
        if op_id(node) not in COUNTED_CONVS:
            continue
        x, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not x or not weight or len(x) < 2 or len(weight) < 2:
            continue
        group = attributes(node).get("group", 1)
        transpose = op_id(node) == "ConvTranspose"
        reads = weight[0] if transpose else weight[1] * group
        what = f"{node.op_type} {node.name!r}"
        if x[1] != reads:
            per = "" if transpose else f" ({weight[1]} per conv-group x group {group})"
            raise BadInputError(
                f"{what} reads {x[1]} input channels with a weight for {reads}{per}: the "
                "model is not valid (onnxruntime refuses to run it)"
            )
        if group < 1 or weight[0] % group:
            raise BadInputError(
                f"{what} has {weight[0]} filters for {group} conv-groups: the model is not "
                "valid (onnxruntime refuses to run it)"
            )
