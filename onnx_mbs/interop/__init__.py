"""Interop with deployment toolchains (optional extra: `pip install onnx-mbs[interop]`).

    onnx_mbs.interop.ir_pass         OnnxMbsPass: any onnx-mbs pass inside onnx-ir's
                                     PassManager (the torch exporter's optimizer)
    onnx_mbs.interop.polygraphy      ReduceOnnx: a Polygraphy loader between
                                     OnnxFromPath and SaveOnnx
    onnx_mbs.interop.graphsurgeon    to_model: an onnx-graphsurgeon Graph as a
                                     ModelProto; `reduce` accepts a Graph directly
    onnx_mbs.interop.olive           MacroblockScaling: a Microsoft Olive pass, and
                                     package_config() that registers it (extra: olive)

Each submodule imports its package; this one imports none, so `as_model` can
recognise a graphsurgeon Graph without making onnx-graphsurgeon a dependency.
"""

from __future__ import annotations

from typing import Any


def as_model(model: Any, preprocessing_given: bool = False) -> Any:
    """`model` as something `read_model` takes: an onnx-graphsurgeon Graph is exported
    (with a warning about the metadata it dropped, unless the caller gave the mean and std
    it held); anything else is returned as is."""
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        from .graphsurgeon import to_model

        return to_model(model, warn=not preprocessing_given)
    return model


def missing(package: str, error: Exception, extra: str = "interop") -> ImportError:
    """The error to raise when an optional interop package is not installed, or fails to
    import (`error` names why)."""
    from onnx_mbs.passes.errors import missing_extra

    return missing_extra("onnx_mbs.interop", package, extra, error)
