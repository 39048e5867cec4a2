"""Families a user expects to reduce (issue 25) and model-ready data (issue 29).

NFNet-style standardised weights, ConvNeXt-style channels-last blocks, a TResNet-style
space-to-depth stem written as Reshape/Transpose/Reshape, Conv1d audio and Conv3d video
CNNs with data, and a two-input model fed a model-ready npz. Each is exported with
torch.onnx.export, reduced at params=0.7 to a model that passes the full checker and
runs at batch 1 and 2 (and another spatial size where the original takes one), and
keeping every channel is exact.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import write_npz
from graphs import assert_same_outputs, kill_channels, run, standardised_conv_net
from torch import nn

from onnx_mbs.bridge import retrain
from onnx_mbs.cli import main
from onnx_mbs.passes import (
    BadInputError,
    analyze_model,
    choose_channels,
    count_parameters,
    load_model,
    shrink_channels,
    weight_importance,
)
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.read import check_model
from onnx_mbs.pipeline import reduce

SPATIAL = {4: (2, 3), 3: (2,), 5: (2, 3, 4)}  # input rank -> its spatial axes


def export(module: nn.Module, shape: tuple[int, ...], dynamic_size: bool = True) -> onnx.ModelProto:
    """torch.onnx.export with a dynamic batch (and spatial size), random weights."""
    axes = {0: "n"} | ({a: f"s{a}" for a in SPATIAL[len(shape)]} if dynamic_size else {})
    buffer = io.BytesIO()
    torch.onnx.export(
        module.eval(), (torch.randn(*shape),), buffer, input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": axes}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def keep_all_exact(model: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    loaded = load_model(model, {"input": list(shape)})
    channels = analyze_channels(loaded)
    keep = {g.id: np.arange(g.size) for g in channels.groups}
    assert_same_outputs(loaded, shrink_channels(loaded, keep, channels), atol=1e-4)


def check_reduced(reduced: onnx.ModelProto, shapes: list[tuple[int, ...]], **other) -> None:
    """The full checker, then a run at every shape given (batch 1 and 2, other sizes)."""
    check_model(reduced, full_check=True)
    for k, shape in enumerate(shapes):
        x = np.random.default_rng(k).normal(size=shape).astype(np.float32)
        feeds = {"input": x} | {n: f(shape[0]) for n, f in other.items()}
        (y,) = run(reduced, feeds)
        assert y.shape == (shape[0], 10) and np.isfinite(y).all()


def reduce_to_07(model: onnx.ModelProto, shape: tuple[int, ...], data=None):
    shapes = {"input": list(shape)}
    reduced, report = reduce(model, data, budget="params=0.7", progress=False, input_shapes=shapes)
    assert 0.4 <= report.plan.reached["params"] <= 0.72
    assert any(report.plan.counts[g.id] < g.size for g in report.groups)
    return reduced, report


# -- weights computed in the graph --------------------------------------------------------------


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight standardised per output channel at run time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class WrittenOutStdConv(nn.Conv2d):
    """The same standardisation written out: mean and variance over the input axes."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, padding=self.padding)


