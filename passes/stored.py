"""Weights stored in another precision than they are used in, read as used, written as stored.

Weight-only fp16 (or bf16) keeps a float model's I/O and arithmetic and stores each weight in
half precision, Cast to float before use; onnxruntime's fp16 conversion writes the same Casts
for the weights of the ops it keeps in float32. For the analysis such a weight is the float
tensor its readers see: `collapse` (at load) replaces each stored weight and its Cast by that
tensor, so the weight is counted, planned and cut as in the float model; `StoredCasts.apply`
(on every model written from the analysis form) stores each back, cut or not, in its own
dtype behind its own Cast. The value round-trips exactly: a float16 or bfloat16 value is a
float32 value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import cast_target, stored_casts, subgraph_names, value_types
from .protos import with_notes

_F16, _BF16, _F32, _F64 = (
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
)
# (stored, used) dtypes whose Cast is exact: each stored value is a value of the type used.
EXACT = {(_F16, _F32), (_BF16, _F32), (_F16, _F64), (_BF16, _F64), (_F32, _F64)}


@dataclass(frozen=True)
class Stored:
    """One collapsed Cast: the node, and the initializer it read, without its values."""

    cast: onnx.NodeProto
    dtype: int  # the initializer's data_type
    notes: onnx.TensorProto  # its doc_string and metadata_props, without values


@dataclass(frozen=True)
class StoredCasts:
    """The Casts `collapse` took out of a model; `apply` puts them back."""

    casts: tuple[Stored, ...] = ()

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Store each collapsed weight that `model` holds (the analysis form, or a cut or
        retrained copy of it) back in its dtype behind its Cast, in place. A model without
        weights (an instrumented copy) or with a weight it holds elsewhere is left as it is
        there: it computes the same either way."""
        if not self.casts:
            return model
        graph = model.graph
        initializers = {t.name: t for t in graph.initializer}
        restored = []
        for stored in self.casts:
            tensor = initializers.get(stored.cast.output[0])
            if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            value = numpy_helper.to_array(tensor).astype(
                helper.tensor_dtype_to_np_dtype(stored.dtype)
            )
            back = numpy_helper.from_array(value, stored.cast.input[0])
            tensor.CopyFrom(with_notes(back, stored.notes))
            restored.append(stored.cast)
        if restored:
            nodes = [*restored, *graph.node]
            del graph.node[:]
            graph.node.extend(nodes)
        return model


def collapse(model: onnx.ModelProto) -> StoredCasts:
    """Replace, in place, each float initializer that only a Cast to a wider float type reads
    (`stored_casts`, `EXACT`) by the Cast's output as an initializer; what was replaced. A
    narrowing Cast stays: its weight, stored back, would hold rounded values."""
    graph = model.graph
    read: dict[str, int] = {}
    for node in graph.node:
        for name in [*node.input, *subgraph_names(node)]:
            read[name] = read.get(name, 0) + 1
    # a graph output, or a weight also listed as a graph input (overridable, IR >= 4): the
    # caller feeds it as stored, so its Cast stays
    kept = {o.name for o in [*graph.output, *graph.input]}
    initializers = {t.name: t for t in graph.initializer}
    types = value_types(graph)
    casts = {
        output: node
        for output, node in stored_casts(graph, types).items()
        if read[node.input[0]] == 1
        and not {output, node.input[0]} & kept
        and (initializers[node.input[0]].data_type, cast_target(node, types)) in EXACT
    }
    if not casts:
        return StoredCasts()
    taken: list[Stored] = []
    for node in casts.values():
        tensor = initializers[node.input[0]]
        notes = with_notes(onnx.TensorProto(), tensor)
        taken.append(Stored(_copy(node), tensor.data_type, notes))
        to = helper.tensor_dtype_to_np_dtype(cast_target(node, types))
        value = np.asarray(numpy_helper.to_array(tensor).astype(to))
        tensor.CopyFrom(numpy_helper.from_array(value, node.output[0]))
    nodes = [n for n in graph.node if not (n.output and n.output[0] in casts)]
    del graph.node[:]
    graph.node.extend(nodes)
    return StoredCasts(tuple(taken))


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out
