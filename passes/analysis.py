"""Macroblock analysis: per-layer MACs, parameters and local receptive fields.

A macroblock is the set of Conv layers whose outputs share one spatial size
and reach each other through tensors of that size (DESIGN.md). Its base is
the layers whose local receptive field still fits in the feature map; layers
past the base see the whole map, which is where MBS looks for redundancy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .base import Pass, PassResult
from .graph import GraphIndex, attributes, count_parameters
from .load import in_load_form

CONV_OPS = ("Conv", "ConvTranspose")
POOL_OPS = ("MaxPool", "AveragePool", "LpPool")
GLOBAL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
# Ops whose output may have another spatial size than their input: only tensors of
# equal size are joined into one macroblock across them.
RESAMPLING_OPS = (*CONV_OPS, *POOL_OPS, "Resize", "Upsample", "DepthToSpace", "SpaceToDepth")
# Ops that keep the resolution even though the size changes by a border.
BORDER_OPS = ("Pad",)


@dataclass(frozen=True)
class ConvLayer:
    name: str
    op_type: str
    input: str
    output: str
    weight: str
    bias: str | None
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]  # one entry per spatial dim (Conv1d: 1, Conv2d: 2, Conv3d: 3)
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    macs: int
    params: int
    receptive_field: float  # local, in the macroblock's own pixels; inf after global pooling
    macroblock: int

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels


@dataclass(frozen=True)
class Macroblock:
    index: int
    resolution: tuple[int, ...]  # (H, W); (L,) for Conv1d, (D, H, W) for Conv3d
    layers: list[str]
    base_layers: list[str]
    params: int
    macs: int


@dataclass
class ModelAnalysis:
    layers: list[ConvLayer]
    macroblocks: list[Macroblock]
    total_params: int
    total_macs: int  # Conv family plus Gemm/MatMul
    other_macs: dict[str, int] = field(default_factory=dict)  # Gemm/MatMul node -> MACs

    def layer(self, name: str) -> ConvLayer:
        return next(layer for layer in self.layers if layer.name == name)

    def to_dict(self) -> dict:
        def rf(value: float) -> float | str:
            return "global" if math.isinf(value) else value

        return {
            "macroblocks": [asdict(m) for m in self.macroblocks],
            "layers": [
                {**asdict(x), "receptive_field": rf(x.receptive_field)} for x in self.layers
            ],
            "totals": {"params": self.total_params, "macs": self.total_macs},
        }


def _per_dim(values, default: int, rank: int) -> tuple[int, ...]:
    return tuple(values) if values else (default,) * rank


def _spatial(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The spatial size of an N, C, ... tensor: (L,), (H, W) or (D, H, W)."""
    return tuple(shape[2:]) if shape is not None and len(shape) >= 3 else None


def resolution_text(size: tuple[int, ...]) -> str:
    return "x".join(map(str, size))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _kernel_effective(node: onnx.NodeProto, weight_shape: tuple[int, ...] | None) -> int:
    attrs = attributes(node)
    kernel = attrs.get("kernel_shape") or (weight_shape[2:] if weight_shape else [1])
    dilations = attrs.get("dilations") or [1] * len(kernel)
    return max(d * (k - 1) + 1 for k, d in zip(kernel, dilations))


