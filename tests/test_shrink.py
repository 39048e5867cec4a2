"""The shrink pass on zoo models and deployment-shaped graphs.

The central check is dead channels: zero every producing filter (and bias, BN
beta and mean, added constant) of some channels, so they are exactly 0
everywhere in their group; removing exactly those channels must leave the
outputs unchanged, and every tensor of the group must lose exactly them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FORMS, REDUCIBLE_ZOO, SMALL_ZOO
from graphs import (
    HAND_BUILT,
    Builder,
    assert_runs_at_declared_shapes,
    assert_same_outputs,
    kill_channels,
    load_unfolded,
    overridable_conv_net,
    random_feeds,
    run,
)
from onnx_builders import conv_relu_model

from onnx_mbs.passes import BadInputError, count_parameters, load, load_model
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.fold import FoldShapes
from onnx_mbs.passes.graph import GraphIndex
from onnx_mbs.passes.importance import FilterNorm, choose_channels
from onnx_mbs.passes.shrink import predicted_params, shrink_channels


def load_hand_built(name: str) -> onnx.ModelProto:
    build, shapes = HAND_BUILT[name]
    return FoldShapes()(load_model(build(), shapes)).model


def check_dead_channels(model: onnx.ModelProto, seed: int = 0, fraction: float = 0.4) -> None:
    """Kill a random part of every unpinned group, shrink them away, compare."""
    analysis = analyze_channels(model)
    rng = np.random.default_rng(seed)
    drop, keep = {}, {}
    for g in analysis.groups:
        if g.pinned or g.size < 2:
            continue
        n = max(1, int(g.size * fraction))
        dropped = np.sort(rng.choice(g.size, size=n, replace=False))
        drop[g.id] = dropped.tolist()
        keep[g.id] = np.setdiff1d(np.arange(g.size), dropped).tolist()
    assert drop, "nothing to drop"
    killed = kill_channels(model, analysis.groups, drop)
    small = shrink_channels(killed, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert_same_outputs(killed, small)
    assert count_parameters(small) == predicted_params(killed, keep, analysis)
    # Exactly the dropped channels are gone from every tensor of their group; shapes
    # are re-inferred from scratch to check the recorded ones.
    before = GraphIndex.build(model).shapes
    reinferred = onnx.ModelProto()
    reinferred.CopyFrom(small)
    del reinferred.graph.value_info[:]
    after = GraphIndex.build(load_model(reinferred)).shapes
    lost: dict[str, int] = {}  # a Concat or Split input carries several groups
    for gid, dropped in drop.items():
        for m in analysis.groups[gid].members:
            if m.role == "activation":
                lost[m.tensor] = lost.get(m.tensor, 0) + len(dropped) * m.width
    for name, (axis, _) in analysis.tensors.items():
        if name in after:
            assert after[name][axis] == before[name][axis] - lost.get(name, 0), name


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_keep_everything_is_identical(zoo_onnx, name, form):
    model = load_model(zoo_onnx(name, form))
    analysis = analyze_channels(model)
    everything = {g.id: list(range(g.size)) for g in analysis.groups}
    same = shrink_channels(model, everything, analysis)
    feeds = random_feeds(model)
    for x, y in zip(run(model, feeds), run(same, feeds)):
        assert np.abs(x - y).max() <= 1e-5
    assert [n.name for n in same.graph.node] == [n.name for n in model.graph.node]
    assert same.graph.initializer == model.graph.initializer
    assert same.opset_import == model.opset_import


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", REDUCIBLE_ZOO)
def test_dead_channels_zoo(zoo_onnx, name, form):
    check_dead_channels(load_model(zoo_onnx(name, form)))


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_dead_channels_hand_built(name):
    check_dead_channels(load_hand_built(name), seed=1)


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_hand_built_shrink_to_half(name):
    model = load_hand_built(name)
    analysis = analyze_channels(model)
    free = [g for g in analysis.groups if not g.pinned]
    assert len(free) >= 2
    keep = choose_channels(free, {g.id: max(1, g.size // 2) for g in free}, FilterNorm(model))
    small = shrink_channels(model, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert [i.name for i in small.graph.input] == [i.name for i in model.graph.input]
    feeds = random_feeds(model)
    for vi, x, y in zip(model.graph.output, run(model, feeds), run(small, feeds)):
        assert x.shape == y.shape, vi.name
    assert count_parameters(small) < 0.5 * count_parameters(model)
    assert count_parameters(small) == predicted_params(model, keep, analysis)
    # Written as reduce writes it, it takes every shape the original declared.
    build, shapes = HAND_BUILT[name]
    read = load(build(), shapes)
    written = read.written(shrink_channels(read.model, keep, analyze_channels(read.model)))
    start = shapes and shapes["input"]
    assert_runs_at_declared_shapes(build(), written, start)


@pytest.mark.parametrize("stored", [False, True])
def test_overridable_initializers_keep_their_declared_shapes(stored):
    """Cut to half, a model whose conv1 weight and bias are graph inputs too still takes
    them at the original's shapes, and an override still changes what it computes (the
    weight stored in fp16 behind a Cast too)."""
    original = overridable_conv_net(stored=stored)
    read = load(original, {"x": [1, 3, 8, 8]})
    analysis = analyze_channels(read.model)
    free = [g for g in analysis.groups if not g.pinned]
    keep = choose_channels(free, {g.id: g.size // 2 for g in free}, FilterNorm(read.model))
    written = read.written(shrink_channels(read.model, keep, analysis))
    onnx.checker.check_model(written, full_check=True)
    assert count_parameters(written) < count_parameters(original)
    declared = {vi.name: vi.type.tensor_type.shape for vi in original.graph.input}
    assert {vi.name: vi.type.tensor_type.shape for vi in written.graph.input} == declared
    values = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    plain = run(written, {"x": x})[0]
    listed = [vi.name for vi in original.graph.input if vi.name in values]
    feeds = {"x": x, **{name: 2 * values[name] for name in listed}}
    overridden = run(written, feeds)[0]
    assert overridden.shape == plain.shape == (2, 4, 8, 8)
    assert not np.allclose(overridden, plain)


def test_dynamic_input_model_needs_input_shapes():
    build, shapes = HAND_BUILT["dynamic_input_model"]
    with pytest.raises(BadInputError, match="input_shapes="):
        load_model(build())
    model = load_model(build(), shapes)
    analysis = analyze_channels(model)
    assert sum(not g.pinned for g in analysis.groups) == 3


def test_a_plainly_loaded_model_keeps_its_declared_io(bundled_model_path):
    """`shrink_channels(onnx.load(path), keep)`: the batch stays dynamic (issue 25)."""
    raw = onnx.load(bundled_model_path)
    analysis = analyze_channels(raw)
    keep = {g.id: list(range(g.size // 2)) for g in analysis.groups if not g.pinned}
    small = shrink_channels(raw, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert count_parameters(small) < 0.5 * count_parameters(raw)
    assert_runs_at_declared_shapes(raw, small)


def test_input_model_is_not_modified():
    model = load_hand_built("yolov8_c2f_like")
    before = model.SerializeToString()
    analysis = analyze_channels(model)
    keep = {g.id: [0] for g in analysis.groups if not g.pinned}
    shrink_channels(model, keep, analysis)
    assert model.SerializeToString() == before


def test_metadata_names_and_opset_are_kept():
    model = load_hand_built("mobilenetv3_like")
    onnx.helper.set_model_props(model, {"author": "test", "onnx_mbs.mean": "0.5"})
    model.graph.doc_string = "graph doc"
    analysis = analyze_channels(model)
    keep = {g.id: [0, 1] for g in analysis.groups if not g.pinned}
    small = shrink_channels(model, keep, analysis)
    assert small.metadata_props == model.metadata_props
    assert small.opset_import == model.opset_import and small.ir_version == model.ir_version
    assert small.graph.doc_string == "graph doc"
    assert [n.name for n in small.graph.node] == [n.name for n in model.graph.node]
    assert [o.name for o in small.graph.output] == ["logits"]


@pytest.mark.parametrize("stored", [False, True])
def test_cut_weights_keep_their_doc_string_and_metadata(stored):
    """What a model says about a weight (its doc_string and metadata_props, IR 10) stays with
    the weight once cut: the doc_string did, the metadata_props were dropped (both when the
    weight is stored in fp16 behind a Cast)."""
    model = conv_relu_model()
    weight = next(t for t in model.graph.initializer if t.name == "w")
    if stored:
        half = onnx.numpy_helper.to_array(weight).astype(np.float16)
        weight.CopyFrom(onnx.numpy_helper.from_array(half, "w16"))
        cast = onnx.helper.make_node("Cast", ["w16"], ["w"], to=onnx.TensorProto.FLOAT)
        model.graph.node.insert(0, cast)
    weight.doc_string = "conv weight"
    weight.metadata_props.add(key="origin", value="layer1")
    analysis = analyze_channels(model)
    keep = {g.id: [0, 1] for g in analysis.groups if not g.pinned}
    small = shrink_channels(model, keep, analysis)
    cut = next(t for t in small.graph.initializer if t.name == weight.name)
    assert cut.dims[0] == 2
    assert cut.doc_string == "conv weight"
    assert [(p.key, p.value) for p in cut.metadata_props] == [("origin", "layer1")]


def shared_weight_model() -> onnx.ModelProto:
    """Two convs read one weight, one directly and one through Identity (as exporters
    deduplicate equal tensors); a third pair shares a bias the same way."""
    b = Builder("shared")
    x = b.input("x", [1, 3, 6, 6])
    w = b.weight(4, 3, 3, 3, base="shared_w")
    bias = b.const(np.linspace(-1, 1, 4, dtype=np.float32), "shared_b")
    alias = b.op("Identity", [w], name="alias")
    p = b.op("Relu", [b.op("Conv", [x, w, bias], name="conv_p", pads=[1, 1, 1, 1])])
    q = b.op("Relu", [b.op("Conv", [x, alias, bias], name="conv_q", pads=[1, 1, 1, 1])])
    y = b.op("Add", [b.conv(p, 4, 2, name="head_p"), b.conv(q, 4, 2, name="head_q")])
    return load_model(b.model([y], ["y"]))


def test_shared_initializer_cut_differently_is_split():
    model = shared_weight_model()
    analysis = analyze_channels(model)
    gp = next(g for g in analysis.groups if "conv_p" in g.producers)
    gq = next(g for g in analysis.groups if "conv_q" in g.producers)
    assert gp is not gq
    drop, keep = {gp.id: [0], gq.id: [1, 2]}, {gp.id: [1, 2, 3], gq.id: [0, 3]}
    killed = kill_channels(model, analysis.groups, drop)
    small = shrink_channels(killed, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert_same_outputs(killed, small)
    conv_p = next(n for n in small.graph.node if n.name == "conv_p")
    conv_q = next(n for n in small.graph.node if n.name == "conv_q")
    shapes = {t.name: list(t.dims) for t in small.graph.initializer}
    assert shapes[conv_p.input[1]] == [3, 3, 3, 3] and shapes[conv_q.input[1]] == [2, 3, 3, 3]
    assert shapes[conv_p.input[2]] == [3] and shapes[conv_q.input[2]] == [2]
    assert count_parameters(small) == predicted_params(killed, keep, analysis)


def test_shared_initializer_cut_alike_stays_shared():
    model = shared_weight_model()
    analysis = analyze_channels(model)
    keep = {g.id: [1, 3] for g in analysis.groups if g.producers[:1] in (["conv_p"], ["conv_q"])}
    small = shrink_channels(model, keep, analysis)
    names = {t.name for t in small.graph.initializer}
    assert len(names) == len(model.graph.initializer)
    conv_p = next(n for n in small.graph.node if n.name == "conv_p")
    conv_q = next(n for n in small.graph.node if n.name == "conv_q")
    assert conv_q.input[1] == conv_p.input[1]  # still one tensor (loading collapsed the Identity)
    assert count_parameters(small) == predicted_params(model, keep, analysis)


def test_per_channel_constant_node_is_sliced():
    b = Builder("const_node")
    x = b.input("x", [1, 3, 6, 6])
    scale = np.linspace(0.5, 2.0, 5, dtype=np.float32).reshape(1, 5, 1, 1)
    const = b.op("Constant", [], name="scale", value=onnx.numpy_helper.from_array(scale))
    shift = b.const(np.linspace(-1, 1, 5, dtype=np.float32).reshape(5, 1, 1), "shift")
    y = b.op("Add", [b.op("Mul", [b.conv(x, 3, 5, name="conv"), const]), shift])
    model = load_model(b.model([b.conv(b.op("Relu", [y]), 5, 2)], ["y"]))
    analysis = analyze_channels(model)
    group = next(g for g in analysis.groups if g.producers == ["conv"])
    assert {m.role for m in group.members} >= {"scale", "shift"}
    killed = kill_channels(model, analysis.groups, {group.id: [0, 4]})
    small = shrink_channels(killed, {group.id: [1, 2, 3]}, analysis)
    assert_same_outputs(killed, small)
    # loading made the Constant an initializer (named by its output); it is sliced
    sliced = next(t for t in small.graph.initializer if t.name == const)
    assert list(sliced.dims) == [1, 3, 1, 1]


def test_fold_shapes_keeps_outputs_and_removes_shape_ops():
    model = load_unfolded(HAND_BUILT["shape_arith_head"][0]())
    folded = FoldShapes()(model)
    assert folded.modified
    ops = [n.op_type for n in folded.model.graph.node]
    assert "Shape" not in ops and "Gather" not in ops and "Reshape" in ops
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)
    assert not FoldShapes()(folded.model).modified


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_fold_shapes_on_zoo_exports(zoo_onnx, name):
    """Exports carry Constant nodes (shuffle shapes, split sizes): folding turns those that
    feed shape arithmetic into initializers without changing outputs or channel groups;
    a Constant read only by ops that stay (Clip bounds) stays a Constant."""
    model = load_unfolded(zoo_onnx(name, "deploy"))
    folded = FoldShapes()(model).model
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)
    assert not any(n.op_type == "Shape" for n in folded.graph.node)
    # Folding adds no parameters: Constants read only by ops that stay (Clip bounds)
    # are left as they are instead of becoming float initializers.
    assert count_parameters(folded) == count_parameters(model)
    before, after = analyze_channels(model).groups, analyze_channels(folded).groups
    assert [(g.size, g.pinned) for g in before] == [(g.size, g.pinned) for g in after]
    if name in REDUCIBLE_ZOO:
        check_dead_channels(folded, seed=2)


@pytest.mark.parametrize("axes", [[2, 3], [-3, 2, 3]])
def test_resize_sizes_with_axes_edit_the_channel_entry(axes):
    """Opset 18 Resize: `sizes` has one entry per axis of `axes`. Cutting channels edits
    the channel axis's entry where `axes` names it and nothing where it does not (the
    last entry is a width, not the channel count)."""
    b = Builder("resize_axes")
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 6, name="conv")])
    sizes = [16, 16] if len(axes) == 2 else [6, 16, 16]
    y = b.op("Resize", [y, "", "", b.const(np.array(sizes, np.int64))], mode="nearest", axes=axes)
    raw = b.model([b.conv(b.op("Relu", [b.conv(y, 6, 4, stride=2)]), 4, 2, k=1)], ["y"])
    raw.opset_import[0].version = 18
    model = load_model(raw)
    analysis = analyze_channels(model)
    group = next(g for g in analysis.groups if g.producers == ["conv"])
    assert not group.pinned
    everything = {g.id: list(range(g.size)) for g in analysis.groups}
    assert_same_outputs(model, shrink_channels(model, everything, analysis))
    killed = kill_channels(model, analysis.groups, {group.id: [0, 5]})
    small = shrink_channels(killed, {group.id: [1, 2, 3, 4]}, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert_same_outputs(killed, small)


def test_computed_weight_chain_gets_its_new_shapes():
    """A conv weight computed in the graph (a Transpose from a TF-layout initializer, a
    sum of two, past the size folding evaluates): the tensors on the way record their cut
    shapes, so the shrunk model passes the full checker."""
    b = Builder("computed_weight")
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 32, name="first")])
    tf_layout = b.op("Transpose", [b.weight(3, 3, 32, 24)], perm=[3, 2, 0, 1])
    weight = b.op("Add", [tf_layout, b.weight(24, 32, 3, 3)])
    z = b.op("Conv", [y, weight, b.const(np.zeros(24))], name="computed", pads=[1] * 4)
    model = load_model(b.model([b.conv(b.op("Relu", [z]), 24, 2, k=1)], ["y"]))
    analysis = analyze_channels(model)
    first = next(g for g in analysis.groups if g.producers == ["first"])
    computed = next(g for g in analysis.groups if g.producers == ["computed"])
    assert not first.pinned and not computed.pinned
    drop = {first.id: [0, 5, 31], computed.id: [2, 3]}
    keep = {first.id: [c for c in range(32) if c not in drop[first.id]],
            computed.id: [c for c in range(24) if c not in drop[computed.id]]}  # fmt: skip
    killed = kill_channels(model, analysis.groups, drop)
    small = shrink_channels(killed, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert_same_outputs(killed, small)
    shapes = GraphIndex.build(small).shapes
    assert shapes[tf_layout] == shapes[weight] == (22, 29, 3, 3)


def _tied_weight(reader: str) -> onnx.ModelProto:
    """A weight computed in the graph (past the size folding evaluates) read by a conv and
    by `reader`: a second conv ("conv", its channels made in another group), the transposed
    conv of a tied autoencoder ("deconv"), or a weight penalty ("penalty")."""
    b = Builder("tied")
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 16, name="stem")])
    weight = b.op("Mul", [b.weight(32, 16, 3, 3), b.const(np.float32(0.5))])
    y = b.op("Relu", [b.op("Conv", [h, weight], name="first", pads=[1] * 4)])
    outputs = [b.conv(y, 32, 2, k=1)]
    if reader == "conv":
        z = b.op("Relu", [b.op("Conv", [h, weight], name="second", pads=[1] * 4, strides=[2, 2])])
        outputs.append(b.conv(z, 32, 2, k=1))
    elif reader == "deconv":
        z = b.op("Relu", [b.op("ConvTranspose", [y, weight], name="second", pads=[1] * 4)])
        outputs.append(b.conv(z, 16, 2, k=1))
    else:
        outputs.append(b.op("ReduceSum", [b.op("Mul", [weight, weight])], keepdims=0))
    return b.model(outputs, ["y", "z"])


@pytest.mark.parametrize("reader", ["conv", "deconv", "penalty"])
def test_a_computed_weight_read_elsewhere_too_is_kept_whole(reader):
    """Each conv followed its computed weight alone: the cut of the last one won, and the
    other reader read a weight of another shape (a model onnxruntime refuses, or that fails
    the checker). Such a weight is now kept whole, naming the other reader."""
    model = load_model(_tied_weight(reader))
    analysis = analyze_channels(model)
    first = next(g for g in analysis.groups if any(m.tensor == "first_out" for m in g.members))
    assert first.pinned
    assert any("is read by" in r and "too" in r for r in first.pin_reasons), first.pin_reasons
    free = [g for g in analysis.groups if not g.pinned and g.size > 1]
    drop = {g.id: [0, 1 + k] for k, g in enumerate(free)}  # each group its own cut
    keep = {g.id: [c for c in range(g.size) if c not in drop[g.id]] for g in free}
    killed = kill_channels(model, analysis.groups, drop)
    small = shrink_channels(killed, keep, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert_same_outputs(killed, small)


@pytest.mark.parametrize("shape", [(6, 8, 8), (1, 6, 8, 8)])
def test_matmul_with_a_matrix_per_channel_cuts_it(shape):
    """x (N, C, H, W) @ B (C, W, K): B's batch axis broadcasts against the channels, so
    each channel has its own matrix, cut with it."""
    b = Builder("matmul_per_channel")
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 6, name="conv")])
    y = b.op("Relu", [b.op("MatMul", [y, b.weight(*shape)])])
    model = load_model(b.model([b.conv(y, 6, 2, k=1)], ["y"]))
    analysis = analyze_channels(model)
    group = next(g for g in analysis.groups if g.producers == ["conv"])
    assert not group.pinned
    killed = kill_channels(model, analysis.groups, {group.id: [0, 3, 4]})
    small = shrink_channels(killed, {group.id: [1, 2, 5]}, analysis)
    onnx.checker.check_model(small, full_check=True)
    assert_same_outputs(killed, small)
