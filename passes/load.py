"""Loading: read a model into the analysis form every pass expects.

Everything later assumes a float graph whose every tensor has a static shape, with
unique node names: `load` reads and checks (read.py), normalises, fixes input shapes and
settles shapes (shapes.py), and keeps folded constants size-agnostic (dynamic_dims.py).
"""

from __future__ import annotations

import os
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .base import Pass, PassResult
from .dynamic_dims import keep_dynamic, other_shapes
from .errors import BadInputError
from .graph import GraphIndex, static_shape
from .normalise import normalise_in_place, unique_names
from .read import read_model
from .shapes import FixInputShapes, InputShapes, settle


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
    nothing is cut).
    """

    declared: onnx.ModelProto
    path: Path | None = None  # the file read, when the input was one
    read: onnx.ModelProto | None = field(default=None, repr=False)  # the input, if not a file

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
        """`model` (an analysis-form model or a shrunk one) with the declared I/O."""
        return with_io_of(model, self.declared)

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

    @property
    def runnable(self) -> onnx.ModelProto:
        """The analysis form with the declared I/O: what onnxruntime runs."""
        return self.origin.written(self.model)

    @property
    def batch(self) -> int | None:
        return self.origin.batch


def load(
    source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None
) -> LoadedModel:
    """Read, check and normalise, then fix input shapes and infer shapes and fold shape
    arithmetic until both settle.

    Exporters compute Reshape targets at run time (Shape -> Gather -> Concat); shape
    inference cannot see through all of that, folding it can, and then inference
    goes further. A dynamic batch is taken as 1. Fixing shapes serves the analysis
    only: folded constants that follow a dynamic dim are made size-agnostic (see
    `keep_dynamic`), so the written model accepts every shape the original did.
    """
    # One copy of the weights at a time where it can be (memory: issue 13): the copy
    # read is normalised in place; shapes are inferred into the fixed model, which is
    # that same copy when no input shape needs fixing, and then holds all load needs.
    declared = normalise_in_place(read_model(source))
    fixed = FixInputShapes(input_shapes, batch=1)(declared).model
    io = _io_only(declared)
    model, folded = settle(fixed)
    others = []
    for kind in ("batch", "spatial") if folded else ():
        other = other_shapes(declared, fixed, kind)
        try:
            if other:
                others.append(settle(FixInputShapes(other)(declared).model)[0])
        except BadInputError:
            pass  # the original does not run at that size either: nothing to keep
    try:
        model = keep_dynamic(model, others)
    except BadInputError:
        if not input_shapes:
            raise
        # The user fixed these shapes: the written model takes exactly them.
        io = _io_only(FixInputShapes(input_shapes, batch=None)(declared).model)
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(model, Origin(io, read=source))
    return LoadedModel(model, Origin(io, path=Path(source)))


def _io_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding only `model`'s graph inputs (initializers aside) and outputs."""
    initializers = {t.name for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.graph.input.extend(i for i in model.graph.input if i.name not in initializers)
    out.graph.output.extend(model.graph.output)
    return out


def load_model(
    source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None
) -> onnx.ModelProto:
    """The analysis form of `source` (see `load`): the model every pass expects."""
    return load(source, input_shapes).model


def in_load_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself if it is in `load_model` form, else `load_model(model)`: every public
    analysis and transform accepts a plainly loaded model this way (a model whose
    shapes cannot be fixed raises the BadInputError `load_model` would)."""
    graph = model.graph
    static = {vi.name for vi in [*graph.value_info, *graph.output] if static_shape(vi)}
    return model if _is_load_form(graph, static) else load_model(model)


def indexed(
    model: onnx.ModelProto, index: GraphIndex | None = None
) -> tuple[onnx.ModelProto, GraphIndex]:
    """`in_load_form(model)` and its GraphIndex: where every analysis starts. `index` is the
    caller's `GraphIndex.build(model)` when it has one; the form is read off the index."""
    index = GraphIndex.of(model, index)
    if _is_load_form(model.graph, index.shapes):
        return model, index
    model = load_model(model)
    return model, GraphIndex.build(model)


def _is_load_form(graph: onnx.GraphProto, static: Container[str]) -> bool:
    """Unique node names, static graph inputs and Conv outputs (`static`: names of tensors
    with a static shape): what `load` makes."""
    names = [n.name for n in graph.node]
    initializers = {t.name for t in graph.initializer}
    return (
        all(names)
        and len(set(names)) == len(names)
        and all(static_shape(i) for i in graph.input if i.name not in initializers)
        and all(n.output[0] in static for n in graph.node if n.op_type in ("Conv", "ConvTranspose"))
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
    """`with_io_of` in place, for a copy of one's own (no second copy of the weights)."""
    declared = {vi.name: vi for vi in [*reference.graph.input, *reference.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    del model.graph.value_info[:]
    return model


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's (first) input fixes, or None when the batch is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in initializers:
            dims = vi.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return None
