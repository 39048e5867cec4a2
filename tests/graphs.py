"""Hand-built ONNX graphs shaped like real deployment models, for tests.

Each public function returns a raw ModelProto (opset 17, named nodes, random
weights); run it through `load_model` before passing it to a pass. `Builder`
is the small helper they share, reused by the fuzz test.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Builder:
    """Appends nodes and random initializers; names every node and tensor uniquely."""

    def __init__(self, name: str = "graph", seed: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def input(self, name: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def const(self, value, base: str = "c") -> str:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape: int, scale: float | None = None, base: str = "w") -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else (2.0 / max(fan_in, 1)) ** 0.5
        return self.const(self.rng.normal(0, scale, shape).astype(np.float32), base)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str = "", **attrs):
        name = name or self._name(op_type)
        outputs = [f"{name}_out{k}" if n_out > 1 else f"{name}_out" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs if n_out > 1 else outputs[0]

    # Layers --------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True, name: str = "") -> str:  # fmt: skip
        inputs = [x, self.weight(cout, cin // group, k, k)]
        if bias:
            inputs.append(self.const(self.rng.normal(0, 0.1, cout), "b"))
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4, group=group)  # fmt: skip

    def conv_transpose(self, x: str, cin: int, cout: int, k: int = 2, stride: int = 2,
                       group: int = 1, name: str = "") -> str:  # fmt: skip
        inputs = [x, self.weight(cin, cout // group, k, k), self.const(np.zeros(cout), "b")]
        return self.op("ConvTranspose", inputs, name=name, kernel_shape=[k, k],
                       strides=[stride, stride], group=group)  # fmt: skip

    def bn(self, x: str, c: int, name: str = "") -> str:
        r = self.rng
        params = [
            self.const(r.uniform(0.5, 1.5, c), "gamma"),
            self.const(r.normal(0, 0.1, c), "beta"),
            self.const(r.normal(0, 0.1, c), "mean"),
            self.const(r.uniform(0.5, 1.5, c), "var"),
        ]
        return self.op("BatchNormalization", [x, *params], name=name)

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def resize(self, x: str, factor: float, name: str = "") -> str:
        scales = self.const(np.array([1, 1, factor, factor], np.float32), "scales")
        return self.op("Resize", [x, "", scales], name=name, mode="nearest")

    def se(self, x: str, c: int, r: int, gate: str = "HardSigmoid") -> str:
        s = self.op("GlobalAveragePool", [x])
        s = self.op("Relu", [self.conv(s, c, r, k=1)])
        s = self.op(gate, [self.conv(s, r, c, k=1)])
        return self.op("Mul", [x, s])

    def gap_head(self, x: str, c: int, classes: int, output: str = "logits") -> str:
        x = self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)
        w = self.weight(classes, c)
        b = self.const(self.rng.normal(0, 0.1, classes), "fc_b")
        return self.op("Gemm", [x, w, b], name=output, transB=1)

    def model(self, outputs: list[str], output_names: list[str] | None = None,
              shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:  # fmt: skip
        """Wrap up; graph outputs are renamed with Identity nodes when names are given.
        `shapes` declares tensor shapes inference cannot know (custom ops' outputs)."""
        names = output_names or outputs
        for src, dst in zip(outputs, names):
            if src != dst:
                self.nodes.append(helper.make_node("Identity", [src], [dst], name=f"{dst}_id"))
        graph = helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
            self.inits,
        )
        for name, dims in (shapes or {}).items():
            graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        domains = sorted({n.domain for n in self.nodes if n.domain not in ("", "ai.onnx")})
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        # Output types from shape inference (dims stay symbolic for dynamic inputs).
        inferred = onnx.shape_inference.infer_shapes(model)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        return model


