"""A model written to a file, or sized, a tensor at a time: the bytes protobuf would write,
without the serialized copy of the weights it makes first (memory: issue 13).
"""

from __future__ import annotations

import os

import onnx
from google.protobuf.message import Message

from onnx_mbs.passes.protos import copy_fields_of

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
