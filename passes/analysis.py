"""Macroblock analysis: per-layer MACs, parameters and receptive fields.

A macroblock is the set of Conv layers whose outputs share one spatial size
and reach each other through tensors of that size (docs/design.md). Its base is
the layers whose receptive field still fits: under the global reading (the
paper's, as far as its numbers show) a layer's receptive field in input-image
pixels against the input image size; under the local reading, a receptive
field counted in the macroblock's own pixels against its own map size. Layers
past the base see the whole image (or map): that is where MBS looks for
redundancy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .base import Pass, PassResult
from .channel_handlers import REDUCES
from .domains import COUNTED_CONVS, FUSED_GEMM, LAYER_OPS, is_onnxruntime_op, op_id
from .errors import BadInputError, option
from .graph import (
    GraphIndex,
    attributes,
    channels_last,
    nested_nodes,
    structure_key,
    subgraphs,
)
from .load import indexed
from .parameters import count_parameters

POOL_OPS = ("MaxPool", "AveragePool", "LpPool")
GLOBAL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
# Ops whose output may have another spatial size than their input: only tensors of
# equal size are joined into one macroblock across them.
RESAMPLING_OPS = (*COUNTED_CONVS, *POOL_OPS, "Resize", "Upsample", "DepthToSpace", "SpaceToDepth")
# Ops that keep the resolution even though the size changes by a border.
BORDER_OPS = ("Pad",)
READINGS = ("global", "local")
DEFAULT_RECEPTIVE_FIELD = "global"  # chosen by the paper's numbers: bench/paper_table.py
# Why `uncounted` ops' MACs are not counted, by kind (ModelAnalysis.uncounted_text).
OTHER_DOMAIN_WHY = (
    "ops of another domain than ONNX's, named like ONNX ops or onnxruntime's fused ones; their "
    "weights count as parameters"
)
NESTED_TAIL = ")"  # "Conv 'name' (inside If 'if')": an op of a subgraph
NESTED_WHY = (
    "inside If/Loop/Scan subgraphs: their MACs depend on the branch taken or the trip count; "
    "their weights count as parameters"
)
# Input pixels per axis one output pixel of Resize/Upsample reads, by mode.
RESIZE_TAPS = {"nearest": 1, "linear": 2, "bilinear": 2, "cubic": 4}


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
    local_receptive_field: float  # in the macroblock's own pixels; inf after global pooling
    global_receptive_field: float  # in input-image pixels (largest axis); inf after global pooling
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
    total_macs: int  # Conv family plus Gemm/MatMul/Einsum
    other_macs: dict[str, int] = field(default_factory=dict)  # Gemm/MatMul/Einsum -> MACs
    receptive_field: str = DEFAULT_RECEPTIVE_FIELD  # the reading the bases follow (READINGS)
    image_size: int = 0  # the largest spatial dim of the graph input: the global limit
    batch: int = 1  # the batch the MACs count: the analysed image input's (docs/mbs.md)
    # "domain:op_type 'name'" of each op of another domain named like a counted op: its
    # MACs and layer are not in the counts (its parameters are, as read initializers)
    uncounted: list[str] = field(default_factory=list)
    # `structure_key` of the model analysed ("" for one built by hand: not checked)
    model_key: str = field(default="", repr=False, compare=False)

    def uncounted_text(self) -> str:
        """`uncounted` in words, "" if none: how many of each op, and why."""
        if not self.uncounted:
            return ""
        nested = [x for x in self.uncounted if x.endswith(NESTED_TAIL)]
        parts = []
        for names, why in (
            ([x for x in self.uncounted if x not in nested], OTHER_DOMAIN_WHY),
            (nested, NESTED_WHY),
        ):
            kinds = Counter(x.split(" ", 1)[0] for x in names)
            if kinds:
                parts.append(f"{', '.join(f'{n} {op}' for op, n in kinds.items())} ({why})")
        return f"MACs not counted: {'; '.join(parts)}"

    def layer(self, name: str) -> ConvLayer:
        return next(layer for layer in self.layers if layer.name == name)

    def check_model(self, model: onnx.ModelProto) -> None:
        """Refuse a model other than the one analysed: its layers, macroblocks and MACs
        are that model's."""
        if self.model_key and structure_key(model) != self.model_key:
            raise ValueError(
                "this ModelAnalysis was computed on another model; run analyze_model on the "
                "model you analyse"
            )

    def to_dict(self) -> dict:
        def rf(value: float) -> float | str:
            return "global" if math.isinf(value) else value

        return {
            "receptive_field": self.receptive_field,
            "image_size": self.image_size,
            "batch": self.batch,
            "macroblocks": [asdict(m) for m in self.macroblocks],
            "layers": [
                {
                    **asdict(x),
                    "local_receptive_field": rf(x.local_receptive_field),
                    "global_receptive_field": rf(x.global_receptive_field),
                }
                for x in self.layers
            ],
            "totals": {"params": self.total_params, "macs": self.total_macs},
            **({"uncounted": self.uncounted} if self.uncounted else {}),
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


Axes = tuple[float, ...]  # one entry per spatial dim


def _window(attrs: dict, weight_shape: tuple[int, ...] | None) -> tuple[Axes, Axes]:
    """Per spatial dim: the effective kernel dilation*(K-1)+1 and the stride of a conv or pool
    (`attrs`: its attributes)."""
    kernel = tuple(attrs.get("kernel_shape") or (weight_shape[2:] if weight_shape else ()))
    kernel = kernel or (1,)
    dilation = _per_dim(attrs.get("dilations"), 1, len(kernel))
    stride = _per_dim(attrs.get("strides"), 1, len(kernel))
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation)), stride


