"""Reading: read an ONNX model and refuse what MBS cannot work on (not ONNX, truncated,
invalid, quantized), checking it without a serialized copy of its weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .custom_ops import hide_unknown_ops, is_unknown_op
from .domains import FUSED_CONV, op_id
from .errors import BadInputError, QuantizedModelError, temporary_folder_error
from .external_data import weights_apart
from .graph import FLOAT_TYPES, attributes, nested_nodes, topological_order
from .group_norm import deprecated_group_norms
from .integrity import (
    check_stored_sizes,
    read_external_data,
    refuse_unread_external_data,
    undecodable,
)
from .scratch import scratch_folder

QUANTIZED_OPS = {
    "QLinearConv",
    "ConvInteger",
    "QLinearMatMul",
    "MatMulInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}
# Q/DQ under other names: NVIDIA ModelOpt's trt domain (TRT_FP8QuantizeLinear,
# TRT_INT4DequantizeLinear, ...) exports FP8 and INT4 models so.
QUANTIZING_SUFFIXES = ("QuantizeLinear", "DequantizeLinear")
# onnxruntime's ops that hold their weights quantised (packed 4-bit MatMulNBits, ...) with no
# Q/DQ node beside them (`op_id`s): their weights are no float initializer, so neither counted
# nor cut, and their float scales would be counted as the layers' parameters.
QUANTIZED_WEIGHT_OPS = frozenset(
    f"com.microsoft:{op}"
    for op in (
        "MatMulNBits", "MatMulNBitsMlp", "MatMulNBitsQkv", "MatMulBnb4", "MatMulFpQ4",
        "MatMulBlockQuantizedFp4Weight", "MatMulBlockQuantizedFp8Weight", "GatherBlockQuantized",
        "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QGemm",
        "QAttention", "QMoE",
    )
)  # fmt: skip
# The inputs of a layer that hold its weights (a MatMul's weight may be either input).
WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), FUSED_CONV: (1, 2),
    "Gemm": (0, 1, 2), "MatMul": (0, 1),
}  # fmt: skip
# Ops a hand-written dequantisation passes a stored weight through.
DEQUANTISING = {
    "Cast", "Mul", "Div", "Add", "Sub", "Reshape", "Transpose", "Unsqueeze", "Squeeze",
    "Identity", "Flatten", "Expand",
}  # fmt: skip


def is_quantized(node: onnx.NodeProto) -> bool:
    """A node only a quantised graph has: a quantised op or a Q/DQ (`QUANTIZED_OPS`, under
    any domain's name), or an onnxruntime op holding its weights quantised."""
    return (
        node.op_type in QUANTIZED_OPS
        or node.op_type.endswith(QUANTIZING_SUFFIXES)
        or op_id(node) in QUANTIZED_WEIGHT_OPS
    )


SERIALIZED = (bytes, bytearray, memoryview)  # a model as onnxruntime and Polygraphy pass it


def read_model(
    source: str | os.PathLike | onnx.ModelProto | bytes, quantized: bool = False
) -> onnx.ModelProto:
    """Read an ONNX file (with external data), or copy a ModelProto or parse its bytes.

    Refuses what MBS cannot work on: not ONNX, truncated, invalid, quantized (unless
    `quantized`: a graph to run, not to reduce). Nodes listed before the nodes they read
    from (onnxruntime's fp16 conversion appends the Casts it adds) are put in order, as
    onnxruntime orders them before it runs a model.
    """
    path = None
    if isinstance(source, SERIALIZED):
        source = parse_model(source)
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        if check_stored_sizes(model):  # references that only the file's folder resolves
            refuse_unread_external_data(
                model,
                "the given ModelProto",
                "pass the model's path, or load it with its external data",
            )
    else:
        path = Path(source)
        if path.is_dir():
            raise BadInputError(f"{path} is a folder; give the path of an .onnx model file")
        if not path.is_file():
            raise BadInputError(f"model file not found: {path}")
        try:
            # The external data is read only once what it should hold is known.
            model = onnx.load(str(path), load_external_data=False)
            if check_stored_sizes(model, path.parent):  # some tensors are external data
                read_external_data(model, path.parent)
        except DecodeError as e:
            raise BadInputError(undecodable(path, e)) from None
        except (FileNotFoundError, OSError) as e:
            raise BadInputError(f"cannot read {path} or its external data: {e}") from None
        except BadInputError:
            raise
        except Exception as e:  # onnx raises assorted errors on corrupt files
            raise BadInputError(f"{path} could not be loaded as ONNX: {e}") from None
        if not model.graph.node:
            raise BadInputError(f"{path} is not an ONNX model (no graph nodes found)")
        # No second check_stored_sizes: the external data read holds the checked lengths.
    if model.graph.sparse_initializer:
        names = ", ".join(repr(t.values.name) for t in model.graph.sparse_initializer[:3])
        raise BadInputError(
            f"the model stores {len(model.graph.sparse_initializer)} tensor(s) as "
            f"sparse_initializer ({names}), which onnx-mbs does not read; store them as dense "
            "initializers"
        )
    if not quantized:
        refuse_quantized(model)
    in_order(model.graph)
    undeclared_io(model.graph)
    if not quantized and (found := integer_weight(model.graph)):
        raise QuantizedModelError(
            f"weight-only quantized graph: {found}; MBS works on float models: dequantise the "
            "weights into float initializers (or reduce the float model), then quantize"
        )
    try:
        check_model(model)  # the weights checked a tensor at a time: no copy of them
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise BadInputError(f"the model is not valid ONNX: {first}") from None
    return model


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Refuse a graph with a quantised node anywhere (`is_quantized`; subgraphs and local
    functions included): its weights are no float initializers, so neither counted nor cut,
    and its float scales would be counted as the layers' parameters."""
    quantized_ops = sorted(
        {
            op_id(n) if op_id(n) in QUANTIZED_WEIGHT_OPS else n.op_type
            for n in nested_nodes(model.graph, *model.functions)
            if is_quantized(n)
        }
    )
    if quantized_ops:
        raise QuantizedModelError(
            f"quantized graph ({', '.join(quantized_ops)}): MBS works on float models; "
            "reduce the float model first, then quantize"
        )


def parse_model(data: bytes | bytearray | memoryview) -> onnx.ModelProto:
    """The ModelProto that serialized `data` holds; what is not one is refused."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except DecodeError as e:
        raise BadInputError(f"the given bytes are not a valid ONNX model ({e})") from None
    if not model.graph.node:
        raise BadInputError("the given bytes are not an ONNX model (no graph nodes found)")
    return model


def undeclared_io(graph: onnx.GraphProto) -> None:
    """Refuse graph inputs and outputs declared without a type or a tensor's shape (onnx-ir
    writes a value whose shape is None so), naming them: onnx's checker requires both and
    names none; onnxruntime runs such a model."""
    missing = [
        f"graph {kind} {vi.name!r}"
        for kind, values in (("input", graph.input), ("output", graph.output))
        for vi in values
        if not vi.HasField("type")
        or (vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"))
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInputError(
            f"{', '.join(missing[:3])}{more} declare{'s' * (len(missing) == 1)} no shape, which "
            "ONNX requires of graph inputs and outputs: declare one (dims may be named, "
            "dynamic); onnx.shape_inference.infer_shapes fills in outputs"
        )


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """`onnx.checker.check_model`, with unknown default-domain ops taken as opaque.

    Handed a ModelProto, onnx serializes it whole; handed a file, it reads the bytes and
    then parses them: two copies of the weights (issue 13). So each large tensor is
    checked on its own (the checker's tensor check) and the model is checked from a
    file that holds those tensors as external data. A dim written as a negative size
    (Paddle2ONNX's -1) is checked as the dynamic dim it stands for: onnx's shape inference
    takes it as a size, and over a Slice of it (1.23) fails a C++ assertion that aborts
    the process."""
    deprecated = deprecated_group_norms(model)
    custom = hide_unknown_ops(model, lambda node: is_unknown_op(node) or deprecated(node))[0]
    with scratch_folder() as folder:
        try:
            light, apart = weights_apart(custom, folder, contents=False)
            _negative_dims_dynamic(light.graph)
            for tensor in apart:
                onnx.checker.check_tensor(tensor)
            (folder / "checked.onnx").write_bytes(light.SerializeToString())
        except OSError as error:
            raise temporary_folder_error(error) from None
        onnx.checker.check_model(str(folder / "checked.onnx"), full_check=full_check)


def _negative_dims_dynamic(graph: onnx.GraphProto) -> None:
    """Clear the negative dim sizes of the declared shapes of `graph` (a copy being checked):
    unknown dims, as a dynamic dim without a name is written."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.ClearField("dim_value")


def integer_weight(graph: onnx.GraphProto) -> str | None:
    """Where a layer reads an integer initializer (or Constant) Cast to float (then scaled by
    hand: Mul by a scale, Sub of a zero point...) as its weight, in words; None when none does.
    Such a weight is no float initializer: it was neither counted nor cut, and folding its Cast
    and Mul would write it as float32. Only computations of constants are followed (`graph` in
    topological order): an integer constant added to an activation is no weight."""
    stored = {t.name: (t.data_type, "initializer") for t in graph.initializer}
    for node in graph.node:  # exporters that fold no constants hold weights in Constant nodes
        value = attributes(node).get("value") if op_id(node) == "Constant" else None
        if isinstance(value, onnx.TensorProto):
            stored[node.output[0]] = (value.data_type, "constant")
    integer = {name: held for name, held in stored.items() if held[0] not in FLOAT_TYPES}
    constant = set(stored)
    for node in graph.node:
        if op_id(node) in DEQUANTISING and all(not x or x in constant for x in node.input):
            constant.update(node.output)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    for cast in graph.node:
        if not (
            op_id(cast) == "Cast"
            and cast.input[0] in integer
            and attributes(cast).get("to") in FLOAT_TYPES
        ):
            continue
        data_type, held = integer[cast.input[0]]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type).name
        paths, seen = [(cast, ["Cast"])], {id(cast)}
        while paths:
            node, ops = paths.pop()
            for reader, k in readers.get(node.output[0], []) if node.output else []:
                if k in WEIGHT_INPUTS.get(op_id(reader), ()):
                    return (
                        f"{reader.op_type} {reader.name or reader.output[0]!r} reads {dtype} "
                        f"{held} {cast.input[0]!r} through {' -> '.join(ops)}"
                    )
                if reader.output and reader.output[0] in constant and id(reader) not in seen:
                    seen.add(id(reader))
                    paths.append((reader, [*ops, reader.op_type]))
    return None


def in_order(graph: onnx.GraphProto) -> None:
    """Put `graph`'s nodes in topological order, in place (nodes already in order stay)."""
    order = topological_order(graph)
    if any(a is not b for a, b in zip(order, graph.node)):
        del graph.node[:]
        graph.node.extend(order)
