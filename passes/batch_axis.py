"""An input without a batch axis, known from the graph: it adds the leading axis itself.

A fully static (16, 16, 3) image that the graph Unsqueezes at axis 0 (or Reshapes to
(1, 16, 16, 3), or broadcasts against a (1, 1, 1, 3) mean) before a Conv reads it has no
batch axis. Every reading here takes dim 0
for the batch and the image size from the dims after the channels: such a model would be
analysed at batch 16 and image size 3 without a word, so it is refused instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from .domains import COUNTED_CONVS, op_id
from .errors import BadInputError
from .graph import constant_lookup, tensor_readers

# Ops through which the input is still the image (its values, or its layout, changed):
# the walk from the input to the first Conv goes through these only.
_KEEPS_THE_IMAGE = {
    "Identity", "Cast", "Transpose", "Unsqueeze", "Reshape", "Pad", "Resize", "Slice",
    "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Neg", "Abs", "Sqrt", "Pow",
}  # fmt: skip
# Of those, the ops that read the image at either input and broadcast it against the other.
_BROADCASTS = {"Add", "Sub", "Mul", "Div"}

Dims = list  # int for a known size, None for a dynamic one


def refuse_an_added_batch_axis(graph: onnx.GraphProto, vi: onnx.ValueInfoProto) -> None:
    """Refuse `vi` when, on its way to a Conv, the graph adds a leading axis of 1 to it: the
    input then has no batch axis. An input whose dim 0 is 1 is not refused (a batch of 1
    read as the batch is right, and Unsqueeze at 0 or 1 of it are the same tensor)."""
    dims: Dims = [d.dim_value if d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]
    if not dims or dims[0] == 1:
        return
    constant = constant_lookup(graph)
    readers = tensor_readers(graph)
    todo: list[tuple[str, Dims, onnx.NodeProto | None]] = [(vi.name, dims, None)]
    seen: set[str] = set()
    while todo:
        name, shape, adder = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in readers.get(name, []):
            if op_id(node) in COUNTED_CONVS and node.input[0] == name and adder is not None:
                raise BadInputError(
                    f"input {vi.name!r} has no batch axis: the graph adds its leading axis "
                    f"({adder.op_type} {adder.name or adder.output[0]!r}) before {node.op_type} "
                    f"{node.name or node.output[0]!r} reads it (dims "
                    f"{[d if d else '?' for d in dims]}); onnx-mbs reads an image input as "
                    "(N, C, H, W) or (N, H, W, C): export the model with a batch axis first"
                )
            if op_id(node) not in _KEEPS_THE_IMAGE or (
                node.input[0] != name and op_id(node) not in _BROADCASTS
            ):
                continue
            after = _dims_after(node, name, shape, constant)
            added = adder or (node if _adds_a_leading_axis(shape, after) else None)
            todo.append((node.output[0], after, added))


def _dims_after(
    node: onnx.NodeProto, name: str, dims: Dims, constant: Callable[[str], np.ndarray | None]
) -> Dims:
    """The dims of `node`'s output (`node` reading the walked tensor `name` of `dims`) as far
    as the walk needs them: Unsqueeze, Reshape, Transpose and broadcasting against a
    constant known, the rest kept."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op_id(node) in _BROADCASTS:
        other = next((n for n in node.input if n != name), None)
        value = constant(other) if other is not None else None
        return dims if value is None else _broadcast(dims, list(value.shape))
    if op_id(node) == "Transpose":
        perm = attrs.get("perm", list(reversed(range(len(dims)))))
        return [dims[p] for p in perm] if sorted(perm) == list(range(len(dims))) else dims
    if op_id(node) == "Unsqueeze":
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and (given := constant(node.input[1])) is not None:
            axes = given.reshape(-1).tolist()
        if axes is None:
            return dims
        rank = len(dims) + len(axes)
        out: Dims = list(dims)
        for axis in sorted(a % rank for a in axes):
            out.insert(axis, 1)
        return out
    if (
        op_id(node) == "Reshape"
        and len(node.input) > 1
        and (shape := constant(node.input[1])) is not None
    ):
        target = shape.reshape(-1).tolist()
        copied = dims + [None] * len(target)  # 0 copies the input's dim at that index
        return [t if t > 0 else copied[k] if t == 0 else None for k, t in enumerate(target)]
    return dims


def _broadcast(dims: Dims, other: list[int]) -> Dims:
    """`dims` broadcast against a constant of shape `other` (numpy's rule: aligned on the
    right, a 1 takes the other's size), so a constant of a higher rank adds leading axes."""
    rank = max(len(dims), len(other))
    ours: Dims = [1] * (rank - len(dims)) + list(dims)
    theirs = [1] * (rank - len(other)) + other
    return [d if t == 1 else t for d, t in zip(ours, theirs)]


def _adds_a_leading_axis(before: Dims, after: Dims) -> bool:
    """Whether `after` is `before` with a 1 put in front, and only so (a dim 0 of 1 would
    make the new 1 as well the second axis as the first)."""
    if len(after) != len(before) + 1 or after[0] != 1 or before[0] == 1:
        return False
    return all(a is None or a == b for a, b in zip(after[1:], before))