def _fit(values: Axes, rank: int) -> Axes:
    """The last `rank` entries, padded in front with 1 (a reshape between spatial ranks,
    such as a channel shuffle's 5-D view, keeps the trailing dims)."""
    return (1.0,) * (rank - len(values)) + tuple(values[-rank:])


def _grow(rf: Axes, step: Axes, reach, scale) -> tuple[Axes, Axes]:
    """A window reaching `reach` more pixels of its input per dim, then rescaling the step.
    (A field after global pooling is infinite, and stays so.)"""
    return (
        tuple(f + r * j if r else f for f, r, j in zip(rf, reach, step)),
        tuple(j * c for j, c in zip(step, scale)),
    )


def _global_step(
    node: onnx.NodeProto,
    out: str,
    inputs: list[str],
    resolution: dict[str, tuple[int, ...]],
    field_of: dict[str, tuple[Axes, Axes]],
    window: tuple[Axes, Axes] | None,
    steps: list[int] | None = None,
    pooled: tuple[int, ...] = (),
) -> tuple[Axes, Axes]:
    """(receptive field, step) of `out` per spatial dim, both in input-image pixels;
    `window` is the node's `_window` if it is a conv or pool, `steps` the Slice's steps per
    axis (`_slice_steps`) if it is one that starts a macroblock, `pooled` the spatial dims
    a reduction pools whole (`_pooled_dims`).

    The step is how many input pixels one pixel of the tensor moves by. A window of
    effective size k and stride s adds (k-1)*step and multiplies the step by s;
    ConvTranspose and upsampling divide the step (an output pixel of a stride-s
    ConvTranspose reads ceil(k/s) input pixels); global pooling sees everything, a
    reduction over some spatial dims all of those. A strided
    Slice, x[:, :, ::s, ::s], is a 1x1 window of stride s: the field stays, the step grows.
    Joins take the largest field among inputs of the output's own size: a 1x1
    gate broadcast over a map (squeeze-and-excitation) scales channels, it adds no
    spatial context, and is ignored, as in the local reading.
    """
    op = op_id(node)
    size = resolution[out]
    rank = len(size)
    inf = (math.inf,) * rank
    if op in GLOBAL_OPS:
        return inf, inf
    if not inputs:
        return (1.0,) * rank, (1.0,) * rank
    x = node.input[0]
    if pooled and x in field_of:
        return tuple(
            tuple(math.inf if a in pooled else v for a, v in enumerate(_fit(values, rank)))
            for values in field_of[x]
        )
    if op in (*COUNTED_CONVS, *POOL_OPS) and x in field_of:
        (rf, step), (k, s) = field_of[x], window
        rf, step = _fit(rf, len(k)), _fit(step, len(k))
        if op == "ConvTranspose":
            return _grow(rf, step, [math.ceil(a / b) - 1 for a, b in zip(k, s)], [1 / b for b in s])
        return _grow(rf, step, [a - 1 for a in k], s)
    if steps is not None and x in field_of and len(steps) == len(field_of[x][1]) + 2:
        rf, step = field_of[x]
        return _grow(rf, step, [0] * len(step), steps[2:])
    if op in ("Resize", "Upsample", "DepthToSpace", "SpaceToDepth") and x in field_of:
        before = resolution[x]
        rf, step = (_fit(v, len(before)) for v in field_of[x])
        mode = attributes(node).get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        taps = RESIZE_TAPS.get(mode, 1) if op in ("Resize", "Upsample") else 1
        if op == "SpaceToDepth":
            taps = int(attributes(node)["blocksize"])
        scale = [b / a for a, b in zip(_fit(size, len(before)), before)]
        return _grow(rf, step, [taps - 1] * len(before), scale)
    same = [t for t in inputs if resolution[t] == size] or [
        t for t in inputs if not all(d == 1 for d in resolution[t]) and op not in RESAMPLING_OPS
    ]
    if len(same) == 1:  # most ops: the field of their one map input
        return _fit(field_of[same[0]][0], rank), _fit(field_of[same[0]][1], rank)
    if same:
        fields = [_fit(field_of[t][0], rank) for t in same]
        return tuple(max(f[a] for f in fields) for a in range(rank)), _fit(
            field_of[same[0]][1], rank
        )
    if all(math.isinf(field_of[t][0][0]) for t in inputs):
        return inf, inf
    return (1.0,) * rank, (1.0,) * rank


