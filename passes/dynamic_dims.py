"""Dynamic dims: folded constants that follow a dynamic input dim made size-agnostic, so a
model analysed at one input size is written for every size the original accepted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadInputError
from .graph import GraphIndex, attributes, static_shape


def other_shapes(
    declared: onnx.ModelProto, fixed: onnx.ModelProto, kind: str
) -> dict[str, list[int]]:
    """`fixed`'s input shapes with the dims `declared` leaves dynamic doubled: the batch
    (dim 0) or the spatial dims (2 on); empty when no such dim is dynamic."""
    initializers = {t.name for t in declared.graph.initializer}
    static = {vi.name: static_shape(vi) for vi in fixed.graph.input}
    other: dict[str, list[int]] = {}
    for vi in declared.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        wanted = (lambda k: k == 0) if kind == "batch" else (lambda k: k >= 2)
        dynamic = [k for k, d in enumerate(dims) if not d.HasField("dim_value") and wanted(k)]
        if dynamic:
            shape = list(static[vi.name] or ())
            for k in dynamic:
                shape[k] *= 2
            other[vi.name] = shape
    return other


def keep_dynamic(base: onnx.ModelProto, others: list[onnx.ModelProto]) -> onnx.ModelProto:
    """Make folded constants that follow a dynamic input dim size-agnostic.

    The same model folded at several input sizes: constants that differ follow the
    size. In a Reshape target, an entry that equals the data's own dim at every
    size becomes 0 (ONNX: copy that dim), and a single entry left varying becomes
    -1 (infer it); Resize sizes that scale with the data become scales. Anything
    else is refused rather than written for one size only.
    """
    if not others:
        return base
    index = GraphIndex.build(base)
    folded = [
        ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, GraphIndex.build(m))
        for m in [base, *others]
    ]
    new: dict[str, np.ndarray] = {}
    resized: dict[str, list[str]] = {}  # Resize node -> its new inputs
    for tensor in base.graph.initializer:
        values = [v.get(tensor.name) for v, _ in folded]
        if any(v is None or v.shape != values[0].shape for v in values):
            continue
        if all(np.array_equal(v, values[0]) for v in values):
            continue
        readers = index.consumers.get(tensor.name, [])
        reader = readers[0] if len(readers) == 1 else None
        data = [i.shapes.get(reader.input[0]) for _, i in folded] if reader else [None]
        fixed = None
        if reader is not None and None not in data:
            if reader.op_type == "Reshape" and reader.input[1] == tensor.name:
                fixed = _agnostic_reshape(values, data, attributes(reader))
            elif reader.op_type == "Resize" and reader.input[-1] == tensor.name:
                fixed = _sizes_as_scales(values, data)
        if fixed is None:
            raise BadInputError(
                f"the model computes {tensor.name!r} from the input size in a way onnx-mbs "
                f"cannot keep dynamic; fix the input shape with --input-shape "
                f"({', '.join(index.graph_inputs)}) and the reduced model takes that shape"
            )
        if reader.op_type == "Resize":
            scales = f"{tensor.name}_scales"
            new[scales] = fixed
            roi = reader.input[1] if len(reader.input) > 1 else ""
            resized[reader.name] = [reader.input[0], roi, scales]
        else:
            new[tensor.name] = fixed
    out = onnx.ModelProto()
    out.CopyFrom(base)
    for node in out.graph.node:
        if node.name in resized:
            del node.input[:]
            node.input.extend(resized[node.name])
    used = {name for node in out.graph.node for name in node.input}
    kept = [t for t in out.graph.initializer if t.name not in new and t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for name, value in new.items():
        out.graph.initializer.append(numpy_helper.from_array(value, name))
    return out


def _agnostic_reshape(values: list, data: list, attrs: dict) -> np.ndarray | None:
    """A Reshape target valid at every size (`values[i]` is the target when the data
    has shape `data[i]`), or None."""
    first = values[0]
    differ = [k for k in range(len(first)) if any(v[k] != first[k] for v in values)]
    fixed = first.copy()
    for k in differ:
        if not attrs.get("allowzero", 0) and all(
            k < len(d) and v[k] == d[k] for v, d in zip(values, data)
        ):
            fixed[k] = 0
    varying = [k for k in differ if fixed[k] != 0]
    if len(varying) > 1 or (varying and -1 in first.tolist()):
        return None
    for k in varying:
        fixed[k] = -1
    return fixed


def _sizes_as_scales(values: list, data: list) -> np.ndarray | None:
    """Resize `sizes` that are the data's shape times fixed factors, as `scales`."""
    if any(len(v) != len(d) for v, d in zip(values, data)):
        return None
    scales = values[0] / np.asarray(data[0], dtype=np.float64)
    if not all(np.allclose(v, np.asarray(d) * scales) for v, d in zip(values, data)):
        return None
    return scales.astype(np.float32)
