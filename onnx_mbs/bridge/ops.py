"""The op table: how each ONNX op runs as torch ops.

Every entry is a small *builder*: it receives a `Node` (attributes decoded, inputs that are known at
build time already resolved to numpy) and returns the function that runs the node on its runtime
inputs. Everything that depends only on attributes or constant inputs -- pads, axes, target shapes,
resize scales -- is worked out once in the builder, so a forward pass pays only for the torch op.

Runtime functions receive every ONNX input positionally (missing optional inputs as None) and
return a tensor, or a tuple of tensors for multi-output nodes. Ops listed in `TRAINING_OPS` also
receive the module's `training` flag first. Shape arithmetic (Shape, Gather, Concat ... feeding
Reshape) runs on small int64 CPU tensors and never carries gradients.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnx_mbs.passes.domains import FUSED_ACTIVATIONS, FUSED_CONV, FUSED_GEMM, SAVE_AT_BASIC
from onnx_mbs.passes.errors import BadInputError

OpFn = Callable[..., Any]


@dataclass
class Node:
    """One ONNX node with what the builders need: attributes, constant inputs, opset."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_proto(
        cls,
        node: onnx.NodeProto,
        opset: int,
        consts: dict[str, np.ndarray],
        shapes: dict[str, tuple[int, ...]],
    ) -> Node:
        ins = list(node.input)
        return cls(
            op_type=node.op_type,
            name=node.name,
            inputs=ins,
            outputs=list(node.output),
            attrs={a.name: _attr_value(a) for a in node.attribute},
            opset=opset,
            consts={i: consts[n] for i, n in enumerate(ins) if n in consts},
            shapes={i: shapes[n] for i, n in enumerate(ins) if n in shapes},
        )

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def has(self, i: int) -> bool:
        """Whether optional input i is given."""
        return i < len(self.inputs) and self.inputs[i] != ""

    def const(self, i: int) -> np.ndarray | None:
        """Input i's value when it is a build-time constant, else None."""
        return self.consts.get(i)

    def const_list(self, i: int) -> list | None:
        value = self.consts.get(i)
        return None if value is None else value.reshape(-1).tolist()

    def weight_rank(self, i: int = 1) -> int:
        """Number of spatial dims of a conv/pool, from kernel_shape or the weight's shape."""
        if "kernel_shape" in self.attrs:
            return len(self.attrs["kernel_shape"])
        if i in self.shapes:
            return len(self.shapes[i]) - 2
        raise BadInputError(
            f"{self.op_type} node '{self.name}' has no kernel_shape and its weight is computed "
            "at run time, so the kernel's rank is unknown when the module is built; add the "
            "kernel_shape attribute"
        )

    def kernel(self, i: int = 1) -> list[int]:
        if "kernel_shape" in self.attrs:
            return list(self.attrs["kernel_shape"])
        return list(self.shapes[i][2:])


def _attr_value(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _values(t: Any) -> list:
    """A runtime shape-like input (small int tensor) as a Python list."""
    return t.reshape(-1).tolist()


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] for the trailing dims -> F.pad's (last dim first) order."""
    return [p for b, e in zip(reversed(begin), reversed(end), strict=True) for p in (b, e)]


