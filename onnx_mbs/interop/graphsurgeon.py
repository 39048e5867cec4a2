"""onnx-graphsurgeon Graphs in: export once, say what graphsurgeon dropped.

A graphsurgeon Graph keeps nodes, tensors, opset and producer but not the
model's metadata_props, where onnx-mbs models record their preprocessing
(`onnx_mbs.mean`, `onnx_mbs.std`): `to_model` warns unless `metadata` is given
to put back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import onnx

from . import missing

try:
    import onnx_graphsurgeon as gs
except Exception as e:  # pragma: no cover - depends on the environment; a broken
    # install raises other errors than ImportError (onnx-graphsurgeon 0.5.5 under onnx 1.23)
    raise missing("onnx-graphsurgeon", e) from None


def to_model(
    graph: gs.Graph, metadata: Mapping[str, str] | None = None, warn: bool = True
) -> onnx.ModelProto:
    """`graph` exported as a ModelProto, with `metadata` as its metadata_props; without
    them it warns, unless `warn` is False (`reduce` given mean= and std=)."""
    if not isinstance(graph, gs.Graph):
        raise TypeError(f"expected an onnx_graphsurgeon.Graph, not {type(graph).__name__}")
    model = gs.export_onnx(graph)
    if metadata is None:
        if not warn:
            return model
        warnings.warn(
            "an onnx-graphsurgeon Graph carries no metadata_props: the model's preprocessing "
            "(onnx_mbs.mean/std) and other metadata are lost; pass mean= and std= to reduce, "
            "or to_model(graph, metadata={...})",
            UserWarning,
            stacklevel=3,
        )
        return model
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model
