"""The PyTorch bridge: ONNX graphs run as torch modules match onnxruntime, train, write back."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from conftest import FORMS, SMALL_ZOO
from graphs import run, standardised_conv_net
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import conv_relu_model
from torch import nn

from onnx_mbs.bridge import OnnxModule, retrain, untie_initializers, write_back
from onnx_mbs.models.export import export_onnx
from onnx_mbs.passes.domains import SAVE_AT_BASIC, op_id
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def torch_run(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """Equal within `rel` of the reference's magnitude (max |expected|, at least 1)."""
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    err = float(np.abs(actual.astype(np.float64) - expected).max()) if expected.size else 0.0
    assert err <= rel * scale, f"max error {err} > {rel} * {scale}"


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    module = OnnxModule(model).eval()
    ours, ref = torch_run(module, feeds), run(model, feeds)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b)


# ---------------------------------------------------------------------------
# Models exported from torch


class SmallNet(nn.Module):
    """Conv/BN/ReLU, a residual add, a grouped strided conv, pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.bn3 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        y = nn.functional.hardswish(self.bn3(self.down(y)))
        y = self.pool(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def randomized(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so folding and eval mode matter."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net.eval()


def export(net: nn.Module, x: torch.Tensor, keep_bn: bool) -> onnx.ModelProto:
    """The zoo's exporter: BN kept ("train") or folded ("deploy"), dynamic batch."""
    form = "train" if keep_bn else "deploy"
    return export_onnx(net, tuple(x.shape), form=form, dynamic_batch=True)


@pytest.fixture(scope="module")
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomized(SmallNet())


@pytest.fixture(scope="module")
def x16() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("keep_bn", [True, False], ids=["bn-kept", "bn-folded"])
def test_exported_model_matches_ort_and_torch(small_net, x16, keep_bn) -> None:
    model = export(small_net, torch.from_numpy(x16), keep_bn)
    ops = {n.op_type for n in model.graph.node}
    assert ("BatchNormalization" in ops) == keep_bn
    module = OnnxModule(model).eval()
    ours = torch_run(module, {"input": x16})[0]
    assert_close(ours, run(model, {"input": x16})[0])
    with torch.no_grad():
        assert_close(ours, small_net(torch.from_numpy(x16)).numpy())
    # A different batch size runs too (dynamic batch axis).
    assert torch_run(module, {"input": x16[:1]})[0].shape == (1, 5)


def test_parameters_buffers_and_constants(small_net, x16) -> None:
    model = export(small_net, torch.from_numpy(x16), keep_bn=True)
    module = OnnxModule(model)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    conv_w = next(n for n in model.graph.node if n.op_type == "Conv").input[1]
    assert "." in conv_w and module.initializer_keys[conv_w] in params
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    for name in bn.input[1:3]:  # scale, bias (may be tied through Identity by the exporter)
        source = _through_identity(model, name)
        assert module.initializer_keys[source] in params
    for name in bn.input[3:5]:
        assert module.initializer_keys[name] in buffers
        assert module.initializer_keys[name] in module.state_dict()
    assert all("." not in k for k in module.initializer_keys.values())
    # Every float weight initializer is trainable; no int initializer is.
    n_float = sum(
        np.prod(t.dims)
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT
        and t.name not in bn.input[3:5]
        and not any(t.name in b.input[3:5] for b in model.graph.node)
    )
    assert sum(p.numel() for p in params.values()) == n_float


def _through_identity(model: onnx.ModelProto, name: str) -> str:
    producers = {n.output[0]: n for n in model.graph.node if n.op_type == "Identity"}
    while name in producers:
        name = producers[name].input[0]
    return name


class AffineNormNet(nn.Module):
    """InstanceNorm2d(affine=True), exported as InstanceNormalization reading its weight and
    bias, then GroupNorm, whose InstanceNormalization reads per-group ones and zeros held by
    Constant nodes (its affine is the Mul and Add after)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.gnorm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gnorm(self.inorm(self.conv(x))).mean((2, 3)))


def test_instance_norm_affine_is_trained_and_groupnorm_graph_kept(x16) -> None:
    """InstanceNormalization's scale and bias were constants: retraining silently left
    InstanceNorm2d's affine as it was, while LayerNorm's and BatchNorm's trained. Now they are
    parameters; GroupNorm's per-group ones and zeros stay in their Constant nodes."""
    torch.manual_seed(0)
    model = export_onnx(AffineNormNet(), (1, 3, 16, 16), form="train", dynamic_batch=True)
    module = OnnxModule(untie_initializers(model))
    params = {n for n, k in module.initializer_keys.items() if k in module._parameters}
    assert {"inorm.weight", "inorm.bias"} <= params
    labels = np.arange(len(x16)) % 3
    result = retrain(model, (x16, labels), batch_size=2, lr=1.0, progress=False).model
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    assert not np.array_equal(before["inorm.weight"], after["inorm.weight"])
    assert not np.array_equal(before["inorm.bias"], after["inorm.bias"])
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in model.graph.node]


def test_shared_initializer_is_one_parameter() -> None:
    w = np.random.default_rng(1).normal(size=(4, 4, 3, 3)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1]),
        ],
        {"x": [1, 4, 5, 5]},
        ["y"],
        {"w": w},
    )
    module = OnnxModule(model)
    assert len(list(module.parameters())) == 1
    x = np.random.default_rng(2).normal(size=(1, 4, 5, 5)).astype(np.float32)
    out = module(torch.from_numpy(x))
    out.sum().backward()
    assert module.initializer("w").grad is not None
    assert_close(out.detach().numpy(), run(model, {"x": x})[0])


