"""Shapes: fix the input shapes, then infer shapes and fold shape arithmetic until both
settle; every Conv output must end with a static shape (MACs and widths depend on it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .base import Pass, PassResult
from .batch_axis import refuse_an_added_batch_axis
from .custom_ops import (
    as_fused_ops,
    hide_unknown_ops,
    restore_fused_ops,
    restore_unknown_ops,
    uninferable_outputs,
)
from .domains import COUNTED_CONVS, ONNXRUNTIME_ADVICE, is_onnxruntime_op, op_id
from .errors import BadInputError, UninferredShapesError, input_shape_option
from .graph import default_opset, static_shape
from .protos import without_weights

InputShapes = Mapping[str, Sequence[int]]


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
                    f"{input_shape_option()} without an input name needs a single-input model; "
                    f"name one of: {', '.join(i.name for i in inputs)}"
                )
            shapes[inputs[0].name] = shapes.pop("")
        for vi in inputs:
            refuse_a_size_as_batch(vi)
            refuse_an_added_batch_axis(model.graph, vi)
        unknown = set(shapes) - {i.name for i in inputs}
        if unknown:
            raise BadInputError(
                f"{input_shape_option()} names unknown input(s) {sorted(unknown)}; "
                f"the model's inputs are: {', '.join(i.name for i in inputs)}"
            )
        if not shapes and all(static_shape(i) is not None for i in inputs):
            return PassResult(model)  # nothing to fix: no copy of a large model
        out = onnx.ModelProto()
        out.CopyFrom(model)
        modified = False
        named: dict[str, int] = {}  # dim_param -> the size it was fixed to
        for vi in out.graph.input:
            if vi.name in initializers:
                continue
            dims = vi.type.tensor_type.shape.dim
            if vi.name in shapes:
                wanted = list(shapes[vi.name])
                if len(wanted) != len(dims):
                    raise BadInputError(
                        f"{input_shape_option()} for {vi.name!r} has {len(wanted)} dims, "
                        f"the model's input has {len(dims)}"
                    )
                for k, (d, w) in enumerate(zip(dims, wanted)):
                    if _fixed(d) and d.dim_value != w:
                        raise BadInputError(
                            f"{input_shape_option()} for {vi.name!r} gives {wanted}, but the model "
                            f"fixes dim {k} to {d.dim_value}"
                        )
                    if not _fixed(d):
                        modified = True
                        if d.dim_param:
                            named[d.dim_param] = w
                    d.dim_value = w
                continue
            if static_shape(vi) is not None:
                continue
            dynamic = [k for k, d in enumerate(dims) if not _fixed(d)]
            if dynamic == [0]:
                if self.batch is not None:
                    if dims[0].dim_param:
                        named[dims[0].dim_param] = self.batch
                    dims[0].dim_value = self.batch
                    modified = True
                continue
            shown = [d.dim_value if _fixed(d) else (d.dim_param or "?") for d in dims]
            sizes = [
                str(d.dim_value) if _fixed(d) else "1" if k == 0 else _size_name(d, k)
                for k, d in enumerate(dims)
            ]
            unknown = ", ".join(x for x in sizes if not x.isdigit())
            raise BadInputError(
                f"input {vi.name!r} has dynamic dims {shown}: give the size to analyse at, "
                f"{input_shape_option(vi.name, sizes)} with your {unknown} (the written "
                "model keeps the dims dynamic)"
            )
        _fix_named_dims(out.graph, named)
        return PassResult(out if modified else model, modified)


def _fix_named_dims(graph: onnx.GraphProto, named: dict[str, int]) -> None:
    """Give the recorded shapes (value_info, outputs) the sizes fixed for the inputs' named
    dims: the shape of an op inference cannot see through (a plugin, GroupNormalization)
    is known only from what the model records, 'N' for a dynamic batch."""
    if not named:
        return
    for vi in [*graph.value_info, *graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") and d.dim_param in named:
                d.dim_value = named[d.dim_param]


def _fixed(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """Whether `dim` is a known size: -1 and 0 are dynamic, as exporters write them (Paddle)."""
    return dim.HasField("dim_value") and dim.dim_value > 0


# A dim named like these is an image size: dim 0 so named means the input has no batch axis.
_SIZE_NAME = re.compile(r"(?:.*[^a-z])?(?:h|w|height|width)")


def refuse_a_size_as_batch(vi: onnx.ValueInfoProto) -> None:
    """Refuse an input whose dim 0 is named as an image size ('H', 'height', 'img_w'): an
    (H, W, C) input without a batch axis. Every reading here takes dim 0 for the batch: H
    would be fixed to 1, counted as the batch, and the image size read from W and C."""
    dims = vi.type.tensor_type.shape.dim
    if not dims or not _SIZE_NAME.fullmatch(dims[0].dim_param.lower()):
        return
    shown = [d.dim_value if _fixed(d) else (d.dim_param or "?") for d in dims]
    raise BadInputError(
        f"input {vi.name!r} has no batch axis: dim 0 is {dims[0].dim_param!r}, a size (dims "
        f"{shown}); onnx-mbs reads an image input as (N, C, H, W) or (N, H, W, C): export the "
        "model with a batch axis first"
    )


def _size_name(dim: onnx.TensorShapeProto.Dimension, k: int) -> str:
    """A dynamic dim's name as a placeholder for its size: HEIGHT for 'height', D2 for none."""
    name = dim.dim_param
    return name.upper() if name.isidentifier() and len(name) <= 16 else f"D{k}"


