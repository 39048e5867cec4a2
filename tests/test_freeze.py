"""`retrain --freeze`: named initializers are not trained and are written back unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import write_npz
from graphs import run
from test_retrain import QuadNet, quadrant_data
from torch import nn

from onnx_mbs.bridge import retrain
from onnx_mbs.cli import main
from onnx_mbs.models.export import export_onnx
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KW = dict(epochs=1, lr=0.05, batch_size=32, device="cpu", progress=False, augment="none")


class StrideNet(QuadNet):
    """QuadNet whose scores are scaled by a (1, 4) table: shaped like a channels-last bias, so
    it trains unless frozen (a detector's stride vector)."""

    def __init__(self) -> None:
        super().__init__()
        self.stride = nn.Parameter(torch.tensor([[8.0, 16.0, 32.0, 64.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.stride


def stridenet(form: str = "train") -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_onnx(StrideNet(), (1, 1, 8, 8), form=form, dynamic_batch=True)


def raw(model: onnx.ModelProto) -> dict[str, bytes]:
    return {
        t.name: onnx.numpy_helper.to_array(t).tobytes() + bytes([t.data_type])
        for t in model.graph.initializer
    }


@pytest.fixture(scope="module")
def train() -> tuple[np.ndarray, np.ndarray]:
    return quadrant_data(128, seed=1)


def test_frozen_initializers_are_written_back_unchanged(train) -> None:
    model = stridenet()
    names = {t.name for t in model.graph.initializer}
    assert {"stride", "fc.weight"} <= names, names
    stats = next(n.input[3] for n in model.graph.node if n.op_type == "BatchNormalization")
    before = raw(model)
    kw = {**KW, "weight_decay": 0.1}
    plain = raw(retrain(model, train, None, **kw).model)
    assert plain["stride"] != before["stride"]  # shape alone: the table trains
    frozen = retrain(model, train, None, freeze=["stride", "fc.weight", stats], **kw)
    after = raw(frozen.model)
    for name in ("stride", "fc.weight", stats):
        assert after[name] == before[name], name
    assert after["fc.bias"] != before["fc.bias"]
    assert plain[stats] != before[stats]  # BatchNorm updates its statistics in training


def test_freeze_refusals_name_close_names_and_cuts(train) -> None:
    model = stridenet()
    with pytest.raises(BadInputError, match=r"freeze names 'strid': .* close names: stride"):
        retrain(model, train, None, freeze=["strid"], **KW)
    teacher = stridenet()
    teacher.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, "f"), "gone"))
    with pytest.raises(BadInputError, match="teacher has it, so reduce cut it"):
        retrain(model, (train[0], None), None, teacher=teacher, freeze=["gone"], **KW)
    # BN-folded: the re-inserted BatchNorm folds back into the Conv's weight.
    folded = stridenet("deploy")
    conv = next(n for n in folded.graph.node if n.op_type == "Conv").input[1]
    with pytest.raises(BadInputError, match="reinsert_bn=False"):
        retrain(folded, train, None, freeze=[conv], **KW)
    kept = retrain(folded, train, None, freeze=[conv], reinsert_bn=False, **KW)
    assert raw(kept.model)[conv] == raw(folded)[conv]


def test_reduces_copies_are_frozen_with_their_source(train) -> None:
    from onnx_mbs.bridge.freeze import check_frozen

    model = stridenet()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(2, "f"), "stride__1"))
    assert check_frozen("stride", model) == ["stride", "stride__1"]


def test_cli_freeze_and_resume_with_another_set(tmp_path, train, capsys) -> None:
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(stridenet(), path)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    args = ["retrain", path, "-o", out, "--data", data, "--augment", "none", "--epochs", "1"]
    assert main([*args, "--freeze", "strides"]) == 2
    (err,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert "--freeze names 'strides'" in err and "close names: stride" in err
    ckpt = ["--checkpoint", str(tmp_path / "ck")]
    assert main([*args, *ckpt, "--freeze", "stride,fc.weight"]) == 0
    assert raw(onnx.load(out))["stride"] == raw(onnx.load(path))["stride"]
    assert main([*args, *ckpt, "--resume", "--freeze", "stride"]) == 2
    assert "another run (differs in: freeze)" in capsys.readouterr().err
    assert main([*args, *ckpt, "--resume", "--freeze", "fc.weight", "--freeze", "stride"]) == 0


def test_a_table_reduce_folded_is_named() -> None:
    """Loading folds constant subgraphs: a table reshaped before use is written as the
    Reshape's output; the refusal names that initializer."""
    from onnx import TensorProto, helper

    from onnx_mbs.bridge.freeze import check_frozen

    def graph(folded: bool) -> onnx.ModelProto:
        table = onnx.numpy_helper.from_array(np.arange(4, dtype="f"), "proj")
        shape = onnx.numpy_helper.from_array(np.array([1, 4]), "shape")
        flat = onnx.numpy_helper.from_array(np.arange(4, dtype="f").reshape(1, 4), "proj_2d")
        nodes = [helper.make_node("Mul", ["x", "proj_2d"], ["y"])]
        if not folded:
            nodes.insert(0, helper.make_node("Reshape", ["proj", "shape"], ["proj_2d"]))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
        inits = [flat] if folded else [table, shape]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))

    with pytest.raises(BadInputError, match="reduce folded it into 'proj_2d'"):
        check_frozen(["proj"], graph(True), graph(False))


