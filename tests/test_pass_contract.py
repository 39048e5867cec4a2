"""The pass contract: `modified` only when something changed, analyses tied to the model
they were computed on, no stale analysis past a transform."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import random_images, write_npz
from graphs import Builder, assert_same_outputs
from onnx_builders import conv_relu_model

from onnx_mbs.passes import (
    BadInputError,
    FindMacroblocks,
    FixInputShapes,
    FoldShapes,
    InferShapes,
    NameNodes,
    Normalise,
    Pass,
    PassResult,
    Sequential,
    ShrinkChannels,
    analyze_channels,
    load_model,
    shrink_channels,
)
from onnx_mbs.passes.base import PassContractError
from onnx_mbs.passes.errors import QuantizedModelError
from onnx_mbs.pipeline import MacroblockScaling, reduce


def _two_convs(width: int = 8) -> onnx.ModelProto:
    b = Builder("two", seed=0)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Relu", [b.conv(x, 3, width, name="c1")])
    return load_model(b.model([b.conv(y, width, 4, name="c2")], ["y"]))


def _every_pass_that_changes_nothing(model: onnx.ModelProto) -> list[Pass]:
    """Every pass of the package, set up so that it has nothing to change on `model`."""
    analysis = analyze_channels(model)
    keep_all = {g.id: list(range(g.size)) for g in analysis.groups}
    return [
        InferShapes(),
        NameNodes(),
        FoldShapes(),
        FixInputShapes({"x": [1, 3, 8, 8]}),
        Normalise(),
        FindMacroblocks(),
        ShrinkChannels(keep_all, analysis),
        MacroblockScaling(None, budget="params=1.0"),
        Sequential(Normalise(), NameNodes(), FindMacroblocks()),
    ]


def test_passes_that_change_nothing_say_so_and_return_their_input_itself():
    model = load_model(conv_relu_model())
    before = model.SerializeToString()
    for p in _every_pass_that_changes_nothing(model):
        result = p(model)
        assert not result.modified, p
        assert result.model is model, p
    assert model.SerializeToString() == before


def test_passes_that_change_something_say_so_and_leave_their_input():
    raw = conv_relu_model(input_dims=["n", 3, 8, 8])
    raw.graph.node[0].name = ""
    before = raw.SerializeToString()
    loaded = _two_convs(8)
    analysis = analyze_channels(loaded)
    (free,) = [g for g in analysis.groups if not g.pinned]
    cases = [
        (raw, InferShapes(check_static=False)),
        (raw, NameNodes()),
        (raw, FixInputShapes({"x": [2, 3, 8, 8]})),
        (raw, Normalise()),
        (loaded, ShrinkChannels({free.id: [0, 2, 4, 6]}, analysis)),
        (loaded, MacroblockScaling(None, budget="params=0.6", channel_multiple=1)),
        (raw, Sequential(NameNodes(), FixInputShapes({"x": [2, 3, 8, 8]}))),
    ]
    loaded_before = loaded.SerializeToString()
    for model, p in cases:
        result = p(model)
        assert result.modified, p
        assert result.model is not model, p
        assert result.model.SerializeToString() != model.SerializeToString(), p
    assert raw.SerializeToString() == before
    assert loaded.SerializeToString() == loaded_before


def test_normalise_of_a_normalised_model_is_its_input_unmodified(zoo_onnx):
    for form in ("deploy", "train"):
        model = load_model(zoo_onnx("resnet20", form))
        result = Normalise()(model)
        assert result.model is model and not result.modified
    raw = zoo_onnx("resnet20", "deploy")
    raw.ir_version = 3  # initializers listed as graph inputs are IR 3's form
    raw.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
        for t in raw.graph.initializer
    )
    result = Normalise()(raw)
    assert result.modified and result.model.ir_version == 4
    assert len(result.model.graph.input) == 1


class _Misreporting(Pass):
    """A pass that says the opposite of what it did, as `kind` asks."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"misreporting_{kind}"

    def call(self, model: onnx.ModelProto) -> PassResult:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if self.kind == "changed_says_not":
            copy.graph.node[0].name = "renamed"
            return PassResult(copy, False)
        if self.kind == "input_says_changed":
            return PassResult(model, True)
        if self.kind == "copy_says_changed":
            return PassResult(copy, True)
        if self.kind == "copy_says_not":
            return PassResult(copy, False)
        return model  # type: ignore[return-value]  # not a PassResult


