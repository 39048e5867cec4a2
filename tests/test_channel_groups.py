"""Channel groups on small hand-built graphs: joins, segments, ties and pins."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import (
    Builder,
    assert_runs_at_declared_shapes,
    assert_same_outputs,
    kill_channels,
    load_unfolded,
    mobilenetv3_like,
    overridable_conv_net,
    run,
    shape_arith_head,
)

from onnx_mbs.passes import analyze_model, load_model
from onnx_mbs.passes.activations import activation_tensors
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.fold import FoldShapes
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.pipeline import reduce


def group_of(groups, tensor: str):
    """The groups with an activation member named `tensor` (one unless it is a concat)."""
    found = [g for g in groups if any(m.tensor == tensor for m in g.members)]
    assert found, f"no group has {tensor}"
    return found


def only_group(groups, tensor: str):
    found = group_of(groups, tensor)
    assert len(found) == 1, [g.id for g in found]
    return found[0]


def test_residual_join_is_one_group():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.conv(x, 3, 8, name="conv_a")
    c = b.conv(b.op("Relu", [a]), 8, 8, name="conv_b")
    s = b.op("Add", [a, c], name="join")
    y = b.conv(b.op("Relu", [s]), 8, 4, name="conv_c")
    model = load_model(b.model([y], ["y"]))
    groups = analyze_channels(model).groups
    joined = only_group(groups, s)
    assert joined.size == 8
    assert joined.producers == ["conv_a", "conv_b"]
    assert not joined.pinned and joined.joined
    roles = {(m.node, m.role, m.axis) for m in joined.members if m.role != "activation"}
    assert ("conv_a", "filters", 0) in roles and ("conv_b", "filters", 0) in roles
    assert ("conv_b", "weights_in", 1) in roles and ("conv_c", "weights_in", 1) in roles
    assert ("conv_a", "bias", 0) in roles
    # conv_b's input (the Relu of conv_a) is the same group as its output
    assert only_group(groups, b.nodes[1].output[0]) is joined
    out = only_group(groups, "y")
    assert out.pinned and out.pin_reasons == ["graph output 'y'"]


def test_concat_output_is_made_of_segments():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    p = b.op("Relu", [b.conv(x, 3, 4, name="conv_p")])
    q = b.op("Relu", [b.conv(x, 3, 6, name="conv_q")])
    cat = b.op("Concat", [p, q], name="cat", axis=1)
    y = b.conv(cat, 10, 2, name="conv_r")
    model = load_model(b.model([y], ["y"]))
    groups = analyze_channels(model).groups
    first, second = group_of(groups, cat)
    assert (first.size, second.size) == (4, 6)
    assert first.member(cat).positions.ravel().tolist() == [0, 1, 2, 3]
    assert second.member(cat).positions.ravel().tolist() == [4, 5, 6, 7, 8, 9]
    rows = [m for m in second.members if m.node == "conv_r"]
    assert len(rows) == 1 and rows[0].axis == 1
    assert rows[0].positions.ravel().tolist() == [4, 5, 6, 7, 8, 9]


def test_split_takes_segments_and_shrinks():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 8, name="conv")])
    sizes = b.const(np.array([3, 5], np.int64))
    left, right = b.op("Split", [y, sizes], n_out=2, name="split", axis=1)
    out = b.op("Add", [b.conv(left, 3, 4, name="l"), b.conv(right, 5, 4, name="r")])
    model = load_model(b.model([out], ["out"]))
    analysis = analyze_channels(model)
    g_left, g_right = only_group(analysis.groups, left), only_group(analysis.groups, right)
    assert (g_left.size, g_right.size) == (3, 5)
    rows = [m for m in g_right.members if m.node == "conv" and m.role == "filters"]
    assert rows[0].positions.ravel().tolist() == [3, 4, 5, 6, 7]
    drop = {g_left.id: [1], g_right.id: [0, 4]}
    keep = {g_left.id: [0, 2], g_right.id: [1, 2, 3]}
    killed = kill_channels(model, analysis.groups, drop)
    small = shrink_channels(killed, keep, analysis)
    split = next(n for n in small.graph.node if n.name == "split")
    sizes = next(t for t in small.graph.initializer if t.name == split.input[1])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [2, 3]
    assert_same_outputs(killed, small)


def test_depthwise_conv_ties_input_to_output():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 6, name="pw")])
    d = b.op("Relu", [b.conv(a, 6, 6, group=6, name="dw")])
    y = b.conv(d, 6, 2, k=1, name="out")
    model = load_model(b.model([y], ["y"]))
    analysis = analyze_channels(model)
    tied = only_group(analysis.groups, a)
    assert only_group(analysis.groups, d) is tied
    assert tied.producers == ["pw", "dw"] and tied.size == 6
    assert not tied.joined  # two producers, but the depthwise conv carries pw's channels on
    killed = kill_channels(model, analysis.groups, {tied.id: [0, 3, 4]})
    small = shrink_channels(killed, {tied.id: [1, 2, 5]}, analysis)
    dw = next(n for n in small.graph.node if n.name == "dw")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 3
    assert_same_outputs(killed, small)


def test_grouped_conv_keeps_whole_conv_groups():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 8, name="pw")])
    g = b.op("Relu", [b.conv(a, 8, 6, group=2, name="grouped")])
    y = b.conv(g, 6, 2, k=1, name="out")
    model = load_model(b.model([y], ["y"]))
    analysis = analyze_channels(model)
    blocks = only_group(analysis.groups, a)
    assert only_group(analysis.groups, g) is blocks
    assert blocks.size == 2  # two conv-groups, kept or dropped whole
    assert blocks.member(a).positions.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert blocks.member(g).positions.tolist() == [[0, 1, 2], [3, 4, 5]]
    killed = kill_channels(model, analysis.groups, {blocks.id: [0]})
    small = shrink_channels(killed, {blocks.id: [1]}, analysis)
    conv = next(n for n in small.graph.node if n.name == "grouped")
    assert onnx.helper.get_attribute_value(conv.attribute[-1]) == 1
    assert_same_outputs(killed, small)


def test_channel_shuffle_is_followed():
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    a = b.op("Relu", [b.conv(x, 3, 4, name="a")])
    c = b.op("Relu", [b.conv(x, 3, 4, name="c")])
    cat = b.op("Concat", [a, c], axis=1)
    r = b.op("Reshape", [cat, b.const(np.array([1, 2, 4, 4, 4], np.int64))], name="shuffle/r1")
    t = b.op("Transpose", [r], name="shuffle/t", perm=[0, 2, 1, 3, 4])
    s = b.op("Reshape", [t, b.const(np.array([1, 8, 4, 4], np.int64))], name="shuffle/r2")
    y = b.conv(s, 8, 2, k=1, name="out")
    model = load_model(b.model([y], ["y"]))
    analysis = analyze_channels(model)
    # Shuffled channel 2k is a[k], 2k+1 is c[k]: a[k] and c[k] stay or go together.
    shuffled = only_group(analysis.groups, s)
    assert shuffled is only_group(analysis.groups, a) is only_group(analysis.groups, c)
    assert shuffled.size == 4 and not shuffled.pinned
    assert shuffled.member(s).positions.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    killed = kill_channels(model, analysis.groups, {shuffled.id: [1, 2]})
    small = shrink_channels(killed, {shuffled.id: [0, 3]}, analysis)
    assert_same_outputs(killed, small)


def test_transpose_round_trip_is_followed():
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    a = b.op("Relu", [b.conv(x, 3, 6, name="a")])
    t = b.op("Transpose", [a], perm=[0, 2, 3, 1])  # NHWC: channels last
    t = b.op("Mul", [t, b.const(np.linspace(0.5, 1.5, 6, dtype=np.float32))], name="scale")
    back = b.op("Transpose", [t], perm=[0, 3, 1, 2])
    y = b.conv(back, 6, 2, name="out")
    model = load_model(b.model([y], ["y"]))
    analysis = analyze_channels(model)
    group = only_group(analysis.groups, a)
    assert not group.pinned
    assert [m.axis for m in group.members if m.role == "scale"] == [0]
    killed = kill_channels(model, analysis.groups, {group.id: [0, 5]})
    small = shrink_channels(killed, {group.id: [1, 2, 3, 4]}, analysis)
    assert_same_outputs(killed, small)


def test_op_over_transposed_channels_pins_with_its_name():
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    a = b.op("Relu", [b.conv(x, 3, 6, name="a")])
    t = b.op("Transpose", [a], name="to_nhwc", perm=[0, 2, 3, 1])
    s = b.op("Softmax", [t], name="channel_softmax", axis=-1)
    back = b.op("Transpose", [s], perm=[0, 3, 1, 2])
    y = b.conv(back, 6, 2, name="out")
    model = load_model(b.model([y], ["y"]))
    group = only_group(analyze_channels(model).groups, a)
    assert group.pinned
    assert group.pin_reasons == ["Softmax 'channel_softmax': normalizes over the channel axis"]


def test_custom_op_pins_with_its_name():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, 4, name="before")])
    z = b.op("MyOp", [y], name="weird", domain="custom.ops")
    after = b.op("Relu", [b.conv(z, 4, 4, name="after")])
    model = load_model(b.model([b.conv(after, 4, 2)], ["y"], shapes={z: [1, 4, 8, 8]}))
    groups = analyze_channels(model).groups
    reason = "MyOp 'weird': custom op (domain 'custom.ops') not followed"
    assert only_group(groups, y).pin_reasons == [reason]
    assert only_group(groups, z).pin_reasons == [reason]
    free = only_group(groups, after)  # past the custom op, channels are free again
    assert not free.pinned and free.producers == ["after"]


def test_graph_input_and_output_pin():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(b.op("Relu", [b.conv(x, 3, 4)]), 4, 5, name="last")
    model = load_model(b.model([y], ["y"]))
    groups = analyze_channels(model).groups
    assert only_group(groups, "x").pin_reasons == ["graph input 'x'"]
    assert only_group(groups, "y").pin_reasons == ["graph output 'y'"]
    assert [g.pinned for g in groups] == [True, False, True]


def test_overridable_initializer_pins_its_channels():
    """A weight also listed as a graph input may be fed by the caller at its declared
    shape: its channels stay whole, so the written model still takes it."""
    model = load_model(overridable_conv_net(), {"x": [1, 3, 8, 8]})
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    w, b = conv1.input[1:]
    groups = analyze_channels(model).groups
    made = only_group(groups, conv1.output[0])
    assert made.pin_reasons == [
        f"graph input '{w}' (an overridable initializer)",
        f"graph input '{b}' (an overridable initializer)",
    ]
    assert [g.pinned for g in groups] == [True, True, False, True]  # x, conv1, conv2, y


def test_overridable_shape_constant_pins_the_channels_it_counts():
    """A Reshape target the caller may feed counts the channels: a cut would rewrite it."""
    b = Builder()
    c1 = b.op("Relu", [b.conv(b.input("x", [1, 3, 8, 8]), 3, 16, name="conv1")])
    shape = b.const([1, 16, 64], "shape")
    flat = b.op("Reshape", [c1, shape], name="flat")
    back = b.op("Reshape", [flat, b.const([1, 16, 8, 8], "back")], name="unflat")
    model = b.model([b.conv(back, 16, 4, name="conv2")], ["y"])
    model.graph.input.append(onnx.helper.make_tensor_value_info(shape, onnx.TensorProto.INT64, [3]))
    groups = analyze_channels(load_model(model)).groups
    reason = f"graph input '{shape}' (an overridable initializer)"
    assert only_group(groups, c1).pin_reasons == [reason]


def test_se_gate_convs_follow_the_gated_map():
    model = load_model(mobilenetv3_like())
    groups = analyze_channels(model).groups
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    gated, gate = mul.input
    group = only_group(groups, gated)
    assert only_group(groups, gate) is group
    # expand conv, depthwise conv and the SE's second conv all produce these channels
    assert len(group.producers) == 3 and {"b1/expand", "b1/dw"} <= set(group.producers)
    assert not group.joined  # a gate scales the channels; no Add joins two copies of them
    assert group.macroblocks == [0]


def test_flatten_head_rows_are_channel_major():
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.op("Relu", [b.conv(x, 3, 5, stride=2, name="conv")])  # 5 x 2 x 2
    flat = b.op("Flatten", [y], axis=1)
    logits = b.op("Gemm", [flat, b.weight(3, 20), b.const(np.zeros(3))], name="fc", transB=1)
    model = load_model(b.model([logits], ["logits"]))
    analysis = analyze_channels(model)
    group = only_group(analysis.groups, y)
    rows = next(m for m in group.members if m.node == "fc")
    assert rows.axis == 1 and rows.width == 4
    assert rows.positions[2].tolist() == [8, 9, 10, 11]
    killed = kill_channels(model, analysis.groups, {group.id: [1, 2]})
    small = shrink_channels(killed, {group.id: [0, 3, 4]}, analysis)
    weight = next(n for n in small.graph.node if n.name == "fc").input[1]
    assert list(next(t for t in small.graph.initializer if t.name == weight).dims) == [3, 12]
    assert_same_outputs(killed, small)


def test_shape_read_at_run_time_pins_until_folded():
    model = load_unfolded(shape_arith_head())
    conv2 = next(n for n in model.graph.node if n.name == "conv2").output[0]
    pinned = only_group(analyze_channels(model).groups, conv2)
    assert pinned.pin_reasons == [
        "Shape 'head/shape': reads the channel count at run time (run FoldShapes)",
        "Reshape 'head/reshape': shape computed at run time (run FoldShapes first)",
    ]
    folded = FoldShapes()(model).model
    assert not only_group(analyze_channels(folded).groups, conv2).pinned


def test_macroblocks_of_groups():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 4, name="a")])  # 8x8
    c = b.op("Relu", [b.conv(a, 4, 6, stride=2, name="c")])  # 4x4
    y = b.conv(c, 6, 2, name="d")
    model = load_model(b.model([y], ["y"]))
    groups = analyze_channels(model).groups
    # A group belongs to where its channels are made: `a` is made at 8x8 and only read
    # by the 4x4 conv, so the 4x4 block's beta must not decide its width.
    assert only_group(groups, a).macroblocks == [0]
    assert only_group(groups, c).macroblocks == [1]


@pytest.mark.parametrize("bad", [{0: [0, 1]}, {1: []}, {1: [2, 1]}, {1: [0, 9]}, {7: [0]}])
def test_bad_keep_plans_are_refused(bad):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(b.op("Relu", [b.conv(x, 3, 4)]), 4, 2)
    model = load_model(b.model([y], ["y"]))
    with pytest.raises(ValueError, match="group"):
        shrink_channels(model, bad)


def groupnorm_net(target: list[int]) -> onnx.ModelProto:
    """conv (16) -> GroupNorm(4, 16) as torch exports it -> Relu -> conv: Reshape to
    `target`, InstanceNormalization with ones and zeros over the 4 groups, Reshape back to
    the conv output's Shape, then gamma and beta as Mul and Add."""
    b = Builder("groupnorm")
    x = b.input("x", [1, 3, 8, 8])
    a = b.conv(x, 3, 16, name="a")
    r = b.op("Reshape", [a, b.const(np.array(target, np.int64))], name="gn/to_groups")
    n = b.op("InstanceNormalization", [r, b.const(np.ones(4)), b.const(np.zeros(4))], name="gn")
    back = b.op("Reshape", [n, b.op("Shape", [a])], name="gn/back")
    gamma = b.const(b.rng.uniform(0.5, 1.5, (16, 1, 1)), "gamma")
    beta = b.const(b.rng.normal(0, 0.5, (16, 1, 1)), "beta")
    y = b.op("Add", [b.op("Mul", [back, gamma]), beta], name="gn/affine")
    return load_model(b.model([b.conv(b.op("Relu", [y]), 16, 2, name="out")], ["y"]))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    return out


