"""Loading: read a model into the analysis form every pass expects.

Everything later assumes a float graph whose every tensor has a static shape, with
unique node names: `load` reads and checks (read.py), normalises, fixes input shapes and
settles shapes (shapes.py), and keeps folded constants size-agnostic (dynamic_dims.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .base import Pass, PassResult
from .custom_ops import uninferable_outputs
from .domains import COUNTED_CONVS, op_id
from .dynamic_dims import KINDS, MULTIPLES, RunTimeShapes, keep_dynamic, other_shapes
from .errors import BadInputError
from .functions import functions_to_inline, inline_layers
from .graph import GraphIndex, static_shape
from .group_norm import expand_group_norms
from .integrity import check_conv_channels, check_made_sizes
from .normalise import normalise_in_place, unique_names
from .read import SERIALIZED, parse_model, read_model
from .shapes import FixInputShapes, InputShapes, disagree, settle
from .stored import StoredCasts, collapse


class NameNodes(Pass):
    """Give empty and repeated node names a stable unique name (`OpType_k`) so plans and
    reports can refer to them."""

    name = "name_nodes"

    def call(self, model: onnx.ModelProto) -> PassResult:
        names = [n.name for n in model.graph.node]
        if all(names) and len(set(names)) == len(names):
            return PassResult(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        unique_names(out.graph)
        return PassResult(out, True)


@dataclass(frozen=True)
class Origin:
    """Where a loaded model came from, and the I/O every model written from it declares.

    `declared` holds only the graph inputs and outputs (normalised, no shape fixed), not
    a copy of the weights; `original` is the input as read (handed back unchanged when
    nothing is cut); `run_time` the original's computation of the folded constants that
    follow the input size (dynamic_dims.py), which a written model computes again;
    `stored` the weights stored in another precision (stored.py), which a written model
    stores so again.
    """

    declared: onnx.ModelProto
    path: Path | None = None  # the file read, when the input was one
    read: onnx.ModelProto | None = field(default=None, repr=False)  # the input, if not a file
    run_time: RunTimeShapes = field(default_factory=RunTimeShapes, repr=False)
    stored: StoredCasts = field(default_factory=StoredCasts, repr=False)

    @property
    def original(self) -> onnx.ModelProto:
        """The input as read. A file is read again when asked (only when nothing is cut,
        or the written model fails the checker), so a run does not hold a third copy."""
        if self.read is None:
            assert self.path is not None
            return read_model(self.path)
        copy = onnx.ModelProto()  # the caller's own model is never handed back to be changed
        copy.CopyFrom(self.read)
        return copy

    def written(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` (the analysis form, or a shrunk or retrained one) as it is written: a new
        model that takes every input shape the original took."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return self.write_form(out)

    def write_form(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`written` in place, for a copy of one's own (no second copy of the weights):
        the shape arithmetic that follows the input size computed at run time again, the
        weights stored as the original stores them, then the declared I/O."""
        return set_io(self.stored.apply(self.run_time.apply(model)), self.declared)

    @property
    def batch(self) -> int | None:
        """The batch the declared input fixes, or None when it is dynamic."""
        return static_batch(self.declared)


