"""`--importance act` ranks channels by what they produce, not by their filter norms."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder, run
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.data import open_data
from onnx_mbs.passes import analyze_model, load_model
from onnx_mbs.passes.activations import activation_tensors
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.importance import FilterNorm, choose_channels
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.pipeline import activation_importance
from onnx_mbs.stats import collect_stats


def _model_with_dead_channels() -> onnx.ModelProto:
    """conv1 has 8 channels; 0-3 have the largest filters but a bias that ReLU always zeroes."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w1[:4] *= 10.0
    b1 = np.zeros(8, np.float32)
    b1[:4] = -1e4
    w2 = rng.normal(0, 0.3, (6, 8, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.zeros(6, np.float32), "b2"))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run(model, x)[0]


def test_activation_importance_drops_dead_channels_that_l1_keeps():
    model = load_model(_model_with_dead_channels())
    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    source = open_data([{"x": x}], "x", [1, 3, 8, 8])
    activation = activation_tensors(model, analyze_model(model))
    assert activation["conv1"] == "r1"
    stats = collect_stats(
        model, ["r1"], source, ["CPUExecutionProvider"], 1, progress=False, magnitudes=True
    )
    channels = analyze_channels(model)
    (group,) = [g for g in channels.groups if "conv1" in g.producers]
    by_act = choose_channels(
        channels.groups, {group.id: 4}, activation_importance(model, stats, activation)
    )
    by_l1 = choose_channels(channels.groups, {group.id: 4}, FilterNorm(model))
    assert by_act[group.id] == [4, 5, 6, 7]
    assert by_l1[group.id] == [0, 1, 2, 3]
    sample = x[:1]
    expected = _outputs(model, sample)
    kept_live = shrink_channels(model, by_act, channels)
    np.testing.assert_allclose(_outputs(kept_live, sample), expected, atol=1e-5)
    kept_dead = shrink_channels(model, by_l1, channels)
    assert np.abs(_outputs(kept_dead, sample) - expected).max() > 1e-2


def _grouped_upsampler() -> onnx.ModelProto:
    """conv1 (4 channels, equal filters) into a grouped ConvTranspose (group 4, 2 outputs per
    conv-group): conv-group 3's filters are zero, so its outputs 6 and 7 are dead and so is
    conv1's channel 3, which only they read; conv-group 0's are small but alive."""
    b = Builder("upsampler")
    x = b.input("x", [1, 3, 6, 6])
    c1 = b.op("Conv", [x, b.const(np.ones((4, 3, 1, 1), np.float32), "w1")], name="conv1")
    wt = np.random.default_rng(0).uniform(0.5, 1.5, (4, 2, 2, 2)).astype(np.float32)
    wt[3] = 0.0
    wt[0] *= 0.1
    up = b.op(
        "ConvTranspose",
        [b.op("Relu", [c1]), b.const(wt, "wt")],
        name="up",
        kernel_shape=[2, 2],
        strides=[2, 2],
        group=4,
    )
    return b.model([b.conv(b.op("Relu", [up]), 8, 5, k=1, name="head")], ["y"])


def test_activation_importance_reads_a_grouped_conv_transposes_own_outputs():
    """A grouped ConvTranspose's filters are cut on its weight's input axis; its activation
    means are per output channel, conv-group j's at j * 2 and j * 2 + 1 here. Read at the
    input positions, channel 3 scored output 3's mean (alive) and the dead conv-group was
    kept while a live one was cut."""
    model = load_model(_grouped_upsampler())
    x = np.random.default_rng(1).random((8, 3, 6, 6), dtype=np.float32)
    activation = activation_tensors(model, analyze_model(model))
    tensors = sorted({t for t in activation.values() if t})
    stats = collect_stats(
        model, tensors, open_data([{"x": x}], "x", [1, 3, 6, 6]), ["CPUExecutionProvider"],
        1, progress=False,
    )  # fmt: skip
    importance = activation_importance(model, stats, activation)
    channels = analyze_channels(model)
    (group,) = [g for g in channels.groups if "up" in g.producers]
    means = importance.per_layer["up"]
    np.testing.assert_allclose(means[6:], 0.0)
    (up,) = [m for m in group.members if m.node == "up" and m.role == "filters"]
    np.testing.assert_allclose(importance.producer_scores(up), means.reshape(4, 2).sum(axis=1))
    keep = choose_channels(channels.groups, {group.id: 3}, importance)
    assert keep == {group.id: [0, 1, 2]}
    np.testing.assert_allclose(
        _outputs(shrink_channels(model, keep, channels), x[:1]), _outputs(model, x[:1]), atol=1e-5
    )
