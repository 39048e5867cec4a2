"""Protobuf copying: a model's fields without its weights, and field-by-field copies."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import onnx
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its initializers: what reading, inferring or running it
    needs but the weights, which are not copied (and written apart: see external_data.py)."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    return out


def with_notes(tensor: onnx.TensorProto, source: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor`, in place, with `source`'s doc_string and metadata_props: what a model says
    about a weight stays with it when its values are cut, retrained or stored anew."""
    tensor.doc_string = source.doc_string
    del tensor.metadata_props[:]
    tensor.metadata_props.extend(source.metadata_props)
    return tensor


def copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every set field of `source` but `skip` into `target`, in field order. `skip`
    is never read (ListFields would hand out a copy of a tensor's raw_data to be dropped)."""
    names = []
    for name, repeated, presence, default in _fields(source.DESCRIPTOR):
        if name == skip:
            continue
        if repeated:
            present = len(getattr(source, name)) > 0
        elif presence:
            present = source.HasField(name)
        else:
            present = getattr(source, name) != default
        if present:
            names.append(name)
    copy_fields_of(source, target, names)


@functools.cache
def _fields(descriptor: Descriptor) -> list[tuple[str, bool, bool, object]]:
    """(name, repeated, has presence, default) of each field, by field number."""
    fields = sorted(descriptor.fields, key=lambda d: d.number)
    return [(d.name, d.is_repeated, d.has_presence, d.default_value) for d in fields]


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