def standardised_conv_net(seed: int = 0, width: int = 32) -> onnx.ModelProto:
    """conv, Relu, a conv 'std' whose weight is standardised as torch's dynamo exporter writes
    timm's ScaledStdConv2d (NFNets), Relu, pooled Gemm head; input (N, 3, 16, 16), dynamic N.
    The standardisation: an inference-mode BatchNormalization of the weight reshaped to
    (1, O, -1), with a gain, and for mean and variance ReduceMeans of that weight over (0, 2)
    that drop the axes they reduce (so they average over the input channels). `width`
    channels (32: a weight too large to fold; 8: one small enough)."""
    b = Builder(seed=seed)
    c = width
    x = b.op("Relu", [b.conv(b.input("input", ["N", 3, 16, 16]), 3, c)])
    v = b.op("Reshape", [b.weight(c, c, 3, 3), b.const(np.array([1, c, -1]))])
    centred = b.op("Sub", [v, b.op("ReduceMean", [v], axes=[0, 2], keepdims=1)])
    mean = b.op("ReduceMean", [v], axes=[0, 2], keepdims=0)
    var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[0, 2], keepdims=0)
    gain, zero = b.const(np.linspace(0.5, 1.5, c)), b.const(np.zeros(c))
    weight = b.op("BatchNormalization", [v, gain, zero, mean, var], epsilon=1e-5)
    weight = b.op("Reshape", [weight, b.const(np.array([c, c, 3, 3]))])
    y = b.op("Conv", [x, weight], kernel_shape=[3, 3], pads=[1] * 4, name="std")
    return b.model([b.gap_head(b.op("Relu", [y]), c, 10)], ["logits"])


def blur_pool_net(seed: int = 0) -> onnx.ModelProto:
    """conv, Relu, a fixed 3x3 binomial depthwise filter with stride 2 whose weight is a
    Constant node (timm's BlurPool2d, TResNet's anti-aliasing, as torch's TorchScript exporter
    writes it), conv, Relu, pooled Gemm head; input (1, 3, 16, 16)."""
    b = Builder("blur", seed)
    x = b.op("Relu", [b.conv(b.input("input", [1, 3, 16, 16]), 3, 16)])
    taps = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
    filt = numpy_helper.from_array(np.tile(taps, (16, 1, 1, 1)), "filt")
    w = b.op("Constant", [], name="filt", value=filt)
    x = b.op("Conv", [x, w], name="blur", group=16, kernel_shape=[3, 3], strides=[2, 2],
             pads=[1] * 4)  # fmt: skip
    x = b.op("Relu", [b.conv(x, 16, 16)])
    return b.model([b.gap_head(x, 16, 4)], ["logits"])


def load_unfolded(model: onnx.ModelProto) -> onnx.ModelProto:
    """`load_model`'s form without its shape folding: for tests of what folding changes."""
    from onnx_mbs.passes import FixInputShapes, InferShapes, NameNodes, Sequential

    return Sequential(FixInputShapes(), NameNodes(), InferShapes())(model).model


# -- deployment-shaped graphs ------------------------------------------------------------------