class NFNetLike(nn.Module):
    def __init__(self, conv=StdConv) -> None:
        super().__init__()
        self.stem = conv(3, 16, 3, padding=1)
        self.body = nn.ModuleList(
            conv(c, d, 3, padding=1) for c, d in [(16, 32), (32, 32), (32, 32)]
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = F.max_pool2d(x, 2)
        for k, conv in enumerate(self.body):
            y = F.gelu(conv(x))
            x = x + y if k else y
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("conv", [StdConv, WrittenOutStdConv])
def test_standardised_weights_reduce(conv):
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    model = export(NFNetLike(conv), shape)
    groups = analyze_channels(load_model(model, {"input": list(shape)})).groups
    assert not any("weight" in r for g in groups for r in g.pin_reasons)
    keep_all_exact(model, shape)
    reduced, report = reduce_to_07(model, shape)
    check_reduced(reduced, [(1, 3, 32, 32), (2, 3, 32, 32), (2, 3, 48, 40)])
    note = next(n for n in report.plan.notes if n.startswith("not exact"))
    assert "standardised" in note


def test_flops_budget_counts_the_macs_of_convs_with_computed_weights():
    """The cost model scales such a conv's MACs with the initializer its weight is
    computed from; else they would count as fixed and flops=0.6 be out of reach."""
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    model = export(NFNetLike(StdConv), shape)
    _, report = reduce(
        model, budget="flops=0.6", progress=False, input_shapes={"input": list(shape)}
    )
    assert 0.4 <= report.plan.reached["flops"] <= 0.62
    assert report.after.total_macs / report.before.total_macs == report.plan.reached["flops"]


def test_output_channels_of_a_standardised_weight_cut_exactly():
    """Standardisation is per output channel: dropping a dead output channel of a conv
    whose readers have plain weights changes nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(StdConv(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
    loaded = load_model(export(net, (1, 3, 16, 16), dynamic_size=False))
    channels = analyze_channels(loaded)
    group = next(g for g in channels.groups if g.size == 16)
    assert not group.pinned and not group.inexact
    bias = next(m for m in group.members if m.role == "bias")
    dead = kill_channels(loaded, channels.groups, {group.id: [3, 7]})
    for tensor in dead.graph.initializer:  # ReLU(gain * standardised + bias): bias -1 kills
        if tensor.name == bias.tensor:
            b = onnx.numpy_helper.to_array(tensor).copy()
            b[[3, 7]] = -1e4
            tensor.CopyFrom(onnx.numpy_helper.from_array(b, tensor.name))
    keep = {group.id: [c for c in range(16) if c not in (3, 7)]}
    assert_same_outputs(dead, shrink_channels(dead, keep, channels), atol=1e-4)


def test_standardisation_by_reductions_that_drop_axes_is_not_exact_on_inputs():
    """As torch's dynamo exporter writes timm's ScaledStdConv2d (`standardised_conv_net`):
    mean and variance are ReduceMeans of the weight that drop the axes they reduce. They
    average over the input channels, so cutting one changes the kept ones: the report must
    say so, as it does for the other forms."""
    model = standardised_conv_net()
    groups = analyze_channels(load_model(model)).groups
    read = next(g for g in groups if g.size == 32 and "std" not in g.producers)
    made = next(g for g in groups if g.producers == ["std"])
    assert any("Conv 'std': its weight is standardised" in r for r in read.inexact), read
    assert not made.inexact  # per output channel: their cut is exact


def test_a_small_standardised_weight_folded_at_load_counts_as_parameters():
    """A weight of up to 4096 entries computed in the graph (nf_regnet_b0's stem and first
    stage) is folded at load to the weight its conv reads. It was marked as folded shape
    arithmetic: the conv's parameters were left out of the count (314 of 906 here), the budget
    was met against that, and the written file kept the mark, so counting it again left
    them out too. Now the folded weight counts (its gain and zero shift are folded into it)."""
    model = standardised_conv_net(width=8)
    weight = 8 * 8 * 3 * 3
    assert count_parameters(model) == 906  # stem 224, weight 576, gain and shift 16, head 90
    loaded = load_model(model)
    assert "std" in [n.name for n in loaded.graph.node]
    assert count_parameters(loaded) == 906 - 16
    small, report = reduce(model, budget="params=0.7", channel_multiple=1, progress=False)
    assert report.plan.params == (906 - 16, count_parameters(small))
    assert report.plan.reached["params"] <= 0.7
    std = next(n for n in small.graph.node if n.name == "std")
    kept = next(t for t in small.graph.initializer if t.name == std.input[1])
    assert 0 < np.prod(kept.dims) < weight
    assert count_parameters(load_model(small)) == count_parameters(small)


def test_unfollowed_weight_arithmetic_pins_naming_the_node():
    class Odd(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, torch.sin(self.weight), self.bias, padding=self.padding)

    # (weights of up to 4096 entries computed from constants are folded at load)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), Odd(32, 32, 3, padding=1))
    groups = analyze_channels(load_model(export(net, (1, 3, 16, 16), False))).groups
    reasons = [r for g in groups if g.size == 32 for r in g.pin_reasons]
    assert any("not followed" in r and "Sin '" in r for r in reasons), reasons


def test_default_run_says_why_nothing_is_cut(tmp_path, capsys):
    class Odd(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, torch.sin(self.weight), self.bias, padding=self.padding)

    path = tmp_path / "odd.onnx"
    onnx.save(
        export(nn.Sequential(Odd(3, 256, 3), nn.ReLU(), Odd(256, 8, 3)), (1, 3, 16, 16), False),
        path,
    )
    assert main(["reduce", str(path), "-o", str(tmp_path / "out.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "nothing can be cut: every channel group is pinned" in printed
    assert "Sin '" in printed


def test_default_run_says_when_no_macroblock_has_redundancy():
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    reduced, report = reduce(export(net, (1, 3, 64, 64), False), progress=False)
    assert not report.plan.changes_anything
    assert any("R = 0, beta = 1" in n and "give budget to" in n for n in report.plan.notes)


# -- LayerNorm over channels ----------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: depthwise conv, then channels-last LayerNorm and MLP."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.gamma * y


class ConvNeXtLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)
        self.blocks = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_convnext_block_pair_reduces_and_says_layernorm_is_not_exact():
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    model = export(ConvNeXtLike(), shape)
    keep_all_exact(model, shape)
    reduced, report = reduce_to_07(model, shape)
    check_reduced(reduced, [(1, 3, 32, 32), (2, 3, 32, 32), (2, 3, 48, 64)])
    note = next(n for n in report.plan.notes if n.startswith("not exact"))
    assert note.count("LayerNormalization '") == 2


def test_dead_channel_oracle_per_op_in_a_convnext_block():
    """Where it holds, dropping provably dead channels is exact: the MLP's hidden
    channels (MatMul, Add, GELU(0) = 0). Where it does not: a dead channel still counts
    in LayerNormalization's mean and variance, so dropping it changes the outputs, and
    the group says so."""
    torch.manual_seed(0)
    loaded = load_model(export(ConvNeXtLike(), (1, 3, 32, 32), dynamic_size=False))
    channels = analyze_channels(loaded)
    hidden = next(g for g in channels.groups if g.size == 128 and not g.pinned)
    assert not hidden.inexact
    dead = kill_channels(loaded, channels.groups, {hidden.id: [1, 5, 9]})
    keep = {hidden.id: [c for c in range(128) if c not in (1, 5, 9)]}
    assert_same_outputs(dead, shrink_channels(dead, keep, channels), atol=1e-4)

    trunk = next(g for g in channels.groups if g.size == 32)
    assert len(trunk.inexact) == 2 and all("LayerNormalization" in r for r in trunk.inexact)
    dead = kill_channels(loaded, channels.groups, {trunk.id: [2, 4]})
    keep = {trunk.id: [c for c in range(32) if c not in (2, 4)]}
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    (before,) = run(dead, x)
    (after,) = run(shrink_channels(dead, keep, channels), x)
    assert np.abs(before - after).max() > 1e-3


# -- GroupNorm as torch's exporters write it ------------------------------------------------------


class GroupNormNet(nn.Module):
    """conv -> GroupNorm(4, c) -> ReLU -> conv -> head: the norm of FCOS/RetinaNet heads and
    ResNet-GN. Both exporters write GroupNorm as Reshape (N, G, -1), InstanceNormalization
    with ones and zeros, Reshape back to the input's Shape, Mul by gamma, Add beta."""

    def __init__(self, c: int = 32, groups: int = 4, d: int = 8) -> None:
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.b, self.head = nn.Conv2d(c, d, 3, padding=1), nn.Linear(d, 10)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.b(F.relu(self.gn(self.a(x)))).mean((2, 3)))


