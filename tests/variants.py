"""One model, re-expressed the ways other exporters write it.

Paddle2ONNX puts every weight in a Constant node and marks dynamic dims with
-1; old exporters write IR 3 with initializers listed as graph inputs; some
tools leave node names empty or repeat them; others write scalar constants as
`value_float` / `value_ints`. Each function returns a new model that computes
the same function as its input (a raw ModelProto, opset 17 form).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def weights_in_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a Constant node (Paddle2ONNX)."""
    out = _copy(model)
    names = {t.name for t in out.graph.initializer}
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in out.graph.initializer
    ]
    nodes = constants + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def minus_one_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic dims (and the batch) written as dim_value -1 (Paddle2ONNX)."""
    out = _copy(model)
    for vi in [*out.graph.input, *out.graph.output]:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k == 0 or not d.HasField("dim_value"):
                d.dim_value = -1
    return out


def opset(version: int) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def convert(model: onnx.ModelProto) -> onnx.ModelProto:
        return version_converter.convert_version(_copy(model), version)

    convert.__name__ = f"opset_{version}"
    return convert


def ir3_initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 3 (opset 8 era): every initializer is also declared as a graph input."""
    out = _copy(model)
    declared = {i.name for i in out.graph.input}
    for t in out.graph.initializer:
        if t.name not in declared:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    out.ir_version = 3
    return out


def duplicate_and_empty_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every other node unnamed, the rest all called 'node'."""
    out = _copy(model)
    for k, node in enumerate(out.graph.node):
        node.name = "" if k % 2 else "node"
    return out


def scalar_attribute_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Scalar float and 1-D int64 constants as Constant(value_float / value_ints)."""
    out = _copy(model)
    lifted, keep = [], []
    for t in out.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.dtype == np.float32 and array.ndim == 0:
            lifted.append(helper.make_node("Constant", [], [t.name], value_float=float(array)))
        elif array.dtype == np.int64 and array.ndim == 1:
            lifted.append(helper.make_node("Constant", [], [t.name], value_ints=array.tolist()))
        else:
            keep.append(t)
    for node in out.graph.node:  # Clip bounds and the like written as Constant(value=...)
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            if array.dtype == np.float32 and array.ndim == 0:
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value_float", float(array)))
    nodes = lifted + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


VARIANTS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "constants": weights_in_constants,
    "minus_one": minus_one_dims,
    "opset21": opset(21),  # newer; older opsets are exported directly (see test_exporters)
    "ir3": ir3_initializers_as_inputs,
    "names": duplicate_and_empty_names,
    "value_attrs": scalar_attribute_constants,
}
