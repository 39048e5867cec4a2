"""PyTorch bridge: run an ONNX graph as a trainable module, retrain it, write the weights back.

This package (and the model zoo) are the only places in onnx-mbs that import torch.
"""

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