def _starts_a_macroblock(
    node: onnx.NodeProto, size: tuple[int, ...], inputs: list[str], resolution: dict
) -> bool:
    """A Slice whose map output has another size than its map input: it subsamples the map
    (a CIFAR ResNet's option-A shortcut, x[:, :, ::2, ::2]) or crops it (a U-Net skip), so
    the convs after it make maps of another size, in a macroblock of their own."""
    return (
        op_id(node) == "Slice"
        and bool(inputs)
        and inputs[0] == node.input[0]
        and resolution[inputs[0]] != size
        and not all(d == 1 for d in resolution[inputs[0]])
    )


def _slice_steps(node: onnx.NodeProto, index: GraphIndex) -> list[int]:
    """|step| of a Slice per axis of its (4-D) input; 1 where it does not step or the step is
    not a constant (opset < 10 Slices have none)."""
    rank = len(index.shapes.get(node.input[0]) or ())
    steps = [1] * rank
    axes = index.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    given = index.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if given is None:
        return steps
    axes = range(len(given)) if axes is None else axes
    for axis, step in zip(np.ravel(axes), np.ravel(given)):
        steps[int(axis) % rank] = abs(int(step))
    return steps


LAYOUT_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze")
CHAIN_CELLS = 1 << 22  # the largest map whose pixels a chain is traced through


def space_to_depth_chains(index: GraphIndex) -> dict[int, onnx.NodeProto | None]:
    """Chains of views that compute SpaceToDepth or DepthToSpace: TResNet's stem and YOLO
    focus layers written as Reshape-Transpose-Reshape, nn.PixelUnshuffle as torch exports it
    (Unsqueeze, Reshape, Reshape, Transpose, Reshape, Squeeze), a pixel shuffle written as
    views. A chain runs from a map (N, C, H, W) through single-reader views of other ranks
    to a map (N, C*b*b, H/b, W/b) or (N, C/(b*b), H*b, W*b); it is one when tracing its
    pixels shows each output pixel read from its b x b block (or the pixel whose block it
    is). Maps the last node's position to the op it computes and the others' to None: the
    receptive-field trace and the macroblocks read the chain as that op instead of joining
    the maps of both sizes across its views."""
    found: dict[int, onnx.NodeProto | None] = {}
    position = {id(node): k for k, node in enumerate(index.nodes)}
    shapes = index.shapes
    for first in index.nodes:
        if op_id(first) not in LAYOUT_OPS or position[id(first)] in found:
            continue
        x = first.input[0]
        before = shapes.get(x)
        if before is None or len(before) != 4 or math.prod(before) > CHAIN_CELLS:
            continue
        chain, node = [first], first
        while len(chain) < 8:
            out = shapes.get(node.output[0])
            if out is None or len(out) == 4:
                break
            readers = index.consumers.get(node.output[0], [])
            if len(readers) != 1 or op_id(readers[0]) not in LAYOUT_OPS:
                break
            node = readers[0]
            chain.append(node)
        after = shapes.get(chain[-1].output[0])
        if len(chain) < 2 or after is None or len(after) != 4:
            continue
        made = _resampled_by_views(chain, tuple(before), tuple(after), shapes)
        if made is None:
            continue
        op, b = made
        for node in chain[:-1]:
            found[position[id(node)]] = None
        last = chain[-1]
        found[position[id(last)]] = onnx.helper.make_node(
            op, [x], [last.output[0]], name=last.name, blocksize=b
        )
    return found


