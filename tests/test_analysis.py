"""Macroblock analysis against independent counts on every zoo model, in both export forms."""

from __future__ import annotations

import functools
import json

import graphs
import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnx_mbs.cli import main
from onnx_mbs.models.export import export_onnx, randomize_batchnorm
from onnx_mbs.models.zoo import IMAGENET, ZOO
from onnx_mbs.passes import analyze_model, load_model
from onnx_mbs.plan import macroblock_redundancy


@functools.cache
def _zoo(name: str, form: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
    entry = ZOO[name]
    # Random BN values: the exporter shares equal initializers (e.g. all-ones scales).
    module = randomize_batchnorm(entry.build()).eval()
    return module, load_model(export_onnx(module, entry.input_shape, form=form))


def _hook_macs(module: torch.nn.Module, input_shape) -> int:
    """MACs counted by torch forward hooks: what the layers really compute."""
    total = 0

    def conv_hook(layer, _, out):
        nonlocal total
        kh, kw = layer.kernel_size
        total += out.numel() * kh * kw * layer.in_channels // layer.groups

    def linear_hook(layer, inp, out):
        nonlocal total
        total += out.numel() * layer.in_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
        for m in module.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        module(torch.zeros(input_shape))
    for h in handles:
        h.remove()
    return total


def _bn_channels(model: onnx.ModelProto) -> int:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return sum(shapes[n.input[1]][0] for n in model.graph.node if n.op_type == "BatchNormalization")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_counts_and_resolutions(name):
    entry = ZOO[name]
    module, train = _zoo(name, "train")
    _, deploy = _zoo(name, "deploy")
    torch_params = sum(p.numel() for p in module.parameters())
    macs = _hook_macs(module, entry.input_shape)
    for form, model in (("train", train), ("deploy", deploy)):
        analysis = analyze_model(model)
        if form == "train":
            assert analysis.total_params == torch_params
        else:
            # Folding a BN into its conv turns 2C BN parameters into a C-element conv bias.
            folded = _bn_channels(train) - _bn_channels(model)
            assert folded > 0
            assert analysis.total_params == torch_params - folded
        assert analysis.total_macs == macs, form
        assert [m.resolution[0] for m in analysis.macroblocks] == entry.resolutions, form
        assert sum(len(m.layers) for m in analysis.macroblocks) == sum(
            isinstance(m, torch.nn.Conv2d) for m in module.modules()
        )
        for block in analysis.macroblocks:
            assert block.base_layers[0] == block.layers[0]
            assert set(block.base_layers) <= set(block.layers)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("mobilenet_v1", 569e6),  # Howard et al. 2017, Table 8: 569 million mult-adds
        ("shufflenet_v1", 140e6),  # Zhang et al. 2018, Table 2: 1x (g = 3), 140 MFLOPs
    ],
)
def test_paper_models_macs_as_published(name, published):
    module, _ = _zoo(name, "deploy")
    assert analyze_model(_zoo(name, "deploy")[1]).total_macs == _hook_macs(module, IMAGENET)
    assert _hook_macs(module, IMAGENET) == pytest.approx(published, rel=0.02)


def test_resnet50_at_224_has_redundancy_in_its_deeper_macroblocks():
    """The global reading: fields pass 224 input pixels inside the 14x14 macroblock (3x3 convs
    add 32 pixels each there) and from the first layers of the 7x7 one (its stride-2 3x3 conv
    and the projection shortcut: both are its base). The local reading finds no redundancy
    anywhere in ResNet-50 at 224, so MBS would do nothing."""
    _, model = _zoo("resnet50", "deploy")
    rho = {}  # no data: rho = 1
    analysis = analyze_model(model)
    assert analysis.image_size == 224
    redundancy = [r for _, _, r in macroblock_redundancy(analysis, rho)]
    assert redundancy[:3] == [0.0, 0.0, 0.0] and 0.2 < redundancy[3] < redundancy[4] < 1
    seven = analysis.macroblocks[4]
    assert len(seven.base_layers) == 2 and seven.layers[0] in seven.base_layers
    assert all(analysis.layer(n).global_receptive_field > 224 for n in seven.base_layers)
    fourteen = analysis.macroblocks[3]
    rf = {n: analysis.layer(n).global_receptive_field for n in fourteen.layers}
    past = set(fourteen.layers) - set(fourteen.base_layers)
    assert max(rf[n] for n in fourteen.base_layers) <= 224 < min(rf[n] for n in past)
    local = analyze_model(model, "local")
    assert all(r == 0.0 for _, _, r in macroblock_redundancy(local, rho))


