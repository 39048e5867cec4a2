"""Protobuf copying: a model's fields without its weights, and field-by-field copies."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from google.protobuf.message import Message


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its initializers: what reading, inferring or running it
    needs but the weights, which are not copied (and written apart: see external_data.py)."""
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