def analyze_model(model: onnx.ModelProto) -> ModelAnalysis:
    """Layers, macroblocks and totals of a model (normalised by `load_model` if it is not)."""
    model = in_load_form(model)
    index = GraphIndex.build(model)
    shapes = index.shapes
    resolution: dict[str, tuple[int, int]] = {}  # tensor -> size, Pad borders removed
    rf: dict[str, float] = {}
    blocks = _UnionFind()
    for name in index.graph_inputs:
        size = _spatial(shapes.get(name))
        if size:
            resolution[name], rf[name] = size, 1.0

    for node in index.nodes:
        inputs = [t for t in node.input if t in resolution]
        outputs = [t for t in node.output if _spatial(shapes.get(t))]
        if not outputs:
            continue
        op = node.op_type
        for out in outputs:
            resolution[out] = _spatial(shapes[out])
        if op in BORDER_OPS and inputs:
            resolution[outputs[0]] = resolution[inputs[0]]
        weight_shape = shapes.get(node.input[1]) if op in CONV_OPS else None
        # Receptive field of each output, local to its macroblock.
        for out in outputs:
            same = [t for t in inputs if resolution[t] == resolution[out]]
            if op in (*CONV_OPS, *POOL_OPS) and inputs:
                k_eff = _kernel_effective(node, weight_shape)
                if same:
                    rf[out] = rf[same[0]] + (k_eff - 1)
                elif op == "ConvTranspose":
                    rf[out] = 1.0
                else:
                    stride = max(attributes(node).get("strides") or [1])
                    rf[out] = 1.0 + (k_eff - 1) / stride
            elif op in GLOBAL_OPS:
                rf[out] = math.inf
            elif same:
                rf[out] = max(rf[t] for t in same)
            elif (
                inputs
                and not any(all(d == 1 for d in resolution[t]) for t in inputs)
                and op not in RESAMPLING_OPS
            ):
                rf[out] = max(rf[t] for t in inputs)
            elif inputs and all(math.isinf(rf[t]) for t in inputs):
                rf[out] = math.inf
            else:
                rf[out] = 1.0
        # Macroblock membership: join tensors that share a resolution, and join
        # broadcast/global ops whole so SE gates stay with the map they gate.
        tensors = inputs + outputs
        if op in RESAMPLING_OPS:
            for a in tensors:
                for b in tensors:
                    if a < b and resolution[a] == resolution[b]:
                        blocks.union(a, b)
        else:
            for t in tensors[1:]:
                blocks.union(tensors[0], t)

    convs = [n for n in index.nodes if n.op_type in CONV_OPS and n.output[0] in resolution]

    # Group layers by macroblock, ordered by where each macroblock's first tensor
    # appears (a stride-2 branch may run before the convs of the resolution it leaves).
    first_seen: dict[str, int] = {}
    for position, node in enumerate(index.nodes):
        for t in (*node.input, *node.output):
            if t in resolution:
                first_seen.setdefault(blocks.find(t), position)
    by_root: dict[str, list[onnx.NodeProto]] = {}
    for node in convs:
        by_root.setdefault(blocks.find(node.output[0]), []).append(node)
    roots = {r: by_root[r] for r in sorted(by_root, key=lambda r: first_seen.get(r, -1))}

    layers: list[ConvLayer] = []
    macroblocks: list[Macroblock] = []
    for m, nodes in enumerate(roots.values()):
        sizes = Counter(resolution[n.output[0]] for n in nodes)
        block_res = max(sizes, key=lambda s: (sizes[s], s))
        block_layers = [_conv_layer(n, index, resolution, rf, m) for n in nodes]
        limit = max(block_res)
        base = [x.name for k, x in enumerate(block_layers) if k == 0 or x.receptive_field <= limit]
        layers.extend(block_layers)
        macroblocks.append(
            Macroblock(
                index=m,
                resolution=block_res,
                layers=[x.name for x in block_layers],
                base_layers=base,
                params=sum(x.params for x in block_layers),
                macs=sum(x.macs for x in block_layers),
            )
        )
    other = _matmul_macs(index)
    return ModelAnalysis(
        layers=layers,
        macroblocks=macroblocks,
        total_params=count_parameters(model),
        total_macs=sum(x.macs for x in layers) + sum(other.values()),
        other_macs=other,
    )


def _conv_layer(node, index: GraphIndex, resolution, rf, macroblock: int) -> ConvLayer:
    attrs = attributes(node)
    shapes = index.shapes
    weight_shape = shapes[node.input[1]]
    in_shape, out_shape = shapes[node.input[0]], shapes[node.output[0]]
    groups = int(attrs.get("group", 1))
    kernel = tuple(weight_shape[2:])
    rank = len(kernel)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    params = int(np.prod(weight_shape)) + (int(np.prod(shapes[bias])) if bias else 0)
    cin, cout = in_shape[1], out_shape[1]
    if node.op_type == "Conv":
        macs = out_shape[0] * math.prod(out_shape[2:]) * math.prod(kernel)
        macs *= (cin // groups) * cout
    else:  # ConvTranspose: every input pixel scatters a kernel
        macs = in_shape[0] * math.prod(in_shape[2:]) * math.prod(kernel)
        macs *= cin * (cout // groups)
    return ConvLayer(
        name=node.name,
        op_type=node.op_type,
        input=node.input[0],
        output=node.output[0],
        weight=node.input[1],
        bias=bias,
        in_channels=cin,
        out_channels=cout,
        groups=groups,
        kernel=kernel,
        stride=_per_dim(attrs.get("strides"), 1, rank),
        dilation=_per_dim(attrs.get("dilations"), 1, rank),
        input_size=tuple(in_shape[2:]),
        output_size=tuple(out_shape[2:]),
        macs=int(macs),
        params=params,
        receptive_field=rf[node.output[0]],
        macroblock=macroblock,
    )


def _matmul_macs(index: GraphIndex) -> dict[str, int]:
    macs: dict[str, int] = {}
    for node in index.nodes:
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        a, b = index.shapes.get(node.input[0]), index.shapes.get(node.input[1])
        if a is None or b is None:
            continue
        if node.op_type == "Gemm":
            attrs = attributes(node)
            m = a[1] if attrs.get("transA") else a[0]
            k = a[0] if attrs.get("transA") else a[1]
            n = b[0] if attrs.get("transB") else b[1]
            macs[node.name] = int(m * k * n)
        else:
            batch = int(np.prod(a[:-1])) if len(a) > 1 else 1
            macs[node.name] = int(batch * a[-1] * b[-1])
    return macs


class FindMacroblocks(Pass):
    """Analysis pass: adds `macroblocks` (a ModelAnalysis) to the result."""

    name = "macroblocks"

    def call(self, model: onnx.ModelProto) -> PassResult:
        return PassResult(model, False, {self.name: analyze_model(model)})
