"""onnx_mbs.interop with the real packages: onnx-ir's PassManager, a Polygraphy loader
chain, an onnx-graphsurgeon Graph in."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest
from conftest import write_npz
from graphs import run
from polygraphy.backend.onnx import OnnxFromPath, SaveOnnx
from test_layers import _imported_after

from onnx_mbs.interop.graphsurgeon import to_model
from onnx_mbs.interop.ir_pass import OnnxMbsPass
from onnx_mbs.interop.polygraphy import ReduceOnnx
from onnx_mbs.passes import NameNodes, count_parameters
from onnx_mbs.pipeline import MacroblockScaling, reduce

BUDGET = "params=0.5"


def _check_reduced(small: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Fully valid, the original's I/O names, about half the parameters, and it runs at
    two batch sizes (the bundled model's batch is dynamic)."""
    onnx.checker.check_model(small, full_check=True)
    assert [i.name for i in small.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in small.graph.output] == [o.name for o in original.graph.output]
    assert count_parameters(small) == pytest.approx(count_parameters(original) * 0.5, rel=0.05)
    name = small.graph.input[0].name
    for batch in (1, 3):
        (y,) = run(small, {name: np.zeros((batch, 1, 28, 28), np.float32)})
        assert y.shape == (batch, 10)


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