def export_dynamo(module: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) at opset 18, dynamic batch and size."""
    dims = {0: torch.export.Dim("n")} | {
        a: torch.export.Dim(f"s{a}", min=4, max=512) for a in SPATIAL[len(shape)]
    }
    program = torch.onnx.export(
        module.eval(), (torch.randn(*shape),), input_names=["input"], output_names=["logits"],
        dynamic_shapes={"x": dims}, opset_version=18, dynamo=True, verbose=False,
    )  # fmt: skip
    return onnx.load_from_string(program.model_proto.SerializeToString())


GROUPNORM_EXPORTS = {
    "torchscript-opset17": lambda m, shape: export(m, shape),
    "dynamo-opset18": export_dynamo,
}


@pytest.mark.parametrize("exporter", GROUPNORM_EXPORTS.values(), ids=GROUPNORM_EXPORTS.keys())
def test_groupnorm_reduces_to_a_groupnorm_of_the_same_groups(exporter):
    """A cut takes the same channels from each of the 4 groups (k x 4 kept), the written
    model keeps GroupNorm(4) and runs at every shape the original takes; its counts are the
    narrower torch module's; the report says GroupNorm's cut is not exact."""
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    model = exporter(GroupNormNet(), shape)
    keep_all_exact(model, shape)
    reduced, report = reduce(
        model, None, budget="params=0.6", channel_multiple=1, progress=False,
        input_shapes={"input": list(shape)},
    )  # fmt: skip
    check_reduced(reduced, [(1, 3, 16, 16), (2, 3, 16, 16), (2, 3, 12, 20)])
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in reduced.graph.initializer}
    norm = next(n for n in reduced.graph.node if n.op_type == "InstanceNormalization")
    assert weights[norm.input[1]].shape == (4,)
    convs = [weights[n.input[1]].shape for n in reduced.graph.node if n.op_type == "Conv"]
    kept, d = convs[0][0], convs[1][0]
    assert kept < 32 and kept % 4 == 0 and convs[1][1] == kept
    narrow = GroupNormNet(kept, 4, d)
    assert report.after.total_params == sum(p.numel() for p in narrow.parameters())
    assert report.after.total_macs == 16 * 16 * (kept * 27 + d * kept * 9) + d * 10
    assert any("InstanceNormalization" in note for note in report.not_exact)
    retrained_runs(reduced)


def retrained_runs(model: onnx.ModelProto) -> None:
    """One short epoch through the bridge (InstanceNormalization included); the written-back
    model changed its weights, and runs at batch 1 and 2 and another size."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, 16, 16)).astype(np.float32)
    result = retrain(model, (x, rng.integers(0, 10, 32)), epochs=1, batch_size=16,
                     device="cpu", progress=False)  # fmt: skip
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    (before,), (after,) = run(model, x[:2]), run(result.model, x[:2])
    assert np.abs(before - after).max() > 1e-6
    check_reduced(result.model, [(1, 3, 16, 16), (2, 3, 16, 16), (2, 3, 12, 20)])


