"""Framework-neutral ONNX passes for Macroblock Scaling (onnx, onnx-graphsurgeon, numpy only)."""

from .analysis import ConvLayer, FindMacroblocks, Macroblock, ModelAnalysis, analyze_model
from .base import Pass, PassResult, Sequential
from .errors import BadInputError
from .graph import GraphIndex, count_parameters
from .load import FixInputShapes, InferShapes, NameNodes, load_model, parse_input_shape, read_model

__all__ = [
    "BadInputError",
    "ConvLayer",
    "FindMacroblocks",
    "FixInputShapes",
    "GraphIndex",
    "InferShapes",
    "Macroblock",
    "ModelAnalysis",
    "NameNodes",
    "Pass",
    "PassResult",
    "Sequential",
    "analyze_model",
    "count_parameters",
    "load_model",
    "parse_input_shape",
    "read_model",
]
