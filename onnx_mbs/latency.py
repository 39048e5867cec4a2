"""Latency measured in onnxruntime: what a `latency=` budget plans with.

MACs are a poor proxy for time: a 1x1 conv at 7x7 and a 3x3 conv at 56x56 with
the same MACs run at very different speeds, and runtimes work in channel
blocks. So each Conv layer is timed alone, as a one-node model on the user's
execution provider, at the channel widths the planner asks about. Widths are
measured on a grid (every `channel_multiple`, at most ~9 points per axis,
interpolated between) and cached by the layer's shape, so identical layers
(a ResNet's repeated blocks) share measurements. The model's predicted time
is the sum of its convs plus the rest of the model, taken in proportion to the
elements the convs output and fitted so the full-width prediction equals the
whole model's measured time. The pipeline
checks the written model's measured latency against the asked fraction and
re-plans with a corrected target when the prediction missed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_mbs.data.ready import takes_floats
from onnx_mbs.passes.analysis import ConvLayer, ModelAnalysis
from onnx_mbs.passes.cost import CostModel
from onnx_mbs.runtime import CPU, make_session, ort_numpy_type

GRID_POINTS = 8  # intervals per channel axis at most; finer axes use the channel multiple
_MIN_RUNS, _MAX_RUNS = 3, 50


def time_session(session, feed: Mapping[str, np.ndarray], min_seconds: float = 0.02) -> float:
    """Fastest of at least 3 runs and `min_seconds`, after one warm-up (the minimum is the
    least noisy figure on a shared machine)."""
    session.run(None, feed)
    best, spent, runs = math.inf, 0.0, 0
    while runs < _MIN_RUNS or (spent < min_seconds and runs < _MAX_RUNS):
        start = time.perf_counter()
        session.run(None, feed)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def random_feed(
    session, shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Random inputs for every input of a session, each of its declared type (a model taking
    uint8 images, Cast to float in the graph, refuses float32): of its shape in `shapes` (the
    size analysed, for a model whose dims are dynamic), else its declared dims, 1 for a
    dynamic one."""
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if shapes is not None and i.name in shapes:
            shape = [int(d) for d in shapes[i.name]]
        dtype = ort_numpy_type(i.type)
        if takes_floats(dtype):
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
        else:  # integers and bool: pixel-like values
            feed[i.name] = rng.integers(0, 2 if dtype == np.bool_ else 256, shape).astype(dtype)
    return feed


