"""The ONNX GroupNormalization op (opset 18: scale and bias per group, deprecated by ONNX;
opset 21: per channel) is written at load as torch exports GroupNorm (group_norm.py), so
it is analysed, cut in whole units and trained like that form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from graphs import assert_runs_at_declared_shapes, run
from onnx import helper, numpy_helper

from onnx_mbs import reduce
from onnx_mbs.bridge import OnnxModule
from onnx_mbs.passes import BadInputError, load
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.read import check_model
from onnx_mbs.passes.shrink import shrink_channels

GROUPS, CHANNELS = 4, 16


def _group_norm_net(opset: int, channels: int = CHANNELS, plugin: bool = False) -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> conv 'a' (channels) -> GroupNormalization(4) 'gn' -> Relu -> conv
    'out' (2); scale and bias per group at opset 18, per channel at 21. `plugin` puts an
    op without a schema (whose output shape nothing infers) before the norm."""
    rng = np.random.default_rng(0)
    per = GROUPS if opset < 21 else channels
    tensors = {
        "wa": rng.normal(0, 0.5, (channels, 3, 3, 3)),
        "ba": rng.normal(0, 0.1, channels),
        "scale": rng.uniform(0.5, 1.5, per),
        "bias": rng.normal(0, 0.3, per),
        "wo": rng.normal(0, 0.5, (2, channels, 1, 1)),
        "bo": rng.normal(0, 0.1, 2),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()]
    conv = helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="a", pads=[1] * 4)
    nodes = [conv]
    if plugin:
        nodes.append(helper.make_node("MyPlugin", ["a"], ["p"], name="plugin"))
    nodes += [
        helper.make_node(
            "GroupNormalization",
            ["p" if plugin else "a", "scale", "bias"],
            ["g"],
            name="gn",
            num_groups=GROUPS,
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wo", "bo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "group_norm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _kept(model: onnx.ModelProto, channels: list[int]) -> onnx.ModelProto:
    """`model` with conv 'a' making only `channels` (and what reads them cut to match): the
    GroupNormalization itself, run by onnxruntime over the kept channels."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    weights["wa"], weights["ba"] = weights["wa"][channels], weights["ba"][channels]
    weights["wo"] = weights["wo"][:, channels]
    if len(weights["scale"]) == CHANNELS:  # per channel (21); per group (18) stays
        weights["scale"], weights["bias"] = weights["scale"][channels], weights["bias"][channels]
    del out.graph.initializer[:]
    out.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return out


def _images(*batches: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in batches]


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_is_read_and_computes_the_same(opset):
    """Opset 18 was refused as invalid (its schema deprecated by ONNX 1.23), and at 21 the
    op's output stayed untyped, so the conv after it was refused; onnxruntime runs both.
    Loaded, it is torch's exported form, and computes what the op computes."""
    model = _group_norm_net(opset)
    check_model(model)  # onnxruntime runs it as its schema says: not refused as invalid
    read = load(model)
    assert "GroupNormalization" not in {n.op_type for n in read.model.graph.node}
    assert_runs_at_declared_shapes(model, read.runnable)
    module = OnnxModule(read.runnable).eval()
    for x in _images(1, 3):
        (expected,) = run(model, x)
        np.testing.assert_allclose(run(read.runnable, x)[0], expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            trained = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(trained, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_is_cut_in_whole_units(opset):
    """The conv before the norm is cut one channel of each group at a time (its group has
    16 / 4 = 4 units), the norm over the kept channels written: the written model computes
    what GroupNormalization computes over the conv's kept channels."""
    model = _group_norm_net(opset)
    read = load(model)
    analysis = analyze_channels(read.model)
    (group,) = [g for g in analysis.groups if "a" in g.producers]
    assert not group.pinned and group.size == CHANNELS // GROUPS and group.unit == GROUPS
    assert any("'gn'" in reason for reason in group.inexact)
    small = read.written(shrink_channels(read.model, {group.id: [1, 3]}, analysis))
    check_model(small, full_check=True)
    assert_runs_at_declared_shapes(model, small)
    kept = _kept(model, [1, 3, 5, 7, 9, 11, 13, 15])  # classes 1 and 3 of each group
    for x in _images(1, 2):
        np.testing.assert_allclose(run(small, x)[0], run(kept, x)[0], rtol=1e-5, atol=1e-5)
    params = sum(int(np.prod(t.dims)) for t in small.graph.initializer if t.name in _LEARNED)
    per = GROUPS if opset < 21 else 8
    assert params == 8 * 27 + 8 + 2 * per + 2 * 8 + 2


_LEARNED = {"wa", "ba", "scale", "bias", "wo", "bo"}


@pytest.mark.parametrize("opset", [18, 21])
def test_reduce_cuts_a_model_with_group_normalization(opset):
    """`reduce` runs end to end: the norm's conv cut to a multiple of the 4 groups, the
    written model valid at every batch."""
    model = _group_norm_net(opset, channels=32)
    small, report = reduce(model, budget="params=0.6", evaluate_accuracy=False, progress=False)
    assert report.after.total_params < report.before.total_params
    check_model(small, full_check=True)
    assert_runs_at_declared_shapes(model, small)
    conv = next(n for n in small.graph.node if n.op_type == "Conv")
    made = next(t for t in small.graph.initializer if t.name == conv.input[1]).dims[0]
    assert made % GROUPS == 0 and made < 32


def test_group_normalization_of_unknown_rank_is_refused_naming_it():
    """At opset 21 the per-channel affine is broadcast over the dims after the channels:
    where nothing gives the input's rank (a plugin's output), one line names the node."""
    with pytest.raises(BadInputError, match="GroupNormalization 'gn': the rank of its input"):
        load(_group_norm_net(21, plugin=True))


def test_group_normalization_without_num_groups_is_refused_as_invalid():
    """The checker takes the deprecated opset-18 op as opaque, so its required attribute
    is checked where it is written out: one line, not a KeyError."""
    model = _group_norm_net(18)
    del model.graph.node[1].attribute[:]
    with pytest.raises(BadInputError, match="not valid ONNX: GroupNormalization 'gn' needs"):
        load(model)


@pytest.mark.parametrize(("stash", "computed"), [(None, np.float32), (10, np.float16)])
def test_half_precision_group_normalization_keeps_its_stash_type(stash, computed):
    """A float16 model (activations too). At opset 21 the op computes its mean and variance
    in `stash_type` (float32 unless set): the written form ran its InstanceNormalization in
    float16, whatever the stash type. It runs in the stash type now (a Cast each side, its
    ones and zeros of that type, as InstanceNormalization requires), the output float16,
    and it computes what the op computes."""
    model = _group_norm_net(21)
    for tensor in model.graph.initializer:
        half = numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    if stash is not None:
        model.graph.node[1].attribute.append(helper.make_attribute("stash_type", stash))
    read = load(model)
    inferred = onnx.shape_inference.infer_shapes(read.runnable).graph
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    (norm,) = [n for n in read.runnable.graph.node if n.op_type == "InstanceNormalization"]
    assert helper.tensor_dtype_to_np_dtype(types[norm.input[0]]) == computed
    x = _images(2)[0].astype(np.float16)
    (expected,) = run(model, x)
    (got,) = run(read.runnable, x)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


def test_group_normalization_at_21_trains_only_its_own_affine():
    """At opset 21 the affine is per channel (the Mul and Add after the norm); the
    InstanceNormalization's per-group ones and zeros are held in Constant nodes, as torch
    exports them, so retraining does not add a second, per-group affine of 2 * G weights."""
    read = load(_group_norm_net(21))
    trained = sum(p.numel() for p in OnnxModule(read.runnable).parameters())
    conv_a, affine, conv_out = CHANNELS * 27 + CHANNELS, 2 * CHANNELS, 2 * CHANNELS + 2
    assert trained == conv_a + affine + conv_out  # no per-group 2 * GROUPS


class _GroupedConvAfterGroupNorm(torch.nn.Module):
    """conv -> GroupNorm(4, 16) -> conv with groups=4 [-> GroupNorm(4, 16)] -> conv 'dw'."""

    def __init__(self, norm_after: bool) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.gn0 = torch.nn.GroupNorm(4, 16)
        self.gc = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gn = torch.nn.GroupNorm(4, 16) if norm_after else torch.nn.Identity()
        self.dw = torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(torch.relu(self.gn(self.gc(torch.relu(self.gn0(self.stem(x)))))))


def test_conv_groups_and_group_norm_units_that_tie_every_channel_say_so(tmp_path):
    """A GroupNorm unit is one channel of each group, a grouped conv's unit its conv-group:
    together they tie all 16 channels, so the group is pinned. The reason named the next
    conv ("Conv '/dw/Conv': channels arrive on axis 3": the walk put the one-unit channels
    on the last axis after the GroupNorm); it says why now, and the written model computes
    the same."""
    reasons = _pinned_as_tied(_GroupedConvAfterGroupNorm(norm_after=True), tmp_path)
    assert not any("arrive on axis" in reason for reason in reasons)
    assert any("GroupNorm" in reason for reason in reasons), reasons


def _pinned_as_tied(net: torch.nn.Module, tmp_path) -> list[str]:
    """The pin reasons of `net`'s grouped conv 'gc' group, which one says its conv-groups
    and a GroupNorm's units tie every channel; the written model computes the same."""
    path = tmp_path / "gn.onnx"
    torch.onnx.export(net.eval(), torch.randn(1, 3, 8, 8), path, dynamo=False)
    read = load(onnx.load(path))
    (group,) = [g for g in analyze_channels(read.model).groups if "/gc/Conv" in g.producers]
    assert group.pinned
    assert any(
        "conv-groups" in reason and "tie every channel" in reason for reason in group.pin_reasons
    ), group.pin_reasons
    small, report = reduce(onnx.load(path), evaluate_accuracy=False, progress=False)
    assert any("tie every channel" in reason for reason in report.pinned)
    check_model(small, full_check=True)
    (x,) = _images(1)
    np.testing.assert_allclose(run(small, x)[0], run(onnx.load(path), x)[0], atol=1e-5)
    return group.pin_reasons


def test_a_grouped_conv_after_a_group_norm_that_ties_every_channel_says_so(tmp_path):
    """The GroupNorm's units come first and the grouped conv's conv-groups then tie all 16
    channels into one unit: the group was left a one-unit group, unpinned, with no reason in
    the report. The conv pins it now, saying why, and the written model computes the same."""
    reasons = _pinned_as_tied(_GroupedConvAfterGroupNorm(norm_after=False), tmp_path)
    assert any("Conv '/gc/Conv' (group 4)" in reason for reason in reasons), reasons