def test_weights_through_layout_ops_train_and_write_back() -> None:
    """MatMul(x, Transpose(W)) and a Conv weight stored flat and reshaped: both W are trained."""
    nodes = [
        helper.make_node("Reshape", ["wflat", "wshape"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["a"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["a"], ["f"]),
        helper.make_node("Transpose", ["h"], ["ht"]),
        helper.make_node("MatMul", ["f", "ht"], ["y"]),
    ]
    inits = {"wflat": rnd(4, 9), "wshape": i64(4, 1, 3, 3), "h": rnd(5, 144, seed=1)}
    model = make_model(nodes, {"x": X}, ["y"], inits)
    module = OnnxModule(model)
    assert {n for n, _ in module.named_parameters()} == {"wflat", "h"}
    x = rnd(*X, seed=2)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    module(torch.from_numpy(x)).square().mean().backward()
    opt.step()
    written = write_back(model, module.eval())
    assert_close(run(written, {"x": x})[0], torch_run(module, {"x": x})[0])
    assert not np.allclose(run(written, {"x": x})[0], run(model, {"x": x})[0])


def _indexed_weights_net() -> onnx.ModelProto:
    """Weights read through Slice, Split, Gather and Expand, as exporters write them: a fused
    kernel split in two, a kernel sliced out of a larger one, one picked from a stack by a
    constant index, a per-channel scale broadcast by Expand, and an embedding table looked up
    by the token ids the model is fed."""
    values = {
        "fused": rnd(8, 4, 3, 3, seed=1),
        "split": i64(4, 4),
        "big": rnd(6, 4, 3, 3, seed=2),
        "starts": i64(2),
        "ends": i64(6),
        "axes": i64(0),
        "stack": rnd(3, 4, 4, 3, 3, seed=3),
        "pick": np.array(1, np.int64),
        "scale": rnd(4, 1, 1, seed=4),
        "eshape": i64(4, 6, 6),
        "table": rnd(10, 4, seed=5),
        "h": rnd(5, 4, seed=6),
    }
    nodes = [
        helper.make_node("Split", ["fused", "split"], ["wa", "wb"], axis=0),
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1] * 4),
        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1] * 4),
        helper.make_node("Slice", ["big", "starts", "ends", "axes"], ["ws"]),
        helper.make_node("Conv", ["a", "ws"], ["c"], pads=[1] * 4),
        helper.make_node("Gather", ["stack", "pick"], ["wg"], axis=0),
        helper.make_node("Conv", ["b", "wg"], ["d"], pads=[1] * 4),
        helper.make_node("Expand", ["scale", "eshape"], ["se"]),
        helper.make_node("Mul", ["c", "se"], ["e"]),
        helper.make_node("Add", ["d", "e"], ["f"]),
        helper.make_node("GlobalAveragePool", ["f"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("Add", ["flat", "emb"], ["z"]),
        helper.make_node("Gemm", ["z", "h"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "indexed_weights",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


INDEXED = {"fused", "big", "stack", "scale", "table"}


def test_weights_through_slice_split_gather_expand_train_and_write_back() -> None:
    """These weights were folded into constants when the module was built (their readers took
    only constants) or, the embedding, left a constant: `retrain` wrote them back unchanged,
    silently. Now each is a parameter, the op runs on it every forward, one step of training
    moves it, and the written model computes what the trained module does."""
    model = _indexed_weights_net()
    feeds = {"x": rnd(3, 4, 6, 6, seed=7), "ids": i64(0, 9, 4)}
    module = OnnxModule(model)
    assert {n for n, _ in module.named_parameters()} == INDEXED | {"h"}
    assert module.untrained == {}
    assert_close(torch_run(module.eval(), feeds)[0], run(model, feeds)[0])
    before = {n: module.initializer(n).detach().clone() for n in INDEXED}
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    out = module.train()(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    out.square().mean().backward()
    opt.step()
    for name in INDEXED:
        assert not torch.equal(module.initializer(name), before[name]), name
    # Rows the ids do not pick and kernels the index does not take get no gradient.
    assert torch.equal(module.initializer("table")[1], before["table"][1])
    assert torch.equal(module.initializer("stack")[0], before["stack"][0])
    with torch.no_grad():  # every weight changed, then written back: the graph is the module
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    written = write_back(model, module.eval())
    onnx.checker.check_model(written, full_check=True)
    assert_close(run(written, feeds)[0], torch_run(module, feeds)[0])
    assert not np.allclose(run(written, feeds)[0], run(model, feeds)[0])
    for name in INDEXED:
        w = next(t for t in written.graph.initializer if t.name == name)
        np.testing.assert_array_equal(
            numpy_helper.to_array(w), module.initializer(name).detach().numpy()
        )


def test_retrain_trains_weights_read_through_slice() -> None:
    """The whole run: the sliced kernel is written back trained."""
    nodes = [
        helper.make_node("Slice", ["big", "starts", "ends", "axes"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["a"], pads=[1] * 4),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "h"], ["y"], transB=1),
    ]
    inits = {"big": rnd(6, 4, 3, 3), "starts": i64(1), "ends": i64(4), "axes": i64(0)}
    inits["h"] = rnd(3, 3, seed=1)
    model = make_model(nodes, {"x": ["n", 4, 6, 6]}, ["y"], inits)
    x, y = rnd(16, 4, 6, 6, seed=2), np.arange(16) % 3
    result = retrain(
        model, (x, y), epochs=1, lr=0.1, batch_size=8, weight_decay=0.0, progress=False
    )
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert not np.allclose(after["big"][1:4], inits["big"][1:4])
    # Rows no Slice reads get no gradient (weight decay alone would move them).
    np.testing.assert_array_equal(after["big"][[0, 4, 5]], inits["big"][[0, 4, 5]])
    assert result.untrained == []


def _scaled_kernel_net() -> onnx.ModelProto:
    """A kernel computed from an initializer by an op the bridge does not train through
    (Mul by a constant mask, folded into the Conv's weight when the module is built)."""
    nodes = [
        helper.make_node("Mul", ["raw", "mask"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["a"], pads=[1] * 4),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "h"], ["y"], transB=1),
    ]
    mask = (np.arange(3 * 4 * 9).reshape(3, 4, 3, 3) % 2).astype(np.float32)
    inits = {"raw": rnd(3, 4, 3, 3), "mask": mask, "h": rnd(3, 3, seed=1)}
    return make_model(nodes, {"x": ["n", 4, 6, 6]}, ["y"], inits)


def test_weights_folded_at_build_time_are_named(capsys) -> None:
    """What still cannot train (a kernel computed by Mul) is said in one line on stderr and
    listed on the result, not left silently as it was."""
    model = _scaled_kernel_net()
    module = OnnxModule(model)
    assert set(module.untrained) == {"raw", "mask"}
    assert "Conv" in module.untrained["raw"] and "Mul" in module.untrained["raw"]
    x, y = rnd(16, 4, 6, 6, seed=2), np.arange(16) % 3
    result = retrain(model, (x, y), epochs=1, lr=0.1, batch_size=8, progress=False)
    assert result.untrained == ["mask", "raw"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "raw" in line]
    assert len(lines) == 1 and "mask" in lines[0] and "Mul" in lines[0], lines
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(after["raw"], rnd(3, 4, 3, 3))
    assert not np.allclose(after["h"], rnd(3, 3, seed=1))


def test_weights_folded_from_constant_nodes_are_named() -> None:
    """The same with the kernel held by a Constant node (exporters that fold nothing)."""
    model = _scaled_kernel_net()
    graph = model.graph
    raw = next(t for t in graph.initializer if t.name == "raw")
    graph.node.insert(0, helper.make_node("Constant", [], ["raw"], value=raw))
    graph.initializer.remove(raw)
    assert set(OnnxModule(model).untrained) == {"raw", "mask"}


def test_group_norm_ones_and_zeros_computed_from_constants_are_not_named() -> None:
    """InstanceNormalization's scale and bias held in Constant nodes are GroupNorm's per-group
    ones and zeros as exporters write them (the affine is the Mul/Add after): left in their
    nodes by design, and not named as untrained when computed from them (Expand) either."""

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))

    nodes = [
        const("one", f32(1.0)),
        const("zero", f32(0.0)),
        helper.make_node("Expand", ["one", "groups"], ["ones"]),
        helper.make_node("Expand", ["zero", "groups"], ["zeros"]),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Reshape", ["c", "grouped"], ["r"]),
        helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"]),
        helper.make_node("Reshape", ["n", "back"], ["y"]),
    ]
    inits = {"w": rnd(4, 4, 1, 1), "groups": i64(2), "grouped": i64(0, 2, -1)}
    inits["back"] = i64(0, 4, 6, 6)
    model = make_model(nodes, {"x": X}, ["y"], inits)
    assert_matches_ort(model, {"x": rnd(*X)})
    assert OnnxModule(model).untrained == {}


def constant_weight_classifier() -> onnx.ModelProto:
    """The conv weight held by a Constant node, and a scalar Constant."""

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))

    nodes = [
        const("w", rnd(8, 4, 3, 3)),
        const("k", f32(0.5)),
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Mul", ["a", "k"], ["m"]),
        helper.make_node("GlobalAveragePool", ["m"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "h"], ["y"], transB=1),
    ]
    return make_model(nodes, {"x": ["n", 4, 6, 6]}, ["y"], {"h": rnd(3, 8, seed=1)})


def test_weights_in_constant_nodes_are_trained_and_written_back() -> None:
    model = constant_weight_classifier()
    x, y = rnd(16, 4, 6, 6, seed=2), np.arange(16) % 3
    written = retrain(model, (x, y), epochs=1, lr=0.1, batch_size=8, progress=False).model
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert not np.allclose(inits["w"], rnd(8, 4, 3, 3))  # the conv weight trained too
    assert [n.op_type for n in written.graph.node if n.op_type == "Constant"] == ["Constant"]
    assert written.graph.input == model.graph.input
    assert run(written, {"x": x[:3]})[0].shape == (3, 3)


def test_weights_in_constant_nodes_of_ir3_models_are_trained() -> None:
    """IR 3 (initializers are graph inputs too): the Constant weight was left in its node, so
    the conv silently kept its weight. It is lifted as in later IRs, listed as an input."""
    model = constant_weight_classifier()
    model.ir_version, model.opset_import[0].version = 3, 8
    next(n for n in model.graph.node if n.op_type == "Gemm").input.append("c")  # C: Gemm-7
    model.graph.initializer.append(numpy_helper.from_array(f32(0, 0, 0), "c"))
    for name, shape in (("h", [3, 8]), ("c", [3])):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]))
    onnx.checker.check_model(model, full_check=True)
    x, y = rnd(16, 4, 6, 6, seed=2), np.arange(16) % 3
    written = retrain(model, (x, y), epochs=1, lr=0.1, batch_size=8, progress=False).model
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert not np.allclose(inits["w"], rnd(8, 4, 3, 3))
    assert [i.name for i in written.graph.input] == ["x", "h", "c", "w"]
    onnx.checker.check_model(written, full_check=True)
    assert run(written, {"x": x[:3]})[0].shape == (3, 3)


def test_model_without_trainable_weights_is_refused() -> None:
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    model = make_model(nodes, {"x": ["n", 4, 6, 6]}, ["y"])
    x, y = rnd(16, 4, 6, 6, seed=2), np.arange(16) % 4
    with pytest.raises(BadInputError, match="no trainable weights"):
        retrain(model, (x, y), epochs=1, batch_size=8, progress=False)


