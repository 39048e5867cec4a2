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
from .cost import CostModel
from .errors import BadInputError
from .fold import FoldShapes, fold_shapes
from .graph import GraphIndex, count_parameters
from .importance import Importance, choose_channels, l1_importance
from .load import (
    FixInputShapes,
    InferShapes,
    LoadedModel,
    NameNodes,
    load,
    load_model,
    parse_input_shape,
    read_model,
    static_batch,
    with_io_of,
)
from .normalise import Normalise, normalise
from .shrink import KeepPlan, ShrinkChannels, predicted_params, shrink_channels

__all__ = [
    "BadInputError",
    "ChannelAnalysis",
    "ChannelGroup",
    "ConvLayer",
    "CostModel",
    "FindMacroblocks",
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
    "l1_importance",
    "load",
    "load_model",
    "normalise",
    "parse_input_shape",
    "predicted_params",
    "read_model",
    "shrink_channels",
    "static_batch",
    "with_io_of",
]