@pytest.mark.parametrize(
    "kind", ["changed_says_not", "input_says_changed", "copy_says_changed", "copy_says_not", "bare"]
)
def test_the_base_pass_refuses_a_pass_that_misreports_modified(kind):
    model = load_model(conv_relu_model())
    with pytest.raises(PassContractError, match=f"misreporting_{kind}"):
        _Misreporting(kind)(model)


def test_an_in_place_pass_must_return_its_input():
    class Copies(Pass):
        name = "copies"
        in_place = True

        def call(self, model):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            return PassResult(copy, True)

    with pytest.raises(PassContractError, match="in-place pass 'copies'"):
        Copies()(load_model(conv_relu_model()))


def test_sequential_names_the_failing_pass():
    model = load_model(conv_relu_model())
    sequence = Sequential(NameNodes(), _Misreporting("copy_says_not"))
    with pytest.raises(PassContractError, match=r"pass 2 of 2 \('misreporting_copy_says_not'\)"):
        sequence(model)
    bad_shape = Sequential(NameNodes(), FixInputShapes({"nope": [1, 3, 8, 8]}))
    with pytest.raises(BadInputError, match=r"pass 2 of 2 \('fix_input_shapes'\): .*nope"):
        bad_shape(model)


def test_sequential_keeps_the_type_of_a_bad_input_error():
    """A BadInputError subclass raised inside a Sequential stays that subclass (evaluate
    catches QuantizedModelError to run a quantised model), prefixed with the pass."""

    class Quantised(Pass):
        name = "quantised"

        def call(self, model):
            raise QuantizedModelError("a quantised graph")

    with pytest.raises(QuantizedModelError, match=r"^pass 2 of 2 \('quantised'\): a quantised"):
        Sequential(NameNodes(), Quantised())(load_model(conv_relu_model()))


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


def test_macroblock_scaling_that_cuts_nothing_keeps_the_preprocessing_it_was_given(tmp_path):
    """The pass hands back its input when nothing is cut; given mean/std that the input does
    not record, it handed back the input's own record (reduce and the command line write the
    given one), so eval and retrain later read the data another way than the run did."""
    model = conv_relu_model()
    model.metadata_props.add(key="onnx_mbs.mean", value="0.1,0.1,0.1")
    model.metadata_props.add(key="onnx_mbs.std", value="0.2,0.2,0.2")
    model.metadata_props.add(key="onnx_mbs.test_top1", value="0.9")  # read at 0.1/0.2
    data = write_npz(tmp_path / "d.npz", **random_images(8, (3, 8, 8), labels=False))
    before = model.SerializeToString()
    given = MacroblockScaling(data, budget="params=1.0", mean=[0.5] * 3, std=[0.25] * 3)
    result = given(model)
    written, _ = reduce(model, data, given.options)
    assert result.modified and result.model is not model
    assert _metadata(result.model) == _metadata(written)
    assert _metadata(result.model)["onnx_mbs.mean"] == "0.5,0.5,0.5"
    assert "onnx_mbs.test_top1" not in _metadata(result.model)  # measured under the old record
    assert model.SerializeToString() == before
    assert_same_outputs(model, result.model)
    as_recorded = MacroblockScaling(data, budget="params=1.0", mean=[0.1] * 3, std=[0.2] * 3)
    same = as_recorded(model)
    assert not same.modified and same.model is model


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
