"""One GraphIndex serves every analysis of a model: `reduce` indexes its model once and
passes the index on, so a passed index must give exactly what a built one gives, and an
index of another model must be refused rather than read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import mobilenetv3_like, yolov8_c2f_like

from onnx_mbs.passes import (
    ActivationImportance,
    ChannelAnalysis,
    CostModel,
    GraphIndex,
    activation_tensors,
    analyze_channels,
    analyze_model,
    load_model,
    shrink_channels,
    weight_importance,
)
from onnx_mbs.passes.graph import input_layout, input_scale, static_shape
from onnx_mbs.passes.load import in_load_form


def _dump(channels: ChannelAnalysis) -> tuple:
    """Everything a ChannelAnalysis holds, as comparable plain values."""
    groups = [
        (g.id, g.size, g.producers, g.macroblocks, g.pinned, g.pin_reasons,
         [(m.tensor, m.axis, m.positions.tolist(), m.role, m.node) for m in g.members])
        for g in channels.groups
    ]  # fmt: skip
    tensors = {name: (axis, ids.tolist()) for name, (axis, ids) in channels.tensors.items()}
    slots = [(s.node, s.input, s.axis, s.ids.tolist(), s.role) for s in channels.slots]
    edits = [(e.kind, e.node, [i.tolist() for i in e.ids], e.axis) for e in channels.edits]
    classes = [c.tolist() for c in channels.classes]
    return groups, channels.root.tolist(), classes, tensors, slots, edits, channels.model_key


@pytest.mark.parametrize("make", [mobilenetv3_like, yolov8_c2f_like])
def test_a_passed_index_gives_what_a_built_one_gives(make):
    model = load_model(make())
    index = GraphIndex.build(model)
    before = analyze_model(model)
    assert analyze_model(model, index=index) == before
    channels = analyze_channels(model, before)
    assert _dump(analyze_channels(model, before, index)) == _dump(channels)
    assert _dump(analyze_channels(model, index=index)) == _dump(channels)
    assert activation_tensors(model, before, index) == activation_tensors(model, before)

    free = [g for g in channels.groups if not g.pinned and g.size > 1]
    assert free
    counts = {g.id: g.size // 2 for g in free}
    cost = CostModel.build(model, channels, before, index)
    assert cost(counts) == CostModel.build(model, channels, before)(counts)
    assert cost(counts)[0] < before.total_params

    for name in ("l1", "l2", "bn"):
        given, built = weight_importance(model, name, index), weight_importance(model, name)
        for group in free:
            np.testing.assert_array_equal(given(group), built(group))
    act = ActivationImportance(model, {}, index=index)
    assert act.fallback.index is index  # the fallback criterion reads the same index
    for group in free:
        np.testing.assert_array_equal(act(group), ActivationImportance(model, {})(group))

    keep = {gid: list(range(count)) for gid, count in counts.items()}
    shrunk = shrink_channels(model, keep, channels, index)
    assert shrunk.SerializeToString() == shrink_channels(model, keep, channels).SerializeToString()
    assert analyze_model(shrunk).total_params == cost(counts)[0]


def test_an_index_of_another_model_is_refused():
    model, other = load_model(mobilenetv3_like()), load_model(mobilenetv3_like())
    index = GraphIndex.build(other)  # equal content, another object: still another model
    before = analyze_model(model)
    calls = [
        lambda: analyze_model(model, index=index),
        lambda: analyze_channels(model, before, index),
        lambda: activation_tensors(model, before, index),
        lambda: CostModel.build(model, index=index),
        lambda: weight_importance(model, "l2", index),
        lambda: ActivationImportance(model, {}, index=index),
        lambda: shrink_channels(model, {}, index=index),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="indexes another model"):
            call()


def test_an_index_of_a_model_not_in_load_form_is_loaded_as_without_one():
    raw = mobilenetv3_like()
    assert in_load_form(raw) is not raw  # no recorded shapes: analyses load it first
    index = GraphIndex.build(raw)
    assert analyze_model(raw, index=index) == analyze_model(raw)
    assert _dump(analyze_channels(raw, index=index)) == _dump(analyze_channels(raw))


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        ([1, 3, 8, 8], (1, 3, 8, 8)),
        ([], ()),
        (None, None),  # no shape recorded
        (["N", 3, 8, 8], None),  # a named dim
        ([None, 3], None),  # a dim with nothing set
        ([-1, 3], None),  # Paddle's dynamic dims
        ([1, 0], None),
    ],
)
def test_static_shape(dims, expected):
    value_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
    assert static_shape(value_info) == expected


def _front(*ops: tuple[str, object]) -> onnx.GraphProto:
    """An NHWC RGB input through `ops` (op type, constant), then a Transpose to NCHW."""
    helper, tensors, nodes, name = onnx.helper, [], [], "input_1"
    for k, (op, value) in enumerate(ops):
        tensors.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), f"c{k}"))
        nodes.append(helper.make_node(op, [name, f"c{k}"], [f"t{k}"]))
        name = f"t{k}"
    nodes.append(helper.make_node("Transpose", [name], ["y"], perm=[0, 3, 1, 2]))
    x = helper.make_tensor_value_info("input_1", onnx.TensorProto.FLOAT, ["unk__12", 8, 8, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    return helper.make_graph(nodes, "front", [x], [y], tensors)


MEAN = np.array([[[[124.0, 117.0, 104.0]]]])  # Keras Normalization's, in 0..255 units
STD = np.array([[[[58.0, 57.0, 57.0]]]])


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ([("Mul", 1 / 255), ("Sub", MEAN / 255), ("Div", STD / 255)], 1 / 255),  # Rescaling first
        ([("Sub", MEAN), ("Div", STD), ("Mul", 1 / 255)], 1 / 255),  # Normalization first
        ([("Sub", MEAN), ("Mul", 1 / STD), ("Div", 255.0)], 1 / 255),
        ([("Sub", MEAN[..., :1]), ("Div", STD[..., :1]), ("Mul", 1 / 255)], 1 / 255),  # gray
        ([("Mul", 1 / 127.5), ("Add", -1.0)], 1 / 127.5),
        ([("Sub", MEAN / 255), ("Div", STD / 255)], 1.0),  # takes [0, 1] pixels
        ([], 1.0),
    ],
)
def test_input_scale_finds_the_pixel_scaling_in_any_order(ops, expected):
    """Keras' Rescaling(1/255) may come before or after a Normalization (per-channel Sub and
    Div, or Mul by 1/std): the 1/255 is found either way."""
    assert input_scale(_front(*ops), "input_1") == pytest.approx(expected)


@pytest.mark.parametrize("constant", ["initializer", "Constant"])
def test_input_scale_reads_a_constant_through_identity(constant):
    """Some exporters write Mul(x, Identity(c)): the 1/255 behind the Identity was not read,
    and the model, which divides by 255 itself, was fed [0, 1] pixels divided again; nor was
    the input, which only feeds a Transpose to NCHW past it, read as NHWC."""
    graph = _front(("Mul", 1 / 255), ("Sub", MEAN / 255))
    graph.node.insert(0, onnx.helper.make_node("Identity", ["c0_alias"], ["c0_alias2"]))
    graph.node.insert(0, onnx.helper.make_node("Identity", ["c0"], ["c0_alias"]))
    graph.node[2].input[1] = "c0_alias2"
    if constant == "Constant":
        tensor = next(t for t in graph.initializer if t.name == "c0")
        graph.initializer.remove(tensor)
        graph.node.insert(0, onnx.helper.make_node("Constant", [], ["c0"], value=tensor))
    assert input_scale(graph, "input_1") == pytest.approx(1 / 255)
    assert input_layout(graph, "input_1") == "NHWC"
