"""Attribute fuzzing of the PyTorch bridge against onnxruntime.

Each generator draws one small graph around one op from the attribute space the ONNX spec
allows at several opsets. For every graph onnxruntime accepts, the bridge must either refuse
it with one clear line (a BadInputError, when built or run) or compute what onnxruntime
computes; and a module written back untrained (`write_back`) must leave the model's outputs
as they were. A graph onnxruntime refuses is skipped: nothing to compare against.

The default run draws a few graphs per op (seeded); the `slow` marker runs a larger sweep.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.bridge import OnnxModule, untie_initializers, write_back
from onnx_mbs.bridge.ops import OPS
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
RTOL = 1e-5


@dataclass
class Case:
    """One graph: nodes, initializers, runtime inputs (name -> value), opset."""

    nodes: list[onnx.NodeProto]
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 17
    rtol: float = RTOL

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "fuzz",
            [
                helper.make_tensor_value_info(
                    n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)
                )
                for n, v in self.feeds.items()
            ],
            [onnx.ValueInfoProto(name=n) for n in self.outputs],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 7 if self.opset < 15 else 8
        return model

    def describe(self) -> str:
        nodes = "; ".join(
            f"{n.op_type}({', '.join(n.input)}) "
            + str({a.name: helper.get_attribute_value(a) for a in n.attribute})
            for n in self.nodes
        )
        shapes = {k: list(v.shape) for k, v in {**self.feeds, **self.inits}.items()}
        consts = {k: v.tolist() for k, v in self.inits.items() if v.size <= 8}
        return f"opset {self.opset}: {nodes} shapes {shapes} consts {consts}"


# ---------------------------------------------------------------------------
# Drawing helpers


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def chance(rng: np.random.Generator, p: float = 0.5) -> bool:
    return bool(rng.random() < p)


def ints(rng: np.random.Generator, lo: int, hi: int, n: int) -> list[int]:
    """n ints in [lo, hi]."""
    return [int(v) for v in rng.integers(lo, hi + 1, n)]


def node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> onnx.NodeProto:
    """A node named after its first output (unique in a graph); None attributes left out."""
    attrs = {k: v for k, v in attrs.items() if v is not None}
    outputs = outputs or ["y"]
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **attrs)


# ---------------------------------------------------------------------------
# Generators, one per op family


def _conv_case(
    rng: np.random.Generator,
    op: str,
    inputs: list[str],
    attrs: dict,
    inits: dict[str, np.ndarray],
    cin: int,
    sizes: list[int],
) -> Case:
    """One `op` node (Conv or ConvTranspose) on a batch of 1 or 2 with `cin` channels of
    `sizes`, at an opset from 7 to 22."""
    return Case(
        [node(op, inputs, **attrs)],
        {"x": normal(rng, int(rng.integers(1, 3)), cin, *sizes)},
        ["y"],
        inits,
        pick(rng, [7, 11, 17, 22]),
    )


def gen_conv(rng: np.random.Generator) -> Case:
    rank = pick(rng, [1, 2, 2, 2, 3])
    group = pick(rng, [1, 1, 2, 3])
    cin = group * int(rng.integers(1, 3))
    cout = group * int(rng.integers(1, 3))
    kernel = ints(rng, 1, 4, rank)
    strides = ints(rng, 1, 3, rank)
    dilations = ints(rng, 1, 2, rank)
    sizes = ints(rng, 5, 9, rank)
    auto_pad = pick(rng, ["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    pads = ints(rng, 0, 3, 2 * rank) if auto_pad == "NOTSET" and chance(rng, 0.8) else None
    inits = {"w": normal(rng, cout, cin // group, *kernel)}
    inputs = ["x", "w"]
    if chance(rng):
        inits["b"] = normal(rng, cout)
        inputs.append("b")
    attrs = dict(
        kernel_shape=kernel if chance(rng, 0.7) else None,
        strides=strides if chance(rng, 0.8) else None,
        dilations=dilations if chance(rng, 0.6) else None,
        group=group if group > 1 or chance(rng) else None,
        pads=pads,
        auto_pad=auto_pad if auto_pad != "NOTSET" or chance(rng, 0.2) else None,
    )
    return _conv_case(rng, "Conv", inputs, attrs, inits, cin, sizes)


def gen_conv_transpose(rng: np.random.Generator) -> Case:
    rank = pick(rng, [1, 2, 2, 2, 3])
    group = pick(rng, [1, 1, 2])
    cin = group * int(rng.integers(1, 3))
    cout_g = int(rng.integers(1, 3))
    kernel = ints(rng, 1, 4, rank)
    strides = ints(rng, 1, 3, rank)
    dilations = ints(rng, 1, 2, rank) if chance(rng, 0.5) else [1] * rank
    sizes = ints(rng, 2, 5, rank)
    out_pad = (
        [int(rng.integers(0, max(s, d))) for s, d in zip(strides, dilations)]
        if chance(rng, 0.4)
        else None
    )
    auto_pad = pick(rng, ["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    pads = ints(rng, 0, 2, 2 * rank) if auto_pad == "NOTSET" and chance(rng, 0.7) else None
    output_shape = None
    if chance(rng, 0.3):
        natural = [
            s * (i - 1) + (op or 0) + (k - 1) * d + 1
            for s, i, op, k, d in zip(strides, sizes, out_pad or [0] * rank, kernel, dilations)
        ]
        output_shape = [max(1, n + int(rng.integers(-3, 2))) for n in natural]
    inits = {"w": normal(rng, cin, cout_g, *kernel)}
    inputs = ["x", "w"]
    if chance(rng):
        inits["b"] = normal(rng, cout_g * group)
        inputs.append("b")
    attrs = dict(
        kernel_shape=kernel if chance(rng, 0.7) else None,
        strides=strides,
        dilations=dilations if any(d > 1 for d in dilations) else None,
        group=group if group > 1 else None,
        pads=pads,
        output_padding=out_pad,
        output_shape=output_shape,
        auto_pad=auto_pad if auto_pad != "NOTSET" else None,
    )
    return _conv_case(rng, "ConvTranspose", inputs, attrs, inits, cin, sizes)


def _pool_attrs(rng: np.random.Generator, rank: int, opset: int, dilate: bool) -> dict:
    kernel = ints(rng, 1, 4, rank)
    auto_pad = pick(rng, ["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    pads = (
        [int(rng.integers(0, k)) for k in kernel * 2]
        if auto_pad == "NOTSET" and chance(rng, 0.7)
        else None
    )
    attrs = dict(
        kernel_shape=kernel,
        strides=ints(rng, 1, 3, rank) if chance(rng, 0.8) else None,
        pads=pads,
        auto_pad=auto_pad if auto_pad != "NOTSET" else None,
    )
    if opset >= 10 and chance(rng):
        attrs["ceil_mode"] = int(rng.integers(0, 2))
    if dilate and chance(rng, 0.4):
        attrs["dilations"] = ints(rng, 1, 2, rank)
    return attrs


def gen_max_pool(rng: np.random.Generator) -> Case:
    opset = pick(rng, [8, 10, 12, 22])
    rank = pick(rng, [1, 2, 2, 3])
    attrs = _pool_attrs(rng, rank, opset, dilate=opset >= 10)
    if chance(rng, 0.3):
        attrs["storage_order"] = int(rng.integers(0, 2))
    # A dilated window wider than the input gives onnxruntime an empty output and torch an
    # error (retrain refuses that in one line): not drawn.
    dilations = attrs.get("dilations") or [1] * rank
    spans = [(k - 1) * d + 1 for k, d in zip(attrs["kernel_shape"], dilations)]
    sizes = [max(int(rng.integers(4, 10)), s) for s in spans]
    x = normal(rng, int(rng.integers(1, 3)), 2, *sizes)
    return Case([node("MaxPool", ["x"], **attrs)], {"x": x}, ["y"], opset=opset)


def gen_average_pool(rng: np.random.Generator) -> Case:
    opset = pick(rng, [7, 10, 11, 19, 22])
    rank = pick(rng, [1, 2, 2, 3])
    attrs = _pool_attrs(rng, rank, opset, dilate=opset >= 19)
    if chance(rng, 0.6):
        attrs["count_include_pad"] = int(rng.integers(0, 2))
    x = normal(rng, int(rng.integers(1, 3)), 2, *ints(rng, 4, 9, rank))
    return Case([node("AveragePool", ["x"], **attrs)], {"x": x}, ["y"], opset=opset)


def gen_global_pool(rng: np.random.Generator) -> Case:
    op = pick(rng, ["GlobalAveragePool", "GlobalMaxPool"])
    x = normal(rng, 2, 3, *ints(rng, 1, 5, pick(rng, [1, 2, 3])))
    return Case([node(op, ["x"])], {"x": x}, ["y"], opset=pick(rng, [7, 13, 22]))


_TRANSFORMS = [
    "half_pixel",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
    "tf_crop_and_resize",
    "half_pixel_symmetric",
]


def gen_resize(rng: np.random.Generator) -> Case:
    opset = pick(rng, [10, 11, 13, 18, 19])
    mode = pick(rng, ["nearest", "nearest", "linear", "linear", "cubic"])
    x = normal(rng, int(rng.integers(1, 3)), 2, *ints(rng, 2, 7, 2))
    spatial = [
        float(pick(rng, [0.5, 1 / 3, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4 / 7]))
        for _ in range(2)
    ]
    scales = f32(1, 1, *spatial)
    if opset < 11:
        return Case(
            [node("Resize", ["x", "scales"], mode=mode)], {"x": x}, ["y"], {"scales": scales}, opset
        )
    transforms = _TRANSFORMS if opset >= 19 else _TRANSFORMS[:-1]
    attrs = dict(
        mode=mode,
        coordinate_transformation_mode=pick(rng, transforms) if chance(rng, 0.8) else None,
        nearest_mode=pick(rng, ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
        if mode == "nearest" and chance(rng, 0.7)
        else None,
        cubic_coeff_a=float(pick(rng, [-0.5, -0.75])) if mode == "cubic" else None,
        exclude_outside=int(rng.integers(0, 2)) if chance(rng, 0.3) else None,
        extrapolation_value=1.5 if chance(rng, 0.2) else None,
    )
    inits: dict[str, np.ndarray] = {}
    roi_name = ""
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" or chance(rng, 0.3):
        inits["roi"] = f32(0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7)
        roi_name = "roi"
    elif opset < 13:
        inits["roi"] = f32()
        roi_name = "roi"
    axes = None
    if opset >= 18 and chance(rng, 0.3):
        axes = pick(rng, [[2, 3], [-1, -2], [3]])
        attrs["axes"] = axes
        if roi_name:
            inits["roi"] = f32(*([0.1] * len(axes)), *([0.8] * len(axes)))
        attrs["keep_aspect_ratio_policy"] = (
            pick(rng, ["stretch", "not_larger", "not_smaller"]) if chance(rng, 0.3) else None
        )
        if chance(rng, 0.2):
            attrs["antialias"] = 1
    if chance(rng):
        chosen = [a % 4 for a in axes] if axes else [0, 1, 2, 3]
        inits["scales"] = scales[chosen] if axes else scales
        names = ["x", roi_name, "scales"]
    else:
        full = [x.shape[0], x.shape[1], *[max(1, int(s * d)) for s, d in zip(spatial, x.shape[2:])]]
        if chance(rng, 0.3):
            full[3] = int(rng.integers(1, 9))
        chosen = [a % 4 for a in axes] if axes else [0, 1, 2, 3]
        inits["sizes"] = np.array([full[a] for a in chosen], dtype=np.int64)
        names = ["x", roi_name, "" if opset >= 13 else "scales", "sizes"]
        if opset < 13:
            inits["scales"] = f32()
    return Case([node("Resize", names, **attrs)], {"x": x}, ["y"], inits, opset)


def gen_resize_any_rank(rng: np.random.Generator) -> Case:
    """Resize of 1-D to 5-D tensors, the batch and channel axes scaled too."""
    rank = int(rng.integers(1, 6))
    x = normal(rng, *ints(rng, 1, 5, rank))
    scale = [float(pick(rng, [1.0, 1.0, 0.5, 2.0, 1.5, 0.75, 3.0])) for _ in range(rank)]
    mode = pick(rng, ["nearest", "linear"])
    attrs = dict(
        mode=mode,
        coordinate_transformation_mode=pick(rng, _TRANSFORMS[:5]) if chance(rng, 0.7) else None,
        nearest_mode=pick(rng, ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
        if mode == "nearest" and chance(rng)
        else None,
    )
    if chance(rng):
        return Case(
            [node("Resize", ["x", "", "scales"], **attrs)],
            {"x": x},
            ["y"],
            {"scales": f32(*scale)},
            13,
        )
    sizes = np.array([max(1, int(d * f)) for d, f in zip(x.shape, scale)], np.int64)
    return Case([node("Resize", ["x", "", "", "z"], **attrs)], {"x": x}, ["y"], {"z": sizes}, 13)


def gen_upsample(rng: np.random.Generator) -> Case:
    opset = pick(rng, [7, 9])
    mode = pick(rng, ["nearest", "linear"])
    x = normal(rng, 1, 2, *ints(rng, 2, 5, 2))
    scales = [1.0, 1.0, float(pick(rng, [1, 2, 3, 1.5])), float(pick(rng, [1, 2, 2.5]))]
    if opset == 7:
        return Case([node("Upsample", ["x"], mode=mode, scales=scales)], {"x": x}, ["y"], {}, 7)
    return Case(
        [node("Upsample", ["x", "scales"], mode=mode)], {"x": x}, ["y"], {"scales": f32(*scales)}, 9
    )


def gen_gemm(rng: np.random.Generator) -> Case:
    m, k, n = ints(rng, 1, 5, 3)
    ta, tb = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    a = normal(rng, *((k, m) if ta else (m, k)))
    b = normal(rng, *((n, k) if tb else (k, n)))
    c_shape = pick(rng, [None, (), (1,), (n,), (1, n), (m, 1), (m, n)])
    feeds, inits = {}, {}
    (feeds if chance(rng, 0.7) else inits)["a"] = a
    (inits if chance(rng, 0.8) else feeds)["b"] = b
    inputs = ["a", "b"]
    if c_shape is not None:
        (inits if chance(rng, 0.8) else feeds)["c"] = normal(rng, *c_shape)
        inputs.append("c")
    if not feeds:
        feeds["a"] = inits.pop("a")
    attrs = dict(
        transA=ta if ta or chance(rng) else None,
        transB=tb if tb or chance(rng) else None,
        alpha=float(pick(rng, [1.0, 0.5, -2.0])) if chance(rng) else None,
        beta=float(pick(rng, [1.0, 0.0, 3.0])) if chance(rng) else None,
    )
    return Case([node("Gemm", inputs, **attrs)], feeds, ["y"], inits, pick(rng, [9, 11, 13]))


def gen_softmax(rng: np.random.Generator) -> Case:
    op = pick(rng, ["Softmax", "LogSoftmax"])
    rank = int(rng.integers(1, 5))
    x = normal(rng, *ints(rng, 1, 4, rank))
    axis = int(rng.integers(-rank, rank)) if chance(rng, 0.8) else None
    return Case([node(op, ["x"], axis=axis)], {"x": x}, ["y"], opset=pick(rng, [1, 11, 13, 22]))


def gen_pad(rng: np.random.Generator) -> Case:
    opset = pick(rng, [2, 11, 13, 18, 19, 21])
    modes = ["constant", "reflect", "edge"] + (["wrap"] if opset >= 19 else [])
    mode = pick(rng, modes)
    rank = int(rng.integers(1, 5))
    shape = ints(rng, 2, 5, rank)
    x = normal(rng, *shape)
    axes = None
    if opset >= 18 and chance(rng, 0.4):
        axes = sorted(set(int(a) for a in rng.integers(0, rank, rank)))
        axes = [a - rank if chance(rng) else a for a in axes]
    span = [shape[a] for a in axes] if axes else shape
    lo = -1 if chance(rng, 0.4) else 0
    begin = [int(rng.integers(lo, s if mode == "reflect" else 4)) for s in span]
    end = [int(rng.integers(lo, s if mode == "reflect" else 4)) for s in span]
    value = float(pick(rng, [0.0, 1.5, -2.0]))
    attrs = dict(mode=mode if mode != "constant" or chance(rng) else None)
    if opset < 11:
        return Case(
            [node("Pad", ["x"], pads=begin + end, value=value, **attrs)], {"x": x}, ["y"], {}, 2
        )
    inits = {"p": np.array(begin + end, np.int64)}
    inputs = ["x", "p"]
    if chance(rng):
        inits["v"] = f32(value).reshape(())
        inputs.append("v")
    if axes is not None:
        if len(inputs) == 2:
            inputs.append("")
        inits["ax"] = np.array(axes, np.int64)
        inputs.append("ax")
    return Case([node("Pad", inputs, **attrs)], {"x": x}, ["y"], inits, opset)


def _slice_bound(rng: np.random.Generator, size: int) -> int:
    return int(
        pick(
            rng,
            [
                rng.integers(-size - 2, size + 3),
                rng.integers(-size - 2, size + 3),
                INT64_MAX,
                -INT64_MAX - 1,
                INT32_MAX,
                -(2**31),
            ],
        )
    )


def gen_slice(rng: np.random.Generator) -> Case:
    opset = pick(rng, [1, 10, 11, 13])
    rank = int(rng.integers(1, 5))
    shape = ints(rng, 1, 6, rank)
    x = normal(rng, *shape)
    count = int(rng.integers(1, rank + 1))
    axes = [int(a) for a in rng.permutation(rank)[:count]]
    axes = [a - rank if opset >= 11 and chance(rng) else a for a in axes]
    starts = [_slice_bound(rng, shape[a]) for a in axes]
    ends = [_slice_bound(rng, shape[a]) for a in axes]
    steps = [int(pick(rng, [1, 1, 2, 3, -1, -1, -2, -3])) for _ in axes]
    give_axes = chance(rng, 0.7) or axes != list(range(count))
    if opset < 10:
        return Case(
            [node("Slice", ["x"], starts=starts, ends=ends, axes=axes if give_axes else None)],
            {"x": x},
            ["y"],
            opset=1,
        )
    inits = {"st": np.array(starts, np.int64), "en": np.array(ends, np.int64)}
    inputs = ["x", "st", "en"]
    give_steps = chance(rng, 0.7)
    if give_axes or give_steps:
        inits["ax"] = np.array(axes, np.int64)
        inputs.append("ax")
    if give_steps:
        inits["sp"] = np.array(steps, np.int64)
        inputs.append("sp")
    return Case([node("Slice", inputs)], {"x": x}, ["y"], inits, opset)


def gen_split(rng: np.random.Generator) -> Case:
    opset = pick(rng, [2, 11, 13, 18])
    rank = int(rng.integers(1, 4))
    shape = ints(rng, 2, 7, rank)
    axis = int(rng.integers(-rank, rank)) if opset >= 11 else int(rng.integers(0, rank))
    size = shape[axis]
    count = int(rng.integers(1, min(size, 4) + 1))
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, size), count - 1, replace=False))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, size])]
    outs = [f"y{k}" for k in range(count)]
    x = normal(rng, *shape)
    attrs = dict(axis=axis if axis or chance(rng) else None)
    how = pick(rng, ["sizes", "equal"] + (["num_outputs"] if opset >= 18 else []))
    inputs, inits = ["x"], {}
    if how == "sizes":
        if opset < 13:
            attrs["split"] = sizes
        else:
            inits["s"] = np.array(sizes, np.int64)
            inputs.append("s")
    elif how == "num_outputs":
        attrs["num_outputs"] = count
    return Case([node("Split", inputs, outs, **attrs)], {"x": x}, outs, inits, opset)


def gen_clip(rng: np.random.Generator) -> Case:
    opset = pick(rng, [6, 11, 12, 13])
    x = normal(rng, 2, 3, 4)
    lo = float(pick(rng, [None, -0.5, 0.0, 0.3]) or 0) if chance(rng, 0.7) else None
    hi = float(pick(rng, [0.6, 1.0, -0.2])) if chance(rng, 0.7) else None
    if opset < 11:
        return Case([node("Clip", ["x"], min=lo, max=hi)], {"x": x}, ["y"], opset=opset)
    inputs, inits, feeds = ["x"], {}, {"x": x}
    for name, value in (("lo", lo), ("hi", hi)):
        if value is None:
            inputs.append("")
            continue
        (inits if chance(rng, 0.8) else feeds)[name] = f32(value).reshape(())
        inputs.append(name)
    while inputs[-1] == "":
        inputs.pop()
    return Case([node("Clip", inputs)], feeds, ["y"], inits, opset)


_REDUCE_AXES_INPUT = {"ReduceMean": 18, "ReduceSum": 13, "ReduceMax": 18, "ReduceProd": 18}


def gen_reduce(rng: np.random.Generator) -> Case:
    op = pick(rng, list(_REDUCE_AXES_INPUT))
    opset = pick(rng, [11, 13, 18, 20])
    rank = int(rng.integers(1, 5))
    x = normal(rng, *ints(rng, 1, 4, rank))
    axes = sorted(set(int(a) for a in rng.integers(-rank, rank, int(rng.integers(0, rank + 1)))))
    axes = list({a % rank: a for a in axes}.values())
    attrs = dict(keepdims=int(rng.integers(0, 2)) if chance(rng, 0.7) else None)
    inputs, inits = ["x"], {}
    if opset < _REDUCE_AXES_INPUT[op]:
        if axes:
            attrs["axes"] = axes
    else:
        if chance(rng, 0.6):
            attrs["noop_with_empty_axes"] = int(rng.integers(0, 2))
        if axes or chance(rng, 0.3):
            inits["axes"] = np.array(axes, np.int64)
            inputs.append("axes")
    return Case([node(op, inputs, **attrs)], {"x": x}, ["y"], inits, opset)


def _broadcast_to_norm(rng: np.random.Generator, norm_shape: list[int]) -> list[int]:
    """A scale or bias shape: the normalised shape, or one broadcasting to it."""
    return norm_shape if chance(rng, 0.6) else _broadcastable(rng, norm_shape)


def gen_layer_norm(rng: np.random.Generator) -> Case:
    rank = int(rng.integers(2, 5))
    shape = ints(rng, 2, 4, rank)
    axis = int(rng.integers(-rank, rank))
    a = axis % rank
    inits = {"s": normal(rng, *_broadcast_to_norm(rng, shape[a:]))}
    inputs = ["x", "s"]
    if chance(rng):  # broadcast on its own
        inits["b"] = normal(rng, *_broadcast_to_norm(rng, shape[a:]))
        inputs.append("b")
    outs = ["y"] + (["mean", "inv_std"] if chance(rng, 0.3) else [])
    attrs = dict(
        axis=axis if axis != -1 or chance(rng) else None,
        epsilon=float(pick(rng, [1e-5, 1e-3, 0.5])) if chance(rng) else None,
        stash_type=1 if chance(rng, 0.2) else None,
    )
    return Case(
        [node("LayerNormalization", inputs, outs, **attrs)],
        {"x": normal(rng, *shape) * 3},
        outs,
        inits,
        pick(rng, [17, 18, 22]),
    )


def gen_instance_norm(rng: np.random.Generator) -> Case:
    rank = int(rng.integers(3, 6))
    shape = [2, 3, *ints(rng, 1, 4, rank - 2)]
    eps = float(pick(rng, [1e-5, 1e-2, 0.7])) if chance(rng) else None
    return Case(
        [node("InstanceNormalization", ["x", "s", "b"], epsilon=eps)],
        {"x": normal(rng, *shape)},
        ["y"],
        {"s": normal(rng, 3), "b": normal(rng, 3)},
        pick(rng, [6, 17, 22]),
        rtol=1e-4,  # onnxruntime's rounding, times 1/sqrt(epsilon) where a map is one value
    )


def gen_batch_norm(rng: np.random.Generator) -> Case:
    opset = pick(rng, [7, 9, 14, 15])
    rank = int(rng.integers(2, 5))
    c = 3
    shape = [int(rng.integers(2, 4)), c, *ints(rng, 1, 4, rank - 2)]
    spatial = opset < 9 and chance(rng, 0.4)
    stat_shape = [c, *shape[2:]] if spatial else [c]
    inits = {
        "s": normal(rng, *stat_shape),
        "b": normal(rng, *stat_shape),
        "m": normal(rng, *stat_shape),
        "var": np.abs(normal(rng, *stat_shape)) + 0.5,
    }
    attrs = dict(
        epsilon=float(pick(rng, [1e-5, 1e-2])) if chance(rng) else None,
        momentum=float(pick(rng, [0.9, 0.5])) if chance(rng) else None,
        spatial=0 if spatial else None,
    )
    outs = ["y"]
    if opset >= 14 and chance(rng, 0.5):
        attrs["training_mode"] = int(rng.integers(0, 2))
        if attrs["training_mode"] and chance(rng):
            outs = ["y", "rm", "rv"]
    return Case(
        [node("BatchNormalization", ["x", "s", "b", "m", "var"], outs, **attrs)],
        {"x": normal(rng, *shape)},
        outs,
        inits,
        opset,
        rtol=1e-4,
    )


def gen_gather(rng: np.random.Generator) -> Case:
    rank = int(rng.integers(1, 4))
    shape = ints(rng, 1, 5, rank)
    axis = int(rng.integers(-rank, rank))
    size = shape[axis]
    idx_shape = pick(rng, [(), (1,), (3,), (2, 2)])
    idx = rng.integers(-size, size, idx_shape).astype(pick(rng, [np.int64, np.int32]))
    attrs = dict(axis=axis if axis or chance(rng) else None)
    feeds, inits = {"x": normal(rng, *shape)}, {}
    (inits if chance(rng, 0.7) else feeds)["i"] = np.array(idx)
    return Case([node("Gather", ["x", "i"], **attrs)], feeds, ["y"], inits, pick(rng, [11, 13]))


_CAST_TO = [
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.BOOL,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.FLOAT,
    TensorProto.UINT16,
]


def gen_cast(rng: np.random.Generator) -> Case:
    to = pick(rng, _CAST_TO)
    x = (rng.normal(size=(3, 5)) * 4).astype(np.float32)
    x[0, :4] = [2.5, -2.5, 0.5, -1.5]
    if to in (TensorProto.UINT8, TensorProto.UINT16):
        x = np.abs(x)
    return Case([node("Cast", ["x"], to=to)], {"x": x}, ["y"], opset=pick(rng, [9, 13, 19, 21]))


def _broadcastable(rng: np.random.Generator, shape: list[int]) -> list[int]:
    keep = int(rng.integers(0, len(shape) + 1))
    return [1 if chance(rng, 0.4) else d for d in shape[len(shape) - keep :]]


def gen_where_expand(rng: np.random.Generator) -> Case:
    rank = int(rng.integers(1, 4))
    shape = ints(rng, 1, 4, rank)
    if chance(rng):
        cond = rng.random(_broadcastable(rng, shape)) > 0.5
        a, b = normal(rng, *_broadcastable(rng, shape)), normal(rng, *shape)
        return Case([node("Where", ["c", "a", "b"])], {"c": np.array(cond), "a": a, "b": b}, ["y"])
    small = [1 if chance(rng) else d for d in shape]
    target = [d if chance(rng) else 1 for d in shape]
    if chance(rng, 0.3):
        target = [2, *target]
    return Case(
        [node("Expand", ["x", "s"])],
        {"x": normal(rng, *small)},
        ["y"],
        {"s": np.array(target, np.int64)},
        pick(rng, [8, 13]),
    )


def gen_tile(rng: np.random.Generator) -> Case:
    rank = int(rng.integers(1, 5))
    repeats = [int(r) for r in rng.integers(1, 4, rank)]
    return Case(
        [node("Tile", ["x", "r"])],
        {"x": normal(rng, *ints(rng, 1, 4, rank))},
        ["y"],
        {"r": np.array(repeats, np.int64)},
        pick(rng, [6, 13]),
    )


def gen_flatten(rng: np.random.Generator) -> Case:
    opset = pick(rng, [1, 9, 11, 13])
    rank = int(rng.integers(1, 5))
    lo = -rank if opset >= 11 else 0
    axis = int(rng.integers(lo, rank + 1)) if chance(rng, 0.8) else None
    return Case(
        [node("Flatten", ["x"], axis=axis)],
        {"x": normal(rng, *ints(rng, 1, 4, rank))},
        ["y"],
        opset=opset,
    )


_ACTIVATIONS: dict[str, Callable[[np.random.Generator], dict]] = {
    "HardSigmoid": lambda r: dict(alpha=float(r.uniform(0.05, 1)), beta=float(r.uniform(-1, 1))),
    "LeakyRelu": lambda r: dict(alpha=float(pick(r, [0.01, 0.2, -0.5, 1.5]))),
    "Elu": lambda r: dict(alpha=float(pick(r, [1.0, 0.3, 2.0]))),
    "Selu": lambda r: dict(alpha=1.5, gamma=1.2),
    "Celu": lambda r: dict(alpha=float(pick(r, [1.0, 0.5]))),
    "ThresholdedRelu": lambda r: dict(alpha=0.3),
    "Gelu": lambda r: dict(approximate=pick(r, ["none", "tanh"])),
    "Relu": lambda r: {},
    "Sigmoid": lambda r: {},
    "HardSwish": lambda r: {},
    "Tanh": lambda r: {},
    "Softplus": lambda r: {},
    "Softsign": lambda r: {},
    "Erf": lambda r: {},
    "Exp": lambda r: {},
    "Log": lambda r: {},
    "Sqrt": lambda r: {},
    "Neg": lambda r: {},
    "Abs": lambda r: {},
    "Floor": lambda r: {},
    "Ceil": lambda r: {},
    "Reciprocal": lambda r: {},
    "Identity": lambda r: {},
    "Mish": lambda r: {},
    "Round": lambda r: {},
    "Sign": lambda r: {},
}


def gen_activation(rng: np.random.Generator) -> Case:
    op = pick(rng, list(_ACTIVATIONS))
    attrs = {k: (v if chance(rng, 0.8) else None) for k, v in _ACTIVATIONS[op](rng).items()}
    x = normal(rng, 2, 3, 4) * 3
    if op in ("Log", "Sqrt"):
        x = np.abs(x) + 0.1
    opset = 20 if op == "Gelu" else pick(rng, [6, 13, 14, 22] if op != "Mish" else [18, 22])
    if op in ("Celu",):
        opset = max(opset, 12)
    if op == "HardSwish":
        opset = max(opset, 14)
    if op in ("ThresholdedRelu", "Round"):
        opset = max(opset, 11)
    return Case([node(op, ["x"], **attrs)], {"x": x}, ["y"], opset=opset)


def gen_prelu(rng: np.random.Generator) -> Case:
    shape = [2, 3, 4, 4]
    slope = pick(rng, [[3, 1, 1], [1], [4], [1, 4], [3, 4, 4]])
    return Case(
        [node("PRelu", ["x", "s"])],
        {"x": normal(rng, *shape)},
        ["y"],
        {"s": normal(rng, *slope)},
        pick(rng, [9, 16]),
    )


def gen_binary(rng: np.random.Generator) -> Case:
    op = pick(rng, ["Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "Max", "Min",
                    "Sum", "Mean", "Mod", "LessOrEqual"])  # fmt: skip
    shape = ints(rng, 1, 4, int(rng.integers(1, 4)))
    a, b = normal(rng, *shape), normal(rng, *_broadcastable(rng, shape))
    if chance(rng):
        a, b = b, a
    if op == "Pow":
        a = np.abs(a) + 0.1
    if op in ("Div",):
        b = np.where(np.abs(b) < 0.1, 0.5, b).astype(np.float32)
    if op in ("Equal",):
        b = np.round(b)
        a = np.round(a)
    feeds, inits = {"a": a}, {}
    (inits if chance(rng) else feeds)["b"] = b
    inputs = ["a", "b"]
    if op in ("Max", "Min", "Sum", "Mean") and chance(rng, 0.4):
        inputs = inputs + ["a"] if chance(rng) else ["a"]
    if op == "Mod":
        return Case([node(op, inputs, fmod=1)], feeds, ["y"], inits, 13)
    return Case([node(op, inputs)], feeds, ["y"], inits, pick(rng, [13, 14]))


def gen_integer(rng: np.random.Generator) -> Case:
    """Integer tensors (shape arithmetic): results keep ONNX's type, not torch's promotion."""
    a = rng.integers(-9, 10, (2, 3)).astype(pick(rng, [np.int64, np.int32]))
    op = pick(rng, ["Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater",
                    "Pow", "Clip", "Where", "Neg", "Abs", "ReduceSum", "ReduceMax"])  # fmt: skip
    b = rng.integers(1, 4, pick(rng, [(3,), (), (2, 3)])).astype(a.dtype)
    if op == "Div":
        b = b * pick(rng, [1, -1])
    if op == "Pow":
        a = np.abs(a)
        b = pick(rng, [b, b.astype(np.float32) + np.float32(0.5)])
    if op == "Clip":
        lo, hi = np.array(-3, a.dtype), np.array(4, a.dtype)
        return Case([node(op, ["a", "lo", "hi"])], {"a": a}, ["y"], {"lo": lo, "hi": hi}, 13)
    if op == "Where":
        cond = rng.random((2, 3)) > 0.5
        return Case([node(op, ["c", "a", "b"])], {"c": cond, "a": a}, ["y"], {"b": b}, 16)
    if op in ("Neg", "Abs", "ReduceSum", "ReduceMax"):
        return Case([node(op, ["a"])], {"a": a}, ["y"], {}, 13)
    return Case([node(op, ["a", "b"])], {"a": a}, ["y"], {"b": b}, 15)


def gen_matmul(rng: np.random.Generator) -> Case:
    k = int(rng.integers(1, 5))
    a_shape = pick(rng, [[k], [3, k], [2, 3, k], [2, 1, 3, k]])
    b_shape = pick(rng, [[k], [k, 2], [2, k, 2], [1, k, 4]])
    feeds, inits = {"a": normal(rng, *a_shape)}, {}
    (inits if chance(rng, 0.7) else feeds)["b"] = normal(rng, *b_shape)
    return Case([node("MatMul", ["a", "b"])], feeds, ["y"], inits, 13)


def gen_layout(rng: np.random.Generator) -> Case:
    """Transpose, Squeeze, Unsqueeze, Reshape, Concat, Shape, Identity."""
    op = pick(rng, ["Transpose", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Shape"])
    opset = pick(rng, [11, 13, 15, 21])
    shape = [2, 1, 3, 1]
    x = normal(rng, *shape)
    if op == "Transpose":
        perm = [int(p) for p in rng.permutation(4)] if chance(rng, 0.7) else None
        return Case([node(op, ["x"], perm=perm)], {"x": x}, ["y"], opset=opset)
    if op in ("Squeeze", "Unsqueeze"):
        if op == "Squeeze":
            axes = pick(rng, [[1], [-1], [1, 3], [3, -3], []])
        else:
            axes = pick(rng, [[0], [-1], [1, 4], [-1, 0], [5, 2]])
        if opset < 13:
            return Case([node(op, ["x"], axes=axes or None)], {"x": x}, ["y"], opset=opset)
        if not axes and op == "Squeeze":
            return Case([node(op, ["x"])], {"x": x}, ["y"], opset=opset)
        return Case([node(op, ["x", "a"])], {"x": x}, ["y"], {"a": np.array(axes, np.int64)}, opset)
    if op == "Reshape":
        target = pick(rng, [[0, -1], [-1], [3, 0, 2], [0, 0, 3], [6, 0], [2, 3, 0]])
        allowzero = 1 if opset >= 14 and chance(rng, 0.3) else None
        if allowzero and target == [6, 0]:
            target = [6, 1]
        if chance(rng, 0.2):  # before opset 5 the target is an attribute
            return Case([node(op, ["x"], shape=target)], {"x": x}, ["y"], opset=4)
        return Case(
            [node(op, ["x", "s"], allowzero=allowzero)],
            {"x": x},
            ["y"],
            {"s": np.array(target, np.int64)},
            opset,
        )
    if op == "Concat":
        axis = int(rng.integers(-4, 4))
        other = list(shape)
        other[axis] = 2
        return Case(
            [node(op, ["x", "c"], axis=axis)],
            {"x": x},
            ["y"],
            {"c": normal(rng, *other)},
            opset,
        )
    attrs = {}
    if opset >= 15:
        attrs = dict(
            start=int(rng.integers(-5, 5)) if chance(rng) else None,
            end=int(rng.integers(-5, 5)) if chance(rng) else None,
        )
    return Case([node(op, ["x"], ["y"], **attrs)], {"x": x}, ["y"], opset=opset)


def gen_constant_like(rng: np.random.Generator) -> Case:
    """Range, ConstantOfShape and Constant feeding an Add with the input."""
    op = pick(rng, ["Range", "ConstantOfShape", "Constant"])
    x = normal(rng, 2, 4)
    if op == "Range":
        start, limit, delta = pick(rng, [(0.0, 4.0, 1.0), (3.0, -1.0, -1.0), (0.5, 2.0, 0.375)])
        nodes = [
            node("Range", ["st", "li", "de"], ["r"]),
            node("Add", ["x", "r"], ["y"]),
        ]
        inits = {"st": f32(start).reshape(()), "li": f32(limit).reshape(()),
                 "de": f32(delta).reshape(())}  # fmt: skip
        return Case(nodes, {"x": x}, ["y"], inits, 11)
    if op == "ConstantOfShape":
        value = numpy_helper.from_array(f32(1.5)) if chance(rng) else None
        nodes = [
            node("ConstantOfShape", ["s"], ["c"], value=value),
            node("Add", ["x", "c"], ["y"]),
        ]
        return Case(nodes, {"x": x}, ["y"], {"s": i64(*pick(rng, [(2, 4), (4,), (1, 1), ()]))}, 13)
    key = pick(rng, ["value", "value_float", "value_floats"])
    value = {
        "value": numpy_helper.from_array(normal(rng, 4)),
        "value_float": 0.25,
        "value_floats": [0.5, 1.0, -1.0, 2.0],
    }[key]
    nodes = [
        helper.make_node("Constant", [], ["c"], **{key: value}),
        node("Add", ["x", "c"], ["y"]),
    ]
    return Case(nodes, {"x": x}, ["y"], {}, 13)


def gen_dropout(rng: np.random.Generator) -> Case:
    opset = pick(rng, [7, 10, 12, 13])
    outs = ["y", "mask"] if chance(rng) else ["y"]
    if opset < 12:
        return Case(
            [node("Dropout", ["x"], outs, ratio=0.3 if chance(rng) else None)],
            {"x": normal(rng, 2, 3)},
            ["y"] if len(outs) == 1 or opset < 10 else outs,
            opset=opset,
        )
    inputs, inits = ["x"], {}
    if chance(rng):
        inits["r"] = f32(0.4).reshape(())
        inputs.append("r")
    if chance(rng, 0.3):
        if len(inputs) == 1:
            inputs.append("")
        inits["t"] = np.array(False)
        inputs.append("t")
    return Case([node("Dropout", inputs, outs)], {"x": normal(rng, 2, 3)}, outs, inits, opset)


def gen_recurrent(rng: np.random.Generator) -> Case:
    op = pick(rng, ["LSTM", "GRU"])
    gates = 4 if op == "LSTM" else 3
    seq, batch, size, hidden = 3, 2, 3, int(rng.integers(1, 4))
    direction = pick(rng, ["forward", "reverse", "bidirectional"])
    dirs = 2 if direction == "bidirectional" else 1
    layout = int(rng.integers(0, 2)) if chance(rng, 0.4) else 0
    x = normal(rng, *((batch, seq, size) if layout else (seq, batch, size)))
    inits = {
        "w": normal(rng, dirs, gates * hidden, size),
        "r": normal(rng, dirs, gates * hidden, hidden),
    }
    inputs = ["x", "w", "r"]
    if chance(rng, 0.7):
        inits["b"] = normal(rng, dirs, 2 * gates * hidden)
        inputs.append("b")
    h_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    if chance(rng, 0.5):
        inputs += [""] * (4 - len(inputs)) + ["", "h0"]
        inits["h0"] = normal(rng, *h_shape)
        if op == "LSTM" and chance(rng):
            inputs.append("c0")
            inits["c0"] = normal(rng, *h_shape)
    if op == "LSTM" and chance(rng, 0.4):
        inputs += [""] * (7 - len(inputs)) + ["p"]
        inits["p"] = normal(rng, dirs, 3 * hidden)
    outs = pick(rng, [["y"], ["y", "yh"], ["", "yh"]]) + (
        ["yc"] if op == "LSTM" and chance(rng, 0.3) else []
    )
    attrs = dict(
        hidden_size=hidden,
        direction=direction if direction != "forward" or chance(rng) else None,
        layout=layout or None,
        linear_before_reset=int(rng.integers(0, 2)) if op == "GRU" and chance(rng) else None,
    )
    opset = 14 if layout else pick(rng, [7, 14])
    return Case(
        [node(op, inputs, outs, **attrs)],
        {"x": x},
        [o for o in outs if o],
        inits,
        opset,
        rtol=1e-4,
    )


def gen_weights(rng: np.random.Generator) -> Case:
    """Weights reached through other nodes (layout ops, Casts, Identity ties, Constant nodes,
    shared initializers): they must train, and be written back where they were read."""
    c, k = 3, int(rng.integers(1, 4))
    x = normal(rng, 2, c, 5, 5)
    form = pick(rng, ["transpose", "reshape", "cast16", "constant", "tied", "shared",
                      "layer_scale", "unsqueeze", "bn_shared"])  # fmt: skip
    w = normal(rng, 4, c, k, k)
    pads = [k // 2] * 4
    if form == "transpose":  # a Linear exported as MatMul(x, Transpose(W)) + b
        nodes = [
            node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
            node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            node("MatMul", ["t", "wt"], ["m"]),
            node("Add", ["m", "b"], ["y"]),
        ]
        return Case(nodes, {"x": x}, ["y"], {"w": normal(rng, 4, c), "b": normal(rng, 4)})
    if form == "reshape":  # a depthwise weight stored flat
        nodes = [
            node("Reshape", ["wf", "shape"], ["w"]),
            node("Conv", ["x", "w"], ["y"], group=c, pads=pads),
        ]
        inits = {"wf": normal(rng, c * k * k), "shape": i64(c, 1, k, k)}
        return Case(nodes, {"x": x}, ["y"], inits)
    if form == "cast16":  # weights stored in fp16, cast before use
        nodes = [
            node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
            node("Conv", ["x", "w"], ["y"], pads=pads),
        ]
        return Case(nodes, {"x": x}, ["y"], {"w16": w.astype(np.float16)})
    if form == "constant":  # a weight held by a Constant node
        nodes = [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            node("Conv", ["x", "w", "b"], ["y"], pads=pads),
        ]
        return Case(nodes, {"x": x}, ["y"], {"b": normal(rng, 4)})
    if form == "tied":  # the torch exporter's Identity ties
        nodes = [
            node("Conv", ["x", "w"], ["a"], pads=pads),
            node("Identity", ["w"], ["w2"]),
            node("Conv", ["x", "w2"], ["b"], pads=pads),
            node("Sub", ["a", "b"], ["d"]),
            node("Add", ["d", "a"], ["y"]),
        ]
        return Case(nodes, {"x": x}, ["y"], {"w": w})
    if form == "shared":  # one initializer read by two Convs
        nodes = [
            node("Conv", ["x", "w"], ["a"], pads=pads),
            node("Relu", ["a"], ["r"]),
            node("Conv", ["r", "w2"], ["y"], pads=pads),
        ]
        return Case(nodes, {"x": x}, ["y"], {"w": w, "w2": w[:, :4] if c >= 4 else
                                              normal(rng, 4, 4, k, k)})  # fmt: skip
    if form == "layer_scale":  # per-channel constants after a weight train
        nodes = [
            node("Sub", ["x", "mean"], ["xn"]),
            node("Conv", ["xn", "w"], ["a"], pads=pads),
            node("Mul", ["a", "gamma"], ["m"]),
            node("Add", ["m", "beta"], ["y"]),
        ]
        inits = {"mean": normal(rng, c, 1, 1), "w": w, "gamma": normal(rng, 1, 4, 1, 1),
                 "beta": normal(rng, 4, 1, 1)}  # fmt: skip
        return Case(nodes, {"x": x}, ["y"], inits)
    if form == "unsqueeze":
        nodes = [
            node("Unsqueeze", ["w3", "ax"], ["w"]),
            node("Conv", ["x", "w"], ["y"], pads=[k // 2, k // 2], group=c),
        ]
        x1 = normal(rng, 2, c, 7)
        return Case(nodes, {"x": x1}, ["y"], {"w3": normal(rng, c, k), "ax": i64(1)}, 13)
    # Two BatchNorms sharing their statistics (reduce's normal form of exporter ties).
    stats = {"s": normal(rng, 4), "b": normal(rng, 4), "m": normal(rng, 4),
             "var": np.abs(normal(rng, 4)) + 0.5}  # fmt: skip
    nodes = [
        node("Conv", ["x", "w"], ["a"], pads=pads),
        node("BatchNormalization", ["a", "s", "b", "m", "var"], ["n1"]),
        node("BatchNormalization", ["a", "s", "b", "m", "var"], ["n2"], epsilon=1e-3),
        node("Mul", ["n1", "n2"], ["y"]),
    ]
    return Case(nodes, {"x": x}, ["y"], {"w": w, **stats}, rtol=1e-4)


def gen_unnamed_outputs(rng: np.random.Generator) -> Case:
    """A multi-output node with an unnamed ("") optional output, then nodes with missing ("")
    optional inputs: the one must not feed the other."""
    x = normal(rng, 3, 2, 4)
    first = pick(rng, ["GRU", "LSTM", "LayerNormalization"])
    if first == "LayerNormalization":
        outs = pick(rng, [["n", "", "istd"], ["n", ""], ["n", "", ""]])
        nodes = [node(first, ["x", "s"], outs)]
        inits = {"s": normal(rng, 4)}
        h = "n"
    else:
        gates = 4 if first == "LSTM" else 3
        outs = ["", "yh"] + (["", "yc"][: int(rng.integers(0, 2))] if first == "LSTM" else [])
        nodes = [
            node(first, ["x", "w", "r"], outs, hidden_size=4),
            node("Squeeze", ["yh", "ax"], ["h"]),
        ]
        inits = {"w": normal(rng, 1, gates * 4, 4), "r": normal(rng, 1, gates * 4, 4),
                 "ax": i64(0)}  # fmt: skip
        h = "h"
    last = pick(rng, ["Gemm", "Clip", "Pad", "Conv"])
    if last == "Gemm":
        nodes.append(node("Gemm", [h, "fc", ""], transB=1))
        inits["fc"] = normal(rng, 3, 4)
    elif last == "Clip":
        nodes.append(node("Clip", [h, "", "hi"]))
        inits["hi"] = f32(0.3).reshape(())
    elif last == "Pad":
        nodes.append(node("Pad", [h, "p", ""]))
        inits["p"] = np.array([0, 1] + [0] * (2 * (2 if h == "h" else 3) - 2), np.int64)
    else:
        nodes.append(node("Conv", [h, "cw", ""]))
        inits["cw"] = normal(rng, 3, 2 if h == "h" else 2, 1)
    return Case(nodes, {"x": x}, ["y"], inits, 18, rtol=1e-4)


def gen_chain(rng: np.random.Generator) -> Case:
    """A few shape-keeping layers in a row, with residual reads of earlier tensors: values
    must live as long as a later node reads them, weights train wherever they sit."""
    c = 4
    x = normal(rng, 2, c, 5, 5)
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    live = ["x"]
    for k in range(int(rng.integers(2, 7))):
        src, out = live[-1], f"t{k}"
        kind = pick(rng, ["conv", "bn", "act", "residual", "scale", "pool", "split_concat",
                          "transpose", "pad_slice", "concat_conv"])  # fmt: skip
        if kind == "conv":
            inits[f"w{k}"], inits[f"b{k}"] = normal(rng, c, c, 3, 3) * 0.3, normal(rng, c)
            nodes.append(node("Conv", [src, f"w{k}", f"b{k}"], [out], pads=[1, 1, 1, 1]))
        elif kind == "bn":
            for part, value in zip("sbmv", (normal(rng, c), normal(rng, c), normal(rng, c),
                                            np.abs(normal(rng, c)) + 0.5)):  # fmt: skip
                inits[f"bn{part}{k}"] = value
            names = [src] + [f"bn{part}{k}" for part in "sbmv"]
            nodes.append(node("BatchNormalization", names, [out]))
        elif kind == "act":
            op = pick(rng, ["Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Tanh"])
            nodes.append(node(op, [src], [out]))
        elif kind == "residual":
            nodes.append(node(pick(rng, ["Add", "Sub", "Mul"]), [src, pick(rng, live)], [out]))
        elif kind == "scale":
            inits[f"g{k}"] = normal(rng, 1, c, 1, 1)
            nodes.append(node("Mul", [src, f"g{k}"], [out]))
        elif kind == "pool":
            nodes.append(node("MaxPool", [src], [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        elif kind == "split_concat":
            nodes += [
                node("Split", [src], [f"a{k}", f"b{k}"], axis=1, num_outputs=2),
                node("Concat", [f"b{k}", f"a{k}"], [out], axis=1),
            ]
        elif kind == "transpose":
            nodes += [
                node("Transpose", [src], [f"p{k}"], perm=[0, 2, 3, 1]),
                node("Transpose", [f"p{k}"], [out], perm=[0, 3, 1, 2]),
            ]
        elif kind == "pad_slice":
            inits[f"pp{k}"], inits[f"st{k}"] = i64(0, 0, 1, 2, 0, 0, 2, 1), i64(1, 2)
            inits[f"en{k}"], inits[f"ax{k}"] = i64(6, 7), i64(2, 3)
            nodes += [
                node("Pad", [src, f"pp{k}"], [f"q{k}"], mode=pick(rng, ["constant", "edge"])),
                node("Slice", [f"q{k}", f"st{k}", f"en{k}", f"ax{k}"], [out]),
            ]
        else:
            other = pick(rng, live)
            inits[f"w{k}"] = normal(rng, c, 2 * c, 1, 1)
            nodes += [
                node("Concat", [src, other], [f"cc{k}"], axis=1),
                node("Conv", [f"cc{k}", f"w{k}"], [out]),
            ]
        live.append(out)
    outputs = [live[-1]] + ([live[1]] if len(live) > 2 and chance(rng, 0.3) else [])
    return Case(nodes, {"x": x}, outputs, inits, 18, rtol=1e-4)


def gen_space_depth(rng: np.random.Generator) -> Case:
    """DepthToSpace in both modes and SpaceToDepth, with channel counts where the modes'
    orders differ (more than one channel per block)."""
    b = pick(rng, [2, 3])
    opset = pick(rng, [11, 13, 21])
    if chance(rng):
        mode = pick(rng, ["DCR", "CRD", None])
        x = normal(rng, 2, b * b * int(rng.integers(1, 4)), 3, 2)
        return Case(
            [node("DepthToSpace", ["x"], blocksize=b, mode=mode)], {"x": x}, ["y"], opset=opset
        )
    x = normal(rng, 2, int(rng.integers(1, 4)), 2 * b, 3 * b)
    return Case([node("SpaceToDepth", ["x"], blocksize=b)], {"x": x}, ["y"], opset=opset)


def gen_arg_extreme(rng: np.random.Generator) -> Case:
    """ArgMax and ArgMin over any axis, with ties (small integer values) and, from opset 12,
    select_last_index; int64 indices out."""
    op = pick(rng, ["ArgMax", "ArgMin"])
    opset = pick(rng, [11, 12, 13])
    rank = int(rng.integers(1, 5))
    shape = ints(rng, 1, 4, rank)
    x = rng.integers(-2, 3, shape).astype(np.float32) if chance(rng) else normal(rng, *shape)
    attrs = dict(
        axis=int(rng.integers(-rank, rank)) if chance(rng, 0.8) else None,
        keepdims=int(rng.integers(0, 2)) if chance(rng, 0.7) else None,
        select_last_index=int(rng.integers(0, 2)) if opset >= 12 and chance(rng) else None,
    )
    return Case([node(op, ["x"], **attrs)], {"x": x}, ["y"], opset=opset)


# onnxruntime's fused activations and their parameters (contrib_ops/cpu/fused_activation.cc).
_FUSED_ACTIVATIONS = {
    "Relu": lambda r: [],
    "Tanh": lambda r: [],
    "Sigmoid": lambda r: [],
    "LeakyRelu": lambda r: [float(pick(r, [0.01, 0.2, -0.5]))],
    "Clip": lambda r: sorted(float(v) for v in r.uniform(-1, 1, 2)),
    "HardSigmoid": lambda r: [float(r.uniform(0.05, 1)), float(r.uniform(-1, 1))],
}


def gen_fused(rng: np.random.Generator) -> Case:
    """onnxruntime's com.microsoft FusedConv (a Conv, Z added, then its activation) and
    FusedGemm (a Gemm then its activation), as its extended optimisations write them."""
    kind = pick(rng, list(_FUSED_ACTIVATIONS))
    params = _FUSED_ACTIVATIONS[kind](rng)
    if chance(rng):
        kind = kind if kind != "Clip" else "Relu"  # FusedGemm runs no Clip
        params = _FUSED_ACTIVATIONS[kind](rng)
        case = gen_gemm(rng)
        plain = case.nodes[0]
        names = dict(zip(["activation_alpha", "activation_beta"], params, strict=False))
        fused = node("FusedGemm", list(plain.input), activation=kind, **names)
    else:
        case = gen_conv(rng)
        plain = case.nodes[0]
        inputs = list(plain.input)
        if chance(rng):
            made = ort_run(case.model(), case.feeds)
            if made is None:
                return case
            if len(inputs) == 2:
                inputs.append("")
            case.feeds["z"] = normal(rng, *made[0].shape)
            inputs.append("z")
        activation = dict(activation=kind, activation_params=params or None)
        fused = node("FusedConv", inputs, **(activation if chance(rng, 0.9) else {}))
    fused.domain = "com.microsoft"
    fused.attribute.extend(plain.attribute)
    case.nodes = [fused]
    case.rtol = 1e-4
    return case


def gen_unsupported(rng: np.random.Generator) -> Case:
    """Ops the bridge does not implement: refused with one line, never computed."""
    x = normal(rng, 2, 4, 3, 3)
    choice = pick(rng, ["Einsum", "GroupNormalization", "LRN", "Hardmax"])
    if choice == "Einsum":
        return Case(
            [node("Einsum", ["x", "w"], equation="nchw,oc->nohw")],
            {"x": x},
            ["y"],
            {"w": normal(rng, 5, 4)},
            13,
        )
    if choice == "GroupNormalization":
        return Case(
            [node("GroupNormalization", ["x", "s", "b"], num_groups=2)],
            {"x": x},
            ["y"],
            {"s": normal(rng, 4), "b": normal(rng, 4)},
            21,
        )
    if choice == "LRN":
        return Case([node("LRN", ["x"], size=3)], {"x": x}, ["y"], opset=13)
    return Case([node("Hardmax", ["x"])], {"x": x}, ["y"], opset=13)


GENERATORS: dict[str, Callable[[np.random.Generator], Case]] = {
    "conv": gen_conv,
    "conv_transpose": gen_conv_transpose,
    "max_pool": gen_max_pool,
    "average_pool": gen_average_pool,
    "global_pool": gen_global_pool,
    "resize": gen_resize,
    "upsample": gen_upsample,
    "resize_any_rank": gen_resize_any_rank,
    "gemm": gen_gemm,
    "softmax": gen_softmax,
    "pad": gen_pad,
    "slice": gen_slice,
    "split": gen_split,
    "clip": gen_clip,
    "reduce": gen_reduce,
    "layer_norm": gen_layer_norm,
    "instance_norm": gen_instance_norm,
    "batch_norm": gen_batch_norm,
    "gather": gen_gather,
    "cast": gen_cast,
    "where_expand": gen_where_expand,
    "flatten": gen_flatten,
    "tile": gen_tile,
    "activation": gen_activation,
    "prelu": gen_prelu,
    "binary": gen_binary,
    "matmul": gen_matmul,
    "integer": gen_integer,
    "layout": gen_layout,
    "space_depth": gen_space_depth,
    "arg_extreme": gen_arg_extreme,
    "fused": gen_fused,
    "constant_like": gen_constant_like,
    "dropout": gen_dropout,
    "recurrent": gen_recurrent,
    "weights": gen_weights,
    "unnamed_outputs": gen_unnamed_outputs,
    "chain": gen_chain,
    "unsupported": gen_unsupported,
}


# ---------------------------------------------------------------------------
# The oracle


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """onnxruntime's outputs, or None where it refuses the graph (nothing to compare)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)
    except Exception:  # noqa: BLE001 -- any refusal: an invalid draw
        return None


