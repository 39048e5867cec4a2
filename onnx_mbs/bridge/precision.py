"""fp16 / bf16 graphs train in float32 and are written back in their own dtype.

Half-precision weights cannot take small SGD updates (an fp16 weight near 1 moves in steps of
1e-3), and torch's CPU kernels for them are slow or missing. So the bridge trains a float32 copy of
the graph -- the master weights -- and `write_values` stores the trained values back into the
original graph, each initializer in its own dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.measurements import drop_measurements
from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.protos import with_notes

LOW = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def is_low_precision(model: onnx.ModelProto) -> bool:
    """Whether any initializer or graph input/output is fp16 or bf16."""
    graph = model.graph
    values = [*graph.input, *graph.output]
    return any(t.data_type in LOW for t in graph.initializer) or any(
        v.type.tensor_type.elem_type in LOW for v in values
    )


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy computing in float32: fp16/bf16 initializers, Constant values, Cast targets and
    declared types become float32; names and nodes stay."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for init in graph.initializer:
        if init.data_type in LOW:
            value = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type in LOW:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if op_id(node) == "Cast" and attr.name == "to" and attr.i in LOW:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in LOW:
                value = numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
    return out


def write_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `values` hold those values, each stored in
    the initializer's own dtype (float32 master weights -> fp16/bf16), without the metadata
    that measured the old weights (onnx_mbs.measurements)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop_measurements(out)
    for init in out.graph.initializer:
        if init.name not in values:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        new = numpy_helper.from_array(np.asarray(values[init.name]).astype(dtype), init.name)
        init.CopyFrom(with_notes(new, init))
    return out