def test_groupnorm_at_the_default_multiple_is_cut_in_multiples_of_8_channels():
    """GroupNorm(8, 64): 8 units of 8 channels. --channel-multiple counted units, so at 8 a
    group kept all 8 and params=0.7 was out of reach; it counts channels (a unit of 8 is one
    step), so the cut keeps k units, a multiple of 8 channels and of the 8 groups."""
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    model = export(GroupNormNet(64, 8, 4), shape)
    reduced, report = reduce(
        model, None, budget="params=0.7", progress=False, input_shapes={"input": list(shape)}
    )
    assert report.plan.reached["params"] <= 0.7
    written = load_model(reduced, {"input": list(shape)})
    kept = {x.name: x.out_channels for x in analyze_model(written).layers}
    assert 0 < kept["/a/Conv"] < 64 and kept["/a/Conv"] % 8 == 0
    check_reduced(reduced, [(1, 3, 16, 16), (2, 3, 12, 20)])


def test_groupnorm_cut_of_dead_channels_is_groupnorm_over_the_kept_ones():
    """Channel 3 of every group zeroed (one class) and cut: the written model computes
    GroupNorm(4) over the kept channels (torch's, on the narrower weights), which is not
    what it computed with the zeros in its statistics."""
    torch.manual_seed(0)
    net = GroupNormNet().eval()
    loaded = load_model(export(net, (1, 3, 16, 16), dynamic_size=False))
    channels = analyze_channels(loaded)
    group = next(g for g in channels.groups if g.producers == ["/a/Conv"])
    assert group.size == 8 and not group.pinned
    dead = kill_channels(loaded, channels.groups, {group.id: [3]})
    chosen = choose_channels(channels.groups, {group.id: 7}, weight_importance(dead, "l2"))
    assert chosen == {group.id: [c for c in range(8) if c != 3]}  # what MBS cuts: the dead unit
    small = shrink_channels(dead, chosen, channels)
    cut = group.member(loaded.graph.node[0].output[0]).positions[3]
    assert cut.tolist() == [3, 11, 19, 27]
    keep = [c for c in range(32) if c not in cut]
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        a = F.conv2d(torch.from_numpy(x), net.a.weight[keep], net.a.bias[keep], padding=1)
        h = F.relu(F.group_norm(a, 4, net.gn.weight[keep], net.gn.bias[keep]))
        b = F.conv2d(h, net.b.weight[:, keep], net.b.bias, padding=1)
        want = net.head(b.mean((2, 3))).numpy()
    (got,) = run(small, x)
    np.testing.assert_allclose(got, want, atol=1e-4)
    (before,) = run(dead, x)
    assert np.abs(before - got).max() > 1e-3