def numpy_groupnorm(x: np.ndarray, groups: int, gamma: np.ndarray, beta: np.ndarray):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1).astype(np.float64)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(x.shape) * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)


@pytest.mark.parametrize("target", [[0, 4, -1], [1, 4, 4, 8, 8]], ids=["n-g-rest", "n-g-c-h-w"])
def test_groupnorm_as_exported_cuts_the_same_channels_from_every_group(target):
    """A class is channel j of each of the 4 groups: a cut takes k from every group, the
    written GroupNorm keeps its 4 groups (InstanceNormalization scale and bias stay) and
    computes GroupNorm over the kept channels; that changes their statistics, so the
    group says it is not exact."""
    model = groupnorm_net(target)
    analysis = analyze_channels(model)
    group = next(g for g in analysis.groups if "a" in g.producers)
    assert not group.pinned and group.size == 4
    assert group.member(model.graph.node[0].output[0]).positions.tolist() == [
        [j, j + 4, j + 8, j + 12] for j in range(4)
    ]
    assert len(group.inexact) == 1 and group.inexact[0].startswith("InstanceNormalization 'gn'")
    assert_same_outputs(model, shrink_channels(model, {group.id: range(4)}, analysis))

    small = shrink_channels(model, {group.id: [1, 3]}, analysis)
    onnx.checker.check_model(small, full_check=True)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in small.graph.initializer}
    norm = next(n for n in small.graph.node if n.op_type == "InstanceNormalization")
    assert weights[norm.input[1]].shape == (4,)
    assert weights[small.graph.node[0].input[1]].shape == (8, 3, 3, 3)  # 2 of each group of 4

    conv, affine = model.graph.node[0].output[0], "gn/affine_out"
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    full, _ = run(with_outputs(model, [conv]), x, [conv, "y"])
    (written,) = run(with_outputs(small, [affine]), x, [affine])
    kept = np.array([1, 3, 5, 7, 9, 11, 13, 15])  # classes 1 and 3 of each group
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    add = next(n for n in model.graph.node if n.name == "gn/affine")
    mul = next(n for n in model.graph.node if n.output[0] == add.input[0])
    gamma, beta = (original[name].reshape(-1)[kept] for name in (mul.input[1], add.input[1]))
    expected = numpy_groupnorm(full[:, kept], 4, gamma, beta)
    np.testing.assert_allclose(written, expected, atol=1e-4)


