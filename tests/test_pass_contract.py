"""The pass contract: `modified` only when something changed, analyses tied to the model
they were computed on, no stale analysis past a transform."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, assert_same_outputs
from onnx_builders import conv_relu_model

from onnx_mbs.passes import (
    FindMacroblocks,
    FixInputShapes,
    FoldShapes,
    InferShapes,
    NameNodes,
    Sequential,
    ShrinkChannels,
    analyze_channels,
    load_model,
    shrink_channels,
)


def _two_convs(width: int = 8) -> onnx.ModelProto:
    b = Builder("two", seed=0)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, width, name="c1")])
    return load_model(b.model([b.conv(y, width, 4, name="c2")], ["y"]))


def test_passes_that_change_nothing_say_so_and_copy_nothing():
    model = load_model(conv_relu_model())
    for p in (InferShapes(), NameNodes(), FoldShapes(), FixInputShapes({"x": [1, 3, 8, 8]})):
        result = p(model)
        assert not result.modified, p
        assert result.model is model or result.model == model, p


def test_passes_that_change_something_say_so_and_leave_their_input():
    raw = conv_relu_model(input_dims=["n", 3, 8, 8])
    raw.graph.node[0].name = ""
    before = raw.SerializeToString()
    for p in (InferShapes(check_static=False), NameNodes(), FixInputShapes({"x": [2, 3, 8, 8]})):
        result = p(raw)
        assert result.modified, p
        assert result.model is not raw, p
    assert raw.SerializeToString() == before


def test_shrink_refuses_an_analysis_of_another_model():
    model, other = _two_convs(8), _two_convs(16)
    analysis = analyze_channels(other)
    (free,) = [g for g in analysis.groups if not g.pinned]
    with pytest.raises(ValueError, match="another model"):
        shrink_channels(model, {free.id: [0, 1]}, analysis)
    # the same structure with other weights is the same model to the analysis
    same = _two_convs(8)
    same.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(
            np.zeros(onnx.numpy_helper.to_array(same.graph.initializer[0]).shape, np.float32),
            same.graph.initializer[0].name,
        )
    )
    shrink_channels(same, {free.id: [0, 1]}, analyze_channels(model))


def test_shrink_channels_pass_checks_its_model_and_reports_honestly():
    model = _two_convs(8)
    analysis = analyze_channels(model)
    (free,) = [g for g in analysis.groups if not g.pinned]
    keep_all = ShrinkChannels({free.id: list(range(8))}, analysis)(model)
    assert not keep_all.modified and keep_all.model is model
    cut = ShrinkChannels({free.id: [0, 2, 4, 6]}, analysis)(model)
    assert cut.modified
    assert cut.model == shrink_channels(model, {free.id: [0, 2, 4, 6]}, analysis)
    with pytest.raises(ValueError, match="another model"):
        ShrinkChannels({free.id: [0, 1]}, analysis)(_two_convs(16))
    kept = ShrinkChannels({free.id: list(range(8))}, analysis)(model).model
    assert_same_outputs(model, kept)


def test_sequential_drops_analyses_of_a_model_a_later_pass_changed():
    raw = conv_relu_model(input_dims=["n", 3, 8, 8])
    kept = Sequential(FixInputShapes({"x": [2, 3, 8, 8]}), InferShapes(), FindMacroblocks())(raw)
    assert "macroblocks" in kept.analyses
    stale = Sequential(FixInputShapes(), InferShapes(), FindMacroblocks(), NameNodes())
    raw.graph.node[0].name = ""  # NameNodes will change the model after the analysis
    result = stale(raw)
    assert result.modified and "macroblocks" not in result.analyses
    unchanged = Sequential(FindMacroblocks(), NameNodes())(load_model(conv_relu_model()))
    assert not unchanged.modified and "macroblocks" in unchanged.analyses
