"""Memory bounds: what a size read from a file or an option may ask for before it is allocated.

A few bytes of a model or a large `--input-shape` can ask for gigabytes. Each such size is
checked here first against the memory this process may still take: the smaller of the
system's available memory and what its address-space limit (`ulimit -v`) leaves.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import onnx

from onnx_mbs.passes.errors import BadInputError, input_shape_option
from onnx_mbs.passes.graph import GraphIndex


def available_bytes() -> int:
    """Memory this process may still allocate (a generous upper bound when unknown)."""
    limits = [_meminfo("MemAvailable")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - (_status("VmSize") or 0))
    known = [v for v in limits if v is not None]
    return max(0, min(known)) if known else 2**63


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Refuse `what`, which needs `nbytes`, when this process cannot have them."""
    available = available_bytes()
    if nbytes > available:
        raise BadInputError(
            f"{what} needs {_size(nbytes)} of memory, more than the {_size(available)} "
            f"available; {fix}"
        )


def check_model_fits(model: onnx.ModelProto) -> None:
    """The largest tensor `model` (in load form: static shapes, batch 1) makes for one sample
    must fit, before onnxruntime is asked to make it."""
    index = GraphIndex.build(model)
    weights = set(index.initializers)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]
    }
    largest, name = 0, ""
    for tensor, shape in index.shapes.items():
        if tensor in weights:
            continue
        nbytes = math.prod(shape) * _itemsize(types.get(tensor, onnx.TensorProto.FLOAT))
        if nbytes > largest:
            largest, name = nbytes, tensor
    producer = index.producer.get(name)
    made_by = f" (made by {producer.op_type} {producer.name!r})" if producer is not None else ""
    check_fits(
        largest,
        f"tensor {name!r}{made_by}, one sample at the analysed input shape,",
        f"fix the input shape with {input_shape_option()} to the size the model was trained "
        "at, or the model's sizes are corrupt or crafted",
    )


def _itemsize(elem_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 4


def _size(nbytes: int) -> str:
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _meminfo(key: str) -> int | None:
    return _kilobytes(Path("/proc/meminfo"), key)


def _status(key: str) -> int | None:
    return _kilobytes(Path("/proc/self/status"), key)


def _kilobytes(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
