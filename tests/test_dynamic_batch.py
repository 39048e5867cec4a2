"""Dynamic-batch exports whose shape arithmetic reads the batch: reduced models keep the batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import random_images, write_npz
from graphs import assert_runs_at_declared_shapes, run
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.models.export import export_onnx, randomize_batchnorm
from onnx_mbs.models.zoo import ZOO
from onnx_mbs.passes import analyze_model, load, load_model
from onnx_mbs.pipeline import reduce


def _calibration(tmp_path, shape) -> str:
    return write_npz(tmp_path / "x.npz", **random_images(8, shape, labels=False))


class ViewHead(torch.nn.Module):
    """The classic `x.view(x.size(0), -1)` head: Shape -> Gather -> Concat -> Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("name", ["view_head", "shufflenet_v2"])
def test_reduced_dynamic_batch_models_run_at_any_batch(name, tmp_path):
    torch.manual_seed(0)
    if name == "view_head":
        model = export_onnx(ViewHead(), (1, 3, 8, 8), dynamic_batch=True)
        assert "Shape" in {n.op_type for n in model.graph.node}
    else:
        entry = ZOO[name]
        model = export_onnx(
            randomize_batchnorm(entry.build()), entry.test_input_shape, dynamic_batch=True
        )
    shape = [d.dim_value for d in load_model(model).graph.input[0].type.tensor_type.shape.dim]
    small, report = reduce(
        model,
        _calibration(tmp_path, shape[1:]),
        budget="params=0.6",
        progress=False,
        evaluate_accuracy=False,
    )
    assert report.plan.changes_anything
    assert not small.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert_runs_at_declared_shapes(model, small)
    x = np.random.default_rng(1).standard_normal((3, *shape[1:])).astype(np.float32)
    assert run(small, x)[0].shape == run(model, x)[0].shape
    # Keeping every channel changes nothing, at a batch other than the analysed one.
    same, _ = reduce(
        model,
        _calibration(tmp_path, shape[1:]),
        budget="params=1",
        progress=False,
        evaluate_accuracy=False,
    )
    np.testing.assert_allclose(run(same, x)[0], run(model, x)[0], atol=1e-5)


def _batch_read_by(last: onnx.NodeProto, target_first: bool = False) -> onnx.ModelProto:
    """Conv -> Flatten -> Transpose, then `last` reads a target (16, N) built from the batch."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Shape", ["f"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1d"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["sixteen", "n1"], ["target"], name="concat", axis=0),
        helper.make_node("Transpose", ["f"], ["t"], name="transpose", perm=[1, 0]),
        last,
    ]
    consts = [
        w,
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "zero1d"),
        numpy_helper.from_array(np.array([16], np.int64), "sixteen"),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_last",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, "N"])],
        consts,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_batch_in_another_place_of_a_reshape_is_copied():
    """Reshape (16, N) to (16, N): the entry that follows the batch copies it (0)."""
    model = _batch_read_by(helper.make_node("Reshape", ["t", "target"], ["y"], name="reshape"))
    loaded = load(model)
    target = next(t for t in loaded.model.graph.initializer if t.name == "target")
    assert numpy_helper.to_array(target).tolist() == [16, 0]
    for batch in (1, 3):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 2, 2)).astype(np.float32)
        assert run(loaded.runnable, x)[0].shape == (16, batch)


def test_batch_read_by_another_op_is_computed_at_run_time():
    """Expand to (16, N): no size-agnostic constant, so the written model computes the
    target as the original does (Shape -> Gather -> Concat), not written for N = 1."""
    model = _batch_read_by(helper.make_node("Expand", ["t", "target"], ["y"], name="expand"))
    loaded = load(model)
    assert "Shape" not in {n.op_type for n in loaded.model.graph.node}  # analysed folded
    assert "Shape" in {n.op_type for n in loaded.runnable.graph.node}
    assert_runs_at_declared_shapes(model, loaded.runnable)
    for batch in (1, 3):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 2, 2)).astype(np.float32)
        np.testing.assert_allclose(run(loaded.runnable, x)[0], run(model, x)[0])
    # With the batch fixed by the user it is analysed at that batch; the model still
    # takes every batch.
    read = load(model, {"x": [2, 3, 2, 2]})
    assert analyze_model(read.model).total_macs == 2 * 2 * 2 * 3 * 4
    assert_runs_at_declared_shapes(model, read.runnable)


def test_eval_teacher_runs_a_fixed_batch_model_on_a_short_last_batch(
    bundled_model_path, tmp_path, capsys
):
    """20 samples at a fixed batch of 8: the last batch of 4 is padded for the run (as plain
    eval pads it) and only its 4 rows are compared, against a dynamic-batch teacher too."""
    import json

    from onnx_mbs.cli import main
    from onnx_mbs.models import FMNIST_SAMPLE

    fixed = onnx.load(str(bundled_model_path))
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 8
    path = tmp_path / "b8.onnx"
    onnx.save(fixed, path)
    for teacher in (path, bundled_model_path):
        args = ["eval", str(path), "--teacher", str(teacher), "--data", str(FMNIST_SAMPLE)]
        assert main([*args, "--limit", "20", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["samples"] == 20
        (logits,) = result["outputs"].values()
        assert logits["shape"] == [10]  # per sample, as the table prints it (not [8, 10])
        assert logits["top1"] == 1.0 and logits["relative_error"] < 1e-5