# ---------------------------------------------------------------------------
# Hand-built graphs for ops and attribute combinations torch does not emit


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: list[str],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def rnd(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def unary(op: str, **attrs) -> tuple:
    return ([helper.make_node(op, ["x"], ["y"], **attrs)], {}, 17)


def resize(mode: str, scales=None, sizes=None, opset: int = 17, **attrs) -> tuple:
    inits = {"roi": f32()}
    names = ["x", "roi"]
    if scales is not None:
        inits["scales"] = f32(*scales)
        names.append("scales")
    else:
        inits["sizes"] = i64(*sizes)
        names += ["", "sizes"]
    return ([helper.make_node("Resize", names, ["y"], mode=mode, **attrs)], inits, opset)


X = [2, 4, 6, 6]  # input shape used by the single-input cases below

CASES: dict[str, tuple] = {
    "hardswish": unary("HardSwish"),
    "hardsigmoid": unary("HardSigmoid", alpha=0.3, beta=0.4),
    "leakyrelu": unary("LeakyRelu", alpha=0.2),
    "elu": unary("Elu", alpha=0.7),
    "softplus": unary("Softplus"),
    # Keras' selu and softsign activations, as tf2onnx 1.17.0 writes them (ONNX's Selu
    # defaults are torch's constants; other alpha and gamma are honoured).
    "selu": unary("Selu"),
    "selu-attrs": unary("Selu", alpha=1.2, gamma=0.9),
    "softsign": unary("Softsign"),
    "sigmoid": unary("Sigmoid"),
    "tanh": unary("Tanh"),
    "softmax": unary("Softmax", axis=1),
    # Before opset 13 (Log)Softmax normalises over all dims from axis on, as one flat row.
    "softmax-opset11": ([helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}, 11),
    "logsoftmax-opset11": ([helper.make_node("LogSoftmax", ["x"], ["y"], axis=1)], {}, 11),
    "logsoftmax-opset11-default": ([helper.make_node("LogSoftmax", ["x"], ["y"])], {}, 11),
    "logsoftmax": unary("LogSoftmax", axis=2),
    "globalmaxpool": unary("GlobalMaxPool"),
    "flatten-axis2": unary("Flatten", axis=2),
    "transpose": unary("Transpose", perm=[0, 2, 3, 1]),
    "prelu": ([helper.make_node("PRelu", ["x", "s"], ["y"])], {"s": rnd(4, 1, 1)}, 17),
    "clip-inputs": (
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)},
        17,
    ),
    "clip-min-only": (
        [helper.make_node("Clip", ["x", "lo"], ["y"])],
        {"lo": np.array(0.1, np.float32)},
        17,
    ),
    # Shape arithmetic through a Clip with int64 bounds: the bounds were made floats, and so
    # the target shape (a TypeError in Reshape).
    "clip-int64-shape-arithmetic": (
        [
            helper.make_node("Shape", ["x"], ["shp"]),
            helper.make_node("Gather", ["shp", "one"], ["c"], axis=0),
            helper.make_node("Clip", ["c", "lo", "hi"], ["cc"]),
            helper.make_node("Unsqueeze", ["cc", "ax0"], ["c1"]),
            helper.make_node("Concat", ["c1", "minus1"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        {
            "one": np.array(1, np.int64),
            "lo": np.array(1, np.int64),
            "hi": np.array(2, np.int64),
            "ax0": i64(0),
            "minus1": i64(-1),
        },
        17,
    ),
    "clip-attrs-opset6": ([helper.make_node("Clip", ["x"], ["y"], min=-0.2, max=0.3)], {}, 6),
    "sub-div-mul": (
        [
            helper.make_node("Sub", ["x", "m"], ["a"]),
            helper.make_node("Div", ["a", "s"], ["b"]),
            helper.make_node("Mul", ["b", "k"], ["y"]),
        ],
        {"m": rnd(4, 1, 1), "s": f32(2.0), "k": rnd(1, 4, 1, 1, seed=3)},
        17,
    ),
    "conv-asym-pads": (
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])],
        {"w": rnd(3, 4, 3, 3), "b": rnd(3)},
        17,
    ),
    "conv-same-upper-s2": (
        [
            helper.make_node(
                "Conv",
                ["x", "w"],
                ["y"],
                auto_pad="SAME_UPPER",
                strides=[2, 2],
                kernel_shape=[4, 4],
            )
        ],
        {"w": rnd(3, 4, 4, 4)},
        17,
    ),
    "conv-same-lower": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", kernel_shape=[4, 2])],
        {"w": rnd(3, 4, 4, 2)},
        17,
    ),
    # No kernel_shape (it is optional): the kernel comes from a tied or cast weight's shape.
    "conv-tied-weight-no-kernel-shape": (
        [
            helper.make_node("Identity", ["w0"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        ],
        {"w0": rnd(3, 4, 3, 3)},
        17,
    ),
    "conv-cast-weight-no-kernel-shape": (
        [
            helper.make_node("Cast", ["w0"], ["w"], to=TensorProto.FLOAT),
            helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2]),
        ],
        {"w0": rnd(3, 4, 2, 2)},
        17,
    ),
    "conv-dilated": (
        [helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[2, 2, 2, 2])],
        {"w": rnd(3, 4, 3, 3)},
        17,
    ),
    "conv-depthwise": (
        [helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])],
        {"w": rnd(8, 1, 3, 3)},
        17,
    ),
    "convtranspose-outpad-groups": (
        [
            helper.make_node(
                "ConvTranspose",
                ["x", "w", "b"],
                ["y"],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                output_padding=[1, 1],
                group=2,
            )
        ],
        {"w": rnd(4, 3, 3, 3), "b": rnd(6)},
        17,
    ),
    "convtranspose-asym-pads": (
        [
            helper.make_node(
                "ConvTranspose",
                ["x", "w"],
                ["y"],
                strides=[2, 1],
                pads=[0, 1, 1, 0],
                dilations=[1, 2],
            )
        ],
        {"w": rnd(4, 2, 3, 2)},
        17,
    ),
    "convtranspose-output-shape": (
        [
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[13, 12]
            )
        ],
        {"w": rnd(4, 2, 3, 3)},
        17,
    ),
    # A target beyond the natural size: extra cells at the end hold the bias (output_shape);
    # auto_pad keeps the natural size (what onnxruntime does).
    "convtranspose-output-shape-beyond": (
        [
            helper.make_node(
                "ConvTranspose", ["x", "w", "b"], ["y"], strides=[3, 3], output_shape=[18, 17]
            )
        ],
        {"w": rnd(4, 2, 2, 2), "b": rnd(2)},
        17,
    ),
    "convtranspose-same-stride-beyond-kernel": (
        [
            helper.make_node(
                "ConvTranspose", ["x", "w", "b"], ["y"], strides=[3, 2], auto_pad="SAME_UPPER"
            )
        ],
        {"w": rnd(4, 2, 2, 1), "b": rnd(2)},
        17,
    ),
    "maxpool-ceil-asym": (
        [
            helper.make_node(
                "MaxPool",
                ["x"],
                ["y"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[0, 1, 1, 0],
                ceil_mode=1,
            )
        ],
        {},
        17,
    ),
    "maxpool-same-upper": (
        [
            helper.make_node(
                "MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"
            )
        ],
        {},
        17,
    ),
    # ceil_mode's last window must start inside the input or the leading pad, also where the
    # pads are applied by hand (onnxruntime: 3 columns here, not 4).
    "maxpool-ceil-big-pads": (
        [
            helper.make_node(
                "MaxPool",
                ["x"],
                ["y"],
                kernel_shape=[1, 3],
                strides=[2, 2],
                pads=[0, 2, 0, 2],
                ceil_mode=1,
            )
        ],
        {},
        17,
    ),
    "avgpool-ceil-asym-include": (
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[2, 2],
                strides=[2, 2],
                pads=[1, 0, 1, 1],
                ceil_mode=1,
                count_include_pad=1,
            )
        ],
        {},
        17,
    ),
    # A stride beyond the kernel: SAME's total pad is negative, the window skips input at both
    # ends (onnxruntime picks rows 1 and 4 of 6 here).
    "avgpool-same-stride-beyond-kernel": (
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[1, 2],
                strides=[3, 3],
                auto_pad="SAME_UPPER",
            )
        ],
        {},
        19,
    ),
    "avgpool-exclude-pad": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        {},
        17,
    ),
    "avgpool-include-pad": (
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                count_include_pad=1,
                strides=[2, 2],
            )
        ],
        {},
        17,
    ),
    "avgpool-asym-exclude": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 3], pads=[1, 0, 0, 2])],
        {},
        17,
    ),
    "avgpool-ceil": (
        [
            helper.make_node(
                "AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
            )
        ],
        {},
        17,
    ),
    "reducemean-axes-input": (
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
        {"axes": i64(2, -1)},
        18,
    ),
    "reducemean-attr": (
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)],
        {},
        13,
    ),
    "pad-constant": (
        [helper.make_node("Pad", ["x", "p", "v"], ["y"], mode="constant")],
        {"p": i64(0, 0, 1, 2, 0, 0, 2, 0), "v": np.array(0.5, np.float32)},
        17,
    ),
    "pad-negative": (
        [helper.make_node("Pad", ["x", "p"], ["y"])],
        {"p": i64(0, 1, -1, 0, 0, 0, 1, -2)},
        17,
    ),
    "pad-reflect": (
        [helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")],
        {"p": i64(0, 0, 2, 1, 0, 0, 1, 2)},
        17,
    ),
    "pad-edge-leading-axes": (
        [helper.make_node("Pad", ["x", "p"], ["y"], mode="edge")],
        {"p": i64(1, 0, 0, 1, 0, 2, 0, 1)},
        17,
    ),
    "pad-reflect-channels": (
        [helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")],
        {"p": i64(0, 2, 1, 0, 0, 1, -1, 2)},
        17,
    ),
    "pad-edge-axes": (
        [helper.make_node("Pad", ["x", "p", "", "axes"], ["y"], mode="edge")],
        {"p": i64(1, 2, 3, 0), "axes": i64(-1, 2)},
        18,
    ),
    # Wrap repeats the (cropped) axis as often as the pads reach; torch wraps once at most.
    "pad-wrap-beyond-size": (
        [helper.make_node("Pad", ["x", "p"], ["y"], mode="wrap")],
        {"p": i64(0, 0, 8, 0, 0, 0, -1, 13)},
        19,
    ),
    "split-sizes-input": (
        [
            helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1),
            helper.make_node("Relu", ["a"], ["ra"]),
            helper.make_node("Concat", ["b", "ra"], ["y"], axis=1),
        ],
        {"s": i64(1, 3)},
        17,
    ),
    "split-num-outputs": (
        [
            helper.make_node("Split", ["x"], ["a", "b"], axis=2, num_outputs=2),
            helper.make_node("Sub", ["a", "b"], ["y"]),
        ],
        {},
        18,
    ),
    "slice-steps": (
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"st": i64(-1, 1), "en": i64(-(2**63), -1), "ax": i64(1, 3), "sp": i64(-1, 2)},
        17,
    ),
    # An end of INT64_MAX (or INT32_MAX) with a negative step runs to index 0 in onnxruntime.
    "slice-negative-step-int-max-end": (
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"st": i64(3, -2), "en": i64(2**63 - 1, 2**31 - 1), "ax": i64(3, 2), "sp": i64(-1, -2)},
        17,
    ),
    "slice-no-axes": (
        [helper.make_node("Slice", ["x", "st", "en"], ["y"])],
        {"st": i64(1, 0, 2), "en": i64(2, 100, 5)},
        17,
    ),
    "channel-shuffle": (
        [
            helper.make_node("Reshape", ["x", "s1"], ["a"]),
            helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1, 3, 4]),
            helper.make_node("Reshape", ["b", "s2"], ["y"]),
        ],
        {"s1": i64(0, 2, 2, 6, 6), "s2": i64(0, -1, 6, 6)},
        17,
    ),
    # Before opset 5 the target shape is an attribute (it was a TypeError).
    "reshape-opset4-attribute": (
        [helper.make_node("Reshape", ["x"], ["y"], shape=[0, 12, -1])],
        {},
        4,
    ),
    "dynamic-reshape": (
        [
            helper.make_node("Shape", ["x"], ["shp"]),
            helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        {"zero": np.array(0, np.int64), "ax0": i64(0), "minus1": i64(-1)},
        17,
    ),
    "squeeze-unsqueeze": (
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1),
            helper.make_node("Squeeze", ["m", "a23"], ["s"]),
            helper.make_node("Unsqueeze", ["s", "a1"], ["y"]),
        ],
        {"a23": i64(2, 3), "a1": i64(-1)},
        17,
    ),
    "expand-constantofshape-cast": (
        [
            helper.make_node(
                "ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(i64(3))
            ),
            helper.make_node("Cast", ["ones"], ["onesf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
            helper.make_node("Expand", ["m", "eshape"], ["e"]),
            helper.make_node("Mul", ["e", "onesf"], ["y"]),
        ],
        {"shape": i64(1, 1, 6), "eshape": i64(1, 4, 1, 1)},
        17,
    ),
    # An empty shape: a scalar (it was a TypeError).
    "constantofshape-scalar": (
        [
            helper.make_node("Shape", ["x"], ["none"], start=4),
            helper.make_node(
                "ConstantOfShape", ["none"], ["c"], value=numpy_helper.from_array(f32(2.5))
            ),
            helper.make_node("Mul", ["x", "c"], ["y"]),
        ],
        {},
        17,
    ),
    "gemm-transb": (
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1),
        ],
        {"w": rnd(5, 144), "b": rnd(5)},
        17,
    ),
    "gemm-general": (
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node(
                "Gemm", ["w", "f", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0
            ),
        ],
        {"w": rnd(144, 3), "c": rnd(3, 2)},
        17,
    ),
    "matmul": (
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"w": rnd(6, 3)},
        17,
    ),
    "dropout-identity": (
        [
            helper.make_node("Dropout", ["x", "r"], ["d"]),
            helper.make_node("Identity", ["d"], ["y"]),
        ],
        {"r": np.array(0.3, np.float32)},
        17,
    ),
    "resize-nearest-asym-floor": resize(
        "nearest",
        scales=[1, 1, 2, 2],
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    ),
    "resize-nearest-halfpixel-sizes": resize("nearest", sizes=[2, 4, 9, 4]),
    "resize-nearest-ceil-tf": resize(
        "nearest",
        scales=[1, 1, 1.5, 0.5],
        coordinate_transformation_mode="tf_half_pixel_for_nn",
        nearest_mode="round_prefer_ceil",
    ),
    "resize-linear-halfpixel": resize("linear", scales=[1, 1, 2, 2]),
    "resize-linear-align-corners": resize(
        "linear", sizes=[2, 4, 11, 7], coordinate_transformation_mode="align_corners"
    ),
    "resize-linear-asym": resize(
        "linear", scales=[1, 1, 1.5, 2.5], coordinate_transformation_mode="asymmetric"
    ),
    "resize-linear-pytorch-down": resize(
        "linear", sizes=[2, 4, 4, 3], coordinate_transformation_mode="pytorch_half_pixel"
    ),
    # onnxruntime computes sizes and source coordinates in float32: 6 * float32(5/6) is 5 there,
    # (0 + 0.5) / float32(1/3) - 0.5 is exactly 1 (float64 says 4 and 0.99999996).
    "resize-nearest-floor-third": resize(
        "nearest", scales=[1, 1, 1 / 3, 1 / 3], nearest_mode="floor"
    ),
    "resize-linear-size-float32": resize("linear", scales=[1, 1, 5 / 6, 1]),
    # No dim changes: onnxruntime copies the input, whatever the scales say.
    "resize-linear-dims-unchanged": resize(
        "linear", scales=[1, 1, 1.1, 1.1], coordinate_transformation_mode="asymmetric"
    ),
    # half_pixel_symmetric (opset 19+): onnxruntime sums the offset and the half-pixel term in
    # float64, so floor lands on the other side at 1/3 here.
    "resize-nearest-half-pixel-symmetric-floor": resize(
        "nearest",
        scales=[1, 1, 1 / 3, 11 / 5],
        opset=19,
        coordinate_transformation_mode="half_pixel_symmetric",
        nearest_mode="floor",
    ),
    "resize-nearest-half-pixel-symmetric": resize(
        "nearest",
        scales=[1, 1, 4 / 7, 8 / 5],
        opset=19,
        coordinate_transformation_mode="half_pixel_symmetric",
    ),
    "resize-linear-half-pixel-symmetric": resize(
        "linear",
        scales=[1, 1, 0.6, 1.7],
        opset=19,
        coordinate_transformation_mode="half_pixel_symmetric",
    ),
    # 3 / float32(4/7) is 5.2499995 and 1 / float32(4/7) is 1.7499999: onnxruntime takes a
    # coordinate within 1e-6 of a half for the half (round_prefer_ceil picks 2, not 1).
    "resize-nearest-prefer-ceil-near-half": resize(
        "nearest",
        scales=[1, 1, 4 / 7, 16 / 7],
        coordinate_transformation_mode="asymmetric",
        nearest_mode="round_prefer_ceil",
    ),
    # Resize-10 nearest rounds down where an axis grows and up where it shrinks.
    "resize-opset10-nearest": (
        [helper.make_node("Resize", ["x", "sc"], ["y"], mode="nearest")],
        {"sc": f32(1, 1, 0.6, 1.5)},
        10,
    ),
    "instancenorm": (
        [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)],
        {"s": rnd(4, seed=1), "b": rnd(4, seed=2)},
        17,
    ),
    # GroupNorm(2, 4) as torch exports it: over (N, G, -1), then back to the input's shape.
    "groupnorm-as-exported": (
        [
            helper.make_node("Reshape", ["x", "g"], ["r"]),
            helper.make_node("InstanceNormalization", ["r", "s", "b"], ["n"]),
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Reshape", ["n", "xs"], ["y"]),
        ],
        {"g": i64(0, 2, -1), "s": f32(1, 1), "b": f32(0, 0)},
        17,
    ),
    "upsample-opset9": (
        [helper.make_node("Upsample", ["x", "sc"], ["y"], mode="nearest")],
        {"sc": f32(1, 1, 2, 3)},
        9,
    ),
    "space-to-depth": unary("SpaceToDepth", blocksize=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_ort(case: str) -> None:
    nodes, inits, opset = CASES[case]
    model = make_model(nodes, {"x": X}, ["y"], inits, opset)
    x = rnd(*X, seed=7)
    assert_matches_ort(model, {"x": x})


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_matches_ort(mode: str) -> None:
    """Super-resolution upsamplers (torch exports PixelShuffle as CRD; DCR is the default):
    with 3 output channels the two orders differ."""
    node = helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode=mode)
    assert_matches_ort(make_model([node], {"x": [2, 12, 3, 5]}, ["y"]), {"x": rnd(2, 12, 3, 5)})