def torch_run(module: OnnxModule, case: Case) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(case.feeds[n]) for n in module.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def mismatch(actual: np.ndarray, expected: np.ndarray, rtol: float) -> str | None:
    """Why `actual` is not `expected` (shape, dtype, values within rtol of the larger of 1 and
    the largest |expected|), or None."""
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != {expected.shape}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != {expected.dtype}"
    if not expected.size:
        return None
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    scale = max(1.0, float(np.nanmax(np.abs(e), initial=0.0)))
    err = np.where(both_nan, 0.0, np.abs(a - e))
    worst = float(np.nanmax(err, initial=0.0)) if not np.isnan(err).any() else float("nan")
    if not worst <= rtol * scale:
        return f"max error {worst} > {rtol} * {scale}"
    return None


# Float initializers that are settings, not weights: moved to runtime inputs with the integer ones.
_SETTINGS = frozenset({"scales", "roi", "v", "lo", "hi", "r", "st", "li", "de"})


def on_device(name: str, value: np.ndarray, device: str) -> torch.Tensor:
    """A graph input as retrain feeds it: images on the training device, settings on the CPU."""
    tensor = torch.from_numpy(value)
    if name in _SETTINGS or not tensor.is_floating_point():
        return tensor
    return tensor.to(device)


def check(case: Case) -> str:
    """'skipped' (onnxruntime refuses), 'refused' (BadInputError, one line) or 'matched';
    raises AssertionError on a wrong result, lets other exceptions (crashes) through."""
    model = case.model()
    expected = ort_run(model, case.feeds)
    if expected is None:
        return "skipped"
    # As retrain runs it (ties and Constant-node weights made initializers), and as given.
    untied = untie_initializers(model)
    modules = []
    for graph in (untied, model):
        try:
            modules.append(OnnxModule(graph).eval())
            actual = torch_run(modules[-1], case)
        except BadInputError as e:
            assert "\n" not in str(e).strip(), f"refusal is not one line: {e}"
            if graph is untied:
                return "refused"
            continue
        assert len(actual) == len(expected), case.describe()
        for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
            why = mismatch(a, e, case.rtol)
            assert why is None, f"output {k}: {why}\n{case.describe()}"
    module = modules[0]
    # Every trained weight takes part in the output (else training leaves it as it was).
    params = dict(module.named_parameters())
    if params:
        out = module(*[torch.from_numpy(case.feeds[n]) for n in module.input_names])
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if o.is_floating_point()).backward()
        idle = sorted(k for k, p in params.items() if p.grad is None)
        assert not idle, f"parameters without a gradient: {idle}\n{case.describe()}"
    # Moved to another device (meta stands in for CUDA: the same device checks), the module
    # still runs: its integer constants stay on the CPU and must meet the rest there.
    moved = copy.deepcopy(module).to("meta")
    with torch.no_grad():
        out = moved(*[on_device(n, case.feeds[n], "meta") for n in moved.input_names])
    outs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outs] == [e.shape for e in expected], case.describe()
    # Written back untrained, the model computes what it did.
    again = ort_run(write_back(untied, module), case.feeds)
    assert again is not None, f"written model refused by onnxruntime\n{case.describe()}"
    for k, (a, e) in enumerate(zip(again, expected, strict=True)):
        why = mismatch(a, e, 0.0)
        assert why is None, f"written back, output {k}: {why}\n{case.describe()}"
    # Written back after a change to every weight and statistic (as training makes), the
    # model computes what the module now does.
    with torch.no_grad():
        for tensor in module.state_dict().values():  # weights and statistics, no constants
            if tensor.is_floating_point():
                tensor.mul_(1.0 + 0.1 * torch.randn_like(tensor)).add_(0.01)
    changed = ort_run(write_back(untied, module), case.feeds)
    assert changed is not None, f"written model refused by onnxruntime\n{case.describe()}"
    for k, (a, e) in enumerate(zip(torch_run(module, case), changed, strict=True)):
        why = mismatch(a, e, case.rtol)
        assert why is None, f"changed, written back, output {k}: {why}\n{case.describe()}"
    return "matched"


