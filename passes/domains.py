"""Which op a node runs. ONNX names an op by (domain, op_type), "" and "ai.onnx" being the
one default domain; an op of another domain that shares an ONNX op's name is not that op
(onnxruntime's com.microsoft.nchwc Conv reads channels blocked in eights; a my.ops Relu
may compute anything). Every place that gives a node ONNX's meaning asks `op_id`."""

from __future__ import annotations

import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")
# onnxruntime's extended optimisations write a Conv with its activation (and a residual
# Add) fused as this op: X, W, B as Conv's, the same attributes, the same output size.
FUSED_CONV = "com.microsoft:FusedConv"
# And a Gemm with its activation fused: A, B, C and the attributes as Gemm's.
FUSED_GEMM = "com.microsoft:FusedGemm"
# The ONNX op each of those fuses: its output has that op's shape.
FUSED = {FUSED_CONV: "Conv", FUSED_GEMM: "Gemm"}
# The activations onnxruntime runs fused into each of those ops, each elementwise (so a kept
# channel computes what it did), with their parameters in order: the attributes of the ONNX
# op of that name. FusedConv's come from onnxruntime's GetFusedActivationAttr
# (contrib_ops/cpu/fused_activation.cc), which requires them as `activation_params`;
# FusedGemm's from its elementwise functors (ElementWiseRangedTransform), which have no
# Clip and read them from `activation_alpha` and `activation_beta`.
_CONV_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "Relu": (),
    "Tanh": (),
    "Sigmoid": (),
    "LeakyRelu": ("alpha",),
    "Clip": ("min", "max"),
    "HardSigmoid": ("alpha", "beta"),
}
FUSED_ACTIVATIONS = {
    FUSED_CONV: _CONV_ACTIVATIONS,
    FUSED_GEMM: {k: v for k, v in _CONV_ACTIVATIONS.items() if k != "Clip"},
}
# The ops counted as conv layers (`op_id`s): their output and weight shapes must be static.
# FusedConv is followed as the Conv it fuses (channel_handlers._fused) and sized as it
# (custom_ops.as_fused_ops).
COUNTED_CONVS = ("Conv", "ConvTranspose", FUSED_CONV)
# The ONNX ops whose multiply-adds analysis.py counts (the convs and the matrix products):
# a local function holding one is inlined (functions.py); an op of another domain named so
# is listed as not counted (analysis.uncounted_ops).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")


def is_default(domain: str) -> bool:
    """Whether `domain` is ONNX's own."""
    return domain in DEFAULT_DOMAINS


def is_onnxruntime_op(node: onnx.NodeProto) -> bool:
    """An op of onnxruntime's own domains (com.microsoft, com.microsoft.nchwc: what its
    optimisations write), which onnxruntime runs and ONNX's shape inference cannot size."""
    return node.domain == "com.microsoft" or node.domain.startswith("com.microsoft.")


# How to give onnx-mbs a model without the ops onnxruntime's optimisations above basic write.
SAVE_AT_BASIC = "save the model at ORT_ENABLE_BASIC (or give the original)"
# How to give onnx-mbs a model its onnxruntime ops would keep whole.
ONNXRUNTIME_ADVICE = (
    f"onnxruntime's optimisations above basic write them: {SAVE_AT_BASIC} and reduce that"
)


def canonical(domain: str) -> str:
    """`domain` in one spelling: "" for ONNX's own, however the model names it."""
    return "" if domain in DEFAULT_DOMAINS else domain


def opset_versions(model: onnx.ModelProto) -> dict[str, int]:
    """The opset version `model` imports for each domain, keyed by `canonical` domain: a model
    importing "ai.onnx" is read as one importing "" (the reference runtime, given "ai.onnx",
    knows no opset for default-domain nodes)."""
    return {canonical(o.domain): o.version for o in model.opset_import}


def opset_ids(versions: dict[str, int]) -> list[onnx.OperatorSetIdProto]:
    """`versions` (`opset_versions`) as a model's opset imports."""
    return [onnx.helper.make_opsetid(domain, version) for domain, version in versions.items()]


def op_id(node: onnx.NodeProto) -> str:
    """The op `node` runs, one string: its op_type in the default domain, "domain:op_type"
    in any other, which no ONNX op's name equals."""
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}"