def _arg_model(op: str, shape: list[int], dtype: int, opset: int, **attrs) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("shape", [[2, 5, 3, 4], [7], [5, 1]])
@pytest.mark.parametrize("opset", [11, 13])
def test_arg_max_min_match_ort_with_ties_infinities_and_nans(op, shape, opset) -> None:
    """A segmentation net's in-graph ArgMax: every axis, keepdims and select_last_index, on
    values with ties, infinities and NaNs (onnxruntime's scan keeps the first of equal values,
    the last with select_last_index, and passes over a NaN unless it comes first; its 1-D path
    takes the first NaN), and on int64 values; the output is int64."""
    rng = np.random.default_rng(len(shape) + opset)
    x = rng.integers(-2, 3, size=shape).astype(np.float32)
    draw = rng.random(shape)
    x[draw < 0.1], x[(draw > 0.1) & (draw < 0.2)], x[draw > 0.9] = np.nan, np.inf, -np.inf
    x.reshape(-1)[0] = 2.0  # a NaN first and one later are both drawn below
    nan_first = x.copy()
    nan_first.reshape(-1)[0] = np.nan
    lasts = [0, 1] if opset >= 12 else [None]
    for axis in range(-len(shape), len(shape)):
        for keep, last in itertools.product([0, 1], lasts):
            attrs = {"axis": axis, "keepdims": keep}
            if last is not None:
                attrs["select_last_index"] = last
            model = _arg_model(op, shape, TensorProto.FLOAT, opset, **attrs)
            for values in (x, nan_first):
                ours, ref = (
                    torch_run(OnnxModule(model).eval(), {"x": values}),
                    run(model, {"x": values}),
                )
                assert ours[0].dtype == ref[0].dtype == np.int64
                np.testing.assert_array_equal(ours[0], ref[0], err_msg=str(attrs))
            ints = _arg_model(op, shape, TensorProto.INT64, opset, **attrs)
            whole = np.nan_to_num(x, posinf=9, neginf=-9).astype(np.int64)
            np.testing.assert_array_equal(
                torch_run(OnnxModule(ints).eval(), {"x": whole})[0], run(ints, {"x": whole})[0]
            )


