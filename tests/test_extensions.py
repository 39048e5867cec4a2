"""Extension points used end to end through `reduce`: an importance of one's own (an
object, a factory, a registered name) and a channel handler that brings its own shrink
edit for an op the walk does not know."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import run
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.passes import (
    BadInputError,
    FilterNorm,
    Importance,
    load_model,
    register_handler,
    unregister_handler,
)
from onnx_mbs.passes.importance import register_importance, unregister_importance
from onnx_mbs.pipeline import reduce

C, SPATIAL, CLASSES = 16, 8 * 8, 10


class LastChannels(Importance):
    """Scores a group's channels by their index: the last ones are the most important."""

    name = "last"

    def producer_scores(self, member):
        return member.positions[:, 0].astype(np.float64) + 1.0


def _conv_head(flatten: str = "Flatten") -> onnx.ModelProto:
    """x -> Conv (3 -> C) -> Relu -> flatten (C * 8 * 8) -> Gemm -> y. `flatten` is the
    standard op, or "FlatTo": a custom op of domain `test` (a model-local function that
    reshapes to its constant second input)."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.5, (C, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, C).astype(np.float32),
        "w2": rng.normal(0, 0.1, (CLASSES, C * SPATIAL)).astype(np.float32),
        "b2": np.zeros(CLASSES, np.float32),
        "target": np.array([1, C * SPATIAL], np.int64),
    }
    flat = (
        helper.make_node("Flatten", ["r"], ["f"], name="flat")
        if flatten == "Flatten"
        else helper.make_node("FlatTo", ["r", "target"], ["f"], name="flat", domain="test")
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="c1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            flat,
            helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
        ],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [
            numpy_helper.from_array(v, k)
            for k, v in weights.items()
            if flatten != "Flatten" or k != "target"
        ],
    )
    opsets = [helper.make_opsetid("", 17)]
    functions = []
    if flatten != "Flatten":
        opsets.append(helper.make_opsetid("test", 1))
        body = helper.make_node("Reshape", ["data", "shape"], ["out"])
        functions.append(
            helper.make_function("test", "FlatTo", ["data", "shape"], ["out"], [body], opsets[:1])
        )
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=9)


def _expected(model: onnx.ModelProto, kept: int) -> onnx.ModelProto:
    """The hand-made oracle: `model` with the first C - kept channels of c1 zeroed (the
    channels LastChannels ranks lowest), so their flattened entries add nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in ("w1", "b1"):
            array = numpy_helper.to_array(tensor).copy()
            array[: C - kept] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return out


def _widths(reduced: onnx.ModelProto) -> tuple[int, int]:
    """c1's output channels and fc's input width in the written model."""
    init = {t.name: numpy_helper.to_array(t) for t in reduced.graph.initializer}
    conv = next(n for n in reduced.graph.node if n.op_type == "Conv")
    gemm = next(n for n in reduced.graph.node if n.op_type == "Gemm")
    return init[conv.input[1]].shape[0], init[gemm.input[1]].shape[1]


def _check_reduced(model: onnx.ModelProto, reduced: onnx.ModelProto) -> int:
    kept, columns = _widths(reduced)
    assert kept < C and columns == kept * SPATIAL
    init = {t.name: numpy_helper.to_array(t) for t in reduced.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in reduced.graph.node if n.op_type == "Conv")
    np.testing.assert_array_equal(init[conv.input[1]], original["w1"][C - kept :])
    onnx.checker.check_model(reduced, full_check=True)
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run(reduced, {"x": x})[0], run(_expected(model, kept), {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    return kept


def test_an_importance_object_of_ones_own_decides_which_channels_reduce_keeps():
    model = _conv_head()
    options = {"budget": "params=0.6", "strategy": "uniform", "progress": False}
    reduced, report = reduce(model, importance=LastChannels(load_model(model)), **options)
    kept = _check_reduced(model, reduced)
    assert "channels ranked by last importance" in report.plan.notes
    # the same criterion as a factory, and registered under a name
    by_factory, _ = reduce(model, importance=LastChannels, **options)
    register_importance("last", LastChannels)
    try:
        by_name, _ = reduce(model, importance="last", **options)
    finally:
        unregister_importance("last")
    for other in (by_factory, by_name):
        assert _widths(other)[0] == kept
        assert other.SerializeToString() == reduced.SerializeToString()
    with pytest.raises(ValueError, match="built-in"):
        register_importance("l2", LastChannels)


def test_an_importance_object_built_for_another_model_is_refused():
    """An Importance reads the weights of the model it was built for: one built for another
    model (the same layers and names, other weights: another checkpoint) would rank this
    model's channels by those weights and write a model without a word; refused, naming it."""
    model = _conv_head()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w1 = next(t for t in other.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1)[::-1].copy(), "w1"))
    options = {"budget": "params=0.6", "strategy": "uniform", "progress": False}
    with pytest.raises(BadInputError, match="importance.*another model.*'w1'"):
        reduce(model, importance=FilterNorm(load_model(other)), **options)
    # one built for the model itself, loaded or as read, is taken
    own, _ = reduce(model, importance=FilterNorm(load_model(model)), **options)
    as_read, _ = reduce(model, importance=FilterNorm(model), **options)
    by_name, _ = reduce(model, importance="l1", **options)
    assert own.SerializeToString() == by_name.SerializeToString()
    assert as_read.SerializeToString() == by_name.SerializeToString()


def _flat_to(walk, node):
    """Grouping for test.FlatTo: each flattened entry follows its channel; the target's
    channel entry is recomputed by `_flat_to_edit` when channels are cut."""
    axis, ids = walk.chan[node.input[0]]
    shape, target = walk.shape(node.input[0]), walk.const(node.input[1])
    if axis != 1 or target is None:
        walk.opaque(node, "FlatTo away from the channel axis")
        return
    per = int(np.prod(shape[2:]))
    walk.edit("flat_to", node, (ids,), per=per, value=target, apply=_flat_to_edit)
    walk.pass_on(node, 1, np.repeat(ids, per))


def _flat_to_edit(context, node, edit):
    value = edit.value.copy()
    value[1] = context.count(edit.ids[0]) * edit.per
    context.set_input(node, 1, value, "target")


def test_a_custom_op_handler_with_its_own_edit_is_cut_through_by_reduce():
    model = _conv_head("FlatTo")
    options = {"budget": "params=0.6", "strategy": "uniform", "progress": False}
    importance = LastChannels
    with pytest.raises(Exception, match="cannot be reached|nothing"):
        reduce(model, importance=importance, **options)  # opaque: c1's channels are pinned
    register_handler("FlatTo", _flat_to, domain="test")
    try:
        reduced, _ = reduce(model, importance=importance, **options)
    finally:
        unregister_handler("FlatTo", domain="test")
    kept = _check_reduced(model, reduced)
    flat = next(n for n in reduced.graph.node if n.op_type == "FlatTo")
    target = next(t for t in reduced.graph.initializer if t.name == flat.input[1])
    assert numpy_helper.to_array(target).tolist() == [1, kept * SPATIAL]