def test_a_frozen_table_read_through_a_tie_stays_frozen(train) -> None:
    """The torch exporter ties equal tables through Identity, and reduce's form shares a
    BatchNorm statistic between readers: retraining unties them into initializers of other
    names, which trained though the table they copy was frozen, so the graph computed with a
    changed table where the user's name was read."""
    model = stridenet()
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and "stride" in n.input)
    tie = onnx.helper.make_node("Identity", ["stride"], ["stride_tied"], name="tie")
    mul.input[list(mul.input).index("stride")] = "stride_tied"
    model.graph.node.insert(0, tie)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    stats = bn.input[3]  # read by a second node too: untied into a copy of its own
    model.graph.node.append(onnx.helper.make_node("Identity", [stats], ["mean_seen"]))
    dims = next(t.dims for t in model.graph.initializer if t.name == stats)
    model.graph.output.append(onnx.helper.make_tensor_value_info("mean_seen", 1, dims))
    onnx.checker.check_model(model)
    before = raw(model)
    result = retrain(model, train, None, freeze=["stride", stats], **{**KW, "weight_decay": 0.1})
    after = result.model
    read = {n.op_type: n for n in after.graph.node}
    values = raw(after)
    assert values[read["Mul"].input[1]] == before["stride"]
    bn_after = next(n for n in after.graph.node if n.op_type == "BatchNormalization")
    assert values[bn_after.input[3]] == before[stats]


def test_freezing_every_weight_is_refused_in_one_line(train) -> None:
    """Nothing left to train: torch's optimizer raised ValueError (an empty parameter list)."""
    model = stridenet()
    names = [t.name for t in model.graph.initializer]
    with pytest.raises(BadInputError, match="freeze leaves nothing to train"):
        retrain(model, train, None, freeze=names, **KW)


def test_a_table_held_by_a_constant_node_can_be_frozen(train) -> None:
    """Some exporters hold tables in Constant nodes, which retraining turns into trained
    initializers (`untie_initializers`): --freeze refused their names as no initializer, so
    such a table always trained."""
    model = stridenet()
    table = next(t for t in model.graph.initializer if t.name == "stride")
    model.graph.initializer.remove(table)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["stride"], value=table))
    before = onnx.numpy_helper.to_array(table).tobytes() + bytes([table.data_type])
    assert raw(retrain(model, train, None, **KW).model)["stride"] != before  # it trains
    assert raw(retrain(model, train, None, freeze=["stride"], **KW).model)["stride"] == before


def test_validation_measures_the_model_with_its_frozen_statistics() -> None:
    """A frozen BatchNorm statistic is written unchanged, so validation (the reported top-1 and
    the best epoch's choice) must measure the model with it, not with the statistics the
    train-mode forwards moved. Here a running variance of 100 is frozen: with it put back only
    on write-back, the run reported 100% top-1 for a model onnxruntime scores 99.5%."""
    torch.manual_seed(0)
    model = export_onnx(QuadNet(), (1, 1, 8, 8), form="train", dynamic_batch=True)
    var = next(n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization")
    for t in model.graph.initializer:
        if t.name == var:
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(t.dims, 100.0, np.float32), var))
    val = quadrant_data(200, seed=2)
    kw = {**KW, "epochs": 2, "batch_size": 16}
    result = retrain(model, quadrant_data(128, seed=1), val, freeze=[var], **kw)
    assert raw(result.model)[var] == raw(model)[var]
    written = float((run(result.model, {"input": val[0]})[0].argmax(1) == val[1]).mean())
    assert result.val_top1 == result.best_val_top1 == written
