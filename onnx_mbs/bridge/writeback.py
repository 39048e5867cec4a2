"""Put a module's trained weights back into the ONNX graph it was built from."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from onnx_mbs.bridge.module import OnnxModule
from onnx_mbs.measurements import drop_measurements
from onnx_mbs.passes.protos import with_notes


def write_back(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of `model` whose trained initializers hold `module`'s current values.

    Nodes, names, opset, inputs, outputs and metadata are copied unchanged, except the
    metadata that measured the old weights (onnx_mbs.measurements); each replaced
    initializer keeps its dtype and shape. `model` itself is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop_measurements(out)
    state = module.state_dict()
    for init in out.graph.initializer:
        key = module.initializer_keys.get(init.name)
        if key is None:
            continue
        if key not in state:
            raise ValueError(f"module has no value for initializer '{init.name}' (key '{key}')")
        array = state[key].detach().cpu().numpy()
        if tuple(array.shape) != tuple(init.dims):
            raise ValueError(
                f"initializer '{init.name}' has shape {tuple(init.dims)} in the model but "
                f"{tuple(array.shape)} in the module: was the module built from another model?"
            )
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        new = numpy_helper.from_array(array.astype(dtype, copy=False), init.name)
        init.CopyFrom(with_notes(new, init))
    return out