def mobilenetv3_like(seed: int = 0) -> onnx.ModelProto:
    """HardSwish stem, inverted residuals with depthwise convs and HardSigmoid SE gates,
    a residual add, and a GAP + Flatten + two-Gemm head."""
    b = Builder("mobilenetv3_like", seed)
    x = b.input("image", [1, 3, 32, 32])
    x = b.op("HardSwish", [b.conv(x, 3, 16, stride=2, name="stem")])

    def block(x: str, cin: int, hidden: int, cout: int, stride: int, se: bool, tag: str) -> str:
        y = b.op("HardSwish", [b.conv(x, cin, hidden, k=1, name=f"{tag}/expand")])
        y = b.op("HardSwish", [b.conv(y, hidden, hidden, stride=stride, group=hidden,
                                      name=f"{tag}/dw")])  # fmt: skip
        if se:
            y = b.se(y, hidden, max(hidden // 4, 2))
        y = b.conv(y, hidden, cout, k=1, name=f"{tag}/project")
        return b.op("Add", [x, y], name=f"{tag}/add") if stride == 1 and cin == cout else y

    x = block(x, 16, 32, 16, 1, True, "b1")
    x = block(x, 16, 48, 24, 2, True, "b2")
    x = block(x, 24, 48, 24, 1, False, "b3")
    x = b.op("HardSwish", [b.conv(x, 24, 64, k=1, name="head/conv")])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    x = b.op("HardSwish", [b.op("Gemm", [x, b.weight(40, 64), b.const(np.zeros(40))],
                                name="head/fc1", transB=1)])  # fmt: skip
    logits = b.op("Gemm", [x, b.weight(10, 40), b.const(np.zeros(10))], name="head/fc2", transB=1)
    return b.model([logits], ["logits"])


def yolov8_c2f_like(seed: int = 0) -> onnx.ModelProto:
    """SiLU (Sigmoid*Mul) convs, C2f blocks (Split, bottlenecks with shortcut, Concat),
    a neck with nearest upsampling (one Resize by scales, one by sizes) and concat,
    and two detection head outputs."""
    b = Builder("yolov8_c2f_like", seed)
    x = b.input("images", [1, 3, 64, 64])

    def cbs(x: str, cin: int, cout: int, k: int = 3, s: int = 1, name: str = "") -> str:
        return b.silu(b.conv(x, cin, cout, k, s, name=name))

    def c2f(x: str, cin: int, cout: int, n: int, shortcut: bool, tag: str) -> str:
        half = cout // 2
        y = cbs(x, cin, cout, 1, name=f"{tag}/cv1")
        parts = b.op("Split", [y, b.const(np.array([half, half], np.int64), "split")], n_out=2,
                     name=f"{tag}/split", axis=1)  # fmt: skip
        outs = list(parts)
        for i in range(n):
            z = cbs(outs[-1], half, half, 3, name=f"{tag}/m{i}/cv1")
            z = cbs(z, half, half, 3, name=f"{tag}/m{i}/cv2")
            outs.append(b.op("Add", [outs[-1], z], name=f"{tag}/m{i}/add") if shortcut else z)
        cat = b.op("Concat", outs, name=f"{tag}/concat", axis=1)
        return cbs(cat, (2 + n) * half, cout, 1, name=f"{tag}/cv2")

    x = cbs(x, 3, 16, 3, 2, "stem")
    x = cbs(x, 16, 32, 3, 2, "down1")
    p3 = c2f(x, 32, 32, 1, True, "c2f_p3")  # 16x16
    x = cbs(p3, 32, 64, 3, 2, "down2")
    p4 = c2f(x, 64, 64, 2, True, "c2f_p4")  # 8x8
    x = cbs(p4, 64, 96, 3, 2, "down3")
    p5 = c2f(x, 96, 96, 1, True, "c2f_p5")  # 4x4
    up = b.resize(p5, 2.0, name="neck/up5")
    n4 = c2f(b.op("Concat", [up, p4], name="neck/cat4", axis=1), 160, 64, 1, False, "neck_c2f4")
    sizes = b.const(np.array([1, 64, 16, 16], np.int64), "sizes")
    up = b.op("Resize", [n4, "", "", sizes], name="neck/up4", mode="nearest")
    n3 = c2f(b.op("Concat", [up, p3], name="neck/cat3", axis=1), 96, 32, 1, False, "neck_c2f3")
    head3 = b.conv(cbs(n3, 32, 32, 3, name="head3/cv"), 32, 18, k=1, name="head3/pred")
    head4 = b.conv(cbs(n4, 64, 32, 3, name="head4/cv"), 32, 18, k=1, name="head4/pred")
    return b.model([head3, head4], ["out_p3", "out_p4"])


def dbnet_fpn_like(seed: int = 0) -> onnx.ModelProto:
    """A small backbone with BatchNorm, an FPN (1x1 laterals, Resize + Add top-down,
    3x3 smoothing, Resize to 1/4 and Concat) and DBNet's probability head
    (Conv-BN-Relu, ConvTranspose-BN-Relu, ConvTranspose, Sigmoid)."""
    b = Builder("dbnet_fpn_like", seed)
    x = b.input("image", [1, 3, 64, 64])

    def cbr(x: str, cin: int, cout: int, s: int, name: str) -> str:
        return b.op("Relu", [b.bn(b.conv(x, cin, cout, 3, s, bias=False, name=name), cout)])

    c1 = cbr(cbr(x, 3, 8, 2, "stem"), 8, 8, 1, "stem2")  # 32x32
    c2 = cbr(c1, 8, 16, 2, "stage2")  # 16x16
    c3 = cbr(c2, 16, 32, 2, "stage3")  # 8x8
    c4 = cbr(c3, 32, 48, 2, "stage4")  # 4x4
    in1 = b.conv(c1, 8, 24, k=1, bias=False, name="fpn/in1")
    in2 = b.conv(c2, 16, 24, k=1, bias=False, name="fpn/in2")
    in3 = b.conv(c3, 32, 24, k=1, bias=False, name="fpn/in3")
    in4 = b.conv(c4, 48, 24, k=1, bias=False, name="fpn/in4")
    out3 = b.op("Add", [in3, b.resize(in4, 2.0)], name="fpn/add3")
    out2 = b.op("Add", [in2, b.resize(out3, 2.0)], name="fpn/add2")
    out1 = b.op("Add", [in1, b.resize(out2, 2.0)], name="fpn/add1")
    ps = [
        b.resize(b.conv(o, 24, 6, bias=False, name=f"fpn/p{k}"), float(2**k)) if k else
        b.conv(o, 24, 6, bias=False, name=f"fpn/p{k}")
        for k, o in enumerate([out1, out2, out3, in4])
    ]  # fmt: skip
    fuse = b.op("Concat", ps, name="fpn/concat", axis=1)  # 24 channels at 32x32
    y = b.op("Relu", [b.bn(b.conv(fuse, 24, 8, bias=False, name="head/conv"), 8)])
    y = b.op("Relu", [b.bn(b.conv_transpose(y, 8, 8, name="head/up1"), 8)])
    y = b.conv_transpose(y, 8, 1, name="head/up2")
    return b.model([b.op("Sigmoid", [y], name="head/sigmoid")], ["probability"])


def shape_arith_head(seed: int = 0) -> onnx.ModelProto:
    """Convs and a head whose Reshape shape is computed at run time as
    [N, C*H*W] from Shape, Gather, Mul, Unsqueeze and Concat (as exporters of
    `x.view(x.size(0), -1)`-style code with explicit sizes produce)."""
    b = Builder("shape_arith_head", seed)
    x = b.input("input", [1, 3, 16, 16])
    x = b.op("Relu", [b.conv(x, 3, 8, stride=2, name="conv1")])
    x = b.op("Relu", [b.conv(x, 8, 12, stride=2, name="conv2")])  # 12 x 4 x 4
    shape = b.op("Shape", [x], name="head/shape")
    dims = [b.op("Gather", [shape, b.const(np.array(k, np.int64), "idx")], name=f"head/dim{k}",
                 axis=0) for k in range(4)]  # fmt: skip
    chw = b.op("Mul", [b.op("Mul", [dims[1], dims[2]], name="head/mul1"), dims[3]],
               name="head/mul2")  # fmt: skip
    axes = b.const(np.array([0], np.int64), "axes")
    target = b.op("Concat", [b.op("Unsqueeze", [dims[0], axes], name="head/unsq0"),
                             b.op("Unsqueeze", [chw, axes], name="head/unsq1")],
                  name="head/target", axis=0)  # fmt: skip
    flat = b.op("Reshape", [x, target], name="head/reshape")
    logits = b.op("Gemm", [flat, b.weight(10, 12 * 16), b.const(np.zeros(10))], name="head/fc",
                  transB=1)  # fmt: skip
    return b.model([logits], ["logits"])


def dynamic_input_model(seed: int = 0) -> onnx.ModelProto:
    """Dynamic batch and spatial dims: needs `load_model(m, {"input": [1, 3, H, W]})`."""
    b = Builder("dynamic_input_model", seed)
    x = b.input("input", ["batch", 3, "height", "width"])
    y = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    z = b.op("Relu", [b.conv(y, 8, 8, name="conv2")])
    z = b.conv(z, 8, 8, name="conv3")
    y = b.op("Relu", [b.op("Add", [y, z], name="add")])
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Relu", [b.conv(y, 8, 16, name="conv4")])
    return b.model([b.gap_head(y, 16, 5)], ["logits"])


HAND_BUILT = {
    "mobilenetv3_like": (mobilenetv3_like, None),
    "yolov8_c2f_like": (yolov8_c2f_like, None),
    "dbnet_fpn_like": (dbnet_fpn_like, None),
    "shape_arith_head": (shape_arith_head, None),
    "dynamic_input_model": (dynamic_input_model, {"input": [1, 3, 24, 20]}),
}


# -- dead channels ---------------------------------------------------------------------------

# Initializer roles whose entries must be zero for a channel to be exactly zero after
# its producers: filters and everything added on the way (BN(0) = beta - mean*...).
ZEROED_ROLES = {"filters", "bias", "bn_bias", "bn_mean", "shift", "norm_bias"}


def kill_channels(model: onnx.ModelProto, groups, drop: dict[int, list[int]]) -> onnx.ModelProto:
    """A copy of `model` where the channels `drop[g]` of each group g are provably zero.

    Every producing filter of a dropped channel is zeroed, and so is every bias, BN
    beta and mean, and added constant on its way, so the channel is exactly 0 in
    every tensor of its group (Relu, HardSwish, SiLU, Clip, pooling and Resize keep 0
    at 0; an SE gate multiplies 0). Removing such channels must not change outputs.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    by_id = {g.id: g for g in groups}
    for gid, channels in drop.items():
        for member in by_id[gid].members:
            if member.role not in ZEROED_ROLES:
                continue
            tensor = tensors[member.tensor]
            array = numpy_helper.to_array(tensor).copy()
            index = [slice(None)] * array.ndim
            index[member.axis] = member.positions[channels].ravel()
            array[tuple(index)] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return out


# -- running ---------------------------------------------------------------------------------


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input of a model with static input shapes."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in inits:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | np.ndarray,
    outputs: list[str] | None = None,
) -> list[np.ndarray]:
    """The onnxruntime runner every test shares: CPU, one thread, quiet. One array as
    `feeds` goes to the model's first input; `outputs` picks outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer warnings are noise here
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    if not isinstance(feeds, Mapping):
        feeds = {session.get_inputs()[0].name: feeds}
    return session.run(outputs, dict(feeds))


def declared_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each graph input's and output's declared dims: a size, or None where it is dynamic
    (a dim_param, nothing, or Paddle's -1 or 0)."""
    inits = {t.name for t in model.graph.initializer}
    return {
        vi.name: [d.dim_value if d.dim_value > 0 else None
                  for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.input, *model.graph.output]
        if vi.name not in inits
    }  # fmt: skip


def assert_runs_at_declared_shapes(
    original: onnx.ModelProto,
    written: onnx.ModelProto,
    shape: Mapping[str, list[int]] | list[int] | None = None,
) -> list[dict[str, tuple[int, ...]]]:
    """`written` declares the inputs and outputs `original` declares, dynamic dims included,
    and runs at every shape they allow where the original runs: batch 1 and 2 where the
    batch is dynamic, and where other dims are dynamic two other sizes of them (doubled,
    and odd sizes that differ from dim to dim: 2x + 1, 2x + 3, ...), each giving outputs
    of the original's shapes. `shape` (per input name, or one shape
    for the first input) gives the sizes of dynamic dims other than the batch to start
    from. Returns the input shapes both ran at."""
    inputs, outputs = io_names(original)
    assert io_names(written) == (inputs, outputs)
    dims = declared_dims(original)
    assert declared_dims(written) == dims
    given = dict(shape) if isinstance(shape, Mapping) else {inputs[0]: list(shape or [])}
    start = {}
    for name in inputs:
        start[name] = [
            size if size is not None else (1 if k == 0 else given[name][k])
            for k, size in enumerate(dims[name])
        ]
    batches = [1, 2] if any(dims[n] and dims[n][0] is None for n in inputs) else [None]
    trials = []
    for batch in batches:
        trials.append({n: [batch or s[0], *s[1:]] if s else s for n, s in start.items()})
    if any(size is None for n in inputs for size in dims[n][1:]):
        for grow in (lambda x, k: 2 * x, lambda x, k: 2 * x + 2 * k - 1):  # doubled; odd
            trials.append({
                n: [batches[-1] or s[0], *[grow(x, k) if dims[n][k] is None else x
                                           for k, x in enumerate(s[1:], start=1)]] if s else s
                for n, s in start.items()
            })  # fmt: skip
    ran = []
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in original.graph.input}
    for k, trial in enumerate(trials):
        rng = np.random.default_rng(k)
        feeds = {
            n: rng.standard_normal(s).astype(helper.tensor_dtype_to_np_dtype(elem[n]))
            for n, s in trial.items()
        }
        try:
            expected = run(original, feeds)
        except Exception:  # the original does not take this shape: nor need the written one
            assert k > 0, f"the original does not run at {trial}"
            continue
        got = run(written, feeds)
        assert [y.shape for y in got] == [y.shape for y in expected], trial
        assert all(np.isfinite(y).all() for y in got if y.dtype.kind == "f"), trial
        ran.append({n: tuple(s) for n, s in trial.items()})
    return ran


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The model's data input names (initializers left out) and output names."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return inputs, [o.name for o in model.graph.output]


def written_widths(reduced: onnx.ModelProto, report) -> dict[int, int]:
    """Per channel group of a reduce `report`: the output width of its producer convs in the
    written model (read from the model itself, not from the plan or the report)."""
    from onnx_mbs.passes import analyze_model, load_model

    before = {layer.name: layer.out_channels for layer in report.before.layers}
    after = {layer.name: layer.out_channels for layer in analyze_model(load_model(reduced)).layers}
    widths: dict[int, int] = {}
    for group in report.groups:
        convs = [p for p in group.producers if before.get(p) == group.size]
        written = {after[p] for p in convs}
        assert len(written) <= 1, (group.id, written)  # a group's producers agree
        if written:
            widths[group.id] = written.pop()
    return widths


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, atol: float = 1e-5) -> None:
    """Same output names and shapes, values within `atol` (scaled by the output's size)."""
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    feeds = random_feeds(a)
    for name, x, y in zip([o.name for o in a.graph.output], run(a, feeds), run(b, feeds)):
        assert x.shape == y.shape, name
        scale = max(1.0, float(np.abs(x).max()))
        assert np.abs(x - y).max() <= atol * scale, (name, float(np.abs(x - y).max()))


def assert_cut_channels_were_dead(killed: onnx.ModelProto, small: onnx.ModelProto) -> int:
    """An oracle for shrink that does not ask the channel analysis: run both models on two
    inputs, reading every 4-D NCHW tensor they share; each tensor that lost channels in
    `small` must have lost only channels that are dead in `killed` (the same constant for
    every input and position, as the values show: 0, or f(0) in an SE gate), and its other
    channels must be `killed`'s. Returns how many tensors it compared (a kept channel that
    happens to be constant too makes a tensor ambiguous: skipped)."""

    def shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
        return {
            vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.value_info
        }

    before, after = shapes(killed), shapes(small)
    names = [
        n
        for n, s in before.items()
        if len(s) == 4 and len(after.get(n, ())) == 4
        and after[n][1] < s[1] and after[n][2:] == s[2:]
    ]  # fmt: skip
    if not names:
        return 0

    def values(model: onnx.ModelProto, seed: int) -> list[np.ndarray]:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.output.extend(vi for vi in model.graph.value_info if vi.name in names)
        return run(out, random_feeds(killed, seed), names)

    big = [np.concatenate(pair) for pair in zip(values(killed, 3), values(killed, 4))]
    cut = [np.concatenate(pair) for pair in zip(values(small, 3), values(small, 4))]
    compared = 0
    for name, x, y in zip(names, big, cut):
        live = [c for c in range(x.shape[1]) if np.any(x[:, c] != x.flat[c * x[0, 0].size])]
        assert len(live) <= y.shape[1], (name, "a channel that was not dead was cut")
        if len(live) == y.shape[1]:
            np.testing.assert_allclose(y, x[:, live], rtol=1e-5, atol=1e-5, err_msg=name)
            compared += 1
    return compared


# What each layer op learns, by input position (torch's parameters(): BatchNorm's running
# mean and variance are buffers).
LEARNED_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2),
}


