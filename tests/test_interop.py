"""onnx_mbs.interop with the real packages: onnx-ir's PassManager, a Polygraphy loader
chain, an onnx-graphsurgeon Graph in."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from conftest import write_npz
from graphs import assert_runs_at_declared_shapes
from polygraphy.backend.onnx import FoldConstants, OnnxFromPath, SaveOnnx
from test_layers import _imported_after

from onnx_mbs.interop.graphsurgeon import to_model
from onnx_mbs.interop.ir_pass import OnnxMbsPass
from onnx_mbs.interop.polygraphy import ReduceOnnx
from onnx_mbs.passes import BadInputError, NameNodes, count_parameters
from onnx_mbs.pipeline import MacroblockScaling, reduce

BUDGET = "params=0.5"


def _check_reduced(small: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Fully valid, about half the parameters, and it takes every shape the original
    declares, with its I/O names (the bundled model's batch is dynamic)."""
    onnx.checker.check_model(small, full_check=True)
    assert count_parameters(small) == pytest.approx(count_parameters(original) * 0.5, rel=0.05)
    assert_runs_at_declared_shapes(original, small)


def test_interop_is_not_imported_by_the_pipeline():
    modules = _imported_after("import onnx_mbs.pipeline, onnx_mbs.cli")
    assert not {"onnx_ir", "polygraphy", "onnx_graphsurgeon"} & modules
    # onnx's reference evaluator (0.15 s to import) only when a shape computation is folded
    assert "onnx.reference" not in modules


def test_onnx_ir_pass_manager_runs_macroblock_scaling(bundled_model_path):
    original = onnx.load(str(bundled_model_path))
    model = ir.from_proto(original)
    mbs = OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))
    result = ir.passes.PassManager([mbs])(model)
    assert result.modified
    assert result.model is not model  # functional: the input is left as it was
    assert count_parameters(ir.to_proto(model)) == count_parameters(original)
    _check_reduced(ir.to_proto(result.model), original)
    assert mbs.analyses["mbs"].plan.changes_anything


def test_onnx_ir_pass_reduces_an_external_data_model(bundled_external, bundled_model_path):
    """ir.load leaves the weights in model.onnx.data; the pass reads them in (it failed with
    "... should be stored in .../model.onnx.data, but it is not regular file")."""
    model = ir.load(str(bundled_external))
    weights = model.graph.initializers.values()
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in weights)
    result = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))])(model)
    original = onnx.load(str(bundled_model_path))
    _check_reduced(ir.to_proto(result.model), original)
    # the same cut as from the embedded-weights file
    embedded = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))])(
        ir.load(str(bundled_model_path))
    )
    _same_weights(ir.to_proto(result.model), ir.to_proto(embedded.model))


def test_onnx_ir_pass_reads_external_weights_held_by_constant_nodes(bundled_model_path, tmp_path):
    """Weights in Constant nodes (Paddle2ONNX) saved as external data: the pass read only the
    top graph's initializers in, so reduce got a reference to a file it could not find
    ("... should be stored in /tmp/.onnx-mbs.../model.onnx.data") where the path reduces."""
    model = onnx.load(str(bundled_model_path))
    weight = next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[1])
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [weight.name], value=weight))
    path = tmp_path / "model.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
        convert_attribute=True,
    )
    loaded = ir.load(str(path))
    result = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))])(loaded)
    from_path, _ = reduce(str(path), budget=BUDGET, progress=False)
    _same_weights(ir.to_proto(result.model), from_path)
    # a reference outside the model's folder is refused, as when reduce reads the file
    for tensor in ir.to_proto(loaded).graph.initializer[:1]:
        loaded.graph.initializers[tensor.name].const_value._location = "../model.onnx.data"
    with pytest.raises(ir.passes.PassError) as raised:
        ir.passes.PassManager([OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))])(loaded)
    cause = raised.value
    while cause.__cause__ is not None:  # PassManager's errors wrap the pass's own
        cause = cause.__cause__
    assert "outside the model's folder" in str(cause)


def _same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))


def test_onnx_ir_pass_reports_no_change_honestly(bundled_model_path):
    model = ir.from_proto(onnx.load(str(bundled_model_path)))
    result = ir.passes.PassManager([OnnxMbsPass(NameNodes())])(model)
    assert not result.modified  # every node is named already
    with pytest.raises(TypeError, match="onnx_mbs Pass"):
        OnnxMbsPass(mbs_pass=len)  # type: ignore[arg-type]


def test_polygraphy_loader_chain(bundled_model_path, tmp_path):
    out = tmp_path / "small.onnx"
    loader = ReduceOnnx(OnnxFromPath(str(bundled_model_path)), budget=BUDGET)
    SaveOnnx(loader, path=str(out))()
    _check_reduced(onnx.load(str(out)), onnx.load(str(bundled_model_path)))
    assert loader.report.plan.changes_anything


