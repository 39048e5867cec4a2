"""onnxruntime's com.microsoft FusedConv and FusedGemm (what its extended optimisations
write) run in the PyTorch bridge as onnxruntime computes them, so a model saved at
ORT_ENABLE_EXTENDED retrains and is written back with its fused nodes and names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graphs import saved_at_extended
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnx_mbs.bridge import OnnxModule, retrain
from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.errors import BadInputError

# FusedConv's activations and their activation_params (onnxruntime's fused_activation.cc).
CONV_ACTIVATIONS = [
    (None, None),
    ("Relu", None),
    ("Sigmoid", None),
    ("Tanh", None),
    ("LeakyRelu", [0.2]),
    ("Clip", [-0.5, 0.7]),
    ("HardSigmoid", [0.3, 0.4]),
]
GEOMETRIES = [
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [2, 1, 2, 0], "dilations": [2, 1], "group": 2},
]


def _onnxruntime(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return run.run(None, feeds)


def _fused_conv(activation, params, geometry: dict, with_z: bool) -> onnx.ModelProto:
    """x -> FusedConv(x, W, B[, Z]) -> y, Z a plain Conv of x with the same geometry."""
    rng = np.random.default_rng(0)
    group = geometry.get("group", 1)
    inits = {
        "W": rng.normal(size=(6, 4 // group, 3, 3)).astype(np.float32),
        "B": rng.normal(size=6).astype(np.float32),
        "Wz": rng.normal(size=(6, 4, 3, 3)).astype(np.float32),
    }
    attrs = dict(geometry)
    if activation:
        attrs["activation"] = activation
    if params:
        attrs["activation_params"] = params
    plain = {k: v for k, v in geometry.items() if k != "group"}
    nodes = [helper.make_node("Conv", ["x", "Wz"], ["z"], name="zconv", **plain)] * with_z
    inputs = ["x", "W", "B", "z"] if with_z else ["x", "W", "B"]
    nodes.append(
        helper.make_node("FusedConv", inputs, ["y"], name="fused", domain="com.microsoft", **attrs)
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["pads", "same-stride", "group-dilation"])
@pytest.mark.parametrize("activation,params", CONV_ACTIVATIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("with_z", [False, True], ids=["no-z", "z"])
def test_fused_conv_runs_as_onnxruntime_runs_it(activation, params, geometry, with_z):
    """FusedConv was refused ('retrain the float model ...'): it runs as Conv with Z added
    before the activation, activation_params read as onnxruntime reads them."""
    model = _fused_conv(activation, params, geometry, with_z)
    x = np.random.default_rng(1).normal(size=(2, 4, 9, 10)).astype(np.float32) * 2
    (expected,) = _onnxruntime(model, {"x": x})
    with torch.no_grad():
        got = OnnxModule(model).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _fused_gemm(activation, attrs: dict) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "B": rng.normal(size=(5, 7)).astype(np.float32),
        "C": rng.normal(size=5).astype(np.float32),
    }
    node = helper.make_node(
        "FusedGemm", ["a", "B", "C"], ["y"], name="fg", domain="com.microsoft",
        transB=1, alpha=0.7, beta=1.5, **attrs,
        **({"activation": activation} if activation else {}),
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


@pytest.mark.parametrize(
    "activation,attrs",
    [
        ("Relu", {}),
        ("Sigmoid", {}),
        ("Tanh", {}),
        ("LeakyRelu", {"activation_alpha": 0.3}),
        ("HardSigmoid", {"activation_alpha": 0.3, "activation_beta": 0.4}),
    ],
    ids=lambda v: str(v),
)
def test_fused_gemm_runs_as_onnxruntime_runs_it(activation, attrs):
    """FusedGemm: Gemm's attributes, then its activation with activation_alpha/_beta."""
    model = _fused_gemm(activation, attrs)
    a = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32) * 2
    (expected,) = _onnxruntime(model, {"a": a})
    with torch.no_grad():
        got = OnnxModule(model).eval()(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_other_fused_activations_are_refused_in_one_line():
    """An activation the bridge does not run fused is named, with the way on."""
    model = _fused_conv("Elu", [1.0], GEOMETRIES[0], False)
    with pytest.raises(BadInputError, match=r"FusedConv node 'fused' has activation 'Elu'.*"
                       "ORT_ENABLE_BASIC") as caught:  # fmt: skip
        OnnxModule(model)
    assert "\n" not in str(caught.value)
    model = _fused_conv("LeakyRelu", [], GEOMETRIES[0], False)
    with pytest.raises(BadInputError, match="0 activation_params for LeakyRelu"):
        OnnxModule(model)
    with pytest.raises(BadInputError, match="FusedGemm node 'fg' has activation 'Elu'"):
        OnnxModule(_fused_gemm("Elu", {}))
    # What onnxruntime refuses to run (no activation, its parameters missing) is refused.
    with pytest.raises(BadInputError, match="FusedGemm node 'fg' has no activation"):
        OnnxModule(_fused_gemm(None, {}))
    with pytest.raises(BadInputError, match="HardSigmoid without its activation_alpha and"):
        OnnxModule(_fused_gemm("HardSigmoid", {"activation_beta": 0.4}))


class _Net(nn.Module):
    """conv-BN-ReLU, a residual block, a Linear-ReLU (FusedGemm), a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.n3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.n1(self.c1(x)))
        y = torch.relu(self.n2(self.c2(x)))
        x = torch.relu(self.n3(self.c3(y)) + x)
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _extended(tmp_path: Path) -> Path:
    """_Net exported, then saved by onnxruntime at ORT_ENABLE_EXTENDED."""
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # statistics that are not the identity, so folding shows
        for bn in (net.n1, net.n2, net.n3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return saved_at_extended(net, torch.randn(1, 3, 12, 12), tmp_path)


def test_a_model_saved_at_extended_runs_in_the_bridge_as_in_onnxruntime(tmp_path):
    model = onnx.load(_extended(tmp_path))
    ops = Counter(op_id(n) for n in model.graph.node)
    # onnxruntime's CPU provider leaves the residual Add (Z is hand-built above).
    fused = ops["com.microsoft:FusedConv"], ops["Conv"], ops["com.microsoft:FusedGemm"]
    assert fused == (2, 1, 1)
    x = np.random.default_rng(0).normal(size=(5, 3, 12, 12)).astype(np.float32)
    (expected,) = _onnxruntime(model, {"x": x})
    with torch.no_grad():
        got = OnnxModule(model).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reinsert_bn", [False, None], ids=["as-is", "bn-reinserted"])
def test_a_model_saved_at_extended_retrains_and_is_written_back(tmp_path, reinsert_bn):
    """retrain refused the extended form ('retrain the float model ...'). It trains, and
    the written model keeps its fused nodes, names and dynamic batch, passes the full
    checker and runs in onnxruntime, its weights changed."""
    path = _extended(tmp_path)
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=64)
    result = retrain(
        model, (x, y), epochs=1, batch_size=16, lr=0.05, progress=False, reinsert_bn=reinsert_bn
    )
    written = result.model
    assert result.bn_reinserted == (3 if reinsert_bn is None else 0)  # 2 FusedConv, 1 Conv
    onnx.checker.check_model(written, full_check=True)
    assert [(n.domain, n.op_type, n.name, list(n.input), list(n.output))
            for n in written.graph.node] == [
        (n.domain, n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node
    ]  # fmt: skip
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    fused = [n for n in model.graph.node if n.op_type == "FusedConv"]
    assert all(not np.array_equal(before[n.input[1]], after[n.input[1]]) for n in fused)
    for batch in (1, 7):
        (out,) = _onnxruntime(written, {"x": x[:batch]})
        assert out.shape == (batch, 4) and np.isfinite(out).all()
        with torch.no_grad():
            got = OnnxModule(written).eval()(torch.from_numpy(x[:batch])).numpy()
        np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4)


def test_a_fused_conv_is_a_folded_conv_for_bn_reinsertion(tmp_path):
    """A biased FusedConv is a Conv with its BatchNorm folded as much as a Conv is: the
    extended form of a BN network (2 FusedConv, 1 Conv) got a BN re-inserted after its one
    Conv only, and a graph of FusedConvs alone was not seen as BN-folded at all. The BN goes
    between the conv and its Z and activation; without a reference the training copy
    computes what onnxruntime computes."""
    from onnx_mbs.bridge.bn import foldable_convs, is_bn_folded, reinsert_bn

    assert is_bn_folded(_fused_conv("Relu", None, GEOMETRIES[0], False))  # FusedConvs alone
    model = onnx.load(_extended(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 12, 12)).astype(np.float32)
    assert len(foldable_convs(model)) == 3
    train, inserted = reinsert_bn(model, [torch.from_numpy(x)])
    assert sorted(bn.conv for bn in inserted) == ["/c1/Conv", "/c2/Conv", "/c3/Conv"]
    (expected,) = _onnxruntime(model, {"x": x})
    with torch.no_grad():
        got = OnnxModule(train).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation,params", CONV_ACTIVATIONS, ids=lambda v: str(v))
def test_a_bn_goes_between_a_fused_conv_and_its_z_and_activation(activation, params):
    """Each activation onnxruntime fuses, a Z added: the re-inserted BN (statistics of the
    conv's own output) leaves the training copy computing what onnxruntime computes."""
    from onnx_mbs.bridge.bn import foldable_convs, is_bn_folded, reinsert_bn

    rng = np.random.default_rng(0)
    with_z = _fused_conv(activation, params, GEOMETRIES[2], True)
    assert is_bn_folded(with_z) and len(foldable_convs(with_z)) == 1
    x = rng.normal(size=(8, 4, 9, 10)).astype(np.float32)
    train, inserted = reinsert_bn(with_z, [torch.from_numpy(x + 1)])
    assert [bn.conv for bn in inserted] == ["fused"]
    ops = [n.op_type for n in train.graph.node]
    assert ops == [
        "Conv",
        "Conv",
        "BatchNormalization",
        "Add",
        *([activation] if activation else []),
    ]
    assert train.graph.node[2].input[0] == train.graph.node[1].output[0]  # the conv's own output
    (expected,) = _onnxruntime(with_z, {"x": x})
    with torch.no_grad():
        got = OnnxModule(train).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
