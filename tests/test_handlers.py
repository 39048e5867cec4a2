"""The public op-handler registry: a user teaches channel grouping a custom op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnx_mbs.passes import register_handler, unregister_handler
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.channel_walk import SCALE, ChannelWalk
from onnx_mbs.passes.load import load_model
from onnx_mbs.passes.shrink import shrink_channels

DOMAIN = "my.ops"
PIN = f"ChannelScale 'cscale': custom op (domain '{DOMAIN}') not followed"


class ChannelScale(OpRun):
    """The custom op's reference implementation: x times a per-channel scale."""

    op_domain = DOMAIN

    def _run(self, x, scale):
        return (x * scale,)


def channel_scale(walk: ChannelWalk, node: onnx.NodeProto) -> None:
    """What a user writes: the output carries the input's channels, and the scale's
    axis 1 must be cut with them."""
    axis, ids = walk.chan[node.input[0]]
    walk.slot(node, 1, 1, ids, SCALE)
    walk.pass_on(node, axis, ids)


def _model() -> onnx.ModelProto:
    """Conv (8 channels; 1, 3, 5, 7 dead: zero filters and bias) -> Relu -> ChannelScale
    -> Conv -> Relu -> Conv."""
    b = Builder("custom", seed=0)
    x = b.input("x", [1, 3, 8, 8])
    w = b.rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    bias = b.rng.normal(0, 0.1, 8).astype(np.float32)
    w[1::2], bias[1::2] = 0, 0
    conv = b.op("Conv", [x, b.const(w, "w"), b.const(bias, "b")], name="before", pads=[1] * 4)
    scale = b.const(np.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1), "scale")
    z = b.op("ChannelScale", [b.op("Relu", [conv]), scale], name="cscale", domain=DOMAIN)
    after = b.op("Relu", [b.conv(z, 8, 4, name="after")])
    return load_model(b.model([b.conv(after, 4, 2)], ["y"], shapes={z: [1, 8, 8, 8]}))


def _group_of(model: onnx.ModelProto, producer: str):
    analysis = analyze_channels(model)
    return analysis, next(g for g in analysis.groups if producer in g.producers)


@pytest.fixture
def handler():
    register_handler("ChannelScale", channel_scale, domain=DOMAIN)
    yield
    unregister_handler("ChannelScale", domain=DOMAIN)


def test_without_a_handler_the_group_is_pinned_with_the_op_named():
    _, group = _group_of(_model(), "before")
    assert group.pinned and group.pin_reasons == [PIN]


def test_a_registered_handler_lets_the_group_shrink(handler):
    model = _model()
    analysis, group = _group_of(model, "before")
    assert not group.pinned and group.size == 8
    (scale,) = [m for m in group.members if m.role == SCALE]  # the slot the handler recorded
    assert (scale.axis, scale.node) == (1, "cscale")
    small = shrink_channels(model, {group.id: [0, 2, 4, 6]}, analysis)
    onnx.checker.check_model(small, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in small.graph.initializer}
    nodes = {n.name: n for n in small.graph.node}
    assert shapes[nodes["before"].input[1]] == (4, 3, 3, 3)
    assert shapes[nodes["cscale"].input[1]] == (1, 4, 1, 1)
    assert shapes[nodes["after"].input[1]] == (4, 4, 3, 3)
    # only dead channels went: the outputs are the same
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    (expected,) = ReferenceEvaluator(model, new_ops=[ChannelScale]).run(None, {"x": x})
    (got,) = ReferenceEvaluator(small, new_ops=[ChannelScale]).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_handler_applies_from_its_opset_on(handler):
    register_handler("ChannelScale", lambda w, n: w.opaque(n, "too new"), DOMAIN, since_opset=2)
    try:
        _, group = _group_of(_model(), "before")  # the model imports my.ops version 1
        assert not group.pinned
    finally:
        unregister_handler("ChannelScale", domain=DOMAIN, since_opset=2)


def test_registry_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match="callable"):
        register_handler("ChannelScale", "not a function", domain=DOMAIN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since_opset"):
        register_handler("ChannelScale", channel_scale, domain=DOMAIN, since_opset=0)
    with pytest.raises(KeyError, match="ChannelScale"):
        unregister_handler("ChannelScale", domain=DOMAIN)