def test_cifar_resnet_bases_follow_local_receptive_fields():
    """ResNet-56 at 32x32: 3x3 convs add 2 to the local RF; the base ends once it passes 32."""
    _, model = _zoo("resnet56", "deploy")
    analysis = analyze_model(model, "local")
    first, second, third = analysis.macroblocks
    # Stem conv at RF 3, then each conv +2: RF 3..31 fits 32 -> 15 layers.
    assert len(first.base_layers) == 15
    # Entering 16x16: stride-2 3x3 starts at 1 + 2/2 = 2, 1x1 shortcut at 1; +2 per conv
    # up to 16 -> the entering pair, the shortcut, and 6 more convs.
    assert len(second.base_layers) == 9
    assert len(third.base_layers) == 5
    rf = {x.name: x.local_receptive_field for x in analysis.layers}
    assert rf[second.layers[0]] == 2.0
    assert all(rf[n] <= 16 for n in second.base_layers)
    assert all(rf[n] > 16 for n in set(second.layers) - set(second.base_layers))


# -- graphs torch did not export ------------------------------------------------------------


def _runtime_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes onnxruntime actually produces, independent of ONNX shape inference."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    feed = graphs.random_feeds(model)
    return {n: v.shape for n, v in zip(names, graphs.run(probe, feed, names))}


@pytest.mark.parametrize("name", list(graphs.HAND_BUILT))
def test_hand_built_graphs_macs_from_runtime_shapes(name):
    build, shapes = graphs.HAND_BUILT[name]
    model = load_model(build(), shapes)
    analysis = analyze_model(model)
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    seen = _runtime_shapes(model, [t for n in convs for t in (n.input[0], n.output[0])])
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    expected = 0
    for node in convs:
        w = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv":  # output pixels x kernel x in-channels per group x out
            expected += int(np.prod(seen[node.output[0]])) * int(np.prod(w[1:]))
        else:  # every input pixel scatters (Cout/g) x kernel
            expected += int(np.prod(seen[node.input[0]])) * int(np.prod(w[1:]))
            assert w[0] == seen[node.input[0]][1] and group >= 1
    assert sum(x.macs for x in analysis.layers) == expected
    assert len(analysis.layers) == len(convs)
    for block in analysis.macroblocks:
        assert block.layers[0] in block.base_layers


def test_squeeze_excitation_convs_join_the_gated_macroblock():
    analysis = analyze_model(load_model(graphs.mobilenetv3_like()))
    se = [x for x in analysis.layers if x.output_size == (1, 1)]
    assert se, "the MobileNetV3-like graph has SE convs on 1x1 maps"
    for layer in se:
        block = analysis.macroblocks[layer.macroblock]
        assert block.resolution != (1, 1)
        assert layer.name not in block.base_layers  # they see the whole map
    assert all(m.resolution != (1, 1) for m in analysis.macroblocks)


def test_fpn_resize_and_convtranspose_make_their_own_macroblocks():
    analysis = analyze_model(load_model(graphs.dbnet_fpn_like()))
    resolutions = [m.resolution for m in analysis.macroblocks]
    assert len(set(resolutions)) >= 3
    up = [x for x in analysis.layers if x.op_type == "ConvTranspose"]
    assert up and all(x.output_size[0] > x.input_size[0] for x in up)
    # A layer entering a larger resolution starts a fresh local receptive field.
    assert all(x.local_receptive_field == 1.0 for x in up)