UNNAMED_OUTPUT_THEN_MISSING_INPUT = {
    # GRU's Y left unnamed, its Y_h through a Gemm without C: C was read as Y.
    "gru-gemm": (
        [
            helper.make_node("GRU", ["x", "w", "r", "b"], ["", "yh"], hidden_size=4),
            helper.make_node("Squeeze", ["yh", "ax"], ["h"]),
            helper.make_node("Gemm", ["h", "fc", ""], ["y"], transB=1),
        ],
        {"x": [3, 2, 5]},
        {
            "w": rnd(1, 12, 5),
            "r": rnd(1, 12, 4, seed=1),
            "b": rnd(1, 24, seed=2),
            "ax": i64(0),
            "fc": rnd(4, 4, seed=3),
        },  # fmt: skip
    ),
    # LayerNormalization's mean left unnamed, a Clip with no min: min was the mean, which
    # broadcasts, so the output kept its shape and changed its values.
    "layernorm-clip": (
        [
            helper.make_node("LayerNormalization", ["x", "s"], ["n", "", "istd"]),
            helper.make_node("Mul", ["n", "istd"], ["m"]),
            helper.make_node("Clip", ["m", "", "hi"], ["y"]),
        ],
        {"x": [2, 3, 4], "hi": []},
        {"s": rnd(4, seed=1)},
    ),
}


@pytest.mark.parametrize("case", list(UNNAMED_OUTPUT_THEN_MISSING_INPUT))
def test_unnamed_optional_output_is_not_a_missing_input(case: str) -> None:
    """An unnamed optional output ("") wrote its value where the module looks up missing
    optional inputs (also ""): a later node without that input silently read it."""
    nodes, inputs, inits = UNNAMED_OUTPUT_THEN_MISSING_INPUT[case]
    model = make_model(nodes, inputs, ["y"], inits, opset=18)
    feeds = {"x": rnd(*inputs["x"], seed=7), "hi": np.array(0.5, np.float32)}
    assert_matches_ort(model, {k: v for k, v in feeds.items() if k in inputs})


def test_unnamed_output_of_a_folded_node_is_not_a_missing_input() -> None:
    """The same at build time: a folded Split's unnamed part became the sizes of a later
    Split that has none (equal parts). Checked against numpy: onnxruntime crashes on a
    constant Split with an unnamed output."""
    nodes = [
        helper.make_node("Split", ["c"], ["", "rest"], axis=0, num_outputs=2),
        helper.make_node("Split", ["x", ""], ["a", "b"], axis=1, num_outputs=2),
        helper.make_node("Sub", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, {"x": [2, 4, 3]}, ["y"], {"c": i64(1, 3, 5, 7)}, opset=18)
    x = rnd(2, 4, 3)
    with torch.no_grad():
        y = OnnxModule(model)(torch.from_numpy(x)).numpy()
    assert_close(y, x[:, :2] - x[:, 2:])


def test_instance_norm_over_one_spatial_element_matches_ort() -> None:
    """A 1x1 map (a late feature map, a pooled head): each instance is its own mean, so the
    output is the bias. F.instance_norm refused it with a ValueError, in eval mode too."""
    nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])]
    model = make_model(nodes, {"x": [2, 3, 1, 1]}, ["y"], {"s": rnd(3, seed=1), "b": rnd(3)})
    assert_matches_ort(model, {"x": rnd(2, 3, 1, 1, seed=7)})


@pytest.mark.parametrize(
    "attrs",
    [
        {"mode": "cubic"},
        {"coordinate_transformation_mode": "tf_crop_and_resize"},
        {"nearest_mode": "round_half_even"},
    ],
    ids=["cubic", "tf_crop_and_resize", "nearest-mode"],
)
def test_unsupported_resize_is_refused_when_built(attrs: dict) -> None:
    nodes, inits, _ = resize(**{"mode": "nearest", "scales": [1, 1, 2, 2], **attrs})
    with pytest.raises(BadInputError, match=f"Resize node .*{next(iter(attrs.values()))}"):
        OnnxModule(make_model(nodes, {"x": X}, ["y"], inits))


def test_pool_with_auto_pad_and_dilations_is_refused() -> None:
    # onnxruntime pads these as if undilated (against the spec): no answer both agree on.
    pool = helper.make_node(
        "MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2], auto_pad="SAME_UPPER"
    )
    with pytest.raises(BadInputError, match="combines auto_pad and dilations"):
        OnnxModule(make_model([pool], {"x": X}, ["y"]))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize(("pads", "axis"), [([0, 0, 0, 0], 2), ([1, 0, 1, 0], 3)])
def test_a_pool_window_wider_than_its_input_is_refused_naming_it(
    op: str, pads: list, axis: int
) -> None:
    """A window spanning 6 pixels (2 dilated by 5, or 6) over 5 (H padded to 7, or not):
    onnxruntime outputs an empty tensor, torch raised "Output size is too small", which
    retrain reported as a graph fixing the batch size. Now the node and the cause, one line."""
    dilations = [5, 5] if op == "MaxPool" else [1, 1]
    kernel = [2, 2] if op == "MaxPool" else [6, 6]
    pool = helper.make_node(op, ["x"], ["y"], name="p", kernel_shape=kernel, dilations=dilations,
                            pads=pads)  # fmt: skip
    model = make_model([pool], {"x": [2, 3, 5, 5]}, ["y"], opset=19)
    assert run(model, {"x": rnd(2, 3, 5, 5)})[0].size == 0
    with pytest.raises(
        BadInputError, match=f"{op} node 'p': its window spans 6 pixels along axis {axis}"
    ):
        OnnxModule(model)(torch.from_numpy(rnd(2, 3, 5, 5)))