def test_instance_norm_with_scale_computed_at_run_time_pins():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    scale = b.input("scale", [4])
    a = b.conv(x, 3, 16, name="a")
    r = b.op("Reshape", [a, b.const(np.array([0, 4, -1], np.int64))])
    n = b.op("InstanceNormalization", [r, scale, b.const(np.zeros(4))], name="gn")
    back = b.op("Reshape", [n, b.const(np.array([1, 16, 8, 8], np.int64))])
    model = load_model(b.model([b.conv(back, 16, 2, name="out")], ["y"]))
    group = next(g for g in analyze_channels(model).groups if "a" in g.producers)
    assert group.pinned
    assert any(r.startswith("InstanceNormalization 'gn'") for r in group.pin_reasons)


def test_rho_of_a_conv_before_groupnorm_is_read_after_it():
    """The exported GroupNorm keeps every value where it was (Reshape, InstanceNormalization,
    Reshape back to the same shape): the conv's activation is the Relu after it."""
    model = groupnorm_net([0, 4, -1])
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    assert activation_tensors(model, analyze_model(model))["a"] == relu.output[0]


def siamese_net(head: str = "distance") -> onnx.ModelProto:
    """Two inputs through one tower (every conv's weight and bias read by two Convs, the
    head's by two Gemms, as torch exports a module called twice), then |f(a) - f(b)|^2;
    or, `head` "concat", the towers' maps concatenated and read by one conv (stereo)."""
    b = Builder("siamese")
    shared = {}

    def tower(x: str, side: str) -> str:
        for k, (cin, cout, stride) in enumerate([(3, 16, 1), (16, 32, 2), (32, 32, 1)]):
            if k not in shared:
                shared[k] = (b.weight(cout, cin, 3, 3), b.const(b.rng.normal(0, 0.1, cout)))
            conv = b.op("Conv", [x, *shared[k]], name=f"{side}{k}", kernel_shape=[3, 3],
                        strides=[stride] * 2, pads=[1] * 4)  # fmt: skip
            x = b.op("Relu", [conv])
        if head == "concat":
            return x
        if "head" not in shared:
            shared["head"] = (b.weight(8, 32), b.const(b.rng.normal(0, 0.1, 8)))
        pooled = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
        return b.op("Gemm", [pooled, *shared["head"]], name=f"{side}_head", transB=1)

    fa, fb = tower(b.input("a", ["n", 3, 16, 16]), "a"), tower(b.input("b", ["n", 3, 16, 16]), "b")
    if head == "concat":
        joined = b.op("Relu", [b.conv(b.op("Concat", [fa, fb], axis=1), 64, 32)])
        return b.model([b.conv(joined, 32, 1, k=1)], ["disparity"])
    diff = b.op("Sub", [fa, fb])
    distance = b.op("ReduceSum", [b.op("Mul", [diff, diff]), b.const(np.array([1]))], keepdims=1)
    return b.model([distance], ["d"])