def test_analyze_cli_json_and_dynamic_input(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save(graphs.dynamic_input_model(), path)
    assert main(["analyze", str(path)]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["analyze", str(path), "--input-shape", "input:1,3,24,20", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["resolution"] for m in doc["macroblocks"]] == [[24, 20], [12, 10]]
    assert doc["totals"]["params"] == sum(m["params"] for m in doc["macroblocks"]) + 16 * 5 + 5
    for block in doc["macroblocks"]:
        assert set(block) >= {"resolution", "layers", "base_layers", "params", "macs"}
    # Each layer's field in input pixels, the reading the bases follow and its limit.
    assert doc["receptive_field"] == "global" and doc["image_size"] == 24
    # 3x3 convs: 3, 5, 7; the 2x2 stride-2 max-pool: 8, step 2; then 3x3: 8 + 2*2.
    assert [x["global_receptive_field"] for x in doc["layers"]] == [3, 5, 7, 12]
    assert main(["analyze", str(path), "--input-shape", "input:1,3,24,20"]) == 0
    table = capsys.readouterr().out
    assert "24x20" in table and "12x10" in table
    assert "input pixels is at most the input image size" in table and "(image size 24)" in table
    args = ["analyze", str(path), "--input-shape", "input:1,3,24,20", "--receptive-field"]
    assert main([*args, "local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["receptive_field"] == "local"


def test_macs_say_the_batch_they_count_where_it_is_not_one(tmp_path, capsys):
    """MACs count the analysed batch (docs/mbs.md): a model fixed at batch 2 has twice the
    MACs of its batch-1 form, and every place that prints them says so; at batch 1 nothing
    is added."""
    from onnx_builders import conv_relu_model

    one, two = tmp_path / "b1.onnx", tmp_path / "b2.onnx"
    onnx.save(conv_relu_model([1, 3, 8, 8]), one)
    onnx.save(conv_relu_model([2, 3, 8, 8]), two)
    macs = {}
    for batch, path in ((1, one), (2, two)):
        assert main(["analyze", str(path), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["batch"] == batch
        macs[batch] = doc["totals"]["macs"]
        assert main(["analyze", str(path)]) == 0
        assert ("MACs at batch 2 " in capsys.readouterr().out) == (batch == 2)
    assert macs[2] == 2 * macs[1] == 2 * (4 * 3 * 9 * 64 + 4 * 2)
    # A dynamic batch analysed at the batch --input-shape gives counts that one.
    dynamic = tmp_path / "dyn.onnx"
    onnx.save(conv_relu_model(["n", 3, 8, 8]), dynamic)
    assert main(["analyze", str(dynamic), "--input-shape", "x:2,3,8,8"]) == 0
    assert "MACs at batch 2 " in capsys.readouterr().out
    report = tmp_path / "report"
    args = ["reduce", str(two), "-o", str(tmp_path / "out.onnx"), "--no-eval"]
    assert main([*args, "--report", str(report)]) == 0
    assert "kept, at batch 2)" in capsys.readouterr().out
    assert "kept, at batch 2)" in (report / "report.md").read_text()
    assert json.loads((report / "report.json").read_text())["totals"]["batch"] == 2


@pytest.mark.parametrize(
    "name, build",
    [(f"zoo:{n}", n) for n in ("resnet20", "densenet_bc", "mobilenet_v2", "shufflenet_v2")]
    + [(f"hand:{n}", n) for n in graphs.HAND_BUILT],
)
def test_the_reported_after_is_the_written_models_own_analysis(name, build, zoo_onnx):
    """`reduce` reads the written model's sizes off the analysis before (`resized`): it must
    say exactly what analysing the written model from scratch says."""
    from onnx_mbs.pipeline import reduce

    if name.startswith("zoo:"):
        model, shapes = zoo_onnx(build), None
    else:
        make, shapes = graphs.HAND_BUILT[build]
        model = make()
    reduced, report = reduce(
        model,
        budget="params=0.75",
        channel_multiple=1,
        input_shapes=shapes,
        progress=False,
        strategy="mbs",
    )
    assert report.plan.changes_anything
    assert report.after == analyze_model(load_model(reduced, shapes))
    assert report.after.total_params < report.before.total_params


def test_einsum_macs_are_counted_as_matmul_macs():
    """Attention over channels written with torch.einsum exports as Einsum: its MACs (one
    multiply-add per combination of the letters of its two operands) count as a MatMul's
    do; they were left out of the total and of a flops budget."""
    b = graphs.Builder("einsum_attention")
    x = b.conv(b.input("input", [2, 3, 8, 8]), 3, 16, name="stem")
    q, k, v = (b.conv(x, 16, 16, k=1, name=n) for n in ("q", "k", "v"))
    att = b.op("Softmax", [b.op("Einsum", [q, k], equation="bchw,bdhw->bcd")], axis=-1)
    y = b.op("Einsum", [att, v], equation="...cd,...dhw->...chw")
    model = load_model(b.model([b.op("Add", [x, y])], ["out"]))
    analysis = analyze_model(model)
    convs = sum(layer.macs for layer in analysis.layers)
    assert list(analysis.other_macs.values()) == [2 * 16 * 16 * 64] * 2
    assert analysis.total_macs == convs + 2 * (2 * 16 * 16 * 64)


@pytest.mark.parametrize(
    ("a", "b", "macs"),
    [
        ([2, 16, 8], [8], 2 * 16 * 8),  # x @ v: a vector of weights, one MAC per element of x
        ([16, 8], [3, 8, 4], 3 * 16 * 8 * 4),  # a broadcast over b's batch
        ([3, 16, 8], [8, 4], 3 * 16 * 8 * 4),
    ],
)
def test_matmul_macs_follow_numpy_broadcasting(a, b, macs):
    g = graphs.Builder("matmul")
    y = g.op("MatMul", [g.input("input", a), g.input("other", b)], name="mm")
    model = load_model(g.model([y], ["out"]))
    assert analyze_model(model).other_macs == {"mm": macs}


class _Normed(torch.nn.Module):
    """conv -> norm -> ReLU -> conv: the norm as torch's exporter lowers it (GroupNorm to a
    Reshape, an InstanceNormalization over the groups with ones and zeros, a Reshape back
    and the affine as Mul and Add; InstanceNorm2d to an InstanceNormalization)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.a, self.norm, self.b = torch.nn.Conv2d(3, 32, 3), norm, torch.nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


def _trained(norm: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    return norm


@pytest.mark.parametrize(
    "norm",
    [
        lambda: torch.nn.GroupNorm(4, 32),
        lambda: _trained(torch.nn.GroupNorm(4, 32)),
        lambda: torch.nn.InstanceNorm2d(32),  # affine=False: no parameters of its own
        lambda: _trained(torch.nn.InstanceNorm2d(32, affine=True)),
    ],
    ids=["groupnorm", "groupnorm-trained", "instancenorm", "instancenorm-affine-trained"],
)
def test_normalisation_layers_count_what_torch_counts(norm):
    """The exporter's InstanceNormalization of ones and zeros (GroupNorm over its groups,
    InstanceNorm without affine) holds no learned value: GroupNorm(4, 32) counted 2 x 4 and
    InstanceNorm2d(32) 2 x 32 parameters torch's module does not have."""
    module = _Normed(norm()).eval()
    model = load_model(export_onnx(module, (1, 3, 16, 16)))
    assert "InstanceNormalization" in {n.op_type for n in model.graph.node}
    assert analyze_model(model).total_params == sum(p.numel() for p in module.parameters())


def test_a_conv_after_a_resize_by_a_fractional_scale_is_counted_at_the_size_it_runs_at():
    """onnx's shape inference took 5 x 1.8 to 8 (the product floored in double precision);
    onnxruntime makes 9 x 9 maps, as `F.interpolate(scale_factor=1.8)` does: the conv after
    it was counted at 8 x 8 and its macroblock named by the wrong size."""
    import onnxruntime as ort

    b = graphs.Builder("fractional_resize")
    x = b.input("x", [1, 3, 10, 10])
    a = b.op("Relu", [b.conv(x, 3, 8, stride=2)])  # 5 x 5
    up = b.resize(a, 1.8)
    model = b.model([b.conv(b.op("Relu", [up]), 8, 4, k=1)], ["y"])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ran = session.run(None, {"x": np.zeros((1, 3, 10, 10), np.float32)})[0]
    assert ran.shape == (1, 4, 9, 9)
    analysis = analyze_model(load_model(model))
    last = analysis.layers[-1]
    assert last.macs == 9 * 9 * 8 * 4
    assert (9, 9) in {m.resolution for m in analysis.macroblocks}


def _two_stage(width: int, seed: int = 0) -> onnx.ModelProto:
    """x -> conv -> Relu -> strided conv -> Relu -> conv: two macroblocks."""
    b = graphs.Builder("stages", seed=seed)
    x = b.input("x", [1, 3, 16, 16])
    y = b.op("Relu", [b.conv(x, 3, width)])
    y = b.op("Relu", [b.conv(y, width, width, stride=2)])
    return b.model([b.conv(y, width, 4)], ["y"])


def _groups(channels) -> list[tuple]:
    return [(g.size, g.producers, g.macroblocks, g.pinned) for g in channels.groups]


def test_an_analysis_of_another_model_is_refused_by_what_takes_one():
    """analyze_channels, activation_sites and CostModel.build take the caller's
    `analyze_model`; one of another model (its layers, macroblocks and MACs) was used as
    it came: groups in the wrong macroblocks, MACs of the other model (ResNet-20's 31M
    for ResNet-56's 96M), without a word."""
    from onnx_mbs.passes import CostModel, activation_sites, analyze_channels

    raw, other = _two_stage(8), load_model(_two_stage(16, seed=1))
    model = load_model(raw)
    theirs = analyze_model(other)
    for use in (analyze_channels, activation_sites, lambda m, a: CostModel.build(m, None, a)):
        with pytest.raises(ValueError, match="ModelAnalysis was computed on another model"):
            use(model, theirs)
    # the model's own, computed on it as read or in load_model form, is taken
    for analysis in (analyze_model(model), analyze_model(raw)):
        for m in (model, raw):
            assert _groups(analyze_channels(m, analysis)) == _groups(analyze_channels(m))
            assert activation_sites(m, analysis) == activation_sites(model, analyze_model(model))
            assert CostModel.build(m, None, analysis)({}) == CostModel.build(model)({})


def test_a_weight_written_once_per_cut_counts_in_the_reduced_table():
    """A conv applied twice (one weight, two nodes) that the plan cuts differently is
    written as two weights; the report's per-macroblock params read the reduced model's
    own weight names, so the copy counts (the table said 3928 where the written convs
    held 9112, while the total said 108%)."""
    from onnx import numpy_helper

    from onnx_mbs.passes.analysis import analyze_model, resized
    from onnx_mbs.passes.load import load

    rng = np.random.default_rng(0)
    weights = {
        "wa": rng.normal(size=(4, 3, 3, 3)),
        "ws": rng.normal(size=(4, 4, 3, 3)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="a", pads=[1] * 4),
        helper.make_node("Conv", ["a", "ws"], ["s1"], name="s1", pads=[1] * 4),
        helper.make_node("Conv", ["s1", "ws"], ["y"], name="s2", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = analyze_model(load(model).model)
    assert before.macroblocks[0].params == 4 * 27 + 4 * 36  # the shared weight once
    untied = onnx.ModelProto()
    untied.CopyFrom(model)
    untied.graph.initializer.append(
        numpy_helper.from_array(weights["ws"].astype(np.float32), "ws__1")
    )
    untied.graph.node[2].input[1] = "ws__1"
    after = resized(before, load(untied).model)
    assert after.macroblocks[0].params == 4 * 27 + 2 * 4 * 36
    assert after.macroblocks == analyze_model(load(untied).model).macroblocks


@pytest.mark.parametrize("rescaled", [False, True, "padded"])
def test_nhwc_input_image_size_is_its_height_and_width(rescaled):
    # tf2onnx writes a Keras model's input NHWC, (N, H, W, C), and transposes it to NCHW: its
    # image size is H and W, as the same net's NCHW input's. It was read from dims 2 and 3
    # (W and C): 16 for a 40x16 input, so the global reading's bases were measured against
    # the wrong limit.
    def net(nhwc: bool) -> onnx.ModelProto:
        b = graphs.Builder()
        x = b.input("x", [1, 40, 16, 3] if nhwc else [1, 3, 40, 16])
        if nhwc:
            if rescaled:
                x = b.op("Mul", [x, b.const(np.float32(1 / 255))])
            if rescaled == "padded":  # tf2onnx without its optimiser: Pad H and W first
                x = b.op("Pad", [x, b.const(np.array([0, 1, 1, 0, 0, 1, 1, 0]))])
            x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
        elif rescaled == "padded":
            x = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
        for k in range(10):  # receptive fields up to 21: past 16, within 40
            x = b.op("Relu", [b.conv(x, 3 if k == 0 else 8, 8)])
        return b.model([b.gap_head(x, 8, 4)], ["logits"])

    nchw, nhwc = analyze_model(load_model(net(False))), analyze_model(load_model(net(True)))
    assert nchw.image_size == 40
    assert nhwc.image_size == nchw.image_size

    def bases(a):
        return [len(m.base_layers) for m in a.macroblocks]

    assert bases(nhwc) == bases(nchw) == [10]  # 7 when measured against 16
    assert [x.global_receptive_field for x in nhwc.layers] == [
        x.global_receptive_field for x in nchw.layers
    ]


def _nodes_in_order(model: onnx.ModelProto, pick) -> onnx.ModelProto:
    """`model` with its nodes in another topological order: `pick` chooses among the ready."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    waiting, ordered = list(model.graph.node), []
    while waiting:
        node = pick([n for n in waiting if all(x in known or not x for x in n.input)])
        waiting.remove(node)
        ordered.append(node)
        known.update(node.output)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def test_a_macroblocks_base_does_not_follow_the_order_nodes_are_listed_in(bundled_model_path):
    """A projection shortcut and the block's first conv both start the 7x7 macroblock of the
    bundled ResNet-20; an exporter that lists the shortcut first computes the same function,
    and gets the same base and redundancy (it used to get the shortcut alone as its base)."""
    model = onnx.load(str(bundled_model_path))
    listed = analyze_model(model)
    shortcut_first = analyze_model(_nodes_in_order(model, lambda ready: ready[-1]))
    for a, b in zip(listed.macroblocks, shortcut_first.macroblocks, strict=True):
        assert set(a.layers) == set(b.layers)
        assert set(a.base_layers) == set(b.base_layers)
    seven = listed.macroblocks[2]
    assert {n.split("/")[-2] for n in seven.base_layers} >= {"conv1.0", "shortcut.0"}


def _conv_in_if_net() -> onnx.ModelProto:
    """conv, then an If whose then-branch convolves the conv's output (8x8x8 by 3x3, 36864
    MACs: more than the rest of the model), then a stride-2 conv and a Gemm head."""
    b = graphs.Builder("conv_in_if", 4)
    x = b.op("Relu", [b.conv(b.input("x", [1, 3, 8, 8]), 3, 8, name="c1")])
    inner = helper.make_node(
        "Conv", [x, b.weight(8, 8, 3, 3)], ["t"], name="inner", kernel_shape=[3, 3], pads=[1] * 4
    )
    out = onnx.TensorProto.FLOAT
    then = helper.make_graph([inner], "then", [], [helper.make_tensor_value_info("t", out, None)])
    other = helper.make_graph(
        [helper.make_node("Identity", [x], ["e"], name="eid")],
        "else",
        [],
        [helper.make_tensor_value_info("e", out, None)],
    )
    b.nodes.append(
        helper.make_node(
            "If", [b.input("flag", [])], ["ifo"], name="if", then_branch=then, else_branch=other
        )
    )
    b.inputs[-1].type.tensor_type.elem_type = onnx.TensorProto.BOOL
    y = b.op("Relu", [b.conv("ifo", 8, 16, stride=2, name="c2")])
    return b.model([b.gap_head(y, 16, 10)])


def test_a_conv_inside_an_if_branch_is_said_to_be_uncounted(tmp_path, capsys):
    """A Conv in an If branch was silently left out of the MACs (32K of a 69K-MAC model
    reported, `reduce`'s kept fraction of MACs over the part counted): its MACs depend on the
    branch taken (a Loop's on its trip count), so they are not counted, and analyze and the
    reduce notes say so, naming it."""
    raw = _conv_in_if_net()
    analysis = analyze_model(load_model(raw))
    assert [x.name for x in analysis.layers] == ["c1", "c2"]
    assert analysis.uncounted == ["Conv 'inner' (inside If 'if')"]
    onnx.save(raw, tmp_path / "m.onnx")
    assert main(["analyze", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "MACs not counted: 1 Conv (inside If/Loop/Scan subgraphs" in out


def test_a_weight_held_inside_an_if_branch_counts_as_a_parameter():
    """The branch's conv weight stored in the branch itself (an initializer of the subgraph)
    was left out of the parameter count (1562 said of 2138): it is the same learned weight
    as when the main graph holds it."""
    raw = _conv_in_if_net()
    before = analyze_model(load_model(raw)).total_params
    (branch,) = [n for n in raw.graph.node if n.op_type == "If"]
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    (weight,) = [t for t in raw.graph.initializer if t.name == then.node[0].input[1]]
    then.initializer.append(weight)
    raw.graph.initializer.remove(weight)
    assert analyze_model(load_model(raw)).total_params == before == 2138


def test_weights_of_unnamed_if_nodes_with_like_named_branches_each_count():
    """Two If nodes without names (names are optional), their branches named alike, each
    holding its own 3-value weight "w": 12 parameters, not the 6 that one key per
    (node name, branch name, weight name) left after the collisions."""
    from onnx_mbs.passes import count_parameters

    def branch(name: str, value: float) -> onnx.GraphProto:
        w = onnx.numpy_helper.from_array(np.full(3, value, np.float32), "w")
        out = helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [3])
        return helper.make_graph([helper.make_node("Mul", ["x", "w"], ["o"])], name, [], [out], [w])

    nodes = [
        helper.make_node(
            "If", ["c"], [f"y{i}"], then_branch=branch("then", 1.0), else_branch=branch("then", 2.0)
        )
        for i in range(2)
    ]
    graph = helper.make_graph(
        [*nodes, helper.make_node("Add", ["y0", "y1"], ["y"])],
        "ifs",
        [
            helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    assert count_parameters(model) == 12


@pytest.mark.parametrize(("scale", "params"), [(1.0, 0), (2.0, 6)], ids=["no-affine", "affine"])
def test_an_instancenorm_inside_an_if_branch_counts_as_in_the_main_graph(scale, params):
    """An InstanceNormalization of ones and zeros (torch's GroupNorm and affine-free
    InstanceNorm) holds no parameter in the main graph; inside an If branch its scale and
    bias were counted (6), the branch's constants not read for the rule; held by the main
    graph and read only in the branches, they counted too."""
    from onnx_mbs.passes import count_parameters

    def norm(graph_name: str, inputs: list, output: str) -> onnx.GraphProto:
        weights = [
            onnx.numpy_helper.from_array(np.full(3, v, np.float32), n)
            for n, v in (("s", scale), ("b", 0.0))
        ]
        node = helper.make_node("InstanceNormalization", ["x", "s", "b"], [output])
        out = helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [1, 3, 4, 4])
        return helper.make_graph([node], graph_name, inputs, [out], weights)

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    main_graph = norm("main", [x], "y")
    branch = helper.make_node(
        "If", ["c"], ["y"], then_branch=norm("then", [], "o"), else_branch=norm("else", [], "o")
    )
    cond = helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    in_if = helper.make_graph([branch], "in_if", [cond, x], [out])
    # held by the main graph, read only by the branches (outer scope): the same rule
    then, other = norm("then", [], "o"), norm("else", [], "o")
    weights = list(then.initializer)
    del then.initializer[:], other.initializer[:]
    outer = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "outer",
        [cond, x],
        [out],
        weights,
    )
    opsets = [helper.make_opsetid("", 13)]
    for graph, count in ((main_graph, params), (in_if, 2 * params), (outer, params)):
        model = helper.make_model(graph, opset_imports=opsets)
        onnx.checker.check_model(model, full_check=True)
        assert count_parameters(model) == count
