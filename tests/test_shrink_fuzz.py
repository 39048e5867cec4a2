"""Fuzzing the shrink pass: random small CNNs, random keep plans.

Hypothesis builds graphs from the structures real CNNs are made of (residual
chains, concat, split, slice, depthwise and grouped convs, SE gates, channel
shuffle, NHWC detours, upsampling, ghost modules, space-to-depth, channels-last
tokens) with a random head, and a random keep plan.
Each graph is written as a random exporter would (weights in Constant nodes,
-1 dims, empty or repeated node names, scalar constants as `value_float`).
Every example drops channels; each shrunk model must pass the full checker,
keep the input and output names and output shapes, have exactly the predicted
parameter count, and compute the same outputs as the original model with the
dropped channels made dead.
"""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder, assert_cut_channels_were_dead, assert_same_outputs, kill_channels
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from variants import VARIANTS

from onnx_mbs.passes import count_parameters, load_model
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.shrink import predicted_params, shrink_channels

BLOCKS = [
    "conv", "residual", "concat", "split", "slice", "depthwise", "grouped", "se", "pool",
    "shuffle", "nhwc", "resize", "deconv", "bn", "reduce_se", "pad", "identity",
    "ghost", "split3", "slice_neg", "depthwise2", "space_to_depth", "gemm_se", "instancenorm",
    "tokens", "concat_self", "grouped_deconv",
]  # fmt: skip
ACTIVATIONS = ["Relu", "HardSwish", "SiLU", "Clip", "LeakyRelu", "PRelu", "Tanh", "Elu"]
HEADS = ["gap_gemm", "gmp_gemm", "flatten_gemm", "conv", "reshape_matmul"]


