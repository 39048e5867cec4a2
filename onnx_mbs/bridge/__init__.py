"""PyTorch bridge: run an ONNX graph as a trainable module, retrain it, write the weights back.

This package (and the model zoo) are the only places in onnx-mbs that import torch. The base
install leaves torch out (the `torch` extra): importing this package without it raises a
MissingExtraError naming the extra, which the command line prints in one line (exit 2).
"""

from onnx_mbs.passes.errors import missing_extra, on_command_line

try:
    import torch  # noqa: F401  (checked here, before any module of the package needs it)
except ImportError as error:
    what = (
        "retrain (and reduce --recalibrate)"
        if on_command_line()
        else "onnx_mbs.bridge (retrain, recalibrate_model)"
    )
    raise missing_extra(what, "torch", "torch", error) from None

from onnx_mbs.bridge.module import OnnxModule, untie_initializers
from onnx_mbs.bridge.train import EpochStats, RetrainResult, recalibrate_model, retrain
from onnx_mbs.bridge.writeback import write_back

__all__ = [
    "EpochStats",
    "OnnxModule",
    "RetrainResult",
    "recalibrate_model",
    "retrain",
    "untie_initializers",
    "write_back",
]
