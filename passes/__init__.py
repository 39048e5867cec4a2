"""Framework-neutral ONNX passes for Macroblock Scaling (onnx and numpy only).

Load -> analyse -> group channels -> cost -> choose -> shrink: each step is a
function returning a new model or a plain dataclass, and the transforms are
also Pass objects that compose in a Sequential.
"""

from .activations import activation_tensors
from .analysis import ConvLayer, FindMacroblocks, Macroblock, ModelAnalysis, analyze_model
from .base import Pass, PassResult, Sequential
from .channel_groups import (
    ChannelAnalysis,
    ChannelGroup,
    Member,
    analyze_channels,
    find_channel_groups,
)
from .channel_walk import ChannelWalk, register_handler, unregister_handler
from .cost import CostModel
from .errors import BadInputError
from .fold import FoldShapes, fold_shapes
from .graph import GraphIndex, count_parameters
from .importance import (
    ActivationImportance,
    BatchNormScaled,
    FilterNorm,
    Importance,
    choose_channels,
    weight_importance,
)
from .load import LoadedModel, NameNodes, load, load_model, static_batch, with_io_of
from .normalise import Normalise, normalise
from .read import read_model
from .shapes import FixInputShapes, InferShapes, parse_input_shape
from .shrink import KeepPlan, ShrinkChannels, predicted_params, shrink_channels

__all__ = [
    "ActivationImportance",
    "BatchNormScaled",
    "BadInputError",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelWalk",
    "ConvLayer",
    "CostModel",
    "FindMacroblocks",
    "FilterNorm",
    "FixInputShapes",
    "FoldShapes",
    "GraphIndex",
    "Importance",
    "InferShapes",
    "KeepPlan",
    "LoadedModel",
    "Macroblock",
    "Member",
    "ModelAnalysis",
    "NameNodes",
    "Normalise",
    "Pass",
    "PassResult",
    "Sequential",
    "ShrinkChannels",
    "activation_tensors",
    "analyze_channels",
    "analyze_model",
    "choose_channels",
    "count_parameters",
    "find_channel_groups",
    "fold_shapes",
    "load",
    "load_model",
    "normalise",
    "parse_input_shape",
    "predicted_params",
    "read_model",
    "register_handler",
    "shrink_channels",
    "static_batch",
    "unregister_handler",
    "weight_importance",
    "with_io_of",
]