def test_a_tower_applied_to_two_inputs_keeps_its_weights_tied(tmp_path):
    """A conv whose weights another conv reads too, with everything it cuts shared (a
    siamese tower, a shared encoder) is one group with its twin: both keep the same
    channels. As two groups, the cost model counted a copy of each shared weight that
    shrink did not write (params=0.7 wrote 36% of the parameters), and the act
    importance cut the towers differently: the distance was no longer symmetric."""
    from conftest import write_npz

    from onnx_mbs.passes import count_parameters
    from onnx_mbs.pipeline import reduce

    model = siamese_net()
    analysis = analyze_channels(load_model(model))
    for k in range(3):
        assert only_group(analysis.groups, f"a{k}_out") is only_group(analysis.groups, f"b{k}_out")
    rng = np.random.default_rng(0)
    data = write_npz(
        tmp_path / "pairs.npz",
        a=rng.normal(size=(8, 3, 16, 16)).astype(np.float32),
        b=(3 * np.abs(rng.normal(size=(8, 3, 16, 16))) + 1).astype(np.float32),
    )
    for importance, source in (("l2", None), ("act", data)):
        small, report = reduce(
            model, source, budget="params=0.7", importance=importance, progress=False
        )
        assert 0.6 <= report.plan.reached["params"] <= 0.7
        assert report.plan.params[1] == count_parameters(small)
        weights = [t.name for t in small.graph.initializer]
        assert not [name for name in weights if "__" in name]  # no copies: the towers stay tied
        x, y = (rng.normal(size=(2, 3, 16, 16)).astype(np.float32) for _ in range(2))
        (forward,) = run(small, {"a": x, "b": y})
        (backward,) = run(small, {"a": y, "b": x})
        np.testing.assert_allclose(forward, backward, rtol=1e-5)