def _resampled_by_views(
    chain: list[onnx.NodeProto], before: tuple, after: tuple, shapes: dict
) -> tuple[str, int] | None:
    """("SpaceToDepth" or "DepthToSpace", b) where the views of `chain` move b x b blocks of
    pixels into channels or out of them (any channel order), else None."""
    n, c, h, w = before
    if after[0] != n:
        return None
    if after[2] * 2 <= h and after[2] and h % after[2] == 0:
        op, b = "SpaceToDepth", h // after[2]
        wanted = (n, c * b * b, h // b, w // b)
    elif after[2] >= 2 * h and h and after[2] % h == 0:
        op, b = "DepthToSpace", after[2] // h
        wanted = (n, c // (b * b), h * b, w * b) if c % (b * b) == 0 else None
    else:
        return None
    if tuple(after) != wanted:
        return None
    cells = np.arange(math.prod(before)).reshape(before)
    for node in chain:
        if op_id(node) == "Transpose":
            perm = attributes(node).get("perm") or list(reversed(range(cells.ndim)))
            cells = cells.transpose(perm)
        else:
            cells = cells.reshape(shapes[node.output[0]])
    src_n, _, src_h, src_w = np.unravel_index(cells, before)
    at_n, _, at_h, at_w = np.indices(after, sparse=True)
    if op == "SpaceToDepth":
        same = (src_h // b == at_h) & (src_w // b == at_w)
    else:
        same = (src_h == at_h // b) & (src_w == at_w // b)
    return (op, b) if bool((same & (src_n == at_n)).all()) else None


def _pooled_dims(node: onnx.NodeProto, index: GraphIndex) -> tuple[int, ...]:
    """The spatial dims (0: the first after N, C) that a reduction keeping its rank pools
    whole; () for any other node, or axes only known at run time."""
    # A reduction over H and W with keepdims is global pooling written another way (torch's
    # dynamo exporter writes x.mean((2, 3), keepdim=True) as ReduceMean).
    if op_id(node) not in REDUCES:
        return ()
    attrs = attributes(node)
    rank = len(index.shapes.get(node.input[0]) or ())
    if not attrs.get("keepdims", 1) or rank < 3:
        return ()
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:  # an input from opset 18
        axes = index.constant(node.input[1])
        if axes is None:
            return ()
    if axes is None or not len(axes):
        if attrs.get("noop_with_empty_axes", 0):
            return ()
        axes = range(rank)  # every axis
    return tuple(sorted({int(a) % rank - 2 for a in np.ravel(axes) if int(a) % rank >= 2}))


def _holds_the_map(shape: tuple | None, maps: list[tuple], unlaid: set[str]) -> bool:
    """Whether a tensor of `shape`, without a map's layout, that a node makes from `maps`
    (the maps it reads) and `unlaid` (the tensors it reads that hold whole maps) holds whole
    maps: read from such a tensor, or a map's pixels folded into each sample's features,
    (N, ...) of rank < 3; (N*H*W, C), one row per pixel, keeps them apart."""
    if unlaid:
        return True
    return bool(maps and shape) and len(shape) < 3 and shape[0] == maps[0][0]


def _first_layers(nodes: Sequence[onnx.NodeProto], block_of: Mapping[str, str]) -> set[str]:
    """The convs that no other conv of their own macroblock feeds (`block_of`: conv name ->
    its macroblock): each macroblock's first layers, whatever order the graph lists its nodes
    in (a projection shortcut and the block's first conv both are)."""
    behind: dict[str, frozenset[str]] = {}  # tensor -> macroblocks whose convs it follows
    first: set[str] = set()
    for node in nodes:
        after = frozenset().union(*(behind.get(t, frozenset()) for t in node.input))
        block = block_of.get(node.name)
        if block is not None:
            if block not in after:
                first.add(node.name)
            after = after | {block}
        for t in node.output:
            behind[t] = after
    return first


def check_reading(receptive_field: str) -> str:
    """`receptive_field` if it names a reading, else BadInputError (before any work starts)."""
    if receptive_field not in READINGS:
        raise BadInputError(
            f"unknown {option('--receptive-field')} {receptive_field!r}: "
            f"use {' or '.join(READINGS)}"
        )
    return receptive_field


def analyze_model(
    model: onnx.ModelProto,
    receptive_field: str = DEFAULT_RECEPTIVE_FIELD,
    index: GraphIndex | None = None,
) -> ModelAnalysis:
    """Layers, macroblocks and totals of a model (normalised by `load_model` if it is not).

    `receptive_field` picks the reading the macroblock bases follow ("global":
    input-image pixels against the image size; "local": the macroblock's own
    pixels against its map size); every layer carries both values. `index` is
    `GraphIndex.build(model)` if the caller has it.
    """
    check_reading(receptive_field)
    model, index = indexed(model, index)
    shapes = index.shapes
    resolution: dict[str, tuple[int, int]] = {}  # tensor -> size, Pad borders removed
    rf: dict[str, float] = {}
    field_of: dict[str, tuple[Axes, Axes]] = {}  # tensor -> global (field, step) per dim
    blocks = _UnionFind()
    for name in index.graph_inputs:
        size = _spatial(shapes.get(name))
        if size and len(size) == 2 and channels_last(index, name):  # (N, H, W, C): tf2onnx's
            size = tuple(shapes[name][1:3])
        if size:
            resolution[name], rf[name] = size, 1.0
            field_of[name] = ((1.0,) * len(size), (1.0,) * len(size))
    image_size = max((max(resolution[n]) for n in resolution), default=0)
    batch = next((shapes[n][0] for n in resolution), 1)

    conv_attrs: dict[str, dict] = {}  # conv name -> attributes, read once
    # Tensors without a map's layout that hold every pixel of one per sample (x.mean((2, 3)),
    # a map flattened to (N, C*H*W)) and what is computed from them: a map made from one
    # (unsqueezed or reshaped back, a fully connected decoder's) sees everything.
    unlaid: set[str] = set()
    written_out = space_to_depth_chains(index)
    for position, node in enumerate(index.nodes):
        if position in written_out:  # read as the SpaceToDepth or DepthToSpace it computes
            node = written_out[position]
            if node is None:
                continue
        inputs = [t for t in node.input if t in resolution]
        outputs = []
        for t in node.output:
            size = _spatial(shapes.get(t))
            if size:
                outputs.append(t)
                resolution[t] = size
        if op_id(node) not in ("Shape", "Size"):
            unlaid.update(t for t in node.output if t not in resolution and _holds_the_map(
                shapes.get(t), [shapes[x] for x in inputs], unlaid.intersection(node.input)
            ))  # fmt: skip
        if not outputs:
            continue
        whole = not inputs and bool(unlaid.intersection(node.input))
        op = op_id(node)
        if op in BORDER_OPS and inputs:
            resolution[outputs[0]] = resolution[inputs[0]]
        weight_shape = shapes.get(node.input[1]) if op in COUNTED_CONVS else None
        window = None
        if op in (*COUNTED_CONVS, *POOL_OPS) and inputs:
            attrs = attributes(node)
            window = _window(attrs, weight_shape)
            if op in COUNTED_CONVS:
                conv_attrs[node.name] = attrs
        new_block = _starts_a_macroblock(node, resolution[outputs[0]], inputs, resolution)
        steps = _slice_steps(node, index) if new_block else None
        pooled = _pooled_dims(node, index) if inputs else ()
        for out in outputs:
            field_of[out] = (
                ((math.inf,) * len(resolution[out]),) * 2
                if whole
                else _global_step(node, out, inputs, resolution, field_of, window, steps, pooled)
            )
        # Receptive field of each output, local to its macroblock.
        for out in outputs:
            same = [t for t in inputs if resolution[t] == resolution[out]]
            if window is not None:
                k_eff = max(window[0])
                if same:
                    rf[out] = rf[same[0]] + (k_eff - 1)
                elif op == "ConvTranspose":
                    rf[out] = 1.0
                else:
                    stride = max(window[1])
                    rf[out] = 1.0 + (k_eff - 1) / stride
            elif op in GLOBAL_OPS or pooled or whole:
                rf[out] = math.inf
            elif same:
                rf[out] = max(rf[t] for t in same)
            elif (
                inputs
                and not any(all(d == 1 for d in resolution[t]) for t in inputs)
                and op not in RESAMPLING_OPS
                and not new_block
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
        elif new_block:
            for t in outputs[1:]:
                blocks.union(outputs[0], t)
        else:
            for t in tensors[1:]:
                blocks.union(tensors[0], t)

    convs = [n for n in index.nodes if op_id(n) in COUNTED_CONVS and n.output[0] in resolution]

    # Group layers by macroblock, ordered by where each macroblock's first tensor
    # appears (a stride-2 branch may run before the convs of the resolution it leaves).
    first_at: dict[str, int] = {}  # tensor -> first node it appears in (dict order: by it)
    for position, node in enumerate(index.nodes):
        for t in (*node.input, *node.output):
            if t in resolution:
                first_at.setdefault(t, position)
    first_seen: dict[str, int] = {}
    for t, position in first_at.items():
        first_seen.setdefault(blocks.find(t), position)
    by_root: dict[str, list[onnx.NodeProto]] = {}
    for node in convs:
        by_root.setdefault(blocks.find(node.output[0]), []).append(node)
    roots = {r: by_root[r] for r in sorted(by_root, key=lambda r: first_seen.get(r, -1))}

    first = _first_layers(index.nodes, {n.name: r for r, ns in roots.items() for n in ns})
    layers: list[ConvLayer] = []
    blocks_layers: list[list[ConvLayer]] = []
    unsized: list[Macroblock] = []  # params counted once all layers are known
    for m, nodes in enumerate(roots.values()):
        sizes = Counter(resolution[n.output[0]] for n in nodes)
        block_res = max(sizes, key=lambda s: (sizes[s], s))
        block_layers = [
            _conv_layer(n, conv_attrs.get(n.name), index, rf, field_of, m) for n in nodes
        ]
        if receptive_field == "global":
            limit, key = image_size, "global_receptive_field"
        else:
            limit, key = max(block_res), "local_receptive_field"
        base = [x.name for x in block_layers if x.name in first or getattr(x, key) <= limit]
        layers.extend(block_layers)
        blocks_layers.append(block_layers)
        unsized.append(
            Macroblock(
                index=m,
                resolution=block_res,
                layers=[x.name for x in block_layers],
                base_layers=base,
                params=0,
                macs=sum(x.macs for x in block_layers),
            )
        )
    once = params_once(layers)
    macroblocks = [
        replace(block, params=sum(once[x.name] for x in block_layers))
        for block, block_layers in zip(unsized, blocks_layers)
    ]
    other = _matmul_macs(index)
    return ModelAnalysis(
        layers=layers,
        macroblocks=macroblocks,
        total_params=count_parameters(model),
        total_macs=sum(x.macs for x in layers) + sum(other.values()),
        other_macs=other,
        receptive_field=receptive_field,
        uncounted=uncounted_ops(index),
        image_size=image_size,
        batch=batch,
        model_key=structure_key(model),
    )


def uncounted_ops(index: GraphIndex) -> list[str]:
    """Ops of another domain than ONNX's named like an op the analysis counts (a
    com.microsoft.nchwc Conv), or onnxruntime ops whose names say they multiply-add (its
    FusedMatMul, NhwcConv, Attention), counted as nothing: "domain:op_type 'name'" each; and
    any such op or counted one inside an If, Loop or Scan subgraph, whose MACs depend on the
    branch taken or the trip count: "op_type 'name' (inside If 'name')"."""
    outer = [
        f"{op_id(n)} '{n.name}'"
        for n in index.nodes
        if op_id(n) not in (*COUNTED_CONVS, *LAYER_OPS, FUSED_GEMM) and _multiplies(n)
    ]
    nested = [
        f"{op_id(n)} '{n.name}' (inside {node.op_type} '{node.name}')"
        for node in index.nodes
        for n in nested_nodes(*subgraphs(node))
        if _multiplies(n)  # every counted op is one too
    ]
    return outer + nested


def _multiplies(n: onnx.NodeProto) -> bool:
    """An op named like a counted one, or an onnxruntime op whose name says it multiply-adds."""
    return n.op_type in LAYER_OPS or (
        is_onnxruntime_op(n) and any(x in n.op_type for x in (*LAYER_OPS, "Attention"))
    )


def params_once(layers: Sequence[ConvLayer]) -> dict[str, int]:
    """Each layer's parameters, less the weight or bias a layer before it reads too: a
    shared weight (a siamese tower applied to two inputs) is counted once, in the first
    layer reading it, so macroblocks' params add up to the model's conv parameters."""
    seen: set[str] = set()
    once: dict[str, int] = {}
    for x in layers:
        bias = x.out_channels if x.bias else 0
        once[x.name] = 0
        for name, size in ((x.weight, x.params - bias), (x.bias, bias)):
            if name and name not in seen:
                seen.add(name)
                once[x.name] += size
    return once


def shares_weights(layers: Sequence[ConvLayer]) -> bool:
    """Whether two layers read one weight: the tables then count it once (`params_once`)."""
    once = params_once(layers)
    return any(once[x.name] < x.params for x in layers)


def _conv_layer(node, attrs, index: GraphIndex, rf, field_of, macroblock: int) -> ConvLayer:
    attrs = attributes(node) if attrs is None else attrs
    kernel = tuple(index.shapes[node.input[1]][2:])
    rank = len(kernel)
    return ConvLayer(
        name=node.name,
        op_type=op_id(node),
        input=node.input[0],
        output=node.output[0],
        **_conv_sizes(node, attrs, index.shapes),
        kernel=kernel,
        stride=_per_dim(attrs.get("strides"), 1, rank),
        dilation=_per_dim(attrs.get("dilations"), 1, rank),
        local_receptive_field=rf[node.output[0]],
        global_receptive_field=max(field_of[node.output[0]][0]),
        macroblock=macroblock,
    )


def _conv_sizes(node: onnx.NodeProto, attrs: dict, shapes: dict) -> dict:
    """What a conv's channel counts decide: channels, groups, map sizes, MACs, parameters,
    and the weights it reads (a shared weight cut for each use is written as copies)."""
    weight_shape = shapes[node.input[1]]
    in_shape, out_shape = shapes[node.input[0]], shapes[node.output[0]]
    groups = int(attrs.get("group", 1))
    kernel = weight_shape[2:]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    params = math.prod(weight_shape) + (math.prod(shapes[bias]) if bias else 0)
    cin, cout = in_shape[1], out_shape[1]
    if op_id(node) != "ConvTranspose":
        macs = out_shape[0] * math.prod(out_shape[2:]) * math.prod(kernel)
        macs *= (cin // groups) * cout
    else:  # ConvTranspose: every input pixel scatters a kernel
        macs = in_shape[0] * math.prod(in_shape[2:]) * math.prod(kernel)
        macs *= cin * (cout // groups)
    return {
        "weight": node.input[1],
        "bias": bias,
        "in_channels": cin,
        "out_channels": cout,
        "groups": groups,
        "input_size": tuple(in_shape[2:]),
        "output_size": tuple(out_shape[2:]),
        "macs": int(macs),
        "params": params,
    }


def resized(
    before: ModelAnalysis, model: onnx.ModelProto, index: GraphIndex | None = None
) -> ModelAnalysis:
    """`before`, the analysis of a model, for `model`: the same graph with other channel
    counts (what shrink writes). Receptive fields and macroblocks do not depend on
    channel counts and are kept; every count is read again from `model`, so what the
    report says is what was written. Analysing ResNet-1202 again from scratch cost
    0.3 s of its 2 s `reduce` (issue 23). A model whose convs are not `before`'s
    is analysed from scratch."""
    model, index = indexed(model, index)
    convs = {n.name: n for n in index.nodes if op_id(n) in COUNTED_CONVS}
    if sorted(convs) != sorted(layer.name for layer in before.layers):
        return analyze_model(model, before.receptive_field, index)
    layers = []
    for layer in before.layers:
        node = convs[layer.name]
        layers.append(replace(layer, **_conv_sizes(node, attributes(node), index.shapes)))
    by_name = {layer.name: layer for layer in layers}
    once = params_once(layers)
    macroblocks = [
        replace(
            block,
            params=sum(once[x] for x in block.layers),
            macs=sum(by_name[x].macs for x in block.layers),
        )
        for block in before.macroblocks
    ]
    other = _matmul_macs(index)
    return replace(
        before,
        layers=layers,
        macroblocks=macroblocks,
        total_params=count_parameters(model),
        total_macs=sum(x.macs for x in layers) + sum(other.values()),
        other_macs=other,
        model_key=structure_key(model),
    )


def _matmul_macs(index: GraphIndex) -> dict[str, int]:
    macs: dict[str, int] = {}
    for node in index.nodes:
        if op_id(node) not in ("Gemm", FUSED_GEMM, "MatMul", "Einsum") or len(node.input) < 2:
            continue
        a, b = index.shapes.get(node.input[0]), index.shapes.get(node.input[1])
        if a is None or b is None:
            continue
        if op_id(node) == "Einsum":
            if len(node.input) == 2 and (count := _einsum_macs(node, a, b)) is not None:
                macs[node.name] = count
        elif op_id(node) in ("Gemm", FUSED_GEMM):
            attrs = attributes(node)
            m = a[1] if attrs.get("transA") else a[0]
            k = a[0] if attrs.get("transA") else a[1]
            n = b[0] if attrs.get("transB") else b[1]
            macs[node.name] = int(m * k * n)
        else:  # one multiply-add per output element and entry of the shared axis
            out = index.shapes.get(node.output[0])
            if out is None:  # without its shape: a's rows times b's columns
                out = (*a[:-1], b[-1] if len(b) > 1 else 1)
            macs[node.name] = int(math.prod(out) * a[-1])
    return macs


def _einsum_macs(node: onnx.NodeProto, a: tuple, b: tuple) -> int | None:
    """A two-operand Einsum's multiply-adds: one per combination of the sizes its letters
    (and broadcast `...` dims) take, as a MatMul's are; None where the shapes do not fit the
    equation."""
    equation = attributes(node).get("equation", b"")
    if isinstance(equation, bytes):
        equation = equation.decode("utf-8", "replace")
    equation = equation.replace(" ", "")
    terms = equation.split("->")[0].split(",")
    if len(terms) != 2:
        return None
    sizes: dict[str, int] = {}
    ellipsis: list[int] = []
    for term, shape in zip(terms, (a, b)):
        letters = term.replace("...", "")
        extra = len(shape) - len(letters)
        if extra < 0 or (extra and "..." not in term):
            return None
        head = term.index("...") if "..." in term else len(letters)
        dims = list(shape[:head]) + list(shape[head + extra :])
        for letter, dim in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), int(dim))
        own = list(shape[head : head + extra])  # broadcast from the right, as numpy does
        ellipsis = [max(x, y) for x, y in zip([1] * (len(own) - len(ellipsis)) + ellipsis,
                                              [1] * (len(ellipsis) - len(own)) + own)]  # fmt: skip
    return int(math.prod(sizes.values()) * math.prod(ellipsis))


class FindMacroblocks(Pass):
    """Analysis pass: adds `macroblocks` (a ModelAnalysis) to the result."""

    name = "macroblocks"

    def __init__(self, receptive_field: str = DEFAULT_RECEPTIVE_FIELD) -> None:
        self.receptive_field = receptive_field

    def call(self, model: onnx.ModelProto) -> PassResult:
        analysis = analyze_model(model, self.receptive_field)
        return PassResult(model, False, {self.name: analysis})