def _same_pads(
    sizes: Any,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    mode: str,
    clamp: bool = True,
) -> tuple[list[int], list[int]]:
    """auto_pad=SAME_UPPER/SAME_LOWER: pads that make the output size ceil(input / stride), the
    odd one at the end (UPPER) or the start (LOWER). Pools keep a negative total (`clamp`
    False), as onnxruntime computes theirs: a stride larger than the kernel skips input at both
    ends, and the halves round toward zero."""
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        total = (-(-int(size) // s) - 1) * s + (k - 1) * d + 1 - int(size)
        if clamp:
            total = max(total, 0)
        head = int((total if mode == "SAME_UPPER" else total + 1) / 2)
        begin.append(head)
        end.append(total - head)
    return begin, end


def _same_device(a: Any, b: Any) -> tuple[Any, Any]:
    """Shape arithmetic lives on the CPU; move it next to the other operand when they meet."""
    if a.device != b.device:
        if a.device.type == "cpu":
            a = a.to(b.device)
        else:
            b = b.to(a.device)
    return a, b


# ---------------------------------------------------------------------------
# Convolutions and normalisation

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv(n: Node) -> OpFn:
    rank = n.weight_rank()
    fn = _CONV[rank]
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    groups = n.attr("group", 1)
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = n.kernel()

        def same(x, w, b=None):
            begin, end = _same_pads(x.shape[2:], kernel, strides, dilations, auto_pad)
            return fn(F.pad(x, _torch_pads(begin, end)), w, b, strides, 0, dilations, groups)

        return same
    pads = [0] * (2 * rank) if auto_pad == "VALID" else list(n.attr("pads", [0] * (2 * rank)))
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return lambda x, w, b=None: fn(x, w, b, strides, begin, dilations, groups)
    torch_pads = _torch_pads(begin, end)
    return lambda x, w, b=None: fn(F.pad(x, torch_pads), w, b, strides, 0, dilations, groups)


def conv_transpose(n: Node) -> OpFn:
    rank = n.weight_rank()
    fn = _CONV_T[rank]
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    out_pad = list(n.attr("output_padding", [0] * rank))
    groups = n.attr("group", 1)
    auto_pad = n.attr("auto_pad", "NOTSET")
    output_shape = n.attr("output_shape")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = n.kernel()

        def shaped(x, w, b=None):
            # Pads follow from the requested output size, as the ONNX spec computes them.
            sizes = [int(s) for s in x.shape[2:]]
            target = (
                list(output_shape[-rank:])
                if output_shape
                else [i * s for i, s in zip(sizes, strides, strict=True)]
            )
            begin, end = [], []
            for i, s, op, k, d, t in zip(
                sizes, strides, out_pad, kernel, dilations, target, strict=True
            ):
                total = s * (i - 1) + op + (k - 1) * d + 1 - t
                # A target beyond the natural size (onnxruntime): with output_shape the extra
                # cells at the end hold the bias alone; with auto_pad the output stays natural.
                extra = -total if total < 0 and output_shape else 0
                total = max(total, 0)
                if auto_pad == "SAME_UPPER":
                    begin.append(total // 2)
                    end.append(total - total // 2 - extra)
                else:
                    begin.append(total - total // 2)
                    end.append(total // 2 - extra)
            y = fn(x, w, None, strides, 0, out_pad, groups, dilations)
            y = F.pad(y, _torch_pads([-p for p in begin], [-p for p in end]))
            return y if b is None else y + b.reshape(-1, *([1] * rank))

        return shaped
    pads = [0] * (2 * rank) if auto_pad == "VALID" else list(n.attr("pads", [0] * (2 * rank)))
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return lambda x, w, b=None: fn(x, w, b, strides, begin, out_pad, groups, dilations)
    # Asymmetric pads: run unpadded, then crop (negative F.pad) each side.
    crop = _torch_pads([-p for p in begin], [-p for p in end])
    return lambda x, w, b=None: F.pad(fn(x, w, b, strides, 0, out_pad, groups, dilations), crop)


class PassMeasured(Exception):
    """Raised by `PooledStatistics.add` once every BatchNorm a pass measures has seen the batch:
    the rest of the forward computes nothing the pass needs (`bn.recalibrate` catches it)."""


class PooledStatistics:
    """The input statistics of the BatchNormalizations in `wanted` (ids of their running-mean
    buffers, each with the number of nodes that read it in one forward) over all the batches
    they see, pooled (law of total variance: the variance of all values, i.e. the batch
    variances and the variance of the batch means, weighted by the values each batch has),
    in float64.

    While one is set in `BN_POOL` (by `bn.recalibrate`, in eval mode), each wanted BatchNorm
    records its input here; `write` then sets its running statistics to the pooled mean and
    (population) variance. Every other BatchNorm normalises with its running statistics, as
    the written model does. The plain average of batch variances, kept before, misses the
    variance of the batch means.
    """

    def __init__(self, wanted: Mapping[int, int]) -> None:
        self.wanted = wanted
        # id(running mean) -> [running mean, running var, count, mean, sum of squared deviations]
        self.seen: dict[int, list] = {}
        self.pending: dict[int, int] = {}

    def start(self) -> None:
        """A batch begins: every node of a wanted BatchNorm is still to see it (statistics
        two nodes share, a branch applied twice, are of both nodes' inputs)."""
        self.pending = dict(self.wanted)

    def add(self, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor, dims: list[int]) -> None:
        """Pool the batch `x`, reduced over `dims`, into the statistics of buffers mean/var."""
        # The batch's own statistics as torch's BatchNorm computes them (no float64 copy of a
        # large activation); pooling across batches is in float64.
        batch_var, batch_mean = torch.var_mean(x.detach().float(), dims, correction=0)
        count = x.numel() // max(mean.numel(), 1)
        batch_mean, squares = batch_mean.double(), batch_var.double() * count
        entry = self.seen.get(id(mean))
        if entry is None:
            self.seen[id(mean)] = [mean, var, count, batch_mean, squares]
        else:
            n, m, m2 = entry[2:]  # Chan et al.'s pairwise update
            total = n + count
            delta = batch_mean - m
            entry[2:] = [
                total,
                m + delta * (count / total),
                m2 + squares + delta**2 * (n * count / total),
            ]
        if self.pending.get(id(mean), 0) > 1:
            self.pending[id(mean)] -= 1
        else:
            self.pending.pop(id(mean), None)
        if not self.pending:
            raise PassMeasured

    def write(self) -> None:
        """Set every recorded BatchNorm's running statistics to the pooled ones."""
        with torch.no_grad():
            for mean, var, count, m, m2 in self.seen.values():
                mean.copy_(m.reshape(mean.shape))
                var.copy_((m2 / count).reshape(var.shape))


BN_POOL: contextvars.ContextVar[PooledStatistics | None] = contextvars.ContextVar(
    "BN_POOL", default=None
)


def batch_norm(n: Node) -> OpFn:
    # ONNX: running = m * running + (1 - m) * batch; torch's momentum is the other weight.
    own_momentum = 1.0 - n.attr("momentum", 0.9)
    eps = n.attr("epsilon", 1e-5)
    extra_outputs = len(n.outputs) > 1
    # Before opset 9, spatial=0 keeps statistics per activation (C x D1 x ...), not per channel:
    # batch norm over (N, C*D1*...) computes exactly that.
    per_activation = n.opset < 9 and n.attr("spatial", 1) == 0
    # training_mode=1 (opset 14+): onnxruntime normalises with the batch's own statistics at
    # inference too, and outputs the running statistics that batch moves them to; in train mode
    # the same (its running statistics are inputs it never reads: NFNets' weight
    # standardisation computes them from the weight in the graph).
    batch_stats = n.opset >= 14 and n.attr("training_mode", 0) == 1

    def run(training, x, scale, bias, mean, var):
        if batch_stats:
            if x.numel() == x.shape[1]:  # torch's batch_norm raises ValueError there
                raise BadInputError(
                    f"BatchNormalization '{n.name}' has training_mode=1 and sees one value "
                    f"per channel in a batch of 1 ({list(x.shape)}): batch statistics need 2; "
                    "use a batch size and sample count that leave no batch of 1"
                )
            y = F.batch_norm(x, None, None, scale, bias, True, 0.0, eps)
            if not extra_outputs:
                return y
            dims = [0, *range(2, x.dim())]
            keep = 1.0 - own_momentum
            moved_mean = keep * mean + own_momentum * x.mean(dims)
            return y, moved_mean, keep * var + own_momentum * x.var(dims, unbiased=False)
        if not per_activation and (mean.grad_fn is not None or var.grad_fn is not None):
            # Statistics computed in the graph from trained weights (NFNets' weight
            # standardisation as the dynamo exporter writes it): used as given, in train mode
            # too (they are no state to update), and written out so that gradients reach them.
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
            y = y * scale.reshape(shape) + bias.reshape(shape)
            return (y, mean, var) if extra_outputs else y
        if training and (mean.requires_grad or var.requires_grad):
            raise BadInputError(
                f"BatchNormalization '{n.name}': a running statistic is tied to a trained "
                "weight (through Identity); untie it first with untie_initializers(model)"
            )
        pool = BN_POOL.get()
        measured = pool is not None and id(mean) in pool.wanted
        per_channel = len(x) if per_activation else x.numel() // max(x.shape[1], 1)
        if training and per_channel == 1:
            raise BadInputError(
                f"BatchNormalization '{n.name}' sees one value per channel in a batch of 1 "
                f"({list(x.shape)}): batch statistics need 2; use a batch size of at least 2"
            )
        # Measured: running statistics are left as they are until `PooledStatistics.write`.
        if per_activation:
            if measured:
                pool.add(mean, var, x.flatten(1), [0])
            flat = [t.reshape(-1) for t in (mean, var, scale, bias)]
            y = F.batch_norm(x.flatten(1), *flat[:2], *flat[2:], training, own_momentum, eps)
            y = y.reshape(x.shape)
        else:
            if measured:
                pool.add(mean, var, x, [0, *range(2, x.dim())])
            y = F.batch_norm(x, mean, var, scale, bias, training, own_momentum, eps)
        return (y, mean, var) if extra_outputs else y

    return run


def dropout(n: Node) -> OpFn:
    if n.opset >= 12 and n.has(2):
        mode = n.const(2)
        if mode is None or mode.any():
            # onnxruntime then drops at random at inference, unless its graph optimisations
            # remove the node (they do where its output is not a graph output): no module
            # matches that.
            raise BadInputError(
                f"Dropout node '{n.name}' has training_mode "
                f"{'true' if mode is not None else 'computed at run time'}: onnxruntime then "
                "drops activations at random at inference (or not, as its graph optimisations "
                "decide), which the bridge cannot match; set training_mode to false or remove "
                "the node"
            )
    if n.opset < 12:
        ratio = n.attr("ratio", 0.5)
    else:
        ratio = float(n.const_list(1)[0]) if n.const(1) is not None else 0.5
    ratio_at_run_time = n.opset >= 12 and n.has(1) and n.const(1) is None
    with_mask = len(n.outputs) > 1 and n.outputs[1] != ""
    # The mask is of x's type before opset 10; onnxruntime's is all false (0) at inference
    # before opset 12, all true after.
    float_mask, eval_mask = n.opset < 10, n.opset >= 12

    def run(training, x, r=None, *_):
        p = float(r.reshape(-1)[0]) if training and ratio_at_run_time else ratio
        if not with_mask:
            return F.dropout(x, p, training)
        if not training or p == 0.0:
            mask = torch.full_like(x, eval_mask or training, dtype=torch.bool)
            return x, mask.to(x.dtype) if float_mask else mask
        mask = torch.rand_like(x) >= p
        return x * mask / (1.0 - p), mask.to(x.dtype) if float_mask else mask

    return run


# ---------------------------------------------------------------------------
# Activations


def clip(n: Node) -> OpFn:
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        if (n.has(1) and n.const(1) is None) or (n.has(2) and n.const(2) is None):
            return lambda x, lo=None, hi=None: torch.clamp(x, lo, hi)
        # In the input's type: int64 bounds keep shape arithmetic int64.
        lo = n.const_list(1)[0] if n.has(1) else None
        hi = n.const_list(2)[0] if n.has(2) else None
    if lo is None and hi is None:
        return lambda x, *_: x
    if lo == 0.0 and hi is None:
        return lambda x, *_: F.relu(x)
    return lambda x, *_: torch.clamp(x, lo, hi)


def leaky_relu(n: Node) -> OpFn:
    alpha = n.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


def prelu(n: Node) -> OpFn:
    # ONNX broadcasts the slope numpy-style (e.g. shape (C, 1, 1) against NCHW).
    return lambda x, slope: torch.where(x >= 0, x, x * slope)


def hard_sigmoid(n: Node) -> OpFn:
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


def elu(n: Node) -> OpFn:
    alpha = n.attr("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


def selu(n: Node) -> OpFn:
    # ONNX's defaults are torch's SELU constants (float32-rounded); other values are honoured.
    alpha, gamma = (
        n.attr("alpha", 1.67326319217681884765625),
        n.attr("gamma", 1.05070102214813232421875),
    )
    return lambda x: gamma * F.elu(x, alpha)  # elu's gradient, not where()'s NaN past exp's range


def gelu(n: Node) -> OpFn:
    approximate = n.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


def _softmax_like(fn: Callable) -> Callable[[Node], OpFn]:
    """Softmax / LogSoftmax; before opset 13 they normalise over all dims from axis on."""

    def build(n: Node) -> OpFn:
        axis = n.attr("axis", -1 if n.opset >= 13 else 1)
        if n.opset >= 13:
            return lambda x: fn(x, axis)
        return lambda x: fn(x.flatten(axis), -1).reshape(x.shape)

    return build


def _unary(fn: Callable) -> Callable[[Node], OpFn]:
    return lambda n: lambda x: fn(x)


# ---------------------------------------------------------------------------
# Elementwise arithmetic


def _binary(fn: Callable) -> Callable[[Node], OpFn]:
    def build(n: Node) -> OpFn:
        def run(a, b):
            if a.device != b.device:
                a, b = _same_device(a, b)
            return fn(a, b)

        return run

    return build


def _pow(a, b):
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)  # ONNX: the base's type (ints truncate)


def _div(a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def _variadic(fn: Callable) -> Callable[[Node], OpFn]:
    def build(n: Node) -> OpFn:
        def run(*xs):
            out = xs[0]
            for x in xs[1:]:
                out, x = _same_device(out, x)
                out = fn(out, x)
            return out

        return run

    return build


def where(n: Node) -> OpFn:
    def run(cond, a, b):
        # A constant mask (bool, so kept on the CPU) meets operands on the module's device.
        device = next((t.device for t in (a, b, cond) if t.device.type != "cpu"), None)
        if device is not None:
            cond, a, b = cond.to(device), a.to(device), b.to(device)
        return torch.where(cond, a, b)

    return run


# ---------------------------------------------------------------------------
# Pooling and reductions

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(n: Node) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(n.attr("kernel_shape"))
    rank = len(kernel)
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    pads = list(n.attr("pads", [0] * (2 * rank)))
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        pads = [0] * (2 * rank)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(d != 1 for d in dilations):
        # onnxruntime pads these as if undilated, against the spec: no answer to match.
        raise BadInputError(f"{n.op_type} node '{n.name}' combines auto_pad and dilations")
    return kernel, strides, dilations, pads[:rank], pads[rank:]


def _pool_sizes(
    sizes: Any,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    begin: list[int],
    end: list[int],
    ceil: bool,
) -> list[int]:
    """Output sizes of a pool: ceil_mode's last window must start inside the input or the
    leading pad (what torch does for its own padding, not for padding done by hand)."""
    out = []
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begin, end, strict=True):
        span = int(size) + b + e - (k - 1) * d - 1
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= int(size) + b:
            o -= 1
        out.append(o)
    return out


def _hand_padding(
    x: Any,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    begin: list[int],
    end: list[int],
    auto_pad: str,
    ceil: bool,
) -> tuple[list[int], list[int], list[int]]:
    """Pads and output sizes of a pool padded by hand: SAME pads from x's size as onnxruntime
    computes them (no ceil_mode then), else the node's own."""
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    if same:
        begin, end = _same_pads(x.shape[2:], kernel, strides, dilations, auto_pad, clamp=False)
    sizes = _pool_sizes(x.shape[2:], kernel, strides, dilations, begin, end, ceil and not same)
    return begin, end, sizes


def _crop(y: Any, sizes: list[int]) -> Any:
    """y cut to `sizes` in its trailing dims."""
    if list(y.shape[2:]) == sizes:
        return y
    return y[(slice(None), slice(None), *(slice(0, o) for o in sizes))]


def _fitting(n: Node, pool: OpFn) -> OpFn:
    """`pool`, refusing in one line an input narrower than the node's dilated window (pads
    included): onnxruntime outputs an empty tensor there (or refuses), torch raises "Output
    size is too small", which retrain took for a graph fixing the batch size. SAME pads
    always leave a window."""

    def run(x):
        try:
            return pool(x)
        except RuntimeError:
            kernel, _, dilations, begin, end = _pool_geometry(n)
            sizes = zip(x.shape[2:], kernel, dilations, begin, end, strict=True)
            for axis, (size, k, d, b, e) in enumerate(sizes, 2):
                if (k - 1) * d + 1 > size + b + e:
                    raise BadInputError(
                        f"{n.op_type} node '{n.name}': its window spans {(k - 1) * d + 1} "
                        f"pixels along axis {axis}, more than its input's {size + b + e} (pads "
                        "included): onnxruntime outputs an empty tensor there, PyTorch cannot; "
                        "give the model larger inputs"
                    ) from None
            raise

    return run


def max_pool(n: Node) -> OpFn:
    if len(n.outputs) > 1 and n.outputs[1]:
        raise BadInputError(f"MaxPool node '{n.name}' asks for indices, which is not supported")
    kernel, strides, dilations, begin, end = _pool_geometry(n)
    fn = _MAX_POOL[len(kernel)]
    ceil = bool(n.attr("ceil_mode", 0))
    auto_pad = n.attr("auto_pad", "NOTSET")
    same_mode = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    # torch pads symmetrically and at most half the kernel; otherwise pad by hand with -inf.
    if (
        not same_mode
        and begin == end
        and all(p <= k // 2 for p, k in zip(begin, kernel, strict=True))
    ):
        return _fitting(n, lambda x: fn(x, kernel, strides, begin, dilations, ceil))

    def padded(x):
        b, e, sizes = _hand_padding(x, kernel, strides, dilations, begin, end, auto_pad, ceil)
        y = fn(F.pad(x, _torch_pads(b, e), value=-math.inf), kernel, strides, 0, dilations, ceil)
        return _crop(y, sizes)

    return _fitting(n, padded)


def average_pool(n: Node) -> OpFn:
    kernel, strides, dilations, begin, end = _pool_geometry(n)
    if any(d != 1 for d in dilations):
        raise BadInputError(f"AveragePool node '{n.name}' uses dilations, which is not supported")
    fn = _AVG_POOL[len(kernel)]
    ceil = bool(n.attr("ceil_mode", 0))
    include = bool(n.attr("count_include_pad", 0))
    auto_pad = n.attr("auto_pad", "NOTSET")
    same_mode = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    symmetric = begin == end and all(p <= k // 2 for p, k in zip(begin, kernel, strict=True))
    if not same_mode and symmetric:
        return _fitting(n, lambda x: fn(x, kernel, strides, begin, ceil, include))

    def padded(x):
        b, e, sizes = _hand_padding(x, kernel, strides, dilations, begin, end, auto_pad, ceil)
        torch_pads = _torch_pads(b, e)
        total = _crop(fn(F.pad(x, torch_pads), kernel, strides, 0, ceil, True), sizes)
        if include:
            return total
        # Divide by the number of real (unpadded) elements under each window.
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return total / _crop(fn(F.pad(ones, torch_pads), kernel, strides, 0, ceil, True), sizes)

    return _fitting(n, padded)


def global_average_pool(n: Node) -> OpFn:
    return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(n: Node) -> OpFn:
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


def _mean(x: torch.Tensor, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """torch.mean, which refuses integer tensors; of those onnxruntime's mean: the sum divided
    by the count, truncated toward zero."""
    if x.is_floating_point() or x.is_complex():
        return torch.mean(x, axes, keepdim=keepdim)
    count = math.prod(x.shape[a] for a in axes)
    return torch.div(x.sum(axes, keepdim=keepdim), count, rounding_mode="trunc")


def _prod(x: torch.Tensor, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """torch.prod, which takes one axis: the axes one at a time, the last first, so the others
    keep their places when they are dropped (tf2onnx multiplies a Shape's dims with it)."""
    for a in sorted({a % x.dim() for a in axes}, reverse=True):
        x = torch.prod(x, a, keepdim=keepdim)
    return x


def _reduce(fn: Callable, axes_input_from: int) -> Callable[[Node], OpFn]:
    """Reduce* ops; `axes_input_from` is the opset where axes moved from attribute to input."""

    def build(n: Node) -> OpFn:
        keep = bool(n.attr("keepdims", 1))
        noop_empty = bool(n.attr("noop_with_empty_axes", 0))

        def reduce(x, axes):
            if not axes:
                if noop_empty:
                    return x
                axes = range(x.dim())
            y = fn(x, tuple(axes), keepdim=keep)
            return y if y.dtype == x.dtype else y.to(x.dtype)  # torch sums int32 into int64

        if n.opset < axes_input_from:
            axes = n.attr("axes")
            return lambda x: reduce(x, axes)
        if not n.has(1) or n.const(1) is not None:
            axes = n.const_list(1) if n.has(1) else None
            return lambda x, *_: reduce(x, axes)
        return lambda x, axes=None: reduce(x, None if axes is None else _values(axes))

    return build


def _arg_extreme(largest: bool) -> Callable[[Node], OpFn]:
    """ArgMax / ArgMin as onnxruntime computes them: one scan along `axis` that moves on only
    to a strictly greater (smaller) value, or to an equal one with select_last_index. So ties
    go to the first (last) index, a NaN after the first position is never picked, and a NaN
    at the first position is kept (nothing compares greater than it); except that a 1-D input
    without select_last_index takes onnxruntime's other path, where the first NaN wins.
    Output int64."""

    def build(n: Node) -> OpFn:
        axis, keep = n.attr("axis", 0), bool(n.attr("keepdims", 1))
        last = bool(n.attr("select_last_index", 0))

        def run(x):
            a = axis % x.dim()
            size = x.shape[a]
            y, nan = x, torch.isnan(x) if x.is_floating_point() else None
            if nan is not None:
                y = torch.where(nan, -math.inf if largest else math.inf, x)
            best = y.amax(a, keepdim=True) if largest else y.amin(a, keepdim=True)
            order = torch.arange(size, device=x.device).reshape([-1] + [1] * (x.dim() - a - 1))
            hit = (y == best) & ~nan if nan is not None else y == best
            index = torch.where(hit, order if last else size - 1 - order, -1).amax(a, keepdim=True)
            index = index if last else size - 1 - index
            if nan is not None:
                if x.dim() == 1 and not last:  # onnxruntime's 1-D path: the first NaN wins
                    first = torch.where(nan, size - 1 - order, -1).amax(a, keepdim=True)
                    index = torch.where(first >= 0, size - 1 - first, index)
                index = torch.where(nan.narrow(a, 0, 1), 0, index)  # a NaN first stays
            return index if keep else index.squeeze(a)

        return run

    return build


# ---------------------------------------------------------------------------
# Resize / Upsample


_TRANSFORMS = (
    "half_pixel",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
    "half_pixel_symmetric",
)
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


@functools.lru_cache(maxsize=256)
def _resample_plan(
    size_in: int, size_out: int, scale: float, mode: str, transform: str, nearest: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Source indices (and linear weights) for one axis, from the ONNX formulas evaluated in
    float32 in onnxruntime's order: a nearest index that lands on a rounding boundary (scale
    1/3, 0.6 ...) then picks the pixel onnxruntime picks."""
    f = np.float32
    x = np.arange(size_out, dtype=f)
    scale, half, n_in, n_out = f(scale), f(0.5), f(size_in), f(size_out)
    if transform == "half_pixel":
        src = (x + half) / scale - half
    elif transform == "pytorch_half_pixel":
        src = (x + half) / scale - half if size_out > 1 else np.zeros_like(x)
    elif transform == "align_corners":
        src = x * (n_in - f(1)) / (n_out - f(1)) if size_out > 1 else np.zeros_like(x)
    elif transform == "asymmetric":
        src = x / scale
    elif transform == "tf_half_pixel_for_nn":
        src = (x + half) / scale
    elif transform == "half_pixel_symmetric":
        # The offset in float32, the sum in float64 (onnxruntime's double literals), then float32.
        offset = np.float64(n_in / f(2) * (f(1) - n_out / (scale * n_in)))
        src = (offset + (x.astype(np.float64) + 0.5) / np.float64(scale) - 0.5).astype(f)
    else:
        raise AssertionError(transform)  # refused when the node was built (_TRANSFORMS)
    if mode == "nearest":
        # The round_prefer modes take a coordinate within 1e-6 of a half for the half itself
        # (onnxruntime: 3.4999998 is 3.5 there, so round_prefer_ceil picks 4).
        wide = src.astype(np.float64)
        lower = np.floor(wide)
        half = np.abs(wide - lower - 0.5) <= 1e-6
        closest = np.floor(wide + 0.5)
        rounded = {
            "round_prefer_floor": np.where(half, lower, closest),
            "round_prefer_ceil": np.where(half, lower + 1, closest),
            "floor": lower,
            "ceil": np.ceil(src),
        }[nearest]
        return np.clip(rounded, 0, size_in - 1).astype(np.int64), None, None
    src = np.clip(src, f(0), f(size_in - 1))
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo.astype(f)).astype(f)


def resize(n: Node) -> OpFn:
    mode = n.attr("mode", "nearest")
    mode = "linear" if mode in ("linear", "bilinear") else mode
    if mode not in ("nearest", "linear"):
        raise BadInputError(f"{n.op_type} node '{n.name}' uses mode '{mode}' (only nearest/linear)")
    if n.attr("antialias", 0) or n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise BadInputError(f"Resize node '{n.name}' uses antialias/keep_aspect_ratio_policy")
    # Upsample and Resize-10: X, scales; asymmetric, and nearest rounds down where the axis
    # grows, up where it shrinks (onnxruntime's rule before nearest_mode existed).
    old_style = n.op_type == "Upsample" or n.opset < 11
    transform = (
        "asymmetric" if old_style else n.attr("coordinate_transformation_mode", "half_pixel")
    )
    nearest = None if old_style else n.attr("nearest_mode", "round_prefer_floor")
    for attr, value, known in (
        ("coordinate_transformation_mode", transform, _TRANSFORMS),
        ("nearest_mode", nearest, (None, *_NEAREST_MODES)),
    ):
        if value not in known:
            raise BadInputError(f"Resize node '{n.name}' uses {attr} '{value}' (not supported)")
    axes_attr = n.attr("axes")
    scales_at, sizes_at = (1, None) if old_style else (2, 3)
    static_scales = n.attr("scales") if n.op_type == "Upsample" and n.opset < 9 else None

    def plan(i: int | None, rest: tuple) -> list[float] | None:
        if static_scales is not None and i == scales_at:
            return list(static_scales)
        if i is None or not n.has(i):
            return None
        if n.const(i) is not None:
            return n.const_list(i) or None
        value = rest[i - 1]
        return _values(value) if value is not None and value.numel() > 0 else None

    def run(x, *rest):
        scales, sizes = plan(scales_at, rest), plan(sizes_at, rest)
        axes = list(range(x.dim())) if axes_attr is None else [a % x.dim() for a in axes_attr]
        steps = []
        for k, axis in enumerate(axes):
            size_in = x.shape[axis]
            if sizes is not None:
                size_out = int(sizes[k])
                scale = float(np.float32(size_out) / np.float32(size_in))
            else:  # floor(size * scale), in float32 as onnxruntime computes it
                scale = float(scales[k])
                size_out = int(np.floor(np.float32(scale) * np.float32(size_in)))
            steps.append((axis, size_in, size_out, scale))
        if all(size_out == size_in for _, size_in, size_out, _ in steps):
            return x  # onnxruntime copies the input when no dim changes, whatever the scales
        for axis, size_in, size_out, scale in steps:
            if size_out == size_in and scale == 1.0:
                continue
            rounding = nearest or ("ceil" if scale < 1 else "floor")
            lo, hi, w = _resample_plan(size_in, size_out, scale, mode, transform, rounding)
            x = _resample(x, axis, lo, hi, w)
        return x

    return run


def _resample(x, axis: int, lo: np.ndarray, hi: np.ndarray | None, w: np.ndarray | None):
    lo_t = torch.from_numpy(lo).to(x.device)
    if hi is None:
        return x.index_select(axis, lo_t)
    hi_t = torch.from_numpy(hi).to(x.device)
    w_t = torch.from_numpy(w).to(device=x.device, dtype=x.dtype)
    w_t = w_t.reshape(-1, *([1] * (x.dim() - axis - 1)))
    a, b = x.index_select(axis, lo_t), x.index_select(axis, hi_t)
    return a + (b - a) * w_t


# ---------------------------------------------------------------------------
# Shape and layout


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def pad(n: Node) -> OpFn:
    mode = n.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise BadInputError(f"Pad node '{n.name}' uses mode '{mode}'")
    torch_mode = _PAD_MODES[mode]

    def run(x, pads, value, axes):
        rank = x.dim()
        axes = list(range(rank)) if axes is None else [a % rank for a in axes]
        count = len(axes)
        full = [(0, 0)] * rank
        for k, axis in enumerate(axes):
            full[axis] = (pads[k], pads[k + count])
        nonzero = [i for i, p in enumerate(full) if p != (0, 0)]
        if not nonzero:
            return x
        if torch_mode == "constant":
            flat = [p for b, e in reversed(full[nonzero[0] :]) for p in (b, e)]
            return F.pad(x, flat, "constant", value)
        # torch pads only the last dims in these modes: one axis at a time, moved last.
        for axis in nonzero:
            if torch_mode == "circular":  # torch wraps around once at most; ONNX as often
                x = x.index_select(axis, _wrap_index(x.shape[axis], *full[axis], x.device))
                continue
            moved = x.movedim(axis, -1)
            shape = moved.shape
            moved = F.pad(moved.reshape(-1, 1, shape[-1]), list(full[axis]), torch_mode)
            x = moved.reshape(*shape[:-1], moved.shape[-1]).movedim(-1, axis)
        return x

    if n.opset < 11:
        pads, value = list(n.attr("pads")), n.attr("value", 0.0)
        return lambda x: run(x, pads, value, None)

    def arg(i: int, rest: tuple) -> list | None:
        if not n.has(i):
            return None
        if n.const(i) is not None:
            return n.const_list(i)
        return _values(rest[i - 1])

    def dynamic(x, *rest):
        value = arg(2, rest)
        return run(x, arg(1, rest), float(value[0]) if value else 0.0, arg(3, rest))

    return dynamic


def _wrap_index(size: int, begin: int, end: int, device: Any) -> Any:
    """Source indices of Pad mode wrap along one axis: negative pads crop first, then the kept
    part repeats around as far as the positive pads reach."""
    start, stop = max(-begin, 0), size - max(-end, 0)
    kept = stop - start
    return start + torch.arange(-max(begin, 0), kept + max(end, 0), device=device) % kept


def identity(n: Node) -> OpFn:
    return lambda x: x


def flatten(n: Node) -> OpFn:
    axis = n.attr("axis", 1)

    def run(x):
        a = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return run


def reshape(n: Node) -> OpFn:
    allow_zero = bool(n.attr("allowzero", 0))

    def target(x, shape: list[int]) -> list[int]:
        if allow_zero:
            return shape
        return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]

    if n.opset < 5:  # the target shape was an attribute then
        fixed = list(n.attr("shape"))
        return lambda x: x.reshape(target(x, fixed))
    shape = n.const_list(1)
    if shape is None:
        return lambda x, s: x.reshape(target(x, _values(s)))
    if allow_zero or 0 not in shape:
        return lambda x, _: x.reshape(shape)
    return lambda x, _: x.reshape(target(x, shape))


def transpose(n: Node) -> OpFn:
    perm = n.attr("perm")
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    return lambda x: x.permute(*perm)


def depth_to_space(n: Node) -> OpFn:
    """DCR (the default): channel (i * b + j) * C + c goes to pixel (i, j) of channel c;
    CRD (torch's PixelShuffle): channel c * b * b + i * b + j does."""
    b, crd = n.attr("blocksize"), n.attr("mode", "DCR") == "CRD"

    def run(x):
        n_, c, h, w = x.shape
        if crd:
            return F.pixel_shuffle(x, b)
        y = x.reshape(n_, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n_, c // (b * b), h * b, w * b)

    return run


def space_to_depth(n: Node) -> OpFn:
    """Pixel (i, j) of each b x b block of channel c goes to channel (i * b + j) * C + c."""
    b = n.attr("blocksize")

    def run(x):
        n_, c, h, w = x.shape
        y = x.reshape(n_, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n_, c * b * b, h // b, w // b)

    return run


def _axes(n: Node, since: int) -> tuple[bool, list[int] | None]:
    """(known at build time, axes) for ops whose axes moved from attribute to input at `since`."""
    if n.opset < since:
        return True, n.attr("axes")
    if not n.has(1):
        return True, None
    if n.const(1) is not None:
        return True, n.const_list(1)
    return False, None


def squeeze(n: Node) -> OpFn:
    def run(x, axes):
        if not axes:
            return x.squeeze()
        return x.squeeze(tuple(axes))

    known, axes = _axes(n, 13)
    if known:
        return lambda x, *_: run(x, axes)
    return lambda x, a: run(x, _values(a))


def unsqueeze(n: Node) -> OpFn:
    def run(x, axes):
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x

    known, axes = _axes(n, 13)
    if known:
        return lambda x, *_: run(x, axes)
    return lambda x, a: run(x, _values(a))


def concat(n: Node) -> OpFn:
    axis = n.attr("axis")

    def run(*xs):
        device = xs[0].device
        if any(x.device != device for x in xs):
            device = next((x.device for x in xs if x.device.type != "cpu"), device)
            xs = [x.to(device) for x in xs]
        return torch.cat(xs, axis)

    return run


def split(n: Node) -> OpFn:
    axis = n.attr("axis", 0)
    count = len(n.outputs)
    sizes = n.attr("split") if n.opset < 13 else n.const_list(1)
    if sizes:
        return lambda x, *_: tuple(torch.split(x, sizes, axis))
    if n.opset >= 13 and n.has(1) and n.const(1) is None:
        return lambda x, s: tuple(torch.split(x, _values(s), axis))

    def equal(x, *_):
        parts = torch.split(x, -(-x.shape[axis] // count), axis)
        if len(parts) != count:
            raise BadInputError(
                f"Split node '{n.name}' cannot cut {x.shape[axis]} into {count} parts"
            )
        return tuple(parts)

    return equal


_INT_MAX = (2**31 - 1, 2**63 - 1)


def slice_(n: Node) -> OpFn:
    def run(x, starts, ends, axes, steps):
        rank = x.dim()
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        index: list[Any] = [slice(None)] * rank
        reversed_axes = []
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            axis %= rank
            if step > 0:
                index[axis] = slice(start, end, step)
                continue
            # Negative steps: ONNX clamping, then an explicit index list. An end of INT32_MAX or
            # INT64_MAX means "to the end" in onnxruntime, whichever the direction: here index 0.
            size = x.shape[axis]
            start = min(max(start + size if start < 0 else start, 0), size - 1)
            end = -1 if end in _INT_MAX else min(max(end + size if end < 0 else end, -1), size - 1)
            reversed_axes.append((axis, list(range(start, end, step))))
        x = x[tuple(index)]
        for axis, idx in reversed_axes:
            x = x.index_select(axis, torch.tensor(idx, dtype=torch.int64, device=x.device))
        return x

    if n.opset < 10:
        starts, ends, axes = n.attr("starts"), n.attr("ends"), n.attr("axes")
        return lambda x: run(x, starts, ends, axes, None)
    if all(n.const(i) is not None for i in range(1, len(n.inputs)) if n.has(i)):
        args = [n.const_list(i) if n.has(i) else None for i in range(1, 5)]
        return lambda x, *_: run(x, *args)

    def dynamic(x, *rest):
        args = [None if r is None else _values(r) for r in rest]
        return run(x, *(args + [None] * (4 - len(args))))

    return dynamic


def gemm(n: Node) -> OpFn:
    trans_a, trans_b = n.attr("transA", 0), n.attr("transB", 0)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if not trans_a and trans_b and alpha == 1.0 and beta == 1.0:

        def linear(a, b, c=None):  # the common Linear layer: one fused call
            if c is None or c.dim() == 1:
                return F.linear(a, b, c)
            return F.linear(a, b) + c

        return linear

    def general(a, b, c=None):
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return general


def matmul(n: Node) -> OpFn:
    return lambda a, b: torch.matmul(a, b)


def shape(n: Node) -> OpFn:
    start, end = n.attr("start", 0), n.attr("end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64)


def gather(n: Node) -> OpFn:
    axis = n.attr("axis", 0)

    def run(data, indices):
        ax = axis % data.dim()
        size = data.shape[ax]
        if indices.dim() == 0:
            i = int(indices)
            return data.select(ax, i + size if i < 0 else i)
        idx = indices.to(data.device)
        idx = torch.where(idx < 0, idx + size, idx)
        out = data.index_select(ax, idx.reshape(-1))
        return out.reshape(*data.shape[:ax], *indices.shape, *data.shape[ax + 1 :])

    return run


def constant(n: Node) -> OpFn:
    value = _constant_value(n)
    return lambda: value


def _constant_value(n: Node) -> torch.Tensor:
    if "value" in n.attrs:
        return torch.from_numpy(np.array(n.attrs["value"]))
    for key, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if key in n.attrs:
            return torch.tensor(n.attrs[key], dtype=dtype)
    raise BadInputError(f"Constant node '{n.name}' has no supported value attribute")


def constant_of_shape(n: Node) -> OpFn:
    value = n.attr("value")
    fill = torch.from_numpy(np.array(value).reshape(())) if value is not None else torch.zeros(())
    return lambda s: fill.expand(tuple(_values(s))).clone()  # an empty shape: a scalar


TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def cast(n: Node) -> OpFn:
    to = n.attr("to")
    if to not in TORCH_DTYPES:
        known = to in onnx.TensorProto.DataType.values()
        name = onnx.TensorProto.DataType.Name(to) if known else to
        raise BadInputError(
            f"Cast node '{n.name}' casts to {name}, which the PyTorch bridge does not support"
        )
    dtype = TORCH_DTYPES[to]
    return lambda x: x.to(dtype)


def tile(n: Node) -> OpFn:
    # tf2onnx writes Keras' UpSampling2D as Unsqueeze -> Tile -> Reshape per axis.
    return lambda x, repeats: x.repeat(tuple(_values(repeats)))


def expand(n: Node) -> OpFn:
    # ONNX Expand broadcasts both ways: (3, 1) expanded to (1, 4) gives (3, 4).
    def run(x, s):
        return x.expand(torch.broadcast_shapes(x.shape, tuple(_values(s))))

    return run


# ---------------------------------------------------------------------------
# Normalisation and recurrent layers of OCR / sequence heads (CRNN-style)


def layer_norm(n: Node) -> OpFn:
    axis, eps = n.attr("axis", -1), n.attr("epsilon", 1e-5)
    stats = len(n.outputs) > 1

    def run(x, scale, bias=None):
        a = axis % x.dim()
        dims = tuple(range(a, x.dim()))
        full = tuple(x.shape[a:])
        if not stats and all(t is None or tuple(t.shape) == full for t in (scale, bias)):
            return F.layer_norm(x, full, scale, bias, eps)  # else broadcast by hand
        mean = x.mean(dims, keepdim=True)
        inv_std = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        y = (x - mean) * inv_std * scale
        y = y if bias is None else y + bias
        return (y, mean, inv_std) if stats else y

    return run


def instance_norm(n: Node) -> OpFn:
    """Each (sample, axis-1 entry) normalised over the axes after it; torch's exporters write
    InstanceNorm2d as one, and GroupNorm as one over (N, G, -1) between two Reshapes."""
    eps = n.attr("epsilon", 1e-5)

    def run(x, scale, bias):
        if math.prod(x.shape[2:]) > 1:
            return F.instance_norm(x, weight=scale, bias=bias, eps=eps)
        # One value per instance (a 1x1 map), which F.instance_norm refuses: the formula itself
        # (the value is its own mean, so the output is the bias).
        dims, shape = tuple(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
        return y * scale.reshape(shape) + bias.reshape(shape)

    return run


def _recurrent_checks(n: Node, defaults: list[str]) -> tuple[int, str, int]:
    """hidden size, direction, layout; refuses what the bridge does not implement."""
    activations = [a.lower() for a in n.attr("activations", [])]
    expected = [d.lower() for d in defaults] * max(1, len(activations) // len(defaults))
    if activations and activations != expected:
        raise BadInputError(f"{n.op_type} '{n.name}': only the default activations are supported")
    for attr in ("clip", "input_forget"):
        if n.attr(attr):
            raise BadInputError(f"{n.op_type} '{n.name}': attribute {attr} is not supported")
    if n.has(4):
        raise BadInputError(
            f"{n.op_type} '{n.name}': sequence_lens is not supported (pad to one length)"
        )
    return n.attr("hidden_size"), n.attr("direction", "forward"), n.attr("layout", 0)


def _run_directions(x, step, directions: list[bool], init: list):
    """Run `step(d, x_t, state) -> state` over time per direction; (Y, final states)."""
    ys, finals = [], []
    for d, reverse in enumerate(directions):
        state, outs = init[d], []
        order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        for t in order:
            state = step(d, x[t], state)
            outs.append(state[0])
        if reverse:
            outs.reverse()
        ys.append(torch.stack(outs))  # (seq, batch, hidden)
        finals.append(state)
    return torch.stack(ys, 1), finals  # Y: (seq, dirs, batch, hidden)


def _recurrent(n: Node, cell: bool) -> Callable[..., Any]:
    defaults = ["Sigmoid", "Tanh", "Tanh"] if cell else ["Sigmoid", "Tanh"]
    hidden, direction, layout = _recurrent_checks(n, defaults)
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    linear_before_reset = n.attr("linear_before_reset", 0)

    def lstm_step(w, r, b, p):
        def step(d, xt, state):
            h, c = state
            g = xt @ w[d].t() + h @ r[d].t()
            if b is not None:
                g = g + b[d, : 4 * hidden] + b[d, 4 * hidden :]
            i, o, f, cc = g.chunk(4, 1)
            if p is not None:
                i, f = i + p[d, :hidden] * c, f + p[d, 2 * hidden :] * c
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cc)
            if p is not None:
                o = o + p[d, hidden : 2 * hidden] * c
            return torch.sigmoid(o) * torch.tanh(c), c

        return step

    def gru_step(w, r, b):
        def step(d, xt, state):
            (h,) = state
            wb = b[d, : 3 * hidden] if b is not None else 0.0
            rb = b[d, 3 * hidden :] if b is not None else h.new_zeros(3 * hidden)
            xz, xr, xh = (xt @ w[d].t() + wb).chunk(3, 1)
            rz, rr, _ = r[d].chunk(3, 0)
            hz, hr = h @ rz.t() + rb[:hidden], h @ rr.t() + rb[hidden : 2 * hidden]
            z, rg = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
            rh, rbh = r[d][2 * hidden :], rb[2 * hidden :]
            if linear_before_reset:
                hh = torch.tanh(xh + rg * (h @ rh.t() + rbh))
            else:
                hh = torch.tanh(xh + (rg * h) @ rh.t() + rbh)
            return ((1 - z) * hh + z * h,)

        return step

    def run(x, w, r, b=None, _lens=None, h0=None, c0=None, p=None):
        if layout:
            x = x.transpose(0, 1)
            h0 = None if h0 is None else h0.transpose(0, 1)
            c0 = None if c0 is None else c0.transpose(0, 1)
        batch = x.shape[1]
        zeros = x.new_zeros(len(directions), batch, hidden)
        h0 = zeros if h0 is None else h0
        if cell:
            c0 = zeros if c0 is None else c0
            init = [(h0[d], c0[d]) for d in range(len(directions))]
            step = lstm_step(w, r, b, p)
        else:
            init = [(h0[d],) for d in range(len(directions))]
            step = gru_step(w, r, b)
        y, finals = _run_directions(x, step, directions, init)
        y_h = torch.stack([f[0] for f in finals])
        if layout:
            y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
        if not cell:
            return y, y_h
        y_c = torch.stack([f[1] for f in finals])
        return y, y_h, (y_c.transpose(0, 1) if layout else y_c)

    return run


def lstm(n: Node) -> OpFn:
    return _recurrent(n, cell=True)


def gru(n: Node) -> OpFn:
    return _recurrent(n, cell=False)


def range_(n: Node) -> OpFn:
    def run(start, limit, delta):
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)

    return run


# ---------------------------------------------------------------------------
# onnxruntime's fused ops (com.microsoft): what its extended optimisations write
# (the activations each runs fused, and their parameters: passes.domains.FUSED_ACTIVATIONS)


def _activation(n: Node, kind: str, params: list[float], kinds: Any) -> Callable[[Any], Any]:
    """The elementwise activation `kind` (one of `kinds`, those onnxruntime runs fused into
    `n`'s op) with its parameters, as onnxruntime's kernels apply it."""
    if kind not in kinds:
        raise BadInputError(
            f"{n.op_type} node '{n.name}' has activation {kind!r}, which the PyTorch bridge does "
            f"not run fused (it runs {', '.join(kinds)}): {SAVE_AT_BASIC}"
        )
    if kind == "LeakyRelu":
        return lambda y: F.leaky_relu(y, params[0])
    if kind == "Clip":
        return lambda y: torch.clamp(y, params[0], params[1])
    if kind == "HardSigmoid":
        return lambda y: torch.clamp(params[0] * y + params[1], 0.0, 1.0)
    return {"Relu": F.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid}[kind]


def fused_conv(n: Node) -> OpFn:
    """activation(Conv(X, W, B) + Z): Conv's attributes, Z (input 3) added before the activation."""
    kind, kinds = n.attr("activation", ""), FUSED_ACTIVATIONS[FUSED_CONV]
    if not kind:
        act: Callable[[Any], Any] = lambda y: y  # noqa: E731
    else:
        params = list(n.attr("activation_params", []))
        wanted = len(kinds.get(kind, params))
        if len(params) != wanted:
            raise BadInputError(
                f"FusedConv node '{n.name}' has {len(params)} activation_params for {kind}, "
                f"which takes {wanted} (onnxruntime refuses it too)"
            )
        act = _activation(n, kind, params, kinds)
    run = conv(n)

    def forward(x, w, b=None, z=None):
        y = run(x, w, b)
        return act(y if z is None else y + z)

    return forward


def fused_gemm(n: Node) -> OpFn:
    """activation(Gemm(A, B, C)): Gemm's attributes."""
    kind, kinds = n.attr("activation", ""), FUSED_ACTIVATIONS[FUSED_GEMM]
    params = [n.attr(f"activation_{p}") for p in kinds.get(kind, ())]
    if not kind:
        raise BadInputError(
            f"FusedGemm node '{n.name}' has no activation (onnxruntime refuses it "
            "too): make it a Gemm"
        )
    if None in params:
        wanted = " and ".join(f"activation_{p}" for p in kinds[kind])
        raise BadInputError(
            f"FusedGemm node '{n.name}' has {kind} without its {wanted} "
            "(onnxruntime refuses it too)"
        )
    act = _activation(n, kind, params, kinds)
    run = gemm(n)
    return lambda a, b, c=None: act(run(a, b, c))


# ---------------------------------------------------------------------------
# The table

OPS: dict[str, Callable[[Node], OpFn]] = {
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "BatchNormalization": batch_norm,
    "Dropout": dropout,
    "Relu": _unary(F.relu),
    "LeakyRelu": leaky_relu,
    "PRelu": prelu,
    "Clip": clip,
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "Elu": elu,
    "Selu": selu,
    "Softsign": _unary(F.softsign),
    "Softplus": _unary(F.softplus),
    "Gelu": gelu,
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Reciprocal": _unary(torch.reciprocal),
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(_pow),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Where": where,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
    "ReduceMean": _reduce(_mean, 18),
    "ReduceSum": _reduce(torch.sum, 13),
    "ReduceMax": _reduce(torch.amax, 18),
    "ReduceProd": _reduce(_prod, 18),
    "ArgMax": _arg_extreme(largest=True),
    "ArgMin": _arg_extreme(largest=False),
    "Resize": resize,
    "Upsample": resize,
    "Pad": pad,
    "Identity": identity,
    "Flatten": flatten,
    "Reshape": reshape,
    "Transpose": transpose,
    "DepthToSpace": depth_to_space,
    "SpaceToDepth": space_to_depth,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gemm": gemm,
    "MatMul": matmul,
    "Shape": shape,
    "Gather": gather,
    "Constant": constant,
    "ConstantOfShape": constant_of_shape,
    "Cast": cast,
    "Expand": expand,
    "Tile": tile,
    "LayerNormalization": layer_norm,
    "InstanceNormalization": instance_norm,
    "LSTM": lstm,
    "GRU": gru,
    "Range": range_,
    "com.microsoft:FusedConv": fused_conv,
    "com.microsoft:FusedGemm": fused_gemm,
}

# Ops whose runtime function takes the module's training flag first.
TRAINING_OPS = frozenset({"BatchNormalization", "Dropout"})
# Ops never evaluated at build time even when all their inputs are constant.
NO_FOLD = frozenset({"BatchNormalization", "Dropout"})