@pytest.mark.parametrize("head", ["distance", "concat"])
def test_the_macroblock_table_counts_a_shared_tower_once(head, tmp_path, capsys):
    """The tower appears in two macroblocks (one per input): each listed the tower's weights,
    so the blocks' params added up to more than the model has. A weight is counted once, in
    the first macroblock reading it, and the table says so; the reduce table too."""
    from onnx_mbs.cli import main
    from onnx_mbs.passes import count_parameters
    from onnx_mbs.pipeline import reduce

    model = load_model(siamese_net(head))
    analysis = analyze_model(model)
    convs = {t.name: t for t in model.graph.initializer}
    conv_params = sum(  # each conv weight and bias once
        int(np.prod(convs[name].dims))
        for name in {n for x in analysis.layers for n in (x.weight, x.bias) if n}
    )
    assert sum(m.params for m in analysis.macroblocks) == conv_params <= analysis.total_params
    assert analysis.macroblocks[2].params == 0  # the second input's first conv: a's
    onnx.save(siamese_net(head), tmp_path / "s.onnx")
    shapes = ["--input-shape", "a:1,3,16,16", "--input-shape", "b:1,3,16,16"]
    assert main(["analyze", str(tmp_path / "s.onnx"), *shapes]) == 0
    assert "shared weights are counted once" in capsys.readouterr().out
    small, report = reduce(siamese_net(head), budget="params=0.7", progress=False)
    after = report.after
    kept = {t.name: t for t in small.graph.initializer}
    written = sum(
        int(np.prod(kept[name].dims))
        for name in {n for x in after.layers for n in (x.weight, x.bias) if n}
    )
    assert sum(m.params for m in after.macroblocks) == written <= count_parameters(small)


