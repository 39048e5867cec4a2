"""A seeded generator of random valid CNN DAGs in ONNX, for fuzzing the channel rewrite.

`random_spec(seed)` draws a list of blocks (plain data: kind and parameters), and
`build(spec)` writes it as a model with a dynamic batch (input `input`, N x 3 x S x S).
Shrinking a failing case is dropping blocks from the spec (`shrink_spec`): every block
fits whatever the blocks before it left (channels, spatial size), adapting its numbers.

`build` also records, per Conv/ConvTranspose it writes, the initializers that make
each output channel (`Made`): its filters, its bias, and the BatchNorm right after
it, so that a test can zero channels without asking the channel analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from graphs import Builder

KINDS = [
    "conv", "conv", "depthwise", "grouped", "residual", "residual_mul", "residual_sub",
    "affine", "concat", "split", "slice", "shuffle", "deconv", "pool", "resize", "se",
    "middle_output", "skip", "sum3", "prelu", "deconv_grouped", "bn_join", "gate_gap",
    "depth_to_space", "pad", "concat_self", "se_gemm", "same_conv", "split_output",
    "slice_all_axes", "deconv_stride",
]  # fmt: skip
ACTS = ["Relu", "Clip", "Sigmoid", "HardSwish", "none"]
HEADS = [
    "gap_gemm", "gap_matmul", "flatten_gemm", "conv", "squeeze_matmul", "reshape_gemm", "gemm_bn",
]  # fmt: skip


@dataclass
class Made:
    """A conv's output channels: the conv node, its weight (filters on `axis`), its
    bias, the BatchNorm right after it (scale, bias, mean, var), if any."""

    node: str
    weight: str
    axis: int
    channels: int
    bias: str | None = None
    bn: tuple[str, str, str, str] | None = None


@dataclass
class Built:
    model: onnx.ModelProto
    made: list[Made] = field(default_factory=list)


def random_spec(
    seed: int, blocks: tuple[int, int] = (2, 7), kinds: list[str] = KINDS
) -> list[dict]:
    """A random list of blocks (of `kinds`), each a dict of its kind and the numbers it
    draws."""
    rng = np.random.default_rng(seed)
    rank = 1 if rng.random() < 0.2 else 2  # Conv1d (audio) now and then
    size = int(rng.choice([6, 8, 10])) * (2 if rank == 1 else 1)
    spec: list[dict] = [{"kind": "stem", "size": size, "seed": seed, "rank": rank}]
    for _ in range(int(rng.integers(*blocks))):
        kind = str(rng.choice(kinds))
        spec.append({"kind": kind, "r": rng.integers(0, 2**31, size=8).tolist()})
    spec.append({"kind": "head", "head": str(rng.choice(HEADS)), "r": [int(rng.integers(2**31))]})
    return spec


class _Net:
    def __init__(self, seed: int, size: int, rank: int = 2) -> None:
        self.b = Builder("randcnn", seed)
        self.size = size
        self.r = rank  # spatial dims
        self.x = self.b.input("input", ["N", 3, *[size] * rank])
        self.c = 3
        self.made: list[Made] = []
        self.outputs: list[str] = []
        self.batch_dim = -1 if seed % 2 else 0  # exporters write -1 or 0 for the batch
        self.saved: list[tuple[str, int, int]] = []  # (tensor, channels, size) to join later

    # layers ---------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, rng, k: int | None = None, group: int = 1,
             stride: int = 1, bn: bool | None = None, act: str | None = None) -> str:  # fmt: skip
        b = self.b
        k = k if k is not None else int(rng.choice([1, 3, 5]))
        dil = int(rng.choice([1, 1, 2])) if k > 1 else 1
        bias = bool(rng.random() < 0.6)
        w = b.weight(cout, cin // group, *self.k(k))
        inputs = [x, w]
        if bias:
            inputs.append(b.const(rng.normal(0, 0.1, cout).astype(np.float32), "b"))
        pad = dil * (k // 2)
        y = b.op("Conv", inputs, kernel_shape=self.k(k), strides=self.k(stride),
                 pads=self.k(pad) * 2, dilations=self.k(dil), group=group)  # fmt: skip
        made = Made(b.nodes[-1].name, w, 0, cout, inputs[2] if bias else None)
        self.made.append(made)
        if bn if bn is not None else rng.random() < 0.5:
            y = b.bn(y, cout)
            made.bn = tuple(b.nodes[-1].input[1:5])
        return self.act(y, rng, act)

    def act(self, y: str, rng, kind: str | None = None) -> str:
        kind = kind or str(rng.choice(ACTS))
        if kind == "none":
            return y
        if kind == "Clip":
            return self.b.op("Clip", [y, self.b.const(np.float32(0)), self.b.const(np.float32(6))])
        return self.b.op(kind, [y])

    def k(self, value: int) -> list[int]:
        """One value per spatial dim."""
        return [value] * self.r

    def ones(self, c: int, lead: int = 0) -> tuple[int, ...]:
        """A per-channel shape: `lead` ones, c, then one 1 per spatial dim."""
        return (1,) * lead + (c,) + (1,) * self.r

    def width(self, rng) -> int:
        return int(rng.integers(1, 7))

    # blocks ---------------------------------------------------------------------------
    def block(self, spec: dict) -> None:
        rng = np.random.default_rng(spec["r"])
        if rng.random() < 0.4:
            self.saved.append((self.x, self.c, self.size))
        getattr(self, "_" + spec["kind"])(rng)

    def _conv(self, rng) -> None:
        stride = 2 if self.size >= 4 and rng.random() < 0.3 else 1
        cout = self.width(rng)
        self.x = self.conv(self.x, self.c, cout, rng, stride=stride)
        self.c = cout
        self.size = (self.size - 1) // stride + 1

    def _depthwise(self, rng) -> None:
        mult = int(rng.choice([1, 1, 2]))
        self.x = self.conv(self.x, self.c, self.c * mult, rng, k=3, group=self.c)
        self.c *= mult

    def _grouped(self, rng) -> None:
        divisors = [g for g in range(2, self.c + 1) if self.c % g == 0]
        if not divisors:
            return self._conv(rng)
        g = int(rng.choice(divisors))
        cout = g * int(rng.integers(1, 3))
        self.x = self.conv(self.x, self.c, cout, rng, group=g)
        self.c = cout

    def _residual(self, rng, op: str = "Add") -> None:
        mid = self.width(rng)
        y = self.conv(self.x, self.c, mid, rng)
        y = self.conv(y, mid, self.c, rng, act="none")
        joined = self.b.op(op, [self.x, y] if rng.random() < 0.5 else [y, self.x])
        self.x = self.act(joined, rng)

    def _residual_mul(self, rng) -> None:
        self._residual(rng, "Mul")

    def _residual_sub(self, rng) -> None:
        self._residual(rng, "Sub")

    def _affine(self, rng) -> None:
        """A per-channel constant, broadcast as (1, C, 1, 1), (C, 1, 1) or a scalar."""
        c = self.c
        shape = [self.ones(c, 1), self.ones(c), ()][int(rng.integers(3))]
        value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        op = str(rng.choice(["Add", "Mul", "Sub"]))
        const = self.b.const(value)
        self.x = self.b.op(op, [self.x, const] if rng.random() < 0.7 else [const, self.x])

    def _concat(self, rng) -> None:
        p, q = self.width(rng), self.width(rng)
        left = self.conv(self.x, self.c, p, rng)
        right = self.x if rng.random() < 0.3 else self.conv(self.x, self.c, q, rng, k=1)
        q = self.c if right == self.x else q
        self.x = self.b.op("Concat", [left, right] if rng.random() < 0.5 else [right, left],
                           axis=int(rng.choice([1, -1 - self.r])))  # fmt: skip
        self.c = p + q

    def _split(self, rng) -> None:
        c = self.c
        if c < 2:
            return self._conv(rng)
        n = int(rng.integers(2, min(c, 3) + 1))
        cuts = np.sort(rng.choice(np.arange(1, c), size=n - 1, replace=False))
        sizes = np.diff([0, *cuts.tolist(), c]).astype(np.int64)
        parts = self.b.op("Split", [self.x, self.b.const(sizes)], n_out=n, axis=1)
        treated = []
        for part, s in zip(parts, sizes.tolist()):
            if rng.random() < 0.5:
                part = self.conv(part, s, s, rng)
            treated.append((part, s))
        if rng.random() < 0.3 and n > 2:  # one part left unused
            treated.pop(int(rng.integers(n)))
        order = rng.permutation(len(treated))
        self.x = self.b.op("Concat", [treated[k][0] for k in order], axis=1)
        self.c = sum(s for _, s in treated)

    def _slice(self, rng) -> None:
        c = self.c
        if c < 2:
            return self._conv(rng)
        start = int(rng.integers(0, c - 1))
        end = int(rng.integers(start + 1, c + 1))
        s_start = start - c if rng.random() < 0.3 else start
        s_end = 2**62 if end == c and rng.random() < 0.5 else end
        axis = 1 if rng.random() < 0.5 else -1 - self.r
        consts = [self.b.const(np.array([v], np.int64)) for v in (s_start, s_end, axis, 1)]
        self.x = self.b.op("Slice", [self.x, *consts])
        self.c = end - start

    def _shuffle(self, rng) -> None:
        c, s = self.c, self.size
        divisors = [g for g in range(2, c) if c % g == 0]
        if not divisors:
            return self._conv(rng)
        g = int(rng.choice(divisors))
        n = self.batch_dim
        first, second = [n, g, c // g, *self.k(s)], [n, c, *self.k(s)]
        if n == 0 and rng.random() < 0.5:  # one entry left to the runtime (-1)
            first[int(rng.choice([1, 2, 3]))] = -1
        if n == 0 and rng.random() < 0.5:
            second[int(rng.choice([1, 2]))] = -1
        r = self.b.op("Reshape", [self.x, self.b.const(np.array(first, np.int64))])
        t = self.b.op("Transpose", [r], perm=[0, 2, 1, *range(3, 3 + self.r)])
        self.x = self.b.op("Reshape", [t, self.b.const(np.array(second, np.int64))])

    def _deconv(self, rng) -> None:
        b = self.b
        c = self.c
        group = c if rng.random() < 0.3 else 1
        cout = c if group > 1 else self.width(rng)
        w = b.weight(c, cout // group, *self.k(2))
        bias = b.const(rng.normal(0, 0.1, cout).astype(np.float32), "b")
        y = b.op("ConvTranspose", [self.x, w, bias], kernel_shape=self.k(2), strides=self.k(2),
                 group=group)  # fmt: skip
        self.made.append(Made(b.nodes[-1].name, w, 1, cout, bias))
        y = self.act(y, rng)
        self.x = b.op("MaxPool", [y], kernel_shape=self.k(2), strides=self.k(2))
        self.c = cout

    def _pool(self, rng) -> None:
        kind = str(rng.choice(["MaxPool", "AveragePool"]))
        if self.size >= 4 and rng.random() < 0.5:
            self.x = self.b.op(kind, [self.x], kernel_shape=self.k(2), strides=self.k(2))
            self.size //= 2
        else:
            self.x = self.b.op(kind, [self.x], kernel_shape=self.k(3), pads=self.k(1) * 2)

    def _resize(self, rng) -> None:
        scales = self.b.const(np.array([1, 1, *self.k(2)], np.float32), "scales")
        up = self.b.op("Resize", [self.x, "", scales], mode="nearest")
        self.x = self.b.op("AveragePool", [up], kernel_shape=self.k(2), strides=self.k(2))

    def _se(self, rng) -> None:
        b, c = self.b, self.c
        r = self.width(rng)
        s = b.op("GlobalAveragePool", [self.x])
        s = self.conv(s, c, r, rng, k=1, bn=False, act="Relu")
        s = self.conv(s, r, c, rng, k=1, bn=False, act=str(rng.choice(["Sigmoid", "HardSigmoid"])))
        self.x = b.op("Mul", [self.x, s] if rng.random() < 0.5 else [s, self.x])

    def _skip(self, rng) -> None:
        """A long skip: a tensor saved blocks ago joined to the current one (U-Net, DenseNet)."""
        fits = [(t, c) for t, c, size in self.saved if size == self.size and t != self.x]
        if not fits:
            return self._conv(rng)
        t, c = fits[int(rng.integers(len(fits)))]
        if c == self.c and rng.random() < 0.6:
            self.x = self.b.op(str(rng.choice(["Add", "Sub", "Mul", "Max"])), [self.x, t])
        else:
            self.x = self.b.op("Concat", [self.x, t] if rng.random() < 0.5 else [t, self.x],
                               axis=1)  # fmt: skip
            self.c += c

    def _sum3(self, rng) -> None:
        c = self.c
        branches = [self.x] + [self.conv(self.x, c, c, rng, k=1) for _ in range(2)]
        self.x = self.b.op(str(rng.choice(["Sum", "Mean", "Max"])), branches)

    def _prelu(self, rng) -> None:
        c = self.c
        shape = [self.ones(c), self.ones(c, 1), (1,)][int(rng.integers(3))]
        slope = self.b.const(rng.uniform(0.1, 0.3, shape).astype(np.float32))
        self.x = self.b.op("PRelu", [self.x, slope])
        if rng.random() < 0.5:
            self.x = self.b.op("Div", [self.x, self.b.const(rng.uniform(0.5, 2, self.ones(c)))])

    def _deconv_grouped(self, rng) -> None:
        b, c = self.b, self.c
        divisors = [g for g in range(2, c + 1) if c % g == 0]
        if not divisors:
            return self._deconv(rng)
        group = int(rng.choice(divisors))
        cout = group * int(rng.integers(1, 3))
        k = int(rng.choice([1, 3]))
        w = b.weight(c, cout // group, *self.k(k))
        inputs = [self.x, w]
        if rng.random() < 0.5:
            inputs.append(b.const(rng.normal(0, 0.1, cout).astype(np.float32), "b"))
        y = b.op("ConvTranspose", inputs, kernel_shape=self.k(k), pads=self.k(k // 2) * 2,
                 group=group)  # fmt: skip
        self.made.append(Made(b.nodes[-1].name, w, 1, cout, inputs[2] if len(inputs) > 2 else None))
        if rng.random() < 0.5:
            y = b.bn(y, cout)
            self.made[-1].bn = tuple(b.nodes[-1].input[1:5])
        self.x, self.c = self.act(y, rng), cout

    def _bn_join(self, rng) -> None:
        """A residual join normalised after the Add (pre-activation ResNets)."""
        y = self.conv(self.x, self.c, self.c, rng, act="none")
        self.x = self.act(self.b.bn(self.b.op("Add", [self.x, y]), self.c), rng)

    def _gate_gap(self, rng) -> None:
        """x times (or plus) its own pooled map, broadcast over space: no convs in between."""
        s = self.b.op(str(rng.choice(["GlobalAveragePool", "GlobalMaxPool"])), [self.x])
        s = self.b.op("Sigmoid", [s]) if rng.random() < 0.5 else s
        op = str(rng.choice(["Mul", "Add", "Sub"]))
        self.x = self.b.op(op, [self.x, s] if rng.random() < 0.5 else [s, self.x])

    def _depth_to_space(self, rng) -> None:
        """A pixel shuffle: its b * b channels per output channel are cut as one unit, in the
        order of the mode (DCR or CRD)."""
        if self.c % 4:
            return self._conv(rng)
        if self.r != 2:
            return self._conv(rng)
        y = self.b.op("DepthToSpace", [self.x], blocksize=2, mode=str(rng.choice(["DCR", "CRD"])))
        self.x = self.b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
        self.c //= 4

    def _pad(self, rng) -> None:
        pads = np.array([0, 0, *self.k(1)] * 2, np.int64)
        mode = str(rng.choice(["constant", "reflect", "edge"]))
        y = self.b.op("Pad", [self.x, self.b.const(pads)], mode=mode)
        self.x = self.b.op("AveragePool", [y], kernel_shape=self.k(3))

    def _concat_self(self, rng) -> None:
        self.x = self.b.op("Concat", [self.x, self.x], axis=1)
        self.c *= 2

    def _se_gemm(self, rng) -> None:
        """An SE gate of Gemms (torch Linear layers), back to (N, C, 1, 1) by Unsqueeze or
        Reshape."""
        b, c = self.b, self.c
        r = self.width(rng)
        s = b.op("Flatten", [b.op("GlobalAveragePool", [self.x])], axis=1)
        s = b.op("Relu", [b.op("Gemm", [s, b.weight(r, c), b.const(np.zeros(r))], transB=1)])
        s = b.op("Gemm", [s, b.weight(c, r), b.const(rng.normal(0, 0.1, c))], transB=1)
        s = b.op("HardSigmoid", [s])
        if rng.random() < 0.5:
            s = b.op("Unsqueeze", [s, b.const(np.arange(2, 2 + self.r))])
        else:
            s = b.op("Reshape", [s, b.const(np.array([self.batch_dim, *self.ones(c)]))])
        self.x = b.op("Mul", [self.x, s])

    def _same_conv(self, rng) -> None:
        """auto_pad SAME_UPPER with stride 2 (TensorFlow exports)."""
        cout = self.width(rng)
        w = self.b.weight(cout, self.c, *self.k(3))
        y = self.b.op("Conv", [self.x, w], kernel_shape=self.k(3), strides=self.k(2),
                      auto_pad="SAME_UPPER")  # fmt: skip
        self.made.append(Made(self.b.nodes[-1].name, w, 0, cout))
        self.x, self.c, self.size = self.act(y, rng), cout, (self.size + 1) // 2

    def _split_output(self, rng) -> None:
        """A Split whose first part is also a graph output."""
        if self.c < 2:
            return self._conv(rng)
        s = int(rng.integers(1, self.c))
        left, right = self.b.op("Split", [self.x, self.b.const(np.array([s, self.c - s]))],
                                n_out=2, axis=1)  # fmt: skip
        self.outputs.append(left)
        right = self.conv(right, self.c - s, self.c - s, rng)
        self.x = self.b.op("Concat", [left, right], axis=1)

    def _slice_all_axes(self, rng) -> None:
        """Slice without `axes`: starts and ends for every axis, spatial ones whole."""
        c = self.c
        if c < 2:
            return self._conv(rng)
        start = int(rng.integers(0, c - 1))
        big = 2**62
        starts = self.b.const(np.array([0, start, *self.k(0)], np.int64))
        ends = self.b.const(np.array([big, c, *self.k(big)], np.int64))
        self.x = self.b.op("Slice", [self.x, starts, ends])
        self.c = c - start

    def _deconv_stride(self, rng) -> None:
        b, c = self.b, self.c
        cout = self.width(rng)
        w = b.weight(c, cout, *self.k(3))
        y = b.op("ConvTranspose", [self.x, w], kernel_shape=self.k(3), strides=self.k(2),
                 pads=self.k(1) * 2, output_padding=self.k(1))  # fmt: skip
        self.made.append(Made(b.nodes[-1].name, w, 1, cout))
        if rng.random() < 0.5:
            y = b.bn(y, cout)
            self.made[-1].bn = tuple(b.nodes[-1].input[1:5])
        y = self.act(y, rng)
        self.x = b.op("AveragePool", [y], kernel_shape=self.k(2), strides=self.k(2))
        self.c = cout

    def _middle_output(self, rng) -> None:
        self.outputs.append(self.x)
        self._conv(rng)

    def _head(self, spec: dict) -> onnx.ModelProto:
        b, x, c, s = self.b, self.x, self.c, self.size
        rng = np.random.default_rng(spec["r"])
        kind = spec["head"]
        if kind == "gap_gemm":
            y = b.gap_head(x, c, 3)
        elif kind == "gap_matmul":
            flat = b.op("Reshape", [b.op("GlobalAveragePool", [x]),
                                    b.const(np.array([self.batch_dim, c], np.int64))])  # fmt: skip
            y = b.op("Add", [b.op("MatMul", [flat, b.weight(c, 3)]),
                             b.const(rng.normal(0, 0.1, 3).astype(np.float32))])  # fmt: skip
        elif kind == "flatten_gemm":
            flat = b.op("Flatten", [x], axis=1)
            y = b.op("Gemm", [flat, b.weight(3, c * s**self.r), b.const(np.zeros(3))], transB=1)
        elif kind == "gemm_bn":  # a hidden Linear with BatchNorm1d, then the classifier
            flat = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
            h = self.width(rng) + 1
            y = b.op("Gemm", [flat, b.weight(h, c), b.const(np.zeros(h))], transB=1)
            y = b.op("Relu", [b.bn(y, h)])
            y = b.op("Gemm", [y, b.weight(3, h)], transB=1)
        elif kind == "squeeze_matmul":
            squeezed = b.op("Squeeze", [b.op("GlobalAveragePool", [x]),
                                        b.const(np.arange(2, 2 + self.r))])  # fmt: skip
            y = b.op("MatMul", [squeezed, b.weight(c, 3)])
            y = b.op("Add", [y, b.const(rng.normal(0, 0.1, (1, 3)).astype(np.float32))])
        elif kind == "reshape_gemm":
            flat = b.op(
                "Reshape", [x, b.const(np.array([self.batch_dim, c * s**self.r], np.int64))]
            )
            y = b.op("Gemm", [flat, b.weight(c * s**self.r, 3), b.const(np.zeros((1, 3)))])
        else:
            y = self.conv(x, c, 2, rng, k=1, act="none")
        names = ["output"] + [f"middle{k}" for k in range(len(self.outputs))]
        return b.model([y, *self.outputs], names)


def build(spec: list[dict]) -> Built:
    stem = spec[0]
    net = _Net(stem["seed"], stem["size"], stem.get("rank", 2))
    rng = np.random.default_rng(stem["seed"])
    net.x = net.conv(net.x, 3, int(rng.integers(2, 7)), rng, k=3)
    net.c = net.made[-1].channels
    for block in spec[1:-1]:
        net.block(block)
    model = net._head(spec[-1])
    onnx.checker.check_model(model, full_check=True)
    return Built(model, net.made)


def merge_equal_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """One tensor for initializers of equal value, as torch's exporter writes untrained
    layers (zero biases, BatchNorm's ones and zeros shared across layers of one width)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for tensor in out.graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), onnx.numpy_helper.to_array(tensor).tobytes())
        if key in first:
            renamed[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            kept.append(tensor)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
    return out


def untrained(built: Built, rng: np.random.Generator) -> Built:
    """`built` with zero biases and BatchNorms of ones and zeros (gamma, beta, mean, var),
    so that equal tensors can be merged."""
    out = onnx.ModelProto()
    out.CopyFrom(built.model)
    tensors = {t.name: t for t in out.graph.initializer}
    for made in built.made:
        fills = [(made.bias, 0.0)] if made.bias else []
        if made.bn:
            fills += list(zip(made.bn, (1.0, 0.0, 0.0, 1.0)))
        for name, value in fills:
            if rng.random() < 0.8:
                array = np.full(tuple(tensors[name].dims), value, np.float32)
                tensors[name].CopyFrom(onnx.numpy_helper.from_array(array, name))
    return Built(out, built.made)


def shrink_spec(spec: list[dict], fails: Callable[[list[dict]], bool]) -> list[dict]:
    """The smallest spec (greedily, one block at a time) that still fails; the stem and the
    head stay, and the head is tried as a plain conv."""
    spec = list(spec)
    changed = True
    while changed:
        changed = False
        for k in range(len(spec) - 2, 0, -1):
            candidate = spec[:k] + spec[k + 1 :]
            if _fails(fails, candidate):
                spec, changed = candidate, True
    if spec[-1]["head"] != "conv":
        candidate = spec[:-1] + [{**spec[-1], "head": "conv"}]
        if _fails(fails, candidate):
            spec = candidate
    return spec


def _fails(fails: Callable[[list[dict]], bool], spec: list[dict]) -> bool:
    try:
        return fails(spec)
    except Exception:  # a different failure counts as failing: keep shrinking
        return True