def test_reduce_mean_of_integers_matches_onnxruntime() -> None:
    """torch.mean refuses integer tensors ("could not infer output dtype"), which retrain
    reported as a graph fixing the batch size; onnxruntime divides the integer sum by the
    count, truncating toward zero (-7 / 3 is -2)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
        helper.make_node("ReduceMean", ["i"], ["m"], axes=[1, 3], keepdims=1),
        helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT),
    ]
    x = np.round(rnd(2, 3, 4, 5) * 7)
    assert_matches_ort(make_model(nodes, {"x": list(x.shape)}, ["y"]), {"x": x})


def test_split_into_more_parts_than_fit_is_refused() -> None:
    # 6 into 4: chunks of 2 give 3 parts (onnxruntime refuses too); it was a KeyError.
    outs = ["a", "b", "c", "d"]
    split = helper.make_node("Split", ["x"], outs, axis=2, num_outputs=4)
    module = OnnxModule(make_model([split], {"x": X}, outs, opset=18))
    with pytest.raises(BadInputError, match="cannot cut 6 into 4 parts"):
        module(torch.from_numpy(rnd(*X)))


def test_dynamic_shape_arithmetic_runs_at_run_time() -> None:
    nodes, inits, opset = CASES["dynamic-reshape"]
    model = make_model(nodes, {"x": ["n", 4, 6, 6]}, ["y"], inits, opset)
    module = OnnxModule(model).eval()
    for n in (1, 3):
        x = rnd(n, 4, 6, 6)
        assert module(torch.from_numpy(x)).shape == (n, 144)


def test_where_with_a_constant_condition_follows_the_module_to_its_device() -> None:
    """Integer and bool constants stay on the CPU when the module moves (shape arithmetic); a
    Where reading a constant mask then met CUDA operands and failed. The meta device stands
    in for CUDA here: the same device checks, no GPU needed."""
    nodes = [helper.make_node("Where", ["mask", "x", "fill"], ["y"])]
    mask = np.random.default_rng(0).random((6, 6)) > 0.5
    model = make_model(nodes, {"x": X}, ["y"], {"mask": mask, "fill": f32(-1.0)})
    x = rnd(*X)
    assert_matches_ort(model, {"x": x})
    module = OnnxModule(model).to("meta")
    with torch.no_grad():
        y = module(torch.from_numpy(x).to("meta"))
    assert y.device.type == "meta" and tuple(y.shape) == tuple(X)


def test_constant_subgraph_is_folded_and_not_trainable() -> None:
    nodes, inits, opset = CASES["expand-constantofshape-cast"]
    model = make_model(nodes, {"x": X}, ["y"], inits, opset)
    module = OnnxModule(model)
    assert list(module.parameters()) == []
    # ConstantOfShape and Cast only read constants: evaluated once, at build time.
    assert module.runtime_ops == ["ReduceMean", "Expand", "Mul"]


@pytest.mark.parametrize(
    ("base", "exponent"),
    [(i64(2, 3, 5, 7), f32(0.5)), (f32(1.5, 2.0, 0.5, 3.0), np.array([2.0, 3.0, 0.5, 1.0]))],
    ids=["int-base", "double-exponent"],
)
def test_pow_keeps_the_type_of_its_base(base, exponent) -> None:
    """ONNX Pow returns its base's type; torch promoted an int64 base with a float exponent to
    float32, and a float32 base with a float64 exponent to float64."""
    nodes = [helper.make_node("Pow", ["x", "e"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(base.dtype), [4])],
        [onnx.ValueInfoProto(name="y")],
        initializer=[numpy_helper.from_array(exponent, "e")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    (expected,) = run(model, {"x": base})
    with torch.no_grad():
        y = OnnxModule(model)(torch.from_numpy(base)).numpy()
    assert y.dtype == expected.dtype
    assert_close(y, expected)


def test_reduce_sum_keeps_int32() -> None:
    # torch sums int32 into int64; ONNX ReduceSum returns its input's type.
    nodes = [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 3])],
        [onnx.ValueInfoProto(name="y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.arange(6, dtype=np.int32).reshape(2, 3) - 2
    with torch.no_grad():
        y = OnnxModule(model)(torch.from_numpy(x)).numpy()
    assert y.dtype == np.int32 and y.tolist() == run(model, {"x": x})[0].tolist()


def test_conv_weight_computed_at_run_time_without_kernel_shape_is_refused_clearly() -> None:
    # A weight scaled per output channel in the graph: the refusal said "no weight".
    nodes = [
        helper.make_node("Mul", ["w", "g"], ["scaled"]),
        helper.make_node("Conv", ["x", "scaled"], ["y"], name="conv"),
    ]
    inits = {"w": rnd(3, 4, 3, 3), "g": rnd(3, 1, 1, 1, seed=1)}
    model = make_model(nodes, {"x": X}, ["y"], inits)
    with pytest.raises(BadInputError, match="Conv node 'conv' has no kernel_shape and its weight"):
        OnnxModule(model)
    conv = model.graph.node[1]
    conv.attribute.append(helper.make_attribute("kernel_shape", [3, 3]))
    assert_matches_ort(model, {"x": rnd(*X, seed=2)})


def test_cast_to_an_unsupported_type_names_it() -> None:
    # The message gave the type's number (4), which says nothing to the user.
    cast = helper.make_node("Cast", ["x"], ["y"], name="to_u16", to=TensorProto.UINT16)
    with pytest.raises(BadInputError, match="Cast node 'to_u16' casts to UINT16, which the"):
        OnnxModule(make_model([cast], {"x": X}, ["y"]))


def test_unsupported_ops_listed() -> None:
    model = make_model(
        [
            helper.make_node("LRN", ["x"], ["a"], size=3),
            helper.make_node("Hardmax", ["a"], ["b"]),
            helper.make_node("LRN", ["b"], ["y"], size=3),
        ],
        {"x": X},
        ["y"],
    )
    with pytest.raises(BadInputError, match="Hardmax, LRN"):
        OnnxModule(model)


_RETRAIN_FLOAT = "; retrain the float model they were made from, then apply them again"
_SAVED_AT_BASIC = f"; onnxruntime's optimisations above basic write them: {SAVE_AT_BASIC}"


@pytest.mark.parametrize(
    ("op", "domain", "advice"),
    [
        ("MatMulNBits", "com.microsoft", _RETRAIN_FLOAT),
        ("QLinearConv", "", _RETRAIN_FLOAT),
        ("Gelu", "com.microsoft", _SAVED_AT_BASIC),
        ("FusedMatMul", "com.microsoft", _SAVED_AT_BASIC),
        ("Conv", "com.microsoft.nchwc", _SAVED_AT_BASIC),
        ("Frobnicate", "my.ops", None),
    ],
)
def test_unsupported_ops_are_refused_with_the_way_on_that_fits_them(op, domain, advice) -> None:
    """A model onnxruntime quantised (MatMulNBits, QLinearConv) is retrained as the float
    model it came from. onnxruntime's optimisations above basic (Gelu, FusedMatMul, the
    nchwc Conv) were given that advice too, though the model they optimised needs no
    retraining to lose them: saved at basic, it has none (as the bridge's other refusals of
    them say). A custom domain's op gets no advice it does not fit."""
    model = make_model([helper.make_node(op, ["x"], ["y"], domain=domain)], {"x": X}, ["y"])
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    with pytest.raises(BadInputError) as caught:
        OnnxModule(model)
    message = str(caught.value)
    assert message.startswith(
        f"the PyTorch bridge does not support these op types: {op_id(model.graph.node[0])}"
    )
    if advice is None:
        assert message == "the PyTorch bridge does not support these op types: my.ops:Frobnicate"
    else:
        assert message.endswith(advice)


def test_a_teacher_with_onnxruntime_optimisation_ops_is_told_to_save_at_basic() -> None:
    """A `teacher` onnxruntime's extended optimisations wrote (a FusedMatMul head) was told to
    give the float model it was made from (eval runs a quantized one as it is): advice for a
    quantised teacher. Saved at basic it has none of those ops, as the bridge's refusal of a
    student holding them says."""
    model = conv_relu_model()
    teacher = conv_relu_model()
    teacher.graph.node[-1].CopyFrom(
        helper.make_node(
            "FusedMatMul", ["f", "fc"], ["y"], name="fc", domain="com.microsoft", transB=1
        )
    )
    teacher.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    x = np.random.default_rng(0).random((8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(BadInputError) as caught:
        retrain(model, (x, None), teacher=teacher, epochs=1, batch_size=4, progress=False)
    message = str(caught.value)
    assert message.startswith("the teacher is a graph with com.microsoft:FusedMatMul")
    assert message.endswith(_SAVED_AT_BASIC) and "float model" not in message


@pytest.mark.parametrize("held", ["initializer", "Constant"])
def test_string_tensors_are_refused_in_one_line(held: str) -> None:
    """Class names passed out beside the logits (a string initializer or Constant as a graph
    output): torch has no string tensors, and building the module stopped with numpy's
    TypeError traceback (retrain exited 1). An unread string initializer stays harmless."""
    model = conv_relu_model()
    labels = helper.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"dog"])
    unread = helper.make_tensor("notes", TensorProto.STRING, [1], [b"unread"])
    model.graph.initializer.append(unread)
    if held == "initializer":
        model.graph.initializer.append(labels)
    else:
        model.graph.node.append(helper.make_node("Constant", [], ["labels"], value=labels))
    model.graph.output.append(helper.make_tensor_value_info("labels", TensorProto.STRING, [2]))
    with pytest.raises(BadInputError, match=r"string tensors.*\['labels'\]"):
        OnnxModule(model)
    del model.graph.output[1]
    if held == "Constant":
        del model.graph.node[-1]
    OnnxModule(model)  # an unread string initializer builds


# ---------------------------------------------------------------------------
# Train mode


def test_train_mode_batchnorm_matches_torch() -> None:
    rng = np.random.default_rng(3)
    scale, bias = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    inits = {
        k: v.astype(np.float32) for k, v in {"s": scale, "b": bias, "m": mean, "v": var}.items()
    }
    model = make_model(
        [
            helper.make_node(
                "BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], momentum=0.8, epsilon=1e-3
            )
        ],
        {"x": X},
        ["y"],
        inits,
    )
    module = OnnxModule(model).train()
    ref = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2).train()
    with torch.no_grad():
        for p, k in (
            (ref.weight, "s"),
            (ref.bias, "b"),
            (ref.running_mean, "m"),
            (ref.running_var, "v"),
        ):
            p.copy_(torch.from_numpy(inits[k]))
    for seed in (1, 2):
        x = torch.from_numpy(rnd(*X, seed=seed) * 2 + 1)
        ours, theirs = module(x), ref(x)
        assert_close(ours.detach().numpy(), theirs.detach().numpy())
    assert_close(module.initializer("m").numpy(), ref.running_mean.numpy(), 1e-5)
    assert_close(module.initializer("v").numpy(), ref.running_var.numpy(), 1e-5)
    assert not np.allclose(module.initializer("m").numpy(), inits["m"])
    # Eval mode uses the updated running statistics.
    module.eval()
    ref.eval()
    x = torch.from_numpy(rnd(*X, seed=5))
    with torch.no_grad():
        assert_close(module(x).numpy(), ref(x).numpy())


def test_batchnorm_with_training_mode_uses_batch_statistics_in_eval() -> None:
    """training_mode=1 (opset 14+): onnxruntime normalises with the batch's statistics at
    inference too and outputs the moved running statistics; eval mode must do the same."""
    rng = np.random.default_rng(5)
    inits = {k: rng.normal(size=4).astype(np.float32) for k in "sbm"}
    inits["v"] = rng.uniform(0.5, 2, 4).astype(np.float32)
    bn = helper.make_node(
        "BatchNormalization",
        ["x", "s", "b", "m", "v"],
        ["y", "rm", "rv"],
        training_mode=1,
        momentum=0.8,
    )
    model = make_model([bn], {"x": X}, ["y", "rm", "rv"], inits, opset=15)
    x = rnd(*X, seed=7) * 2 + 1
    assert_matches_ort(model, {"x": x})