# -- space-to-depth written as Reshape/Transpose/Reshape -----------------------------------------


class SpaceToDepthStem(nn.Module):
    """TResNet's stem: blocks of 4x4 pixels moved into channels by views."""

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(n, c * 16, h // 4, w // 4)


def tresnet_like() -> nn.Module:
    layers = [SpaceToDepthStem(), nn.Conv2d(48, 32, 3, padding=1), nn.ReLU()]
    for c, d, stride in [(32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 1)]:
        layers += [nn.Conv2d(c, d, 3, stride=stride, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_space_to_depth_stem_keeps_the_receptive_field_and_reduces():
    torch.manual_seed(0)
    model = export(tresnet_like(), (1, 3, 64, 64), dynamic_size=False)
    analysis = analyze_model(load_model(model))
    # Each 3x3 conv after a 4-pixel block reads 2 more blocks: 4 + 2 * 4, not 3.
    assert analysis.layers[0].global_receptive_field == 12
    assert analysis.layers[-1].global_receptive_field > 64
    _, default = reduce(model, progress=False)
    assert min(m.beta for m in default.plan.macroblocks) < 1
    assert any(default.plan.counts[g.id] < g.size for g in default.groups)
    keep_all_exact(model, (1, 3, 64, 64))
    reduced, _ = reduce_to_07(model, (1, 3, 64, 64))
    check_reduced(reduced, [(1, 3, 64, 64), (2, 3, 64, 64)])


class ViewPixelShuffle(nn.Module):
    """PixelShuffle(2) written by hand with views (DCR order), as some SR repositories do."""

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, 2, 2, c // 4, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(n, c // 4, h * 2, w * 2)


@pytest.mark.parametrize("resample", ["unshuffle", "view-shuffle"])
def test_pixel_unshuffle_and_view_shuffles_start_macroblocks_of_their_size(resample):
    """nn.PixelUnshuffle as torch exports it (Unsqueeze, Reshape, Reshape, Transpose, Reshape,
    Squeeze) and a pixel shuffle written as views change the map size as SpaceToDepth and
    DepthToSpace do: the convs after them are a macroblock of the new size, not members of
    the one before, and their fields are counted in input pixels through the blocks."""
    torch.manual_seed(0)
    if resample == "unshuffle":
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.PixelUnshuffle(2),
                            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 3, 3, padding=1))  # fmt: skip
        sizes, field = [(16, 16), (8, 8)], 3 + 1 + 2 * 2  # a 2x2 block of 3-pixel fields
    else:
        net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), ViewPixelShuffle(),
                            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 3, 3, padding=1))  # fmt: skip
        sizes, field = [(16, 16), (32, 32)], 3 + 2 / 2  # half-pixel steps
    model = export(net, (1, 3, 16, 16))
    analysis = analyze_model(load_model(model, {"input": [1, 3, 16, 16]}))
    assert [m.resolution for m in analysis.macroblocks] == sizes
    assert [len(m.layers) for m in analysis.macroblocks] == [1, 2]
    assert analysis.layers[1].global_receptive_field == field


