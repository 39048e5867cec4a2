"""Label-free retraining of any graph (distillation on every output), `eval --teacher`,
`reduce --recalibrate`, and their bad-input refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from graphs import assert_runs_at_declared_shapes, run

from onnx_mbs.bridge import retrain
from onnx_mbs.bridge.losses import choose_losses, kd_kl, parse_loss_specs
from onnx_mbs.cli import main
from onnx_mbs.evaluate import _Accumulator
from onnx_mbs.models.export import export_head_model
from onnx_mbs.passes import load_model
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.pipeline import reduce
from onnx_mbs.save import save_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple:
    """64 unlabelled 3x64x64 images (Fashion-MNIST would need resizing; noise is enough here)."""
    folder = tmp_path_factory.mktemp("images")
    x = np.random.default_rng(0).uniform(0, 255, size=(48, 3, 64, 64)).astype(np.uint8)
    np.savez(folder / "x.npz", x=x)
    return folder / "x.npz", x.astype(np.float32) / 255


@pytest.fixture(scope="module")
def dbnet(tmp_path_factory, images) -> tuple:
    folder = tmp_path_factory.mktemp("dbnet")
    # Random weights, BN statistics measured on the images (as a trained model's would be).
    teacher = export_head_model("dbnet_tiny", "deploy", calibration=torch.from_numpy(images[1]))
    small, _ = reduce(
        teacher, str(images[0]), budget="params=0.7", evaluate_accuracy=False, progress=False
    )
    assert_runs_at_declared_shapes(teacher, small)
    return save_model(teacher, folder / "t.onnx"), save_model(small, folder / "s.onnx")


def _agreement(model, teacher, data, capsys) -> dict:
    args = ["eval", str(model), "--teacher", str(teacher), "--data", str(data), "--json"]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_losses_default_by_shape_and_user_choice() -> None:
    shapes = {"logits": (8, 10), "boxes": (8, 252, 9), "map": (8, 1, 64, 64)}
    assert choose_losses(shapes) == {"logits": "kl", "boxes": "mse", "map": "mse"}
    assert choose_losses(shapes, {"logits": "mse", "map": "none"})["logits"] == "mse"
    assert parse_loss_specs(["a=b=mse"]) == {"a=b": "mse"}
    with pytest.raises(BadInputError, match="kl loss needs"):
        choose_losses(shapes, {"map": "kl"})
    with pytest.raises(BadInputError, match="does not have"):
        choose_losses(shapes, {"nosuch": "mse"})
    with pytest.raises(BadInputError, match="unknown loss 'l2'"):
        parse_loss_specs(["map=l2"])


def test_label_map_scores_default_to_kl_along_the_argmax_axis() -> None:
    """An ArgMax's label map distils its scores by KL along the ArgMax's axis, averaged over
    the other positions (as numpy computes it), with or without `--logits none`; mse is a
    choice; (batch, classes) logits keep Hinton's batchmean."""
    shapes = {"labels": (2, 3, 4, 5), "boxes": (2, 8, 4)}
    assert choose_losses(shapes, label_maps=["labels"]) == {"labels": "kl", "boxes": "mse"}
    assert choose_losses(shapes, logits="none", label_maps=["labels"])["labels"] == "kl"
    assert choose_losses(shapes, {"labels": "mse"}, label_maps=["labels"])["labels"] == "mse"
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5)) * 3
    temperature, axis = 2.0, 3

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)

    p, q = softmax(t / temperature), softmax(s / temperature)
    expected = (p * (np.log(p) - np.log(q))).sum(axis).mean() * temperature**2
    got = kd_kl(torch.from_numpy(s), torch.from_numpy(t), temperature, axis)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    s2, t2 = torch.from_numpy(s[:, :, 0, 0]), torch.from_numpy(t[:, :, 0, 0])
    assert float(kd_kl(s2, t2, temperature)) == pytest.approx(
        float(kd_kl(s2[..., None], t2[..., None], temperature)), rel=1e-9
    )


def test_nonfinite_student_rows_never_agree() -> None:
    nan = _Accumulator("logits", (2, 3))
    nan.add(np.full((2, 3), np.nan, np.float32), np.eye(2, 3, dtype=np.float32))
    assert nan.result().top1 == 0.0 and nan.result().cosine == 0.0