def parameters_by_layer(model: onnx.ModelProto) -> int:
    """A hand count of a CNN's parameters, layer by layer as torch counts them (conv and
    linear weights and biases, BatchNorm's scale and shift), written independently of
    `count_parameters`; refuses a model with other constants it would have to judge."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    counted: set[str] = set()
    total = 0
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name not in sizes:
                continue
            learned = LEARNED_INPUTS.get(node.op_type)
            assert learned is not None, f"{node.op_type} reads constant {name}: not a layer"
            if position in learned and name not in counted:
                counted.add(name)
                total += sizes[name]
    return total


def tied_conv_net(seed: int = 0, width: int = 8) -> onnx.ModelProto:
    """conv 'a', Relu, then one conv applied twice ('s1', 's2': one weight and bias, as
    torch exports a module called twice), Relu each, pooled Gemm head; input (N, 3, 16, 16)."""
    b = Builder(seed=seed)
    c = width
    x = b.op("Relu", [b.conv(b.input("input", ["N", 3, 16, 16]), 3, c, name="a")])
    shared = [b.weight(c, c, 3, 3, base="ws"), b.const(np.zeros(c), "bs")]
    for name in ("s1", "s2"):
        x = b.op("Conv", [x, *shared], name=name, kernel_shape=[3, 3], pads=[1] * 4)
        x = b.op("Relu", [x])
    return b.model([b.gap_head(x, c, 10)], ["logits"])


def overridable_conv_net(seed: int = 0, stored: bool = False) -> onnx.ModelProto:
    """x -> conv1 -> Relu -> conv2 -> Relu -> conv3 (y), IR 8, with conv1's weight and bias
    listed as graph inputs too: initializers a caller may override (onnxruntime's
    `get_overridable_initializers`). `stored`: conv1's weight is stored in fp16 and Cast
    to float before use (weight-only fp16), and listed alone."""
    b = Builder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    c1 = b.op("Relu", [b.conv(x, 3, 16, name="conv1")])
    c2 = b.op("Relu", [b.conv(c1, 16, 16, name="conv2")])
    model = b.model([b.conv(c2, 16, 4, name="conv3")], ["y"])
    graph = model.graph
    conv1 = next(n for n in graph.node if n.name == "conv1")
    inits = {t.name: t for t in graph.initializer}
    listed = [inits[name] for name in conv1.input[1:]]
    if stored:
        weight = listed[0]
        half = numpy_helper.to_array(weight).astype(np.float16)
        weight.CopyFrom(numpy_helper.from_array(half, weight.name + "_stored"))
        graph.node.insert(0, helper.make_node("Cast", [weight.name], [conv1.input[1]], to=1))
        listed = [weight]
    for t in listed:
        graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return model


def saved_at_extended(net, example, directory) -> Path:
    """torch module `net` exported (input x, output y, dynamic batch), then saved by
    onnxruntime at ORT_ENABLE_EXTENDED (its com.microsoft FusedConv, FusedGemm) as
    `directory`/ext.onnx."""
    import onnxruntime as ort
    import torch

    raw, path = Path(directory) / "raw.onnx", Path(directory) / "ext.onnx"
    torch.onnx.export(
        net.eval(), example, raw, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False,
    )  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    return path