class StdConvNet(nn.Module):
    """timm's ScaledStdConv2d (NFNets): the conv weight standardised per output channel by a
    training-mode batch norm, which torch's exporter writes as BatchNormalization with
    training_mode=1 whose running statistics are computed from the weight in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        w = nn.functional.batch_norm(
            w.reshape(1, 8, -1), None, None, self.gain, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(w)
        y = torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("form", ["training_mode", "computed_statistics"])
def test_weight_standardising_batchnorm_trains(form) -> None:
    """NFNets' weight standardisation as torch's exporters write it: the legacy exporter a
    training_mode=1 BatchNormalization (it normalises with its batch's statistics in train
    mode too, as onnxruntime computes it: its running statistics are neither used nor
    updated), the dynamo exporter an inference one whose statistics are computed from the
    weight (used as given: they are not state to update). Both match onnxruntime in train
    mode and the weight trains."""
    torch.manual_seed(0)
    if form == "training_mode":
        model = export_onnx(StdConvNet(), (1, 3, 8, 8), dynamic_batch=True)
        attrs = [a for n in model.graph.node for a in n.attribute if a.name == "training_mode"]
        assert attrs and all(a.i == 1 for a in attrs)
    else:
        model = standardised_conv_net()
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    x = rnd(4, 3, size, size, seed=3)
    module = OnnxModule(model).train()
    y = module(torch.from_numpy(x))
    assert_close(y.detach().numpy(), run(model, {"input": x})[0])
    y.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    labels = np.arange(4) % 4
    written = retrain(model, (x, labels), epochs=1, batch_size=4, progress=False).model
    assert np.isfinite(run(written, {"input": x})[0]).all()


def test_per_activation_batchnorm_of_opset7() -> None:
    """spatial=0 (before opset 9): one statistic per activation, in eval and train mode."""
    shape = (4, 6, 6)
    rng = np.random.default_rng(4)
    inits = {
        "s": rng.uniform(0.5, 1.5, shape),
        "b": rng.normal(size=shape),
        "m": rng.normal(size=shape),
        "v": rng.uniform(0.5, 2, shape),
    }
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0)
    model = make_model([bn], {"x": X}, ["y"], inits, opset=7)
    x = rnd(*X, seed=7) * 2 + 1
    assert_matches_ort(model, {"x": x})
    module = OnnxModule(model).train()
    y = module(torch.from_numpy(x)).detach().numpy()
    batch_mean, batch_var = x.mean(0), x.var(0)
    expected = (x - batch_mean) / np.sqrt(batch_var + 1e-5) * inits["s"] + inits["b"]
    assert_close(y, expected)
    assert_close(module.initializer("m").numpy(), 0.9 * inits["m"] + 0.1 * batch_mean, 1e-5)


def test_dropout_active_only_in_train_mode() -> None:
    model = make_model(
        [helper.make_node("Dropout", ["x", "r"], ["y"])],
        {"x": X},
        ["y"],
        {"r": np.array(0.5, np.float32)},
    )
    module = OnnxModule(model)
    x = torch.ones(*X)
    torch.manual_seed(0)
    y = module.train()(x)
    zeros = float((y == 0).float().mean())
    assert 0.3 < zeros < 0.7
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    assert torch.equal(module.eval()(x), x)


def dropout_classifier(mode: np.ndarray | None) -> onnx.ModelProto:
    """Conv, Dropout (ratio 0.5, training_mode `mode` as a constant), pooled Gemm head."""
    mode_inits = {} if mode is None else {"t": mode}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Dropout", ["c", "r"] + (["t"] if mode is not None else []), ["d"]),
        helper.make_node("GlobalAveragePool", ["d"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = {"w": rnd(4, 1, 3, 3), "r": np.array(0.5, np.float32), "fc": rnd(3, 4, seed=1)}
    model = make_model(nodes, {"x": ["N", 1, 8, 8]}, ["y"], {**inits, **mode_inits})
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]))
    return model


def test_dropout_with_training_mode_true_is_refused(tmp_path, capsys) -> None:
    """With training_mode true onnxruntime drops at random at inference, or not where its graph
    optimisations remove the node (this one, inside the graph): nothing a module can match."""
    from onnx_mbs.cli import main

    x = rnd(2, 1, 8, 8)
    model = dropout_classifier(np.array(True))
    with pytest.raises(BadInputError, match="Dropout node .* has training_mode true"):
        OnnxModule(model)
    onnx.save(model, tmp_path / "m.onnx")
    images = np.random.default_rng(0).integers(0, 256, (8, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=images, y=np.arange(8) % 3)
    argv = ["retrain", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx")]
    code = main([*argv, "--data", str(tmp_path / "d.npz"), "--epochs", "1"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after data: and preprocessing:
    assert code == 2 and last.startswith("onnx-mbs: error: Dropout node") and "true" in last
    assert not (tmp_path / "out.onnx").exists()
    # training_mode false (and absent) is the identity onnxruntime computes.
    for mode in (np.array(False), None):
        assert_matches_ort(dropout_classifier(mode), {"x": x})


@pytest.mark.parametrize("opset", [7, 10, 13])
def test_dropout_mask_at_inference_matches_ort(opset: int) -> None:
    # onnxruntime's mask: all 0.0 (opset 7-9, x's type), all false (10-11), all true (12+).
    inputs, inits = (["x"], {}) if opset < 12 else (["x", "r"], {"r": np.array(0.3, np.float32)})
    node = helper.make_node("Dropout", inputs, ["y", "m"], **({"ratio": 0.3} if opset < 12 else {}))
    model = make_model([node], {"x": X}, ["y"], inits, opset=opset)
    model.graph.output.append(onnx.ValueInfoProto(name="m"))
    assert_matches_ort(model, {"x": rnd(*X)})


def test_dropout_ratio_computed_at_run_time_is_used_in_train_mode() -> None:
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "k"], ["r"]),  # 0.75: x is all ones
        helper.make_node("Dropout", ["x", "r"], ["y"]),
    ]
    model = make_model(nodes, {"x": X}, ["y"], {"k": f32(0.75)}, opset=17)
    module = OnnxModule(model).train()
    torch.manual_seed(0)
    y = module(torch.ones(*X))
    assert 0.6 < float((y == 0).float().mean()) < 0.9
    assert set(torch.unique(y).tolist()) == {0.0, 4.0}


def test_gradients_reach_every_parameter(small_net, x16) -> None:
    model = export(small_net, torch.from_numpy(x16), keep_bn=True)
    module = OnnxModule(model).train()
    module(torch.from_numpy(x16)).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------
# Write-back


def test_write_back_round_trip(small_net, x16) -> None:
    model = export(small_net, torch.from_numpy(x16), keep_bn=True)
    model.metadata_props.add(key="origin", value="test")
    conv_w = next(n for n in model.graph.node if n.op_type == "Conv").input[1]
    weight = next(t for t in model.graph.initializer if t.name == conv_w)
    weight.doc_string = "stem weight"  # what the model says of a weight stays with it
    weight.metadata_props.add(key="layer", value="stem")
    before = model.SerializeToString()
    module = OnnxModule(model)
    with torch.no_grad():
        module.initializer(conv_w).add_(0.1)
    module.train()(torch.from_numpy(x16 * 3))  # moves BN running statistics
    module.eval()
    written = write_back(model, module)

    assert model.SerializeToString() == before
    onnx.checker.check_model(written)
    new = torch_run(module, {"input": x16})[0]
    assert_close(run(written, {"input": x16})[0], new)
    assert not np.allclose(run(model, {"input": x16})[0], new, atol=1e-3)

    assert [(n.name, list(n.input), list(n.output)) for n in written.graph.node] == [
        (n.name, list(n.input), list(n.output)) for n in model.graph.node
    ]
    assert written.opset_import == model.opset_import
    assert written.graph.input == model.graph.input
    assert written.graph.output == model.graph.output
    assert written.metadata_props == model.metadata_props
    old = {t.name: t for t in model.graph.initializer}
    for t in written.graph.initializer:
        assert (t.data_type, list(t.dims)) == (old[t.name].data_type, list(old[t.name].dims))
    changed = {
        t.name
        for t in written.graph.initializer
        if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(old[t.name]))
    }
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert conv_w in changed and set(bn.input[3:5]) <= changed
    trained = next(t for t in written.graph.initializer if t.name == conv_w)
    assert trained.doc_string == "stem weight"
    assert [(p.key, p.value) for p in trained.metadata_props] == [("layer", "stem")]


def test_write_back_of_untouched_module_is_identical(small_net, x16) -> None:
    model = export(small_net, torch.from_numpy(x16), keep_bn=False)
    written = write_back(model, OnnxModule(model))
    for a, b in zip(written.graph.initializer, model.graph.initializer, strict=True):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


# ---------------------------------------------------------------------------
# The zoo


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_zoo_models_match_ort(zoo_onnx, name: str, form: str) -> None:
    model = zoo_onnx(name, form)
    graph_input = model.graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else 2 for d in graph_input.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).normal(size=dims).astype(np.float32)
    assert_matches_ort(model, {graph_input.name: x})


def _normalised_input_net() -> onnx.ModelProto:
    """x -> Sub(mean) -> Div(std) -> Conv -> Mul(layer scale) -> Add(bias) -> y: the
    preprocessing baked in front (per-channel constants on the input itself), a layer
    scale after the conv."""
    rng = np.random.default_rng(0)
    values = {
        "mean": np.array([0.5, 0.4, 0.3], np.float32).reshape(1, 3, 1, 1),
        "std": np.array([0.2, 0.25, 0.3], np.float32).reshape(1, 3, 1, 1),
        "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32),
        "beta": rng.normal(0, 0.1, (4, 1, 1)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["scaled"]),
            helper.make_node("Conv", ["scaled", "w"], ["c"], pads=[1] * 4),
            helper.make_node("Mul", ["c", "gamma"], ["g"]),
            helper.make_node("Add", ["g", "beta"], ["y"]),
        ],
        "normalised_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_preprocessing_constants_on_the_input_are_not_trained():
    """Per-channel Sub/Div constants applied to the graph input before any weight are the
    images' normalisation, not a layer: they were trained (an in-graph std of 0.5 drifted
    to 0.38..0.68 in 3 epochs), so the written model read its inputs otherwise. The layer
    scale and bias after the conv still train."""
    module = OnnxModule(_normalised_input_net())
    trained = {name for name, _ in module.named_parameters()}
    assert trained == {"w", "gamma", "beta"}


def test_constants_after_a_mix_of_input_and_features_still_train():
    """Only what is computed from the input alone is preprocessing: the scale and bias on
    Add(normalised input, conv features) (a skip from the image) are a layer's and train."""
    model = _normalised_input_net()
    graph = model.graph
    three = np.ones((3, 1, 1), np.float32)
    graph.node.insert(3, helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["c3"]))
    graph.node.insert(4, helper.make_node("Add", ["scaled", "c3"], ["mixed"]))
    graph.node[5].input[0] = "mixed"  # Mul(gamma) reads the mix
    for tensor in graph.initializer:
        if tensor.name in ("gamma", "beta"):
            tensor.CopyFrom(numpy_helper.from_array(three, tensor.name))
    graph.initializer.extend(
        numpy_helper.from_array(np.array([v], np.int64), k)
        for k, v in (("starts", 0), ("ends", 3), ("axes", 1))
    )
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.checker.check_model(model, full_check=True)
    trained = {name for name, _ in OnnxModule(model).named_parameters()}
    assert trained == {"w", "gamma", "beta"}