@dataclass(frozen=True)
class LoadedModel:
    """A model in the analysis form, and its `Origin`.

    `model` is normalised, shapes fixed and inferred, shape arithmetic folded: what
    every pass expects. A caller that lets the model go for a while (the pipeline, while
    onnxruntime holds its weights) keeps the origin alone.
    """

    model: onnx.ModelProto
    origin: Origin

    @property
    def declared(self) -> onnx.ModelProto:
        return self.origin.declared

    @property
    def original(self) -> onnx.ModelProto:
        return self.origin.original

    def written(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return self.origin.written(model)

    def write_form(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return self.origin.write_form(model)

    @property
    def runnable(self) -> onnx.ModelProto:
        """The analysis form with the declared I/O: what onnxruntime runs."""
        return self.origin.written(self.model)

    @property
    def batch(self) -> int | None:
        return self.origin.batch


def load(
    source: str | os.PathLike | onnx.ModelProto | bytes, input_shapes: InputShapes | None = None
) -> LoadedModel:
    """Read, check, inline the local functions that hold layers (functions.py) and
    normalise, read weights stored in another precision as they are
    used (stored.py), then fix input shapes and infer shapes and fold shape arithmetic
    until both settle.

    Exporters compute Reshape targets at run time (Shape -> Gather -> Concat); shape
    inference cannot see through all of that, folding it can, and then inference
    goes further. A dynamic batch is taken as 1, dynamic image sizes as `input_shapes`
    or the model's own (`analysis_shapes`). Fixing shapes serves the analysis only:
    folded constants that follow a dynamic dim are kept dynamic (dynamic.py), so the
    written model accepts every shape the original did.
    """
    if isinstance(source, SERIALIZED):
        source = parse_model(source)
    # One copy of the weights at a time where it can be (memory: issue 13): the copy
    # read is normalised in place; shapes are inferred into the fixed model, which is
    # that same copy when no input shape needs fixing, and then holds all load needs.
    declared = normalise_in_place(inline_layers(read_model(source)))
    stored = collapse(declared)  # weights read in the precision they are used in
    expand_group_norms(declared)  # as torch exports GroupNorm: followed, cut, trained
    fixed = FixInputShapes(analysis_shapes(declared, input_shapes), batch=1)(declared).model
    io = _io_only(declared)
    model, folded = settle(fixed)
    _without_contradictions(io, model)
    index = GraphIndex.build(model)  # one index serves both checks
    check_made_sizes(model, index)
    check_conv_channels(model, index)
    others = _settled_at_other_sizes(declared, fixed) if folded else []
    model, run_time = keep_dynamic(model, others, declared)
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(model, Origin(io, read=source, run_time=run_time, stored=stored))
    return LoadedModel(model, Origin(io, path=Path(source), run_time=run_time, stored=stored))


def _settled_at_other_sizes(
    declared: onnx.ModelProto, fixed: onnx.ModelProto
) -> list[onnx.ModelProto]:
    """`declared` settled at each kind of other size (dynamic_dims.KINDS) it takes: its
    dynamic dims from dim 1 on changed, else (dim 1 the channels a conv fixes, declared
    dynamic) from dim 2 on; odd sizes each its own, else one per position of the inputs
    and size (inputs whose dims must agree), each at odd multiples of 1, 2, 4, ... until
    the original runs; a kind at which the original does not run gives nothing."""
    others = []
    ways = [(f, p, m) for f in (1, 2) for p in (False, True) for m in MULTIPLES]
    for kind in KINDS:
        tried: list[dict[str, list[int]]] = []
        for first, by_position, multiple in ways:
            other = other_shapes(declared, fixed, kind, first, by_position, multiple)
            if not other or other in tried:
                continue
            tried.append(other)
            try:
                others.append(settle(FixInputShapes(other)(declared).model)[0])
                break
            except BadInputError:
                pass  # the original does not run at that size either
    return others


def analysis_shapes(model: onnx.ModelProto, given: InputShapes | None) -> InputShapes | None:
    """The input shapes to analyse at: `given`, else for an image input whose height and
    width are dynamic the size the model records it was made for (the `imgsz` metadata
    Ultralytics exports write), else None (FixInputShapes then says what to give)."""
    if given:
        return given
    recorded = {p.key: p.value for p in model.metadata_props}.get("imgsz", "")
    size = [int(d) for d in re.findall(r"\d+", recorded)]
    if len(size) == 1:
        size *= 2
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(size) != 2 or len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value"):
        return None
    if any(d.HasField("dim_value") for d in dims[2:]):
        return None
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else 1
    return {inputs[0].name: [batch, dims[1].dim_value, *size]}


def _io_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding only `model`'s graph inputs (initializers aside) and outputs, and
    the records of the tensors that only they size (custom ops' outputs: see `set_io`)."""
    initializers = {t.name for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.graph.input.extend(i for i in model.graph.input if i.name not in initializers)
    out.graph.output.extend(model.graph.output)
    recorded = uninferable_outputs(model)
    out.graph.value_info.extend(v for v in model.graph.value_info if v.name in recorded)
    return out


def _without_contradictions(io: onnx.ModelProto, analysed: onnx.ModelProto) -> None:
    """Declared outputs that inference at the analysed size contradicts (a stale record,
    which onnxruntime ignores and the checker refuses) take the inferred element type,
    and the contradicted sizes become dynamic."""
    inferred = {o.name: o for o in analysed.graph.output}
    for output in io.graph.output:
        other = inferred.get(output.name)
        if other is None or not disagree(output, other):
            continue
        declared, found = output.type.tensor_type, other.type.tensor_type
        declared.elem_type = found.elem_type or declared.elem_type
        if len(declared.shape.dim) != len(found.shape.dim):
            declared.ClearField("shape")
            continue
        for k, (a, b) in enumerate(zip(declared.shape.dim, found.shape.dim)):
            if a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value:
                a.dim_param = f"{output.name}_dim{k}"


def load_model(
    source: str | os.PathLike | onnx.ModelProto | bytes, input_shapes: InputShapes | None = None
) -> onnx.ModelProto:
    """The analysis form of `source` (see `load`): the model every pass expects."""
    return load(source, input_shapes).model


def in_load_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself if it is in `load_model` form, else `load_model(model)`: every public
    analysis and transform accepts a plainly loaded model this way (a model whose
    shapes cannot be fixed raises the BadInputError `load_model` would)."""
    graph = model.graph
    static = {vi.name for vi in [*graph.value_info, *graph.output] if static_shape(vi)}
    return model if _is_load_form(model, static) else load_model(model)


def indexed(
    model: onnx.ModelProto, index: GraphIndex | None = None
) -> tuple[onnx.ModelProto, GraphIndex]:
    """`in_load_form(model)` and its GraphIndex: where every analysis starts. `index` is the
    caller's `GraphIndex.build(model)` when it has one; the form is read off the index."""
    model, index, _ = indexed_loaded(model, index)
    return model, index


def indexed_loaded(
    model: onnx.ModelProto, index: GraphIndex | None = None
) -> tuple[onnx.ModelProto, GraphIndex, LoadedModel | None]:
    """`indexed`, and the LoadedModel when `model` had to be loaded: where every transform
    starts, so that its result, written by `LoadedModel.write_form`, keeps the declared
    inputs and outputs of the model it was given (dynamic dims included)."""
    index = GraphIndex.of(model, index)
    if _is_load_form(model, index.shapes):
        return model, index, None
    read = load(model)
    return read.model, GraphIndex.build(read.model), read


def _is_load_form(model: onnx.ModelProto, static: Container[str]) -> bool:
    """Unique node names, static graph inputs and Conv outputs (`static`: names of tensors
    with a static shape), no call of a local function holding layers: what `load` makes."""
    graph = model.graph
    names = [n.name for n in graph.node]
    initializers = {t.name for t in graph.initializer}
    return (
        all(names)
        and len(set(names)) == len(names)
        and all(static_shape(i) for i in graph.input if i.name not in initializers)
        and all(n.output[0] in static for n in graph.node if op_id(n) in COUNTED_CONVS)
        and not (model.functions and functions_to_inline(model))
    )


def with_io_of(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the graph input and output declarations of `reference`.

    Analysis fixes shapes (a dynamic batch becomes 1); a written model must keep
    the original's inputs and outputs, dynamic dims included, so they are put
    back and the intermediate shapes, which assumed the fixed batch, are dropped.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return set_io(out, reference)


def set_io(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """`with_io_of` in place, for a copy of one's own (no second copy of the weights).
    `reference`'s records of tensors shape inference cannot size (a custom op's outputs)
    stay where `model` still makes them at those sizes: without them the written model
    could not be loaded again (retrained, reduced)."""
    declared = {vi.name: vi for vi in [*reference.graph.input, *reference.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    now = {vi.name: vi for vi in model.graph.value_info}
    made = uninferable_outputs(model)
    kept = [
        vi
        for vi in reference.graph.value_info
        if vi.name in made and vi.name in now and not disagree(vi, now[vi.name])
    ]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's (first) input fixes, or None when the batch is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in initializers:
            dims = vi.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return None
