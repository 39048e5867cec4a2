"""Framework-neutral ONNX passes for Macroblock Scaling (onnx and numpy only).

Load -> analyse -> group channels -> cost -> choose -> shrink: each step is a
function returning a new model or a plain dataclass, and the transforms are
also Pass objects that compose in a Sequential.
"""

from .activations import Site, activation_sites, activation_tensors, site_tensors
from .analysis import (
    DEFAULT_RECEPTIVE_FIELD,
    READINGS,
    ConvLayer,
    FindMacroblocks,
    Macroblock,
    ModelAnalysis,
    analyze_model,
    check_reading,
    resized,
    resolution_text,
    shares_weights,
)
from .base import Pass, PassContractError, PassResult, Sequential
from .channel_groups import ChannelAnalysis, ChannelGroup, Member, analyze_channels
from .channel_walk import ChannelWalk, pinned_by, register_handler, unregister_handler
from .cost import CostModel
from .domains import ONNXRUNTIME_ADVICE, is_default, is_onnxruntime_op, op_id
from .errors import (
    BadInputError,
    MissingExtraError,
    QuantizedModelError,
    UninferredShapesError,
    command_line,
    option,
)
from .fold import FoldShapes, fold_shapes
from .functions import inline_layers
from .graph import GraphIndex, static_shape
from .importance import (
    CRITERIA,
    DEFAULT_CRITERION,
    ActivationImportance,
    BatchNormScaled,
    FilterNorm,
    Importance,
    ImportanceFactory,
    check_built_for,
    choose_channels,
    group_scores,
    register_importance,
    unregister_importance,
    weight_importance,
)
from .load import LoadedModel, NameNodes, Origin, load, load_model, set_io, static_batch, with_io_of
from .normalise import Normalise, normalise
from .parameters import count_parameters
from .read import check_model
from .shapes import FixInputShapes, InferShapes, parse_input_shape
from .shrink import EditContext, KeepPlan, ShrinkChannels, predicted_params, shrink_channels

__all__ = [
    "ONNXRUNTIME_ADVICE",
    "ActivationImportance",
    "BadInputError",
    "MissingExtraError",
    "BatchNormScaled",
    "CRITERIA",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelWalk",
    "ConvLayer",
    "CostModel",
    "DEFAULT_CRITERION",
    "DEFAULT_RECEPTIVE_FIELD",
    "EditContext",
    "FilterNorm",
    "FindMacroblocks",
    "FixInputShapes",
    "FoldShapes",
    "GraphIndex",
    "Importance",
    "ImportanceFactory",
    "InferShapes",
    "KeepPlan",
    "LoadedModel",
    "Macroblock",
    "Member",
    "ModelAnalysis",
    "NameNodes",
    "Normalise",
    "Origin",
    "Pass",
    "PassContractError",
    "PassResult",
    "QuantizedModelError",
    "UninferredShapesError",
    "READINGS",
    "Sequential",
    "Site",
    "ShrinkChannels",
    "activation_sites",
    "site_tensors",
    "activation_tensors",
    "analyze_channels",
    "analyze_model",
    "check_built_for",
    "check_model",
    "check_reading",
    "choose_channels",
    "command_line",
    "count_parameters",
    "fold_shapes",
    "group_scores",
    "inline_layers",
    "is_default",
    "is_onnxruntime_op",
    "load",
    "load_model",
    "normalise",
    "op_id",
    "option",
    "pinned_by",
    "parse_input_shape",
    "predicted_params",
    "register_handler",
    "register_importance",
    "resized",
    "resolution_text",
    "set_io",
    "shares_weights",
    "shrink_channels",
    "static_batch",
    "static_shape",
    "unregister_handler",
    "unregister_importance",
    "weight_importance",
    "with_io_of",
]
