"""A Polygraphy loader that reduces an ONNX model with MBS.

    from polygraphy.backend.onnx import OnnxFromPath, SaveOnnx
    from onnx_mbs.interop.polygraphy import ReduceOnnx

    SaveOnnx(ReduceOnnx(OnnxFromPath("model.onnx"), data="calib/", budget="params=0.5"),
             path="small.onnx")()

Like Polygraphy's own loaders it is lazy: nothing runs until it is called, and
`model` may be a ModelProto or a loader that returns one.
"""

from __future__ import annotations

from typing import Any

from onnx_mbs.data.replay import replayable
from onnx_mbs.options import ReduceOptions

from . import missing

try:
    from polygraphy import util
    from polygraphy.backend.base import BaseLoader
except ImportError as e:  # pragma: no cover - depends on the environment
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
        from onnx_mbs.pipeline import reduce

        self.report = None  # none of an earlier call's, should this one raise
        model, _ = util.invoke_if_callable(self._model)
        reduced, self.report = reduce(model, self.data, self.options)
        return reduced