def test_polygraphy_loader_keeps_the_metadata_a_graphsurgeon_loader_before_it_dropped(
    bundled_model_path, fmnist_sample, tmp_path
):
    """Polygraphy's FoldConstants (and sanitize) edit through a graphsurgeon Graph, which drops
    metadata_props: ReduceOnnx after it read the images with mean 0 and std 1 and wrote a model
    without the record (eval then scores 20.9% top-1). It takes the record back from the model
    the chain loaded, for what the model it is given lacks."""
    data = write_npz(tmp_path / "x.npz", x=fmnist_sample[0][:64])
    folded = FoldConstants(OnnxFromPath(str(bundled_model_path)))
    assert not folded().metadata_props
    loader = ReduceOnnx(folded, data=data, budget=BUDGET)
    small = loader()
    assert "0.286" in loader.report.preprocessing
    original = {p.key: p.value for p in onnx.load(str(bundled_model_path)).metadata_props}
    written = {p.key: p.value for p in small.metadata_props}
    assert {k: written[k] for k in ("onnx_mbs.mean", "onnx_mbs.std")} == {
        k: original[k] for k in ("onnx_mbs.mean", "onnx_mbs.std")
    }


def test_polygraphy_loader_reduces_an_external_data_model(
    bundled_external, bundled_model_path, tmp_path
):
    out = tmp_path / "small.onnx"
    SaveOnnx(ReduceOnnx(OnnxFromPath(str(bundled_external)), budget=BUDGET), path=str(out))()
    small = onnx.load(str(out))
    _check_reduced(small, onnx.load(str(bundled_model_path)))
    embedded = ReduceOnnx(OnnxFromPath(str(bundled_model_path)), budget=BUDGET)()
    _same_weights(small, embedded)


def test_graphsurgeon_reduces_an_external_data_model(bundled_external, bundled_model_path):
    graph = gs.import_onnx(onnx.load(str(bundled_external)))
    with pytest.warns(UserWarning, match="metadata_props"):
        small, _ = reduce(graph, budget=BUDGET, progress=False)
    _check_reduced(small, onnx.load(str(bundled_model_path)))


def test_graphsurgeon_graph_in_model_out(bundled_model_path, fmnist_sample, tmp_path):
    original = onnx.load(str(bundled_model_path))
    data = write_npz(tmp_path / "x.npz", x=fmnist_sample[0][:64])
    _, from_file = reduce(str(bundled_model_path), str(data), budget=BUDGET, progress=False)
    assert "0.286" in from_file.preprocessing  # the model's own mean, from its metadata
    graph = gs.import_onnx(original)
    with pytest.warns(UserWarning, match="metadata_props.*mean/std"):
        small, report = reduce(graph, str(data), budget=BUDGET, progress=False)
    assert isinstance(small, onnx.ModelProto)
    _check_reduced(small, original)
    # the Graph lost the model's mean/std: the data were read without them
    assert "0.286" not in report.preprocessing


def test_graphsurgeon_metadata_put_back(bundled_model_path):
    original = onnx.load(str(bundled_model_path))
    meta = {p.key: p.value for p in original.metadata_props}
    assert "onnx_mbs.mean" in meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = to_model(gs.import_onnx(original), metadata=meta)
    assert {p.key: p.value for p in model.metadata_props} == meta
    with pytest.raises(TypeError, match="onnx_graphsurgeon.Graph"):
        to_model(original)


def test_onnx_ir_values_without_shapes_are_named_in_the_refusal(bundled_model_path):
    """An ir.Model whose graph output (or input) lost its shape serialises without one, which
    onnx's checker refuses on graph inputs and outputs (onnxruntime runs it): the refusal was
    onnx's "Field 'shape' of 'type' is required but missing.", naming nothing."""
    model = ir.from_proto(onnx.load(str(bundled_model_path)))
    for node in model.graph:  # intermediate values without shapes are fine
        for value in node.outputs:
            value.shape = None
    mbs = OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))
    with pytest.raises(ir.passes.PassError) as error:
        ir.passes.PassManager([mbs])(model)
    cause = error.value.__cause__.__cause__
    assert isinstance(cause, BadInputError) and "\n" not in str(cause)
    assert re.search(r"graph output 'logits' declares no shape.*infer_shapes", str(cause))
    fixed = onnx.shape_inference.infer_shapes(ir.to_proto(model))
    _check_reduced(reduce(fixed, None, budget=BUDGET)[0], onnx.load(str(bundled_model_path)))
    model.graph.inputs[0].shape = None
    both = r"graph input 'input', graph output 'logits' declare no shape"
    with pytest.raises(BadInputError, match=both):
        reduce(ir.to_proto(model), None, budget=BUDGET)