class InferShapes(Pass):
    """Run ONNX shape inference and (by default) insist every Conv-family output got a
    static shape."""

    name = "infer_shapes"

    def __init__(self, check_static: bool = True) -> None:
        self.check_static = check_static

    def call(self, model: onnx.ModelProto) -> PassResult:
        inferred = inferred_types(model)
        if inferred is None:
            if self.check_static:
                check_static(model)
            return PassResult(model)  # nothing new was inferred
        out = onnx.ModelProto()
        out.CopyFrom(model)
        take_types(out, inferred)
        if self.check_static:
            check_static(out)
        return PassResult(out, True)


def inferred_types(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The weightless model shape inference returns, or None when it adds nothing.

    Recorded shapes that inference contradicts (value_info or outputs left from another
    input size or an edit: onnxruntime runs such models) are inferred afresh."""
    light = weightless(model)
    fused = as_fused_ops(light)
    custom, where = hide_unknown_ops(light)
    custom, resized = _resized_as_run(custom)
    where += resized
    try:
        inferred = _infer(custom)
    except Exception as error:
        stale = _contradicted(custom)
        if not stale:
            raise _inference_failed(error) from None
        _forget_shapes(custom.graph, stale)
        try:
            inferred = _infer(custom)
        except Exception as again:
            raise _inference_failed(again) from None
    custom, more = _resized_as_run(custom, inferred)  # input sizes this inference found
    if more:
        where += more
        try:
            inferred = _infer(custom)
        except Exception as error:
            raise _inference_failed(error) from None
    inferred = restore_unknown_ops(inferred, where)
    restore_fused_ops(inferred, fused)
    return None if _recorded_types(inferred) == _recorded_types(model) else inferred


def _resized_as_run(
    model: onnx.ModelProto, known: onnx.ModelProto | None = None
) -> tuple[onnx.ModelProto, list[int]]:
    """Resize and Upsample by constant scales: their outputs recorded in `model` (in place) at
    the size onnxruntime makes, floor(float32(dim * scale)), and the nodes hidden from
    inference as unknown ops are (`hide_unknown_ops`: the model and where they are, to
    restore). onnx floors the product in double precision: 5 x 1.8f gives 8 where
    onnxruntime gives 9, so a map added to one upsampled to its size by the ratio of the two
    (opset 9/10 exports) contradicted inference, and a conv after a fractional upsampling
    was counted at the wrong size. Input sizes are read in `known` (default `model`); a node
    whose output `known` records at onnxruntime's size already, or whose input size is not
    known yet, is left to onnx."""
    graph = model.graph
    version = default_opset(model)
    constants = {t.name: t for t in graph.initializer}
    recorded = (known or model).graph
    shapes = {vi.name: vi for vi in [*recorded.input, *recorded.value_info, *recorded.output]}
    resized = set()
    for node in graph.node:
        scales = _constant_scales(node, version, constants)
        source = shapes.get(node.input[0]) if scales is not None else None
        dims = static_shape(source) if source is not None else None
        if dims is None or len(scales) != len(dims):
            continue
        sizes = [int(np.float32(d) * s) for d, s in zip(dims, scales)]
        output = shapes.get(node.output[0])
        if output is not None and static_shape(output) == tuple(sizes):
            continue
        _forget_shapes(graph, {node.output[0]})
        elem = source.type.tensor_type.elem_type
        graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], elem, sizes))
        resized.add(node.output[0])
    return hide_unknown_ops(model, lambda node: bool(node.output) and node.output[0] in resized)


def _constant_scales(
    node: onnx.NodeProto, version: int, constants: Mapping[str, onnx.TensorProto]
) -> np.ndarray | None:
    """The scales of a default-domain Resize or Upsample that scales by constants (not to
    sizes, not along `axes`), else None."""
    if op_id(node) not in ("Resize", "Upsample"):
        return None
    if op_id(node) == "Upsample" and version < 9:
        return next(
            (np.array(a.floats, np.float32) for a in node.attribute if a.name == "scales"), None
        )
    if any(a.name == "axes" for a in node.attribute):
        return None
    at = 1 if op_id(node) == "Upsample" or version < 11 else 2
    sizes_given = op_id(node) == "Resize" and version >= 11 and len(node.input) > 3
    if len(node.input) <= at or node.input[at] not in constants or (sizes_given and node.input[3]):
        return None
    return numpy_helper.to_array(constants[node.input[at]]).astype(np.float32).ravel()


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def _inference_failed(error: Exception) -> UninferredShapesError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UninferredShapesError(f"shape inference failed: {first}")


def _contradicted(model: onnx.ModelProto) -> set[str]:
    """The tensors whose recorded type or shape (value_info, outputs) inference without
    them contradicts; none when inference fails without them too."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)  # weightless: small
    _forget_shapes(bare.graph, {vi.name for vi in [*bare.graph.value_info, *bare.graph.output]})
    try:
        inferred = _infer(bare)
    except Exception:
        return set()
    found = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    recorded = [*model.graph.value_info, *model.graph.output]
    return {vi.name for vi in recorded if vi.name in found and disagree(vi, found[vi.name])}


def _forget_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop the value_info of `names` and the shapes their graph outputs declare."""
    kept = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for output in graph.output:
        if output.name in names and output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")


def disagree(recorded: onnx.ValueInfoProto, inferred: onnx.ValueInfoProto) -> bool:
    """Whether two records of a tensor contradict: other element types, ranks or sizes."""
    a, b = recorded.type.tensor_type, inferred.type.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    if not (a.HasField("shape") and b.HasField("shape")):
        return False
    if len(a.shape.dim) != len(b.shape.dim):
        return True
    return any(
        x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
        for x, y in zip(a.shape.dim, b.shape.dim)
    )


def take_types(model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    """Record `inferred`'s value_info and output types in `model`, in place."""
    for name in ("value_info", "output"):
        del getattr(model.graph, name)[:]
        getattr(model.graph, name).extend(getattr(inferred.graph, name))


# What shape inference and its data propagation may read: integer shape data (Reshape
# targets, Slice bounds, pads) up to this many elements, and any tensor this small (Resize
# scales). Everything else is a weight: declared, not copied.
SHAPE_DATA_LIMIT = 4096

SMALL_VALUES = 64


_SHAPE_DATA_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large initializers are graph inputs of the same type and
    shape: what shape inference and its data propagation read (values only of small
    tensors, such as shapes), without serializing and parsing the weights twice."""
    out = without_weights(model)
    graph, light = model.graph, out.graph
    declared = {i.name for i in graph.input}
    for tensor in graph.initializer:
        size = math.prod(tensor.dims)
        shape_data = tensor.data_type in _SHAPE_DATA_TYPES and size <= SHAPE_DATA_LIMIT
        if size <= SMALL_VALUES or shape_data:
            light.initializer.append(tensor)
        elif tensor.name not in declared:
            light.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return out


def _recorded_types(model: onnx.ModelProto) -> list[bytes]:
    """What shape inference writes: value_info and the declared output types."""
    graph = model.graph
    return [vi.SerializeToString() for vi in [*graph.value_info, *graph.output]]


def check_static(inferred: onnx.ModelProto) -> None:
    """Every Conv-family output and weight needs a static shape: MACs, kernels and widths
    depend on them (a weight a custom op computes may have none, the output recorded)."""
    graph = inferred.graph
    known = {vi.name for vi in graph.value_info if static_shape(vi) is not None}
    known |= {vi.name for vi in graph.output if static_shape(vi) is not None}
    weights = known | {t.name for t in graph.initializer}
    weights |= {i.name for i in graph.input if static_shape(i) is not None}
    for node in graph.node:
        if op_id(node) not in COUNTED_CONVS:
            continue
        for what, name, sized in (
            ("output", node.output[0], known),
            ("weight", node.input[1], weights),
        ):
            if name not in sized:
                raise UninferredShapesError(
                    f"the {what} shape of {node.op_type} {node.name!r} is not static after "
                    f"shape inference; {_unsized_because(inferred, node, known)}"
                )


def _unsized_because(model: onnx.ModelProto, node: onnx.NodeProto, known: set[str]) -> str:
    """What leaves `node`'s output unsized, and what to do: the op without an ONNX schema
    that the unsized tensors lead back to (only recorded shapes size its outputs), input
    shapes to fix where they lead back to a graph input, else the op that has static inputs
    and yet no static output (a Loop whose output grows with its iterations): its shape to
    record."""
    made = {name: n for n in model.graph.node for name in n.output}
    sized = known | {t.name for t in model.graph.initializer}
    sized |= {i.name for i in model.graph.input if static_shape(i) is not None}
    for _ in model.graph.node:  # back along unsized inputs, at most once per node
        unsized = [x for x in node.input if x and x not in sized and x in made]
        if not unsized:
            break
        node = made[unsized[0]]
    if node.output[0] not in uninferable_outputs(model):
        if any(x and x not in sized for x in node.input):  # a graph input's dynamic dims
            return f"fix the input shapes with {input_shape_option()}"
        return (
            f"shape inference cannot size the output of {node.op_type} {node.name!r} from "
            "static inputs (it depends on values computed at run time): record that "
            "output's shape in the model's value_info"
        )
    fused = f" ({ONNXRUNTIME_ADVICE})" if is_onnxruntime_op(node) else ""
    return (
        f"shape inference cannot size the output of {node.domain or 'ai.onnx'}:"
        f"{node.op_type} {node.name!r}, an op without an ONNX schema: record its output "
        f"shapes in the model's value_info, or give the model without it{fused}"
    )


def settle(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Infer shapes and fold shape arithmetic until nothing more folds; and whether
    anything did (only folded constants can depend on the input size). Infers into
    `model` itself: pass a copy of one's own."""
    from .fold import fold_shapes  # fold builds on this module's load form

    # Each round can only fold Shapes whose inputs the last inference reached, so a
    # chain of k dependent Shape computations needs up to k + 1 rounds.
    rounds = 2 + sum(op_id(n) == "Shape" for n in model.graph.node)
    anything = False
    for _ in range(rounds):
        inferred = inferred_types(model)
        if inferred is not None:  # in place: the model is load's own (one copy of the weights)
            take_types(model, inferred)
        folded = fold_shapes(model)
        if folded is model:
            break
        model, anything = folded, True
    check_static(model)
    return model, anything