def test_a_tower_whose_two_maps_one_head_reads_keeps_its_weights_tied():
    """The towers' last maps are read by one conv at different input channels (a stereo
    head): still one group (the last conv's weight was counted twice, params=0.7 wrote
    49% of a torch-exported stereo net)."""
    from onnx_mbs.passes import count_parameters
    from onnx_mbs.pipeline import reduce

    model = siamese_net("concat")
    analysis = analyze_channels(load_model(model))
    for k in range(3):
        assert only_group(analysis.groups, f"a{k}_out") is only_group(analysis.groups, f"b{k}_out")
    small, report = reduce(model, budget="params=0.7", progress=False)
    assert 0.6 <= report.plan.reached["params"] <= 0.7
    assert report.plan.params[1] == count_parameters(small)
    assert not [t.name for t in small.graph.initializer if "__" in t.name]
    assert_runs_at_declared_shapes(model, small, {"a": [1, 3, 16, 16], "b": [1, 3, 16, 16]})


@pytest.mark.parametrize("rescaled", [False, True, "padded first"])
def test_nhwc_input_channels_are_its_last_axis(rescaled):
    # tf2onnx writes a Keras model's NHWC input, a Rescaling Mul before it or not, through a
    # Transpose to NCHW and pads H and W before a VALID conv: the walk took the input's axis 1
    # (H) for its channels, and the Pad of H for one of the channel axis ("pads the channel
    # axis" in the report, which was false).
    b = Builder()
    x = b.input("x", [1, 8, 8, 3])
    if rescaled:
        x = b.op("Mul", [x, b.const(np.float32(1 / 255))])
    if rescaled == "padded first":  # tf2onnx without its optimiser: the Pad before the Transpose
        x = b.op("Pad", [x, b.const(np.array([0, 1, 1, 0, 0, 1, 1, 0]))], name="pad")
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    else:
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
        x = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], name="pad")
    x = b.op("Conv", [x, b.weight(4, 3, 3, 3)], kernel_shape=[3, 3], auto_pad="VALID")
    y = b.conv(b.op("Relu", [x]), 4, 5, name="last")
    groups = analyze_channels(load_model(b.model([y], ["y"]))).groups
    pinned = [g.pin_reasons for g in groups if g.pinned]
    assert pinned == [["graph input 'x'"], ["graph output 'y'"]]
    assert only_group(groups, "x").size == 3


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_cuts_whole_blocks_in_the_mode_order(mode):
    """A super-resolution upsampler (PixelShuffle, exported as DepthToSpace CRD): each output
    channel of a DepthToSpace is b * b input channels, (i * b + j) * C + c under DCR and
    c * b * b + i * b + j under CRD; a cut takes those whole, so dead ones leave the outputs
    as they were, and the network takes every size it took."""
    b = Builder()
    x = b.input("x", [1, 3, "h", "w"])
    a = b.op("Relu", [b.conv(x, 3, 12, name="c1")])
    d = b.op("DepthToSpace", [a], name="d2s", blocksize=2, mode=mode)
    y = b.conv(b.op("Relu", [d]), 3, 2, name="c2")
    original = b.model([y], ["y"])
    model = load_model(original, {"x": [1, 3, 6, 6]})
    analysis = analyze_channels(model)
    group = only_group(analysis.groups, d)
    assert group.size == 3 and not group.pinned
    filters = next(m for m in group.members if m.node == "c1" and m.role == "filters")
    expected = [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]] if mode == "DCR" else [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # fmt: skip
    assert sorted(sorted(row) for row in filters.positions.reshape(3, -1).tolist()) == expected
    killed = kill_channels(model, analysis.groups, {group.id: [1]})
    small = shrink_channels(killed, {group.id: [0, 2]}, analysis)
    assert_same_outputs(killed, small)
    reduced, _ = reduce(
        original, budget="params=0.7", input_shapes={"x": [1, 3, 6, 6]}, channel_multiple=2
    )
    c1 = next(n for n in reduced.graph.node if n.name == "c1")
    kept = next(t for t in reduced.graph.initializer if t.name == c1.input[1]).dims[0]
    assert kept == 8  # two whole blocks of 4: 2 channels after the DepthToSpace
    assert_runs_at_declared_shapes(original, reduced, [1, 3, 6, 6])


def test_channel_multiple_holds_after_a_depth_to_space():
    """`--channel-multiple 8` on a super-resolution upsampler (conv 16 -> 64, PixelShuffle(2),
    conv 16 -> 16): the multiple was taken in the producer's channels (blocks of 4 counted as
    GroupNorm units are), so the conv after the DepthToSpace read 10 or 14 channels; now every
    conv's channel counts, on both sides of the DepthToSpace, are multiples of 8."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 16, name="c0")])
    d = b.op("DepthToSpace", [b.conv(a, 16, 64, name="c1")], blocksize=2, mode="CRD")
    c = b.op("Relu", [b.conv(b.op("Relu", [d]), 16, 16, name="c2")])
    y = b.conv(c, 16, 3, name="c3")
    original = b.model([y], ["y"])
    for strategy in ("uniform", "mbs"):
        reduced, report = reduce(original, budget="params=0.5", strategy=strategy)
        dims = {t.name: list(t.dims) for t in reduced.graph.initializer}
        counts = {n.name: dims[n.input[1]][:2] for n in reduced.graph.node if n.op_type == "Conv"}
        assert counts["c1"][0] < 64, counts
        assert all(n % 8 == 0 for k, v in counts.items() for n in v if k != "c3" and n != 3), counts
        assert counts["c1"][0] == 4 * counts["c2"][1]


def layer_counts(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(out, in) channels of every Conv and Gemm (transB=1) of a written model, read from
    the weights and the group attribute."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    counts = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            out, cin = dims[n.input[1]][:2]
            counts[n.name] = (out, cin * attrs.get("group", 1))
    return counts


def view_pixel_shuffle_net(head: str) -> onnx.ModelProto:
    """conv 16 -> 64, a pixel shuffle written as views (DCR: Reshape (N, 2, 2, 16, H, W),
    Transpose, Reshape (N, 16, 2H, 2W)), then a conv or a Linear head."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 16, name="c0")])
    r = b.op("Reshape", [b.conv(a, 16, 64, name="c1"), b.const(np.array([1, 2, 2, 16, 8, 8]))])
    t = b.op("Transpose", [r], perm=[0, 3, 4, 1, 5, 2])
    d = b.op("Relu", [b.op("Reshape", [t, b.const(np.array([1, 16, 16, 16]))])])
    if head == "conv":
        y = b.conv(b.op("Relu", [b.conv(d, 16, 16, name="c2")]), 16, 3, name="c3")
    else:
        y = b.gap_head(d, 16, 10, output="fc")
    return b.model([y], ["y"])


def grouped_net(cin: int, cout: int, group: int) -> onnx.ModelProto:
    """conv 3 -> cin, a grouped conv cin -> cout in `group` groups, conv cout -> 16: a
    depthwise conv with multiplier 2 (16, 32, 16), or one that narrows (96, 48, 12: 8
    channels in, 4 out per conv-group)."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, cin, name="c0")])
    g = b.op("Relu", [b.conv(a, cin, cout, group=group, name="gc")])
    y = b.conv(b.op("Relu", [b.conv(g, cout, 16, name="c2")]), 16, 3, name="c3")
    return b.model([y], ["y"])


@pytest.mark.parametrize(
    "net, multiple, budget",
    [
        (lambda: view_pixel_shuffle_net("conv"), 8, "params=0.5"),
        (lambda: view_pixel_shuffle_net("gemm"), 8, "params=0.5"),
        (lambda: grouped_net(16, 32, 16), 8, "params=0.5"),
        (lambda: grouped_net(96, 48, 12), 16, "params=0.6"),
    ],
    ids=["view-pixel-shuffle", "view-pixel-shuffle-linear", "depthwise-x2", "grouped-96-48"],
)
def test_channel_multiple_holds_on_every_conv_that_makes_or_reads_a_group(net, multiple, budget):
    """The step was taken in the widest unit a group's convs make (the producer's b * b
    block before a pixel shuffle written as views, a depthwise conv's 2 outputs per input,
    a grouped conv's 8 inputs per conv-group), so the convs reading or making fewer
    channels per unit got 12 or 14 channels at multiple 8 (8 at 16): the DepthToSpace op
    alone was counted. Now every cut count of every Conv and Gemm is a multiple."""
    original = net()
    before = layer_counts(original)
    for strategy in ("uniform", "mbs"):
        reduced, _ = reduce(original, budget=budget, strategy=strategy, channel_multiple=multiple)
        after = layer_counts(reduced)
        cut = {(k, side): n for k, v in after.items() for side, n in enumerate(v)
               if n != before[k][side]}  # fmt: skip
        assert cut, after
        assert all(n % multiple == 0 for n in cut.values()), (strategy, after)
        assert_runs_at_declared_shapes(original, reduced)


def test_space_to_depth_repeats_each_channel_in_every_block():
    """SpaceToDepth (DCR order): input channel c becomes channels (i * b + j) * C + c."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.op("Relu", [b.conv(x, 3, 4, name="c1")])
    s = b.op("SpaceToDepth", [a], name="s2d", blocksize=2)
    y = b.conv(s, 16, 2, name="c2")
    model = load_model(b.model([y], ["y"]))
    analysis = analyze_channels(model)
    group = only_group(analysis.groups, a)
    assert group.size == 4 and not group.pinned
    rows = next(m for m in group.members if m.node == "c2" and m.role == "weights_in")
    assert rows.positions.reshape(4, -1).tolist() == [[0, 4, 8, 12], [1, 5, 9, 13],
                                                      [2, 6, 10, 14], [3, 7, 11, 15]]  # fmt: skip
    killed = kill_channels(model, analysis.groups, {group.id: [0, 3]})
    assert_same_outputs(killed, shrink_channels(killed, {group.id: [1, 2]}, analysis))


def test_depth_to_space_of_channels_no_block_divides_is_opaque():
    """10 channels into 2 x 2 blocks (a graph onnxruntime cannot run, which the checker
    passes): the walk raised numpy's ValueError from its reshape; now the op is not followed
    and its channels stay whole."""
    b = Builder()
    x = b.input("x", [1, 3, 6, 6])
    a = b.op("Relu", [b.conv(x, 3, 10, name="c1")])
    d = b.op("DepthToSpace", [a], name="d2s", blocksize=2)
    y = b.conv(d, 2, 2, name="c2")
    groups = analyze_channels(load_model(b.model([y], ["y"]))).groups
    group = only_group(groups, a)
    assert group.pinned
    assert any("DepthToSpace 'd2s'" in reason for reason in group.pin_reasons)