# -- audio and video CNNs, model-ready data --------------------------------------------------------


def audio_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
        *[m for c, d in [(16, 32), (32, 32), (32, 32)]
          for m in (nn.Conv1d(c, d, 5, stride=2, padding=2), nn.ReLU())],
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def video_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(),
        *[m for c, d in [(16, 32), (32, 32), (32, 32)]
          for m in (nn.Conv3d(c, d, 3, stride=(1, 2, 2), padding=1), nn.ReLU())],
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    "build, shape, other",
    [(audio_cnn, (1, 1, 1024), (1, 1, 1536)), (video_cnn, (1, 3, 4, 32, 32), (1, 3, 6, 32, 48))],
    ids=["conv1d", "conv3d"],
)
def test_audio_and_video_cnns_reduce_with_model_ready_data(tmp_path, build, shape, other):
    torch.manual_seed(0)
    model = export(build(), shape)
    rng = np.random.default_rng(0)
    data = write_npz(
        tmp_path / "ready.npz",
        input=rng.normal(size=(12, *shape[1:])).astype(np.float32),
        y=rng.integers(0, 10, 12),
    )
    keep_all_exact(model, shape)
    reduced, report = reduce_to_07(model, shape, data)
    assert report.samples == 12 and "model-ready npz" in report.data
    assert report.preprocessing == "none (model inputs as given)"
    assert all(0 < rho < 1 for rho in report.rho.values())
    check_reduced(reduced, [shape, (2, *shape[1:]), (2, *other[1:])])