def measure_models(
    models: Sequence[onnx.ModelProto | bytes],
    providers: list[str],
    runs: int = 30,
    threads: int = 0,
    sessions: int = 3,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[float]:
    """Seconds per run of each model: the fastest of `runs` runs on each of `sessions`
    sessions (one model's speed differs up to 2x from session to session on a loaded
    machine), every session taking turns run by run so that load changes hit all alike.
    `threads`: intra-op threads (0: onnxruntime's default, one per core); `shapes`: the input
    shapes to time at (`random_feed`)."""
    data = [m.SerializeToString() if isinstance(m, onnx.ModelProto) else m for m in models]
    opened = [
        (k, make_session(d, providers, threads))
        for _ in range(sessions)
        for k, d in enumerate(data)
    ]
    feeds = [random_feed(s, shapes) for _, s in opened]
    for (_, session), feed in zip(opened, feeds):
        session.run(None, feed)  # warm-up
    best = [math.inf] * len(models)
    for _ in range(max(1, runs // sessions)):
        for (k, session), feed in zip(opened, feeds):
            start = time.perf_counter()
            session.run(None, feed)
            best[k] = min(best[k], time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class ConvShape:
    """Everything a conv's run time depends on, but its channel counts."""

    batch: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    input_size: tuple[int, int]
    output_size: tuple[int, int]

    @classmethod
    def of(cls, layer: ConvLayer, batch: int) -> ConvShape:
        return cls(
            batch, layer.kernel, layer.stride, layer.dilation, layer.input_size, layer.output_size
        )

    def model(self, in_per_group: int, out_channels: int, groups: int) -> onnx.ModelProto:
        """A one-Conv model with these shapes and random weights."""
        c_in, size = in_per_group * groups, list(self.input_size)
        pads_begin, pads_end = [], []
        for n, out, k, s, d in zip(
            self.input_size, self.output_size, self.kernel, self.stride, self.dilation
        ):
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
            pads_begin.append(total // 2)
            pads_end.append(total - total // 2)
        rng = np.random.default_rng(0)
        w = rng.standard_normal((out_channels, in_per_group, *self.kernel)).astype(np.float32)
        b = np.zeros(out_channels, np.float32)
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            kernel_shape=list(self.kernel),
            strides=list(self.stride),
            dilations=list(self.dilation),
            pads=pads_begin + pads_end,
            group=groups,
        )
        graph = helper.make_graph(
            [node],
            "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [self.batch, c_in, *size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


Timer = Callable[[ConvShape, int, int, int], float]  # shape, in/group, out, groups -> s


def onnxruntime_timer(providers: list[str], threads: int = 0) -> Timer:
    """Times one conv configuration in onnxruntime on `providers`."""

    def timer(shape: ConvShape, in_per_group: int, out_channels: int, groups: int) -> float:
        model = shape.model(in_per_group, out_channels, groups)
        session = make_session(model, providers, threads)
        return time_session(session, random_feed(session))

    return timer


def _grid(size: int, multiple: int) -> int:
    """Grid step for a channel axis of `size`: the channel multiple, or coarser for wide axes."""
    step = max(multiple, math.ceil(size / GRID_POINTS))
    return math.ceil(step / multiple) * multiple


def _bracket(value: float, size: int, step: int) -> tuple[int, int, float]:
    """Grid points around `value` and the weight of the upper one."""
    value = min(float(size), max(1.0, value))
    lo = int(value // step) * step
    if lo == 0:  # below the first grid point: measured as it is
        v = int(round(value))
        return v, v, 0.0
    hi = min(size, lo + step)
    if hi == lo or value <= lo:
        return lo, lo, 0.0
    return lo, hi, (value - lo) / (hi - lo)


class LatencyModel:
    """Predicted seconds per run of a model as a function of channels kept per group.

    Calling it with group counts returns the sum of its convs' measured times at
    those widths plus the rest of the model (in proportion to the convs' output
    elements). Measurements are cached.
    """

    def __init__(
        self,
        analysis: ModelAnalysis,
        cost: CostModel,
        whole_model_seconds: float,
        timer: Timer,
        *,
        batch: int = 1,
        channel_multiple: int = 8,
    ) -> None:
        self.cost = cost
        self.timer = timer
        self.multiple = channel_multiple
        # ConvTranspose layers are left in the constant rest; the measured check of the
        # written model (see the module docstring) covers what that misses.
        self.layers = [
            (layer, ConvShape.of(layer, batch), cost.weight_axes.get(layer.weight, (-1, -1)))
            for layer in analysis.layers
            if layer.op_type == "Conv"
        ]
        self.cache: dict[tuple, float] = {}
        self.whole_model_seconds = whole_model_seconds
        full = dict(enumerate(cost.sizes.tolist()))
        self.rest = 0.0
        self.activations_full = 1.0
        convs, self.activations_full = self._convs(full)
        self.rest = whole_model_seconds - convs

    @property
    def measurements(self) -> int:
        return len(self.cache)

    def layer_seconds(self, layer: ConvLayer, shape: ConvShape, out: float, in_pg: float) -> float:
        """Interpolated time of `layer` at `out` output and `in_pg` input channels per group."""
        in_full = layer.in_channels // layer.groups
        o_lo, o_hi, wo = _bracket(out, layer.out_channels, _grid(layer.out_channels, self.multiple))
        i_lo, i_hi, wi = _bracket(in_pg, in_full, _grid(in_full, self.multiple))
        total = 0.0
        for o, w_o in ((o_lo, 1 - wo), (o_hi, wo)):
            for i, w_i in ((i_lo, 1 - wi), (i_hi, wi)):
                if w_o * w_i > 0:
                    total += w_o * w_i * self._measure(layer, shape, o, i)
        return total

    def _measure(self, layer: ConvLayer, shape: ConvShape, out: int, in_pg: int) -> float:
        # Grouped and depthwise convs keep channels per group: groups follow the outputs.
        groups = max(1, round(layer.groups * out / layer.out_channels)) if layer.groups > 1 else 1
        out = max(groups, out // groups * groups)
        key = (shape, in_pg, out, groups)
        if key not in self.cache:
            self.cache[key] = self.timer(shape, in_pg, out, groups)
        return self.cache[key]

    def _convs(self, counts: Mapping[int, int]) -> tuple[float, float]:
        """Seconds of the convs, and the elements they output, at these counts."""
        kept = self.cost.kept(counts)
        seconds = elements = 0.0
        for layer, shape, (axis_out, axis_in) in self.layers:
            out = kept[axis_out] if axis_out >= 0 else layer.out_channels
            in_pg = kept[axis_in] if axis_in >= 0 else layer.in_channels // layer.groups
            seconds += self.layer_seconds(layer, shape, float(out), float(in_pg))
            elements += float(out) * layer.output_size[0] * layer.output_size[1]
        return seconds, elements

    def __call__(self, counts: Mapping[int, int]) -> float:
        seconds, elements = self._convs(counts)
        # Everything but the convs (activations, joins, concats, layout changes) moves
        # the activations the convs write: taken in proportion to them.
        return seconds + self.rest * elements / self.activations_full


MULTIPLES = (8, 16, 32, 64)


def auto_channel_multiple(analysis: ModelAnalysis, providers: list[str], timer: Timer) -> int:
    """`--channel-multiple auto`: 8 on the CPU provider (onnxruntime's CPU convs work in
    blocks of 8 channels, 16 with AVX-512, and 8 divides both); elsewhere the multiple whose
    widths cost least per kept channel on the model's largest conv over 120 channels, measured."""
    if providers[0] == CPU:
        return 8
    top = MULTIPLES[-1] + sum(MULTIPLES[:-1])
    convs = [
        x for x in analysis.layers if x.op_type == "Conv" and x.groups == 1 and x.out_channels > top
    ]
    widest = max(convs, key=lambda x: x.macs, default=None)
    if widest is None:
        return MULTIPLES[0]
    # Widths 120, 112, 96, 64: each a multiple of its own m only, so a runtime that pads
    # to m' > m shows up as a dearer channel (narrow enough for padding to show).
    shape = ConvShape.of(widest, 1)
    per_channel = {}
    width = top
    for m in MULTIPLES:
        width = width // m * m
        per_channel[m] = timer(shape, widest.in_channels, width, 1) / width
    best = min(per_channel.values())
    return next(m for m in MULTIPLES if per_channel[m] <= 1.05 * best)