class Net:
    """A builder that tracks channels and spatial size while blocks are appended."""

    def __init__(self, draw, seed: int) -> None:
        self.draw = draw
        self.b = Builder("fuzz", seed)
        self.size = draw(st.sampled_from([4, 6, 8]))
        self.x = self.b.input("input", [1, 3, self.size, self.size])
        self.c = 3
        self.conv(draw(st.integers(2, 6)))

    def width(self) -> int:
        return self.draw(st.integers(1, 6))

    def act(self, x: str, c: int) -> str:
        """A random activation that keeps 0 at 0 (so dead channels stay dead)."""
        kind = self.draw(st.sampled_from(ACTIVATIONS))
        if kind == "PRelu":
            slope = self.b.const(np.linspace(0.1, 0.3, c, dtype=np.float32).reshape(c, 1, 1))
            return self.b.op("PRelu", [x, slope])
        if kind == "SiLU":
            return self.b.silu(x)
        if kind == "Clip":
            lo, hi = self.b.const(np.float32(0)), self.b.const(np.float32(6))
            return self.b.op("Clip", [x, lo, hi])
        return self.b.op(kind, [x])

    def conv(self, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> None:
        self.x = self.act(self.b.conv(self.x, self.c, cout, k, group=group, bias=bias), cout)
        self.c = cout

    def block(self, kind: str) -> None:
        b, x, c = self.b, self.x, self.c
        if kind == "conv":
            self.conv(self.width(), k=self.draw(st.sampled_from([1, 3])))
        elif kind == "bn":
            cout = self.width()
            self.x = self.act(b.bn(b.conv(x, c, cout, bias=False), cout), cout)
            self.c = cout
        elif kind == "residual":
            mid = self.width()
            y = b.conv(self.act(b.conv(x, c, mid), mid), mid, c)
            self.x = self.act(b.op("Add", [x, y]), c)
        elif kind == "concat":
            p, q = self.width(), self.width()
            branches = [self.act(b.conv(x, c, p), p), self.act(b.conv(x, c, q, k=1), q)]
            self.x = b.op("Concat", branches, axis=1)
            self.c = p + q
        elif kind == "split" and c >= 2:
            s = self.draw(st.integers(1, c - 1))
            sizes = b.const(np.array([s, c - s], np.int64))
            left, right = b.op("Split", [x, sizes], n_out=2, axis=1)
            right = self.act(b.conv(right, c - s, c - s), c - s)
            self.x = b.op("Concat", [right, left] if self.draw(st.booleans()) else [left, right],
                          axis=1)  # fmt: skip
        elif kind == "slice" and c >= 2:
            start = self.draw(st.integers(0, c - 2))
            end = self.draw(st.integers(start + 1, c))
            consts = [b.const(np.array([v], np.int64)) for v in (start, end, 1)]
            self.x = b.op("Slice", [x, *consts])
            self.c = end - start
        elif kind == "depthwise":
            mult = self.draw(st.sampled_from([1, 1, 2]))
            self.conv(c * mult, group=c)
        elif kind == "grouped" and c % 2 == 0 and c >= 4:
            self.conv(2 * self.draw(st.integers(1, 3)), group=2)
        elif kind == "se":
            self.x = b.se(x, c, self.width())
        elif kind == "reduce_se":  # an SE gate whose squeeze is ReduceMean over H, W
            r = self.width()
            s = b.op("ReduceMean", [x], axes=[2, 3], keepdims=1)
            s = b.op("Relu", [b.conv(s, c, r, k=1)])
            self.x = b.op("Mul", [x, b.op("Sigmoid", [b.conv(s, r, c, k=1)])])
        elif kind == "pad":
            padded = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
            self.x = b.op("AveragePool", [padded], kernel_shape=[3, 3])
        elif kind == "identity":
            self.x = b.op("Dropout", [b.op("Identity", [x])])
        elif kind == "pool" and self.size >= 4:
            self.x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            self.size //= 2
        elif kind == "pool":
            self.x = b.op("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif kind == "shuffle" and c % 2 == 0:
            s = self.size
            r = b.op("Reshape", [x, b.const(np.array([1, 2, c // 2, s, s], np.int64))])
            t = b.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
            self.x = b.op("Reshape", [t, b.const(np.array([1, c, s, s], np.int64))])
        elif kind == "nhwc":
            t = b.op("Transpose", [x], perm=[0, 2, 3, 1])
            t = b.op("Mul", [t, b.const(np.linspace(0.5, 1.5, c, dtype=np.float32))])
            self.x = b.op("Transpose", [t], perm=[0, 3, 1, 2])
        elif kind == "resize":
            self.x = b.op("MaxPool", [b.resize(x, 2.0)], kernel_shape=[2, 2], strides=[2, 2])
        elif kind == "deconv":
            cout = self.width()
            y = b.conv_transpose(x, c, cout)
            self.x = b.op("AveragePool", [self.act(y, cout)], kernel_shape=[2, 2], strides=[2, 2])
            self.c = cout
        elif kind == "ghost":  # GhostNet: Concat(y, depthwise(y))[:, :out]
            p = self.width()
            y1 = self.act(b.conv(x, c, p, k=1), p)
            y2 = self.act(b.conv(y1, p, p, group=p), p)
            out = self.draw(st.integers(1, 2 * p))
            consts = [b.const(np.array([v], np.int64)) for v in (0, out, 1)]
            self.x = b.op("Slice", [b.op("Concat", [y1, y2], axis=1), *consts])
            self.c = out
        elif kind == "split3" and c >= 3:  # uneven parts, axis counted from the end
            s1 = self.draw(st.integers(1, c - 2))
            s2 = self.draw(st.integers(1, c - s1 - 1))
            sizes = b.const(np.array([s1, s2, c - s1 - s2], np.int64))
            first, middle, last = b.op("Split", [x, sizes], n_out=3, axis=-3)
            self.x = b.op("Concat", [last, self.act(b.conv(middle, s2, s2), s2), first], axis=1)
        elif kind == "slice_neg" and c >= 2:  # x[:, -k:] with the axis counted from the end
            start = self.draw(st.integers(-c, -2))
            consts = [b.const(np.array([v], np.int64)) for v in (start, 2**62, -3)]
            self.x = b.op("Slice", [x, *consts])
            self.c = -start
        elif kind == "depthwise2":  # channel multiplier 2
            self.conv(2 * c, group=c)
        elif kind == "space_to_depth" and self.size % 2 == 0:
            s = self.size
            r = b.op("Reshape", [x, b.const(np.array([1, c, s // 2, 2, s // 2, 2], np.int64))])
            t = b.op("Transpose", [r], perm=[0, 3, 5, 1, 2, 4])
            self.x = b.op("Reshape", [t, b.const(np.array([1, 4 * c, s // 2, s // 2], np.int64))])
            self.c, self.size = 4 * c, s // 2
        elif kind == "gemm_se":  # an SE gate of Gemms, reshaped back to (1, C, 1, 1)
            r = self.width()
            s = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
            s = b.op("Relu", [b.op("Gemm", [s, b.weight(r, c), b.const(np.zeros(r))], transB=1)])
            s = b.op("Sigmoid", [b.op("Gemm", [s, b.weight(r, c)])])
            self.x = b.op("Mul", [x, b.op("Reshape", [s, b.const(np.array([1, c, 1, 1]))])])
        elif kind == "instancenorm":  # (a scale of all ones would not count as parameters)
            scale, shift = b.const(np.linspace(0.5, 0.9, c)), b.const(np.zeros(c))
            self.x = self.act(b.op("InstanceNormalization", [x, scale, shift]), c)
        elif kind == "tokens":  # channels-last tokens through a MatMul, and back
            s, k = self.size, self.width()
            t = b.op("Transpose", [x], perm=[0, 2, 3, 1])
            t = b.op("Reshape", [t, b.const(np.array([1, s * s, c], np.int64))])
            t = b.op("Relu", [b.op("MatMul", [t, b.weight(c, k)])])
            t = b.op("Reshape", [t, b.const(np.array([1, s, s, k], np.int64))])
            self.x, self.c = b.op("Transpose", [t], perm=[0, 3, 1, 2]), k
        elif kind == "concat_self":
            self.x, self.c = b.op("Concat", [x, x], axis=1), 2 * c
        elif kind == "grouped_deconv" and c % 2 == 0:
            cout = 2 * self.draw(st.integers(1, 3))
            y = self.act(b.conv_transpose(x, c, cout, group=2), cout)
            self.x = b.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
            self.c = cout
        else:  # the block does not fit the current shape
            self.conv(self.width())

    def head(self, kind: str) -> onnx.ModelProto:
        b, x, c, s = self.b, self.x, self.c, self.size
        if kind == "gap_gemm":
            y = b.gap_head(x, c, 3)
        elif kind == "gmp_gemm":
            flat = b.op("Flatten", [b.op("GlobalMaxPool", [x])])
            y = b.op("Gemm", [flat, b.weight(3, c), b.const(np.zeros(3))], transB=1)
        elif kind == "flatten_gemm":
            flat = b.op("Flatten", [x], axis=1)
            y = b.op("Gemm", [flat, b.weight(c * s * s, 3), b.const(np.zeros(3))])
        elif kind == "reshape_matmul":
            flat = b.op("Reshape", [x, b.const(np.array([1, c * s * s], np.int64))])
            y = b.op("Add", [b.op("MatMul", [flat, b.weight(c * s * s, 3)]), b.const(np.ones(3))])
        else:
            y = b.conv(x, c, 2, k=1)
        return b.model([y], ["output"])


@st.composite
def cnn_and_plan(draw):
    net = Net(draw, draw(st.integers(0, 2**16)))
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5)):
        net.block(kind)
    raw = net.head(draw(st.sampled_from(HEADS)))
    form = draw(st.sampled_from(["canonical", *EXPORTER_FORMS]))
    model = load_model(raw if form == "canonical" else VARIANTS[form](raw))
    return model, draw(st.integers(0, 2**32 - 1))


EXPORTER_FORMS = ["constants", "minus_one", "names", "value_attrs"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnn_and_plan())
def test_random_plans_on_random_cnns(case):
    model, seed = case
    analysis = analyze_channels(model)
    rng = np.random.default_rng(seed)
    keep, drop = {}, {}
    free = [g for g in analysis.groups if not g.pinned and g.size > 1]
    assume(free)  # a graph whose every channel is pinned has nothing to drop
    for k, g in enumerate(free):
        if k > 0 and rng.random() < 0.2:
            continue  # some groups keep everything; the first always loses channels
        kept = np.sort(rng.choice(g.size, size=rng.integers(1, g.size), replace=False))
        keep[g.id] = kept.tolist()
        drop[g.id] = np.setdiff1d(np.arange(g.size), kept).tolist()
    assert any(drop.values())
    killed = kill_channels(model, analysis.groups, drop)
    small = shrink_channels(killed, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert [i.name for i in small.graph.input] == [i.name for i in model.graph.input]
    assert count_parameters(small) == predicted_params(killed, keep, analysis)
    assert_same_outputs(killed, small)  # names, shapes and values
    # kill_channels zeroes what the analysis groups together, so the checks above would pass
    # with a grouping wrong the same way; the values themselves say which channels were dead.
    assert_cut_channels_were_dead(killed, small)


def test_the_dead_channel_oracle_sees_a_live_channel_cut():
    """The value oracle above fails when shrink cuts channels that were not dead, and
    compares the kept ones when they were."""
    b = Builder("oracle", seed=0)
    x = b.input("input", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="c1")])
    model = load_model(b.model([b.conv(y, 8, 2, k=1, name="c2")], ["output"]))
    analysis = analyze_channels(model)
    (free,) = [g for g in analysis.groups if not g.pinned]
    keep = {free.id: [0, 1, 2, 3]}
    live_cut = shrink_channels(model, keep, analysis)
    try:
        assert_cut_channels_were_dead(model, live_cut)
    except AssertionError:
        pass
    else:
        raise AssertionError("the oracle missed live channels being cut")
    killed = kill_channels(model, analysis.groups, {free.id: [4, 5, 6, 7]})
    assert assert_cut_channels_were_dead(killed, shrink_channels(killed, keep, analysis)) >= 1