def _dense_heads(seed: int) -> onnx.ModelProto:
    """One Conv's (batch, 4, 8, 8) raw map (regression: no IoU) and what a graph makes of it:
    an ArgMax label map (keepdims, int64), Sigmoid probabilities (2 channels, resized x2
    linear), class-axis Softmax probabilities, and a boolean mask; and outputs with no IoU:
    integers a Cast makes, a detector's (batch, boxes, 4) Sigmoid rows."""
    rng = np.random.default_rng(seed)
    h = onnx.helper
    nodes = [
        h.make_node("Conv", ["x", "w"], ["raw"], pads=[1, 1, 1, 1]),
        h.make_node("ArgMax", ["raw"], ["labels"], axis=1),
        h.make_node("Sigmoid", ["raw"], ["sig"]),
        h.make_node("Slice", ["sig", "starts", "ends", "axes"], ["sig2"]),
        h.make_node("Resize", ["sig2", "", "scales"], ["prob"], mode="linear"),
        h.make_node("Softmax", ["raw"], ["classes"], axis=1),
        h.make_node("Greater", ["raw", "zero"], ["mask"]),
        h.make_node("Cast", ["raw"], ["ids"], to=onnx.TensorProto.INT64),
        h.make_node("Reshape", ["raw", "rows"], ["rows4"]),
        h.make_node("Sigmoid", ["rows4"], ["boxes"]),
        h.make_node("Cast", ["labels"], ["flabels"], to=onnx.TensorProto.FLOAT),
    ]
    inits = {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "starts": np.array([0]), "ends": np.array([2]), "axes": np.array([1]),
        "scales": np.array([1, 1, 2, 2], np.float32), "zero": np.zeros(1, np.float32),
        "rows": np.array([0, 64, 4]),
    }  # fmt: skip
    f, i64, b = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
    graph = h.make_graph(
        nodes,
        "heads",
        [h.make_tensor_value_info("x", f, ["n", 3, 8, 8])],
        [
            h.make_tensor_value_info(n, t, None)
            for n, t in [
                ("raw", f),
                ("labels", i64),
                ("prob", f),
                ("classes", f),
                ("mask", b),
                ("ids", i64),
                ("boxes", f),
                ("flabels", f),
            ]  # fmt: skip
        ],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _mean_iou(s: np.ndarray, t: np.ndarray, classes) -> float:
    ious = [((s == c) & (t == c)).sum() / ((s == c) | (t == c)).sum() for c in classes]
    return float(np.mean([v for v in ious if np.isfinite(v)]))


def test_iou_only_where_it_means_something_and_as_numpy_computes_it(tmp_path, capsys) -> None:
    """`eval --teacher`'s IoU: the mean over classes for an integer label map (an in-graph
    ArgMax's output, which had none), the foreground IoU per channel at 0.5 for Sigmoid
    probabilities and for a mask, the argmax IoU for Softmax probabilities, and none for a
    raw Conv map (it took the argmax over 4 regression channels), integers other ops make or a
    detector's Sigmoid rows; figures as numpy computes
    them on the outputs onnxruntime gives."""
    teacher, student = _dense_heads(0), _dense_heads(0)
    w = student.graph.initializer[0]
    noisy = onnx.numpy_helper.to_array(w) + np.random.default_rng(1).normal(size=w.dims) * 0.5
    w.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), "w"))
    x = np.random.default_rng(2).integers(0, 256, size=(20, 3, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "x.npz", x=x)
    paths = [save_model(m, tmp_path / f"{n}.onnx") for n, m in (("t", teacher), ("s", student))]
    result = _agreement(paths[1], paths[0], tmp_path / "x.npz", capsys)["outputs"]
    names = [o.name for o in teacher.graph.output]
    ours, theirs = (dict(zip(names, run(m, x / np.float32(255)))) for m in (student, teacher))
    assert ours["labels"].dtype == np.int64 and ours["labels"].shape == (20, 1, 8, 8)
    for name in ("raw", "ids", "boxes"):
        assert result[name]["iou"] is None and result[name]["relative_error"] > 0
    s, t = ours["labels"], theirs["labels"]
    assert result["labels"]["iou"] == pytest.approx(_mean_iou(s, t, range(4)))
    assert 0 < result["labels"]["iou"] < 1
    assert result["flabels"]["iou"] == result["labels"]["iou"]  # `.argmax(1).float()`
    fore = [_mean_iou(ours["prob"][:, c] > 0.5, theirs["prob"][:, c] > 0.5, [True]) for c in (0, 1)]
    assert result["prob"]["iou"] == pytest.approx(np.mean(fore))
    s, t = ours["classes"].argmax(1), theirs["classes"].argmax(1)
    assert result["classes"]["iou"] == pytest.approx(_mean_iou(s, t, range(4)))
    assert result["classes"]["iou"] == pytest.approx(result["labels"]["iou"])
    assert result["mask"]["iou"] == pytest.approx(_mean_iou(ours["mask"], theirs["mask"], [True]))
    maps = {"labels": "labels", "flabels": "labels", "prob": "probabilities", "mask": "mask"}
    assert {n: o["map"] for n, o in result.items() if o["map"]} == maps | {"classes": "classes"}


def _grid_heads(seed: int, volume: bool = False) -> onnx.ModelProto:
    """A YOLO-style head: one Conv's (batch, 3 * 7, 8, 8) scores viewed as (batch, 3 anchors,
    7, 8, 8) and permuted to (batch, 3, 8, 8, 7) (xywh, objectness, 2 classes), then a Sigmoid
    over all of it ('grid'), a boolean of it ('gmask'), the class ids along its last axis
    ('cls', (batch, 3, 8, 8)) and a Softmax over its anchors ('soft'). `volume`: a 3-D
    segmentation net instead, a (batch, 2, 4, 8, 8) Sigmoid map of a (batch, 3, 4, 8, 8) input."""
    rng = np.random.default_rng(seed)
    h, f = onnx.helper, onnx.TensorProto.FLOAT
    if volume:
        w = rng.normal(size=(2, 3, 3, 3, 3)).astype(np.float32)
        nodes = [h.make_node("Conv", ["x", "w"], ["raw"], pads=[1] * 6),
                 h.make_node("Sigmoid", ["raw"], ["vol"])]  # fmt: skip
        inits, shape = {"w": w}, ["n", 3, 4, 8, 8]
        outputs = [("vol", f)]
    else:
        nodes = [
            h.make_node("Conv", ["x", "w"], ["raw"], pads=[1, 1, 1, 1]),
            h.make_node("Reshape", ["raw", "view"], ["r5"]),
            h.make_node("Transpose", ["r5"], ["t5"], perm=[0, 1, 3, 4, 2]),
            h.make_node("Sigmoid", ["t5"], ["grid"]),
            h.make_node("Greater", ["grid", "half"], ["gmask"]),
            h.make_node("ArgMax", ["t5"], ["cls"], axis=-1, keepdims=0),
            h.make_node("Softmax", ["t5"], ["soft"], axis=1),
        ]
        inits = {
            "w": rng.normal(size=(21, 3, 3, 3)).astype(np.float32),
            "view": np.array([0, 3, 7, 8, 8]), "half": np.array([0.5], np.float32),
        }  # fmt: skip
        shape = ["n", 3, 8, 8]
        i64, b = onnx.TensorProto.INT64, onnx.TensorProto.BOOL
        outputs = [("grid", f), ("gmask", b), ("cls", i64), ("soft", f)]
    graph = h.make_graph(
        nodes,
        "grid",
        [h.make_tensor_value_info("x", f, shape)],
        [h.make_tensor_value_info(n, t, None) for n, t in outputs],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("volume", [False, True])
def test_iou_only_for_maps_over_the_inputs_positions(volume, tmp_path, capsys) -> None:
    """A YOLO head's (batch, anchors, H, W, 5 + classes) Sigmoid output got a 'foreground IoU'
    per anchor of box coordinates, objectness and class scores thresholded at 0.5, and its
    boolean, its class ids along the last axis and a Softmax over its anchors got IoUs too:
    figures that mean nothing. A map has an IoU only at the input's rank ((batch, C, H, W)
    probabilities, classes or mask of an image; (batch, H, W) labels, or (batch, 1, H, W)),
    as a 3-D net's (batch, C, D, H, W) Sigmoid map of a (batch, 3, D, H, W) input still has;
    the report names what each IoU is of, and why the others have none."""
    teacher, student = _grid_heads(0, volume), _grid_heads(0, volume)
    w = student.graph.initializer[0]
    noisy = onnx.numpy_helper.to_array(w) + np.random.default_rng(1).normal(size=w.dims) * 0.3
    w.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), "w"))
    rng = np.random.default_rng(2)
    # A volume is fed as it is (model-ready float32); images are read as uint8 pixels.
    x = rng.random((12, 3, 4, 8, 8), np.float32) if volume else rng.integers(0, 256, (12, 3, 8, 8))
    np.savez(tmp_path / "x.npz", x=x if volume else x.astype(np.uint8))
    paths = [save_model(m, tmp_path / f"{n}.onnx") for n, m in (("t", teacher), ("s", student))]
    if volume:
        (ours,), (theirs,) = run(student, x), run(teacher, x)
        result = _agreement(paths[1], paths[0], tmp_path / "x.npz", capsys)["outputs"]["vol"]
        fore = [_mean_iou(ours[:, c] > 0.5, theirs[:, c] > 0.5, [True]) for c in (0, 1)]
        assert result["iou"] == pytest.approx(np.mean(fore)) and result["map"] == "probabilities"
        return
    result = _agreement(paths[1], paths[0], tmp_path / "x.npz", capsys)["outputs"]
    for name in ("grid", "gmask", "cls", "soft"):
        assert result[name]["iou"] is None and result[name]["map"] is None, name
        assert 0 < result[name]["relative_error"] < 1
    args = ["eval", str(paths[1]), "--teacher", str(paths[0]), "--data", str(tmp_path / "x.npz")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "IoU: none for 'grid', 'gmask', 'cls', 'soft': not a label map, mask or " in out


def test_cosine_of_outputs_that_are_both_zero_is_one() -> None:
    """A sample whose student and teacher outputs are both all zero (an empty mask, a
    label map of class 0 only) agrees exactly: cosine 1, not 0 (orthogonal); one zero
    against a non-zero output still scores 0."""
    teacher = np.zeros((2, 1, 4, 4), np.float32)
    teacher[1, 0, 0] = 1.0
    student = teacher.copy()
    acc = _Accumulator("mask", teacher.shape)
    acc.add(student, teacher)
    assert acc.result().cosine == pytest.approx(1.0)
    one_zero = _Accumulator("mask", teacher.shape)
    one_zero.add(np.zeros_like(teacher), teacher)
    assert one_zero.result().cosine == pytest.approx(0.5)  # sample 0 agrees, sample 1 does not


def test_label_free_retrain_of_a_dense_map_graph_raises_agreement(dbnet, images, tmp_path, capsys):
    teacher, small = dbnet
    data = images[0]
    before = _agreement(small, teacher, data, capsys)
    assert set(before["outputs"]) == {"prob", "thresh"}
    out = tmp_path / "s.ft.onnx"
    code = main(
        ["retrain", str(small), "-o", str(out), "--data", str(data), "--teacher", str(teacher)]
        + ["--epochs", "2", "--lr", "0.02", "--batch-size", "16", "--augment", "none"]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "prob=mse, thresh=mse; no labels" in err and "re-inserted" in err
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    source = onnx.load(small)
    assert [n.name for n in written.graph.node] == [n.name for n in source.graph.node]
    assert written.graph.input == source.graph.input and written.graph.output == source.graph.output
    after = _agreement(out, teacher, data, capsys)
    for name in ("prob", "thresh"):
        assert after["outputs"][name]["relative_error"] < before["outputs"][name]["relative_error"]


def test_fixed_batch_graph_is_refused_in_one_line(images) -> None:
    teacher = load_model(export_head_model("yolo_tiny", "deploy", dynamic_batch=False))
    with pytest.raises(BadInputError, match="cannot run a batch of 8 .*dynamic batch"):
        retrain(teacher, (images[1], None), teacher=teacher, batch_size=8, progress=False)


def test_label_free_on_the_bundled_classifier(bundled_small, bundled_model_path, capsys, tmp_path):
    train = bundled_model_path.parent / "fmnist_train_sample.npz"
    test = bundled_model_path.parent / "fmnist_sample.npz"
    before = _agreement(bundled_small, bundled_model_path, test, capsys)["outputs"]["logits"]
    out = tmp_path / "s.onnx"
    code = main(
        ["retrain", str(bundled_small), "-o", str(out), "--data", str(train), "--no-labels"]
        + ["--teacher", str(bundled_model_path), "--limit", "512", "--lr", "0.02"]
    )
    assert code == 0
    err = capsys.readouterr().err  # the output taken for logits by its shape is named
    assert "logits=kl (chosen by its shape" in err and "; no labels used" in err
    after = _agreement(out, bundled_model_path, test, capsys)["outputs"]["logits"]
    assert after["top1"] > before["top1"] + 0.1
    assert after["relative_error"] < before["relative_error"]


def _refused(args: list[str], out, capsys, expected: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    # Commands print what data they read first; the refusal itself is one line, no traceback.
    lines = [x for x in err.splitlines() if not x.startswith(("data:", "preprocessing:"))]
    assert len(lines) == 1 and lines[0].startswith("onnx-mbs: error:") and expected in err, err
    assert not out.exists()


def test_bad_input_one_line_exit_2_nothing_written(
    bundled_small, bundled_model_path, dbnet, images, tmp_path, capsys
):
    out = tmp_path / "out.onnx"
    retrain_small = ["retrain", str(bundled_small), "-o", str(out)]
    train = str(bundled_model_path.parent / "fmnist_train_sample.npz")
    unlabelled = tmp_path / "nolabels.npz"
    np.savez(unlabelled, x=np.zeros((8, 1, 28, 28), np.uint8))
    _refused([*retrain_small, "--data", str(unlabelled)], out, capsys, "give labels or a --teacher")
    # A teacher with other outputs (names) and one whose output shapes differ.
    teacher, _ = dbnet
    other = onnx.load(bundled_model_path)
    other.graph.output[0].name = other.graph.node[-1].output[0] = "scores"
    _refused(
        [*retrain_small, "--data", train, "--teacher", str(save_model(other, tmp_path / "o.onnx"))],
        out,
        capsys,
        "the teacher has no output 'logits'",
    )
    renamed = onnx.load(bundled_model_path)
    fc = renamed.graph.node[-1]
    assert fc.op_type == "Gemm"
    w = next(t for t in renamed.graph.initializer if t.name == fc.input[1])
    b = next(t for t in renamed.graph.initializer if t.name == fc.input[2])
    w.CopyFrom(onnx.numpy_helper.from_array(np.zeros((5, w.dims[1]), np.float32), w.name))
    b.CopyFrom(onnx.numpy_helper.from_array(np.zeros(5, np.float32), b.name))
    renamed.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    five = save_model(renamed, tmp_path / "five.onnx")
    _refused(
        [*retrain_small, "--data", train, "--teacher", str(five)],
        out,
        capsys,
        "has shape [64, 10] in the model but [64, 5] in the teacher",
    )
    _refused(
        [*retrain_small, "--data", train, "--teacher", str(bundled_model_path), "--loss", "x=l2"],
        out,
        capsys,
        "unknown loss 'l2'",
    )
    _refused(
        [*retrain_small, "--data", train, "--teacher", str(bundled_model_path)]
        + ["--loss", "nosuch=mse"],
        out,
        capsys,
        "does not have",
    )
    _refused(
        ["eval", str(bundled_small), "--teacher", str(teacher), "--data", train],
        out,
        capsys,
        "the teacher has no output(s) ['logits']",
    )


def test_refusal_after_the_data_is_read_leaves_no_checkpoint_folder(
    bundled_small, bundled_model_path, tmp_path, capsys
) -> None:
    """A run refused before training (here: a teacher whose outputs differ) leaves nothing
    behind: not even the empty --checkpoint folder it would have trained into."""
    out, folder = tmp_path / "out.onnx", tmp_path / "ck"
    renamed = onnx.load(bundled_model_path)
    renamed.graph.output[0].name = renamed.graph.node[-1].output[0] = "scores"
    teacher = save_model(renamed, tmp_path / "scores.onnx")
    args = ["retrain", str(bundled_small), "-o", str(out), "--limit", "8", "--workers", "0"]
    args += ["--data", str(bundled_model_path.parent / "fmnist_train_sample.npz")]
    args += ["--teacher", str(teacher), "--checkpoint", str(folder)]
    _refused(args, out, capsys, "the teacher has no output 'logits'")
    assert not folder.exists()


def test_feature_missing_from_a_graph_is_refused(
    bundled_small, bundled_model_path, tmp_path, capsys
) -> None:
    """--feature naming a tensor one graph does not compute: one line, not a KeyError."""
    out = tmp_path / "out.onnx"
    args = ["retrain", str(bundled_small), "-o", str(out), "--limit", "8", "--workers", "0"]
    args += ["--data", str(bundled_model_path.parent / "fmnist_train_sample.npz")]
    args += ["--teacher", str(bundled_model_path)]
    _refused([*args, "--feature", "nosuch"], out, capsys, "'nosuch' is not computed by")
    renamed = onnx.load(bundled_model_path)
    stem = renamed.graph.node[0].output[0]
    for node in renamed.graph.node:
        node.input[:] = ["stem_out" if i == stem else i for i in node.input]
    renamed.graph.node[0].output[0] = "stem_out"
    teacher = save_model(renamed, tmp_path / "renamed.onnx")
    args[args.index("--teacher") + 1] = str(teacher)
    _refused([*args, "--feature", stem], out, capsys, "is not computed by the teacher")


def test_reduce_recalibrate_report_describes_the_written_model(
    bundled_model_path, tmp_path, capsys
) -> None:
    """--report states the model that was written: recalibrated, with its top-1 after."""
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    out, folder = tmp_path / "small.onnx", tmp_path / "report"
    args = ["reduce", str(bundled_model_path), "-o", str(out), "--data", data, "--limit", "128"]
    assert main([*args, "--budget", "params=0.5", "--recalibrate", "--report", str(folder)]) == 0
    capsys.readouterr()
    report = json.loads((folder / "report.json").read_text())
    recal = report["recalibration"]
    assert recal["batches"] == 2
    assert recal["top1"] > report["accuracy"]["after"]["top1"] + 0.1
    assert f"top-1 after recalibration: {recal['top1']:.4f}" in (folder / "report.md").read_text()
    assert main(["eval", str(out), "--data", data, "--limit", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(recal["top1"])


def test_reduce_recalibrate(bundled_model_path, tmp_path, capsys) -> None:
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    out = tmp_path / "small.onnx"
    args = ["reduce", str(bundled_model_path), "-o", str(out), "--data", data]
    args += ["--budget", "params=0.5", "--json"]
    assert main([*args, "--recalibrate"]) == 0
    summary = json.loads(capsys.readouterr().out)
    recal = summary["recalibration"]
    assert recal["batches"] == 8
    assert recal["top1"] > summary["accuracy"]["after"]["top1"] + 0.1
    onnx.checker.check_model(onnx.load(out), full_check=True)
    _refused(
        ["reduce", str(bundled_model_path), "-o", str(tmp_path / "x.onnx"), "--recalibrate"],
        tmp_path / "x.onnx",
        capsys,
        "--recalibrate re-estimates",
    )
    folded = save_model(export_head_model("yolo_tiny", "deploy"), tmp_path / "yolo.onnx")
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 3, 64, 64), np.uint8))
    _refused(
        ["reduce", str(folded), "-o", str(tmp_path / "y.onnx"), "--data", str(tmp_path / "x.npz")]
        + ["--recalibrate"],
        tmp_path / "y.onnx",
        capsys,
        "no BatchNormalization",
    )


class _SegNet(torch.nn.Module):
    """A tiny segmentation net whose graph ends in ArgMax: (batch, H, W) int64 class labels."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        nn = torch.nn
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(24, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.head(torch.cat([self.up(self.b(a)), a], 1)).argmax(1)


@pytest.fixture(scope="module")
def segnet(tmp_path_factory, images) -> tuple:
    """(teacher, reduced) files of `_SegNet`, BN measured on the images, exported BN-folded
    with a dynamic batch; the teacher's label maps use every class."""
    from onnx_mbs.models.export import export_onnx

    folder = tmp_path_factory.mktemp("segnet")
    torch.manual_seed(0)
    net = _SegNet()
    net.head.weight.data *= 20  # class scores apart, as a trained head's (not all ties)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(images[1]))  # BN statistics of the images
    teacher = export_onnx(net, (1, 3, 64, 64), dynamic_batch=True, output_names=("labels",))
    assert [n.op_type for n in teacher.graph.node][-1] == "ArgMax"
    small, _ = reduce(
        teacher, str(images[0]), budget="params=0.6", evaluate_accuracy=False, progress=False
    )
    return save_model(teacher, folder / "t.onnx"), save_model(small, folder / "s.onnx")


def test_segmentation_net_ending_in_argmax_retrains_on_its_class_scores(
    segnet, images, tmp_path, capsys
) -> None:
    """An in-graph ArgMax gives integer labels, which no loss can train: retrain distils the
    class scores the ArgMax reads against the teacher's, and the written model keeps the
    ArgMax, its int64 (batch, H, W) output and the original names; the label maps come closer
    to the teacher's."""
    teacher, small = segnet
    x = images[1]
    (reference,) = run(onnx.load(teacher), x)
    assert len(np.unique(reference)) == 4
    out = tmp_path / "s.ft.onnx"
    code = main(
        ["retrain", str(small), "-o", str(out), "--data", str(images[0]), "--teacher", str(teacher)]
        + ["--epochs", "3", "--lr", "0.05", "--batch-size", "16", "--augment", "none"]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "distillation: labels=kl on the class scores its ArgMax reads; no labels" in err, err
    written, source = onnx.load(out), onnx.load(small)
    onnx.checker.check_model(written, full_check=True)
    assert [n.name for n in written.graph.node] == [n.name for n in source.graph.node]
    assert written.graph.input == source.graph.input and written.graph.output == source.graph.output
    assert written.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert_runs_at_declared_shapes(onnx.load(teacher), written)
    (labels,) = run(written, x)
    assert labels.dtype == np.int64 and labels.shape == reference.shape == (len(x), 64, 64)
    # What was trained: the decisions on the scores the ArgMax reads came closer to the
    # teacher's (KL along its axis at every pixel).
    (before,) = run(source, x)
    assert (labels == reference).mean() > (before == reference).mean()


def test_integer_outputs_no_loss_can_train_are_refused_in_one_line(segnet, images) -> None:
    """An integer output that is not an ArgMax's label map (here an ArgMin's indices) crashed
    in backward ('element 0 of tensors does not require grad'); a label map whose teacher
    output is not an ArgMax's has no scores to compare. Both are refused naming the way out."""
    teacher = onnx.load(segnet[0])
    argmin = onnx.load(segnet[0])
    argmin.graph.node[-1].op_type = "ArgMin"
    x = (images[1], None)
    # Named as Python spells it (it said losses='labels=none', which retrain cannot read).
    with pytest.raises(BadInputError, match="'labels' holds int64 values.*'labels': 'none'"):
        retrain(argmin, x, teacher=argmin, epochs=1, batch_size=16, progress=False)
    with pytest.raises(BadInputError, match="not made by an ArgMax.*'labels': 'none'"):
        retrain(teacher, x, teacher=argmin, epochs=1, batch_size=16, progress=False)


class _Decisions(torch.nn.Module):
    """conv, a 4-class head, and two outputs no loss can train: the head's positive classes
    (bool, (batch, 4)) and its least likely class (an ArgMin's int64 (batch,))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return z, z > 0, z.argmin(1)


def test_every_output_no_loss_can_train_is_named_in_one_refusal(images, tmp_path, capsys) -> None:
    """Two outputs without a gradient: the refusal named the first only, so a run was refused
    once per output, each time naming one more `--loss OUTPUT=none`. One line names them all
    with the options that leave them out, as the door in use spells them."""
    from onnx_mbs.models.export import export_onnx

    torch.manual_seed(0)
    names = ("logits", "pos", "worst")
    model = export_onnx(_Decisions(), (1, 3, 64, 64), dynamic_batch=True, output_names=names)
    x = (images[1][:16], None)
    said = (
        r"outputs 'pos' \(bool\) and 'worst' \(int64\) hold values that carry no gradient: no "
        r"loss can train them; leave them out with losses=\{'pos': 'none', 'worst': 'none'\}$"
    )
    with pytest.raises(BadInputError, match=said):
        retrain(model, x, teacher=model, epochs=1, batch_size=8, progress=False)
    path = save_model(model, tmp_path / "m.onnx")
    args = ["retrain", str(path), "-o", str(tmp_path / "o.onnx"), "--data", str(images[0])]
    assert main([*args, "--teacher", str(path), "--limit", "16", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onnx-mbs: error: outputs 'pos' (bool) and 'worst' (int64)")
    assert err[-1].endswith("leave them out with --loss pos=none --loss worst=none"), err
    kept = {"pos": "none", "worst": "none"}
    result = retrain(model, x, teacher=model, epochs=1, batch_size=8, progress=False, losses=kept)
    assert result.losses == {"logits": "kl", **kept}


class _LabelsAfter(torch.nn.Module):
    """conv, ReLU, a 4-class 1x1 head, its ArgMax (keepdim), then `tail`: the label map
    upsampled (nearest, as float or back to int64) or cropped, all of which `eval --teacher`
    reads as a label map (`dense_maps`)."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = self.head(torch.relu(self.conv(x))).argmax(1, keepdim=True)
        if self.tail == "crop":
            return labels[:, :, 1:-1, 1:-1]
        up = torch.nn.functional.interpolate(labels.float(), scale_factor=2, mode="nearest")
        return up if self.tail == "float" else up.long()


@pytest.mark.parametrize("tail", ["float", "int64", "crop"])
def test_a_label_map_resized_or_cropped_after_its_argmax_retrains_on_the_scores(tail) -> None:
    """A label map upsampled (nearest) or sliced after its ArgMax is still one: `eval
    --teacher` gave it a label IoU, but retrain followed the ArgMax only through reshapes and
    Casts. As float it crashed in backward ('element 0 of tensors does not require grad'),
    as int64 or cropped it was refused as an integer output no loss can train. It is trained
    on the scores the ArgMax reads, as a label map its ArgMax makes directly."""
    from onnx_mbs.models.export import export_onnx

    torch.manual_seed(0)
    model = export_onnx(_LabelsAfter(tail), (1, 3, 16, 16), dynamic_batch=True,
                        output_names=("labels",))  # fmt: skip
    argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
    x = np.random.default_rng(0).random((8, 3, 16, 16)).astype(np.float32)
    result = retrain(model, (x, None), teacher=model, epochs=1, batch_size=4, progress=False)
    assert result.losses == {"labels": "kl"}
    assert result.scores == {"labels": argmax.input[0]}


@pytest.mark.parametrize("pool, kind", [("MaxPool", "labels"), ("AveragePool", None)])
def test_a_pooled_label_map_is_one_only_where_the_pool_keeps_class_ids(pool, kind) -> None:
    """Labels Cast to float and average-pooled hold values between class ids, truncated to
    ids for the IoU; they have none (as after a linear Resize). A max pool keeps ids."""
    from onnx_mbs.dense_maps import map_kind

    h = onnx.helper
    nodes = [
        h.make_node("ArgMax", ["x"], ["ids"], axis=1),
        h.make_node("Cast", ["ids"], ["f"], to=onnx.TensorProto.FLOAT),
        h.make_node(pool, ["f"], ["y"], kernel_shape=[2, 2]),
    ]
    f = onnx.TensorProto.FLOAT
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", f, [1, 4, 8, 8])],
        [h.make_tensor_value_info("y", f, None)],
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    assert map_kind(model, "y", np.zeros((1, 1, 7, 7), np.float32)) == kind


class _FloatMask(torch.nn.Module):
    """conv, then its (batch, 4, H, W) foreground mask as float: `(x > 0).float()`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) > 0).float()


def test_a_float_output_computed_from_a_comparison_is_refused_in_one_line() -> None:
    """A float output computed from booleans carries no gradient, as an integer one does,
    but its type passed the check: backward crashed ('element 0 of tensors does not require
    grad'). Refused in one line naming it."""
    from onnx_mbs.models.export import export_onnx

    torch.manual_seed(0)
    model = export_onnx(_FloatMask(), (1, 3, 16, 16), dynamic_batch=True, output_names=("mask",))
    x = np.random.default_rng(0).random((8, 3, 16, 16)).astype(np.float32)
    said = "no loss can train the model: no gradient comes through output.s. 'mask'"
    with pytest.raises(BadInputError, match=said):
        retrain(model, (x, None), teacher=model, epochs=1, batch_size=4, progress=False)