def test_per_channel_scales_and_biases_get_no_weight_decay():
    """A layer scale or bias stored (C, 1, 1) as the exporter writes it is a vector, as
    torch's (C,) is: decaying it (decided by its rank, 3) pulled the scales towards 0.
    Kernels keep their decay."""
    from onnx_mbs.bridge.train import _optimizer

    module = OnnxModule(_normalised_input_net())
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    optimizer = _optimizer(module, "sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    decayed = {
        tuple(p.shape) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]
    }
    assert decayed == {shapes["w"]}
    assert shapes["gamma"] == (4, 1, 1)


def _decoding_head_net() -> onnx.ModelProto:
    """x -> Conv -> Mul(layer scale (4, 1, 1)) -> Sigmoid -> Mul(2) -> Add(grid) -> Mul(anchors)
    -> y: a YOLO-like box decoding after the last weight, with a cell grid (1, 1, 8, 8) and an
    anchor table (1, 2, 1, 1, 2) as the exporter bakes them in (no batch, no channel in them)."""
    rng = np.random.default_rng(0)
    ys, xs = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    values = {
        "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32),
        "two": np.array(2.0, np.float32),
        "grid": (xs + 8 * ys).astype(np.float32).reshape(1, 1, 8, 8),
        "anchors": np.array([[10, 13], [33, 23]], np.float32).reshape(1, 2, 1, 1, 2),
        "shape": np.array([-1, 2, 8, 8, 2], np.int64),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
            helper.make_node("Mul", ["c", "gamma"], ["g"]),
            helper.make_node("Sigmoid", ["g"], ["s"]),
            helper.make_node("Mul", ["s", "two"], ["s2"]),
            helper.make_node("Add", ["s2", "grid"], ["xy"]),
            helper.make_node("Transpose", ["xy"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["t", "shape"], ["r"]),
            helper.make_node("Mul", ["r", "anchors"], ["y"]),
        ],
        "decoding_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8, 2])],
        [numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_box_decoding_tables_are_not_trained_and_layer_scales_are():
    """A detector's cell grid and anchor table (constants with two or more axes above 1) are
    box decoding, not a per-channel scale or bias: they were trained (and weight-decayed, not
    being vectors), so the retrained model decoded its boxes against moved cells and anchors.
    They stay as they are now; the layer scale (4, 1, 1) after the conv still trains."""
    model = _decoding_head_net()
    onnx.checker.check_model(model, full_check=True)
    assert {name for name, _ in OnnxModule(model).named_parameters()} == {"w", "gamma"}

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    teacher = onnx.ModelProto()
    teacher.CopyFrom(model)
    for tensor in teacher.graph.initializer:
        if tensor.name == "w":
            w = numpy_helper.to_array(tensor) * 1.5
            tensor.CopyFrom(numpy_helper.from_array(w, "w"))
    written = retrain(
        model, (x, None), teacher=teacher, epochs=2, lr=0.1, batch_size=8, progress=False
    ).model
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    for name in ("grid", "anchors"):
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.array_equal(after["gamma"], before["gamma"])
    assert not np.array_equal(after["w"], before["w"])


NHWC = ["n", 6, 6, 4]  # a Keras feature map as tf2onnx passes it between layers, batch dynamic


def test_keras_upsampling_as_tf2onnx_writes_it_matches_ort() -> None:
    """tf2onnx writes Keras' UpSampling2D (a U-Net's decoder) as a repeat per spatial axis:
    Unsqueeze, Tile by 2 on the new axis, Reshape back (tf2onnx 1.17.0, TF 2.21). The bridge
    refused Tile, so such a model could be reduced but not retrained."""
    model = make_model(
        [
            helper.make_node("Unsqueeze", ["x", "a3"], ["u"]),
            helper.make_node("Tile", ["u", "reps"], ["t"]),
            helper.make_node("Reshape", ["t", "hw"], ["h"]),
            helper.make_node("Unsqueeze", ["h", "a3"], ["u2"]),
            helper.make_node("Shape", ["x"], ["s"]),  # repeats computed at run time
            helper.make_node("Slice", ["s", "z", "one", "z"], ["n"]),
            helper.make_node("Div", ["n", "n"], ["n1"]),
            helper.make_node("Concat", ["n1", "r4"], ["reps2"], axis=0),
            helper.make_node("Tile", ["u2", "reps2"], ["t2"]),
            helper.make_node("Reshape", ["t2", "hw2"], ["y"]),
        ],
        {"x": NHWC},
        ["y"],
        {
            "a3": i64(3),
            "reps": i64(1, 1, 1, 2, 1),
            "hw": i64(0, 6, 12, 4),
            "z": i64(0),
            "one": i64(1),
            "r4": i64(1, 1, 1, 2),
            "hw2": i64(0, 6, 24, 4),
        },
    )
    for n in (1, 3):
        assert_matches_ort(model, {"x": rnd(n, 6, 6, 4, seed=n)})


@pytest.mark.parametrize("opset", [17, 18])
def test_keras_dense_on_a_feature_map_as_tf2onnx_writes_it_matches_ort(opset: int) -> None:
    """Keras' Dense on a 4-D tensor is a Tensordot: tf2onnx flattens the leading dims with shape
    arithmetic that multiplies them (ReduceProd over the Shape's free dims), MatMuls and reshapes
    back (tf2onnx 1.17.0, TF 2.21). The bridge refused ReduceProd; from opset 18 its axes are
    an input."""
    axes = {"axes": [0]} if opset < 18 else {}
    prod_in = ["free"] if opset < 18 else ["free", "a0"]
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "free_i"], ["free"], axis=0),
            helper.make_node("ReduceProd", prod_in, ["p"], keepdims=0, **axes),
            helper.make_node("Unsqueeze", ["p", "a0"], ["pu"]),
            helper.make_node("Concat", ["pu", "c"], ["flat"], axis=0),
            helper.make_node("Reshape", ["x", "flat"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["m"]),
            helper.make_node("Concat", ["free", "o"], ["back"], axis=0),
            helper.make_node("Reshape", ["m", "back"], ["y"]),
        ],
        {"x": NHWC},
        ["y"],
        {"free_i": i64(0, 1, 2), "a0": i64(0), "c": i64(4), "o": i64(5), "w": rnd(4, 5, seed=3)},
        opset,
    )
    for n in (1, 3):
        assert_matches_ort(model, {"x": rnd(n, 6, 6, 4, seed=n)})


@pytest.mark.parametrize(("axes", "keep"), [([1, -1], 1), ([0, 2], 0), ([], 0)])
def test_reduce_prod_over_several_axes_matches_ort(axes: list[int], keep: int) -> None:
    attrs = {"axes": axes} if axes else {}
    model = make_model(
        [helper.make_node("ReduceProd", ["x"], ["y"], keepdims=keep, **attrs)],
        {"x": [2, 3, 4]},
        ["y"],
    )
    assert_matches_ort(model, {"x": rnd(2, 3, 4, seed=4) * 0.5 + 1})


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)])
def test_a_single_number_is_counted_as_it_is_trained_whatever_its_rank(shape) -> None:
    """tf2onnx stores a Rescaling offset or a LayerNorm epsilon as a (1, 1, 1, 1) tensor, torch
    as a 0-d one: a constant to the bridge, so no parameter to `count_parameters` either."""
    from onnx_mbs.passes import count_parameters

    w, b = rnd(4, 3, 3, 3), rnd(4)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["c", "k"], ["m"]),
            helper.make_node("Add", ["m", "eps"], ["y"]),
        ],
        {"x": [1, 3, 5, 5]},
        ["y"],
        {
            "w": w,
            "b": b,
            "k": np.full(shape, 0.5, np.float32),
            "eps": np.full(shape, 1e-3, np.float32),
        },
    )
    trained = sum(p.numel() for p in OnnxModule(model).parameters())
    assert trained == w.size + b.size == count_parameters(model)
