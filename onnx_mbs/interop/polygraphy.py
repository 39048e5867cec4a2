"""A Polygraphy loader that reduces an ONNX model with MBS.

    from polygraphy.backend.onnx import OnnxFromPath, SaveOnnx
    from onnx_mbs.interop.polygraphy import ReduceOnnx

    SaveOnnx(ReduceOnnx(OnnxFromPath("model.onnx"), data="calib/", budget="params=0.5"),
             path="small.onnx")()

Like Polygraphy's own loaders it is lazy: nothing runs until it is called, and
`model` may be a ModelProto or a loader that returns one. Polygraphy's loaders that edit
through a graphsurgeon Graph (FoldConstants, SetUpperBound) drop the model's metadata_props,
where the mean/std `eval` and `retrain` read is recorded: given a model without any, it reads
those of the model its loader chain started from (`OnnxFromPath`'s file, or a ModelProto).
"""

from __future__ import annotations

from typing import Any

import onnx

from onnx_mbs.data.fit import metadata
from onnx_mbs.data.replay import replayable
from onnx_mbs.options import ReduceOptions

from . import missing

try:
    from polygraphy import util
    from polygraphy.backend.base import BaseLoader
    from polygraphy.backend.onnx import OnnxFromPath
except Exception as e:  # pragma: no cover - depends on the environment; a broken
    # install raises other errors than ImportError (onnx-graphsurgeon 0.5.5 under onnx 1.23)
    raise missing("polygraphy", e) from None


class ReduceOnnx(BaseLoader):
    """Functor: the model `onnx_mbs.reduce(model, data, options, **overrides)` writes; the
    last run's ReduceReport is kept in `self.report`."""

    def __init__(
        self, model: Any, data: Any = None, options: ReduceOptions | None = None, **overrides: Any
    ) -> None:
        self._model = model
        self.data = replayable(data)  # a one-shot reader, read again on every call
        self.options = ReduceOptions.of(options or ReduceOptions(progress=False), **overrides)
        self.report = None

    def call_impl(self):
        """
        Returns:
            onnx.ModelProto: the reduced model
        """
        from onnx_mbs.pipeline import reduce, with_metadata

        self.report = None  # none of an earlier call's, should this one raise
        model, _ = util.invoke_if_callable(self._model)
        dropped = isinstance(model, onnx.ModelProto) and not model.metadata_props
        if dropped and self._model is not model:
            with_metadata(model, source_metadata(self._model))
        try:
            reduced, self.report = reduce(model, self.data, self.options)
        finally:  # the model given is left as it was (a loader may hand it out again)
            if dropped:
                del model.metadata_props[:]
        return reduced


def source_metadata(loader: Any) -> dict[str, str]:
    """The metadata_props of the model a Polygraphy loader chain starts from: an OnnxFromPath's
    file (read without its external data) or a ModelProto; none where the chain starts from
    anything else. Each Polygraphy loader that transforms a model holds it as `_model`."""
    while isinstance(loader, BaseLoader):
        if isinstance(loader, OnnxFromPath):
            return metadata(onnx.load(loader.path, load_external_data=False))
        loader = getattr(loader, "_model", None)
    return metadata(loader) if isinstance(loader, onnx.ModelProto) else {}