def test_graphsurgeon_graph_with_mean_and_std_given_does_not_warn(bundled_model_path, tmp_path):
    """python.md's call, reduce(gs_graph, data, mean=..., std=...), warned "pass mean= and
    std= to reduce": what the caller had done."""
    data = write_npz(tmp_path / "x.npz", x=np.zeros((4, 1, 28, 28), np.uint8))
    graph = gs.import_onnx(onnx.load(str(bundled_model_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small, report = reduce(graph, data, budget=BUDGET, mean=[0.286], std=[0.353])
    assert "as given" in report.preprocessing
    assert {"onnx_mbs.mean", "onnx_mbs.std"} <= {p.key for p in small.metadata_props}


def test_onnx_ir_pass_manager_steps_do_not_compound_the_budget(bundled_model_path):
    """A PassManager with steps > 1 runs every pass again until none modifies: MBS cut its
    own output again each step, so params=0.5 over 3 steps wrote 0.125 of the parameters.
    The pass leaves a model it wrote (the same conv widths) as it is."""
    original = onnx.load(str(bundled_model_path))
    once = ir.passes.PassManager([OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))])(
        ir.from_proto(original)
    )
    mbs = OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))
    stepped = ir.passes.PassManager([ir.passes.common.RemoveUnusedNodesPass(), mbs], steps=3)(
        ir.from_proto(original)
    )
    _check_reduced(ir.to_proto(stepped.model), original)
    _same_weights(ir.to_proto(stepped.model), ir.to_proto(once.model))
    again = mbs(stepped.model)  # the same pass on what it wrote: nothing to do
    assert not again.modified
    _same_weights(ir.to_proto(again.model), ir.to_proto(stepped.model))
    other = OnnxMbsPass(MacroblockScaling(None, budget=BUDGET))(stepped.model)
    assert other.modified  # a pass of its own reduces it further, as asked
    assert count_parameters(ir.to_proto(other.model)) < count_parameters(ir.to_proto(stepped.model))


def _one_shot_reader(batches: int = 6):
    """A generator of input dicts: read once, it is gone."""
    rng = np.random.default_rng(0)
    for _ in range(batches):
        yield {"input": rng.standard_normal((4, 1, 28, 28)).astype(np.float32)}


def test_a_loader_or_pass_called_again_reads_a_one_shot_reader_again(bundled_model_path):
    """Polygraphy calls a loader once per use (SaveOnnx, then a runner); a pass runs on
    several models. With a one-shot reader the second call measured the samples after the
    first call's `limit` (another model, without a word) or found the reader empty; each
    call now reads the same samples."""
    model = onnx.load(str(bundled_model_path))
    loader = ReduceOnnx(model, data=_one_shot_reader(), budget=BUDGET, limit=8)
    first, again = loader(), loader()
    assert again.SerializeToString() == first.SerializeToString()
    mbs = MacroblockScaling(_one_shot_reader(), budget=BUDGET)
    first, again = mbs(model).model, mbs(model).model
    assert again.SerializeToString() == first.SerializeToString()
    assert mbs(model)["mbs"].samples == 24


def test_a_call_that_fails_leaves_no_analysis_or_report_of_the_call_before(bundled_model_path):
    """OnnxMbsPass.analyses and ReduceOnnx.report hold the last call's: after a call that
    raised, they held the call before's (another model's), as if it were this one's."""
    from onnx_mbs.passes import FindMacroblocks

    good = onnx.load(str(bundled_model_path))
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    for dim in bad.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"  # dynamic H, W and no size given: refused
    wrapped = OnnxMbsPass(FindMacroblocks())
    wrapped(ir.from_proto(good))
    with pytest.raises(BadInputError):
        wrapped(ir.from_proto(bad))
    assert wrapped.analyses == {}
    loader = ReduceOnnx(good, budget=BUDGET)
    loader()
    loader._model = bad
    with pytest.raises(BadInputError):
        loader()
    assert loader.report is None


def test_onnx_ir_pass_reused_on_another_checkpoint_runs_a_pass_that_keeps_the_widths(
    bundled_model_path,
):
    """A wrapped pass that changes no conv width (FixInputShapes, Normalise, NameNodes) wrote
    a model with the widths of its input: the wrapper took every later model of that
    architecture (another checkpoint, the same file again) for its own output and handed it
    back untouched, modified=False, its batch still dynamic. Only a pass that changed the
    widths recognises its output by them."""
    from onnx_mbs.passes import FixInputShapes

    checkpoints = [bundled_model_path, bundled_model_path.with_name("resnet20_fmnist_e8.onnx")]
    manager = ir.passes.PassManager([OnnxMbsPass(FixInputShapes(batch=1))], steps=3)
    for path in [*checkpoints, bundled_model_path]:
        result = manager(ir.load(str(path)))
        assert result.modified, path.name
        batch = ir.to_proto(result.model).graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_value == 1, path.name