def at_run_time(case: Case) -> Case:
    """The same graph with its settings (integer tensors, scales, pad values ...) given as
    graph inputs: the bridge's run-time paths instead of its build-time ones."""
    moved = {
        k: v
        for k, v in case.inits.items()
        if k in _SETTINGS or not np.issubdtype(v.dtype, np.floating)
    }
    if not moved:
        return case
    kept = {k: v for k, v in case.inits.items() if k not in moved}
    return Case(case.nodes, {**case.feeds, **moved}, case.outputs, kept, case.opset, case.rtol)


def draw(family: str, seed: int) -> Case:
    """Graph `seed` of `family`; every third one takes its settings at run time."""
    rng = np.random.default_rng([seed, sorted(GENERATORS).index(family)])
    case = GENERATORS[family](rng)
    return at_run_time(case) if seed % 3 == 2 else case


def test_generators_cover_every_op_of_the_bridge() -> None:
    """A new op in the bridge's table gets a generator here too."""
    drawn: set[str] = set()
    for family in GENERATORS:
        for seed in range(200):
            drawn.update(
                f"{n.domain}:{n.op_type}" if n.domain else n.op_type
                for n in draw(family, seed).nodes
            )
    assert set(OPS) - drawn == set()


@pytest.mark.parametrize("family", sorted(GENERATORS))
def test_fuzz_quick(family: str) -> None:
    for seed in range(12):
        check(draw(family, seed))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(GENERATORS))
def test_fuzz_sweep(family: str) -> None:
    for seed in range(12, 400):
        check(draw(family, seed))