class ImageAndScale(nn.Module):
    """Two inputs: an image, and a per-sample scale (N, 1) that multiplies its features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32, 10)

    def forward(self, x, scale):
        return self.head(self.body(x).mean((2, 3)) * scale)


def two_input_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(
        ImageAndScale().eval(), (torch.randn(1, 3, 16, 16), torch.ones(1, 1)), buffer,
        input_names=["input", "scale"], output_names=["logits"], opset_version=17,
        dynamic_axes={"input": {0: "n"}, "scale": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def test_two_input_model_reduces_with_a_model_ready_npz(tmp_path, capsys):
    model = two_input_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3, 16, 16)).astype(np.float32)
    scale = rng.uniform(0.5, 2, size=(10, 1)).astype(np.float32)
    data = write_npz(tmp_path / "ready.npz", input=x, scale=scale)
    keep_all_exact(model, (1, 3, 16, 16))
    reduced, report = reduce_to_07(model, (1, 3, 16, 16), data)
    assert report.samples == 10 and "input, scale" in report.data
    check_reduced(
        reduced, [(1, 3, 16, 16), (2, 3, 16, 16)], scale=lambda n: np.ones((n, 1), np.float32)
    )
    # The CLI takes the same npz; an image npz is refused in one line for two inputs.
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    out = tmp_path / "out.onnx"
    args = ["reduce", str(path), "-o", str(out), "--budget", "params=0.7", "--no-eval"]
    assert main([*args, "--data", data]) == 0
    check_model(onnx.load(out), full_check=True)
    labelled = write_npz(tmp_path / "labelled.npz", input=x, scale=scale, y=np.arange(10) % 10)
    capsys.readouterr()
    assert main(["eval", str(out), "--data", labelled]) == 0
    assert "top-1" in capsys.readouterr().out
    images = write_npz(tmp_path / "images.npz", x=rng.integers(0, 255, (4, 16, 16, 3), np.uint8))
    with pytest.raises(BadInputError, match="has 2 inputs .input, scale.; give an .npz with one"):
        reduce(model, images, progress=False)
    # A model-ready npz that does not fit: one line, exit 2, nothing written.
    bad = write_npz(tmp_path / "bad.npz", input=x.astype(np.float64), scale=scale)
    capsys.readouterr()
    refused = tmp_path / "refused.onnx"
    assert main(["reduce", str(path), "-o", str(refused), "--data", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "array 'input' has dtype float64" in err
    assert not refused.exists()


IMAGES = np.zeros((4, 3, 16, 16), np.float32)
SCALES = np.ones((4, 1), np.float32)
REFUSED = {
    "dtype": (
        {"input": IMAGES.astype(np.float64)},
        {},
        "dtype float64; the model input expects float32",
    ),
    "shape": (
        {"input": IMAGES[..., :8]},
        {},
        r"\(4, 3, 16, 8\); the model input expects \(N, 3, 16, 16\)",
    ),
    "samples": ({"input": IMAGES, "scale": SCALES[:3]}, {}, "'scale' has 3 samples"),
    "mean": ({"input": IMAGES, "scale": SCALES}, {"mean": 0.5}, "mean/std apply to image data"),
}


@pytest.mark.parametrize("arrays, options, message", REFUSED.values(), ids=REFUSED.keys())
def test_model_ready_npz_refusals_are_one_line(tmp_path, arrays, options, message):
    model = two_input_model()
    if "scale" not in arrays:
        arrays = {**arrays, "scale": np.ones((len(arrays["input"]), 1), np.float32)}
    data = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError, match=message) as caught:
        reduce(model, data, progress=False, **options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("temperature", [np.float32(1.5), np.full(4, 1.5, np.float32)])
def test_a_scalar_input_is_refused_in_one_line_by_model_ready_data(temperature):
    """A rank-0 input (a temperature) has no axis to count samples on: an npz array of
    shape () raised a TypeError (len() of unsized object), one of shape (N,) was told the
    input expects () "(first axis: samples)"."""
    from onnx_mbs.data.ready import DeclaredInput, model_ready_arrays

    inputs = [
        DeclaredInput("input", (None, 3, 16, 16), np.dtype(np.float32)),
        DeclaredInput("temperature", (), np.dtype(np.float32)),
    ]
    npz = {"input": IMAGES, "temperature": np.asarray(temperature)}
    with pytest.raises(BadInputError, match="input 'temperature' is a scalar") as caught:
        model_ready_arrays(npz, inputs, "model-ready npz ready.npz")
    assert "\n" not in str(caught.value)


def test_image_npz_keeps_its_preprocessing(tmp_path):
    """An npz with `x` for a single 4-D input named `x` is image data, as before."""
    from onnx_mbs.data.ready import DeclaredInput, is_model_ready

    image_input = [DeclaredInput("x", (None, 3, 32, 32), np.dtype(np.float32))]
    assert not is_model_ready(["x", "y"], image_input)
    assert is_model_ready(["input"], [DeclaredInput("input", (None, 1, 100), np.dtype(np.float32))])
    model = export(audio_cnn(), (1, 1, 1024), dynamic_size=False)
    images = write_npz(tmp_path / "images.npz", x=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(BadInputError, match="is 3-D .* give a model-ready .npz"):
        reduce(model, images, progress=False)
