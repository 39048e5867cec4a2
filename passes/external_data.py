"""External data: a model whose large tensors are references into one file beside it
(ONNX external data), so it can be checked or run without a serialized copy of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import onnx

from .protos import copy_fields, without_weights

# Tensors of LARGE bytes or more go to WEIGHTS_FILE: what lets a checker or a runtime read
# the model without its weights (onnxruntime maps them when page-aligned: weights_file.py).
LARGE = 4096
WEIGHTS_FILE = "weights.bin"


def placed_apart(tensor: onnx.TensorProto, data: BinaryIO, align: int = 1) -> onnx.TensorProto:
    """`tensor`, or a reference to its raw bytes appended to `data` (WEIGHTS_FILE) at an
    offset that is a multiple of `align` when it holds LARGE bytes or more."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return tensor
    raw = tensor.raw_data
    if len(raw) < LARGE:
        return tensor
    data.write(bytes(-data.tell() % align))
    offset = data.tell()
    data.write(raw)
    reference = onnx.TensorProto()
    copy_fields(tensor, reference, skip="raw_data")
    reference.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", len(raw))):
        reference.external_data.add(key=key, value=str(value))
    return reference


def weights_apart(
    model: onnx.ModelProto, folder: Path, align: int = 1, contents: bool = True
) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` whose tensors of LARGE bytes or more are references into
    `folder`/WEIGHTS_FILE, written there (`placed_apart`); and those tensors, `model`'s own.
    Without `contents` the file gets the right size but not the bytes (a sparse file): what
    the checker opens, which never reads the data (issue 23: ResNet-50 wrote 100 MB twice)."""
    light = without_weights(model)
    apart = []
    with open(folder / WEIGHTS_FILE, "wb") as file:
        data = file if contents else _Extent()
        for tensor in model.graph.initializer:
            placed = placed_apart(tensor, data, align)
            if placed is not tensor:
                apart.append(tensor)
            light.graph.initializer.append(placed)
        if not contents:
            file.truncate(data.tell())
    return light, apart


class _Extent:
    """A file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def tell(self) -> int:
        return self.size

    def write(self, data: bytes) -> None:
        self.size += len(data)
