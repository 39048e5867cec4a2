"""Macroblock Scaling for ONNX CNNs: ONNX in, smaller ONNX out.

    small, report = onnx_mbs.reduce("model.onnx", "calib/", budget="params=0.5")
    onnx_mbs.save_model(small, "small.onnx")

Names are imported on first use, so `import onnx_mbs.passes` stays free of
onnxruntime and `import onnx_mbs` does not need torch until `retrain` is used.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each is imported on first use
    from onnx_mbs.bridge import retrain
    from onnx_mbs.evaluate import evaluate
    from onnx_mbs.options import ReduceOptions
    from onnx_mbs.passes import BadInputError, analyze_model, load_model
    from onnx_mbs.pipeline import MacroblockScaling, ReduceReport, reduce
    from onnx_mbs.plan import Budget, WidthMap
    from onnx_mbs.save import save_model

_LAZY = {
    "BadInputError": "onnx_mbs.passes",
    "analyze_model": "onnx_mbs.passes",
    "load_model": "onnx_mbs.passes",
    "Budget": "onnx_mbs.plan",
    "WidthMap": "onnx_mbs.plan",
    "ReduceOptions": "onnx_mbs.options",
    "ReduceReport": "onnx_mbs.pipeline",
    "reduce": "onnx_mbs.pipeline",
    "MacroblockScaling": "onnx_mbs.pipeline",
    "save_model": "onnx_mbs.save",
    "evaluate": "onnx_mbs.evaluate",
    "retrain": "onnx_mbs.bridge",
}

__all__ = [
    "BadInputError",
    "Budget",
    "MacroblockScaling",
    "ReduceOptions",
    "ReduceReport",
    "WidthMap",
    "analyze_model",
    "evaluate",
    "load_model",
    "reduce",
    "retrain",
    "save_model",
]
assert sorted(__all__) == sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnx_mbs' has no attribute {name!r}")
