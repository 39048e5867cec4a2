"""Loading: read a model, refuse what MBS cannot work on, fix input shapes, infer shapes.

Everything later assumes a float graph whose every tensor has a static shape,
so this is the one place that checks it and says clearly what to do otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .base import Pass, PassResult
from .errors import BadInputError
from .graph import GraphIndex, static_shape

InputShapes = Mapping[str, Sequence[int]]

QUANTIZED_OPS = {
    "QLinearConv",
    "ConvInteger",
    "QLinearMatMul",
    "MatMulInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """Parse `NAME:1,3,224,224` (or `1,3,224,224` for a single-input model, name '')."""
    name, _, dims = spec.rpartition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        raise BadInputError(
            f"bad --input-shape {spec!r}: expected NAME:D0,D1,... with integer dims, "
            "e.g. input:1,3,224,224"
        ) from None
    if any(not 0 < d < 2**63 for d in shape):
        raise BadInputError(
            f"bad --input-shape {spec!r}: dims must be positive integers below 2^63"
        )
    return name, shape


def read_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX file (with external data) or copy a ModelProto.

    Refuses what MBS cannot work on: not ONNX, truncated, invalid, quantized.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise BadInputError(f"{path} is a folder; give the path of an .onnx model file")
        if not path.is_file():
            raise BadInputError(f"model file not found: {path}")
        try:
            model = onnx.load(str(path))
        except DecodeError as e:
            raise BadInputError(
                f"{path} is not a valid ONNX file (truncated or not ONNX: {e})"
            ) from None
        except (FileNotFoundError, OSError) as e:
            raise BadInputError(f"cannot read {path} or its external data: {e}") from None
        except Exception as e:  # onnx raises assorted errors on corrupt files
            raise BadInputError(f"{path} could not be loaded as ONNX: {e}") from None
        if not model.graph.node:
            raise BadInputError(f"{path} is not an ONNX model (no graph nodes found)")
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise BadInputError(
            f"quantized graph ({', '.join(quantized)}): MBS works on float models; "
            "reduce the float model first, then quantize"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise BadInputError(f"the model is not valid ONNX: {first}") from None
    return model


class FixInputShapes(Pass):
    """Make every graph input fully static.

    A dynamic batch dimension alone becomes `batch` (1; None leaves it dynamic);
    any other dynamic dimension must be given (`--input-shape NAME:1,3,224,224`),
    because MACs, macroblocks and channel plans all depend on spatial sizes.
    """

    name = "fix_input_shapes"

    def __init__(self, shapes: InputShapes | None = None, batch: int | None = 1) -> None:
        self.shapes = dict(shapes or {})
        self.batch = batch

    def call(self, model: onnx.ModelProto) -> PassResult:
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        shapes = dict(self.shapes)
        if "" in shapes:
            if len(inputs) != 1:
                raise BadInputError(
                    "--input-shape without a name needs a single-input model; use NAME:dims with "
                    f"one of: {', '.join(i.name for i in inputs)}"
                )
            shapes[inputs[0].name] = shapes.pop("")
        unknown = set(shapes) - {i.name for i in inputs}
        if unknown:
            raise BadInputError(
                f"--input-shape names unknown input(s) {sorted(unknown)}; "
                f"the model's inputs are: {', '.join(i.name for i in inputs)}"
            )
        if not shapes and all(static_shape(i) is not None for i in inputs):
            return PassResult(model)  # nothing to fix: no copy of a large model
        out = onnx.ModelProto()
        out.CopyFrom(model)
        modified = False
        for vi in out.graph.input:
            if vi.name in initializers:
                continue
            dims = vi.type.tensor_type.shape.dim
            if vi.name in shapes:
                wanted = list(shapes[vi.name])
                if len(wanted) != len(dims):
                    raise BadInputError(
                        f"--input-shape for {vi.name!r} has {len(wanted)} dims, "
                        f"the model's input has {len(dims)}"
                    )
                for d, w in zip(dims, wanted):
                    if d.HasField("dim_value") and d.dim_value != w:
                        raise BadInputError(
                            f"--input-shape for {vi.name!r} gives {wanted}, but the model "
                            f"fixes dim {list(dims).index(d)} to {d.dim_value}"
                        )
                    modified |= not d.HasField("dim_value")
                    d.dim_value = w
                continue
            if static_shape(vi) is not None:
                continue
            dynamic = [k for k, d in enumerate(dims) if not d.HasField("dim_value")]
            if dynamic == [0]:
                if self.batch is not None:
                    dims[0].dim_value = self.batch
                    modified = True
                continue
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise BadInputError(
                f"input {vi.name!r} has dynamic dims {shown}; fix them with "
                f"--input-shape {vi.name}:1,3,224,224 (your sizes)"
            )
        return PassResult(out if modified else model, modified)


class InferShapes(Pass):
    """Run ONNX shape inference and (by default) insist every Conv-family output got a
    static shape."""

    name = "infer_shapes"

    def __init__(self, check_static: bool = True) -> None:
        self.check_static = check_static

    def call(self, model: onnx.ModelProto) -> PassResult:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"shape inference failed: {first}") from None
        if self.check_static:
            _check_static(inferred)
        if _recorded_types(inferred) == _recorded_types(model):
            return PassResult(model)  # nothing new was inferred
        return PassResult(inferred, True)


def _recorded_types(model: onnx.ModelProto) -> list[bytes]:
    """What shape inference writes: value_info and the declared input and output types."""
    graph = model.graph
    return [vi.SerializeToString() for vi in [*graph.input, *graph.value_info, *graph.output]]


def _check_static(inferred: onnx.ModelProto) -> None:
    """Every Conv-family output needs a static shape: MACs and widths depend on it."""
    known = {vi.name for vi in inferred.graph.value_info if static_shape(vi) is not None}
    known |= {vi.name for vi in inferred.graph.output if static_shape(vi) is not None}
    for node in inferred.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.output[0] not in known:
            raise BadInputError(
                f"the output shape of {node.op_type} {node.name!r} is not static after "
                "shape inference; fix the input shapes with --input-shape"
            )


class NameNodes(Pass):
    """Give unnamed nodes a stable name (`OpType_k`) so plans and reports can refer to them."""

    name = "name_nodes"

    def call(self, model: onnx.ModelProto) -> PassResult:
        if all(n.name for n in model.graph.node):
            return PassResult(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        taken = {n.name for n in out.graph.node}
        for k, node in enumerate(out.graph.node):
            if not node.name:
                name = f"{node.op_type}_{k}"
                while name in taken:
                    name += "_"
                node.name = name
                taken.add(name)
        return PassResult(out, True)


def load_model(
    source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None
) -> onnx.ModelProto:
    """Read, check, fix input shapes, name nodes, then infer shapes and fold shape
    arithmetic until both settle: the model every pass expects.

    Exporters compute Reshape targets at run time (Shape -> Gather -> Concat); shape
    inference cannot see through all of that, folding it can, and then inference
    goes further. A dynamic batch is taken as 1; shape constants that follow the
    batch are kept batch-agnostic (see `_keep_batch_dynamic`).
    """
    named = NameNodes()(read_model(source)).model
    model, folded = _settle(named, input_shapes, batch=1)
    if folded and _has_dynamic_batch(named, input_shapes):
        model = _keep_batch_dynamic(model, _settle(named, input_shapes, batch=2)[0])
    return model


def declared_io(
    source: onnx.ModelProto, input_shapes: InputShapes | None = None
) -> onnx.ModelProto:
    """`source` with only the user's input shapes applied: the inputs and outputs a
    written model declares (a dynamic batch stays dynamic)."""
    return FixInputShapes(input_shapes, batch=None)(source).model


def _settle(
    model: onnx.ModelProto, input_shapes: InputShapes | None, batch: int
) -> tuple[onnx.ModelProto, bool]:
    """Infer shapes and fold shape arithmetic until nothing more folds; and whether
    anything did (only folded constants can depend on the batch)."""
    from .fold import fold_shapes  # fold builds on this module's load form

    model = FixInputShapes(input_shapes, batch=batch)(model).model
    # Each round can only fold Shapes whose inputs the last inference reached, so a
    # chain of k dependent Shape computations needs up to k + 1 rounds.
    rounds = 2 + sum(n.op_type == "Shape" for n in model.graph.node)
    anything = False
    for _ in range(rounds):
        model = InferShapes(check_static=False)(model).model
        folded = fold_shapes(model)
        if folded is model:
            break
        model, anything = folded, True
    _check_static(model)
    return model, anything


def _has_dynamic_batch(model: onnx.ModelProto, input_shapes: InputShapes | None) -> bool:
    given = set(input_shapes or {})
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers or vi.name in given or "" in given:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            return True
    return False


def _keep_batch_dynamic(at_one: onnx.ModelProto, at_two: onnx.ModelProto) -> onnx.ModelProto:
    """Make folded constants that depend on the batch size batch-agnostic.

    The same model folded at batch 1 and at batch 2: constants that differ
    follow the batch. A Reshape target whose first entry is the batch becomes 0
    there (ONNX: copy that dimension from the input), which holds for any batch;
    anything else is refused rather than written for batch 1 only.
    """
    other = {t.name: numpy_helper.to_array(t) for t in at_two.graph.initializer}
    index = GraphIndex.build(at_one)
    changed: dict[str, np.ndarray] = {}
    for tensor in at_one.graph.initializer:
        if tensor.name not in other:
            continue
        one, two = numpy_helper.to_array(tensor), other[tensor.name]
        if one.shape == two.shape and np.array_equal(one, two):
            continue
        readers = index.consumers.get(tensor.name, [])
        reshape = len(readers) == 1 and readers[0].op_type == "Reshape"
        data = readers[0].input[0] if reshape else ""
        if (
            reshape
            and readers[0].input[1] == tensor.name
            and one.shape == two.shape
            and np.flatnonzero(one != two).tolist() == [0]
            and (one[0], two[0]) == (1, 2)
            and index.shapes.get(data, (0,))[0] == 1
        ):
            fixed = one.copy()
            fixed[0] = 0
            changed[tensor.name] = fixed
            continue
        names = ", ".join(i.name for i in at_one.graph.input if i.name not in index.initializers)
        raise BadInputError(
            f"the model computes {tensor.name!r} from the batch size in a way onnx-mbs cannot "
            f"keep dynamic; fix the batch with --input-shape ({names}) and the reduced model "
            "takes that batch"
        )
    if not changed:
        return at_one
    out = onnx.ModelProto()
    out.CopyFrom(at_one)
    for tensor in out.graph.initializer:
        if tensor.name in changed:
            tensor.CopyFrom(numpy_helper.from_array(changed[tensor.name], tensor.name))
    return out


def with_io_of(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the graph input and output declarations of `reference`.

    Analysis fixes shapes (a dynamic batch becomes 1); a written model must keep
    the original's inputs and outputs, dynamic dims included, so they are put
    back and the intermediate shapes, which assumed the fixed batch, are dropped.
    """
    declared = {vi.name: vi for vi in [*reference.graph.input, *reference.graph.output]}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in [*out.graph.input, *out.graph.output]:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    del out.graph.value_info[:]
    return out


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's (first) input fixes, or None when the batch is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in initializers:
            dims = vi.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return None
