"""Retrain and eval from the command line, on the bundled model reduced to half its size."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import write_npz
from graphs import assert_runs_at_declared_shapes
from test_retrain import export, quadrant_data

from onnx_mbs.bridge import OnnxModule
from onnx_mbs.cli import main
from onnx_mbs.passes.errors import BadInputError


def _eval(path, data, capsys) -> dict:
    assert main(["eval", str(path), "--data", str(data), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _node_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node]


def _torch_top1(model: onnx.ModelProto, x_uint8: np.ndarray, y: np.ndarray) -> float:
    meta = {p.key: p.value for p in model.metadata_props}
    mean, std = float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])
    module = OnnxModule(model).eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(((x_uint8 / 255.0 - mean) / std).astype(np.float32)))
    return float((logits.argmax(1).numpy() == y).mean())


def test_one_epoch_recovers_accuracy_and_ort_agrees(
    bundled_small, bundled_model_path, fmnist_sample, tmp_path, capsys
):
    data = bundled_model_path.parent / "fmnist_sample.npz"
    train = bundled_model_path.parent / "fmnist_train_sample.npz"
    before = _eval(bundled_small, data, capsys)
    assert before["samples"] == 512 and set(before) >= {"top1", "top5", "samples"}
    out = tmp_path / "small.ft.onnx"
    code = main(
        [
            "retrain",
            str(bundled_small),
            "-o",
            str(out),
            "--data",
            str(train),
            "--epochs",
            "1",
            "--lr",
            "0.02",
            "--seed",
            "0",
        ]
    )
    assert code == 0
    capsys.readouterr()
    after = _eval(out, data, capsys)
    assert after["top1"] > before["top1"]
    x, y = fmnist_sample
    retrained = onnx.load(out)
    assert _torch_top1(retrained, x, y) == pytest.approx(after["top1"], abs=1 / 512)
    # Round trip: same nodes, inputs, outputs (dynamic batch kept) as the reduced model.
    source = onnx.load(bundled_small)
    assert _node_names(retrained) == _node_names(source)
    assert [i.name for i in retrained.graph.input] == [i.name for i in source.graph.input]
    assert retrained.graph.output == source.graph.output
    assert retrained.graph.input[0] == source.graph.input[0]
    assert_runs_at_declared_shapes(source, retrained)


def test_eval_without_labels_and_retrain_bad_input(bundled_small, tmp_path, capsys):
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 1, 28, 28), np.uint8))
    assert main(["eval", str(bundled_small), "--data", str(tmp_path / "nolabels.npz")]) == 2
    assert "labels" in capsys.readouterr().err
    code = main(
        [
            "retrain",
            str(bundled_small),
            "-o",
            str(bundled_small),
            "--data",
            str(tmp_path / "nolabels.npz"),
        ]
    )
    assert code == 2
    assert "is the input model" in capsys.readouterr().err


def test_val_limit_without_val_is_refused(bundled_small, bundled_model_path, tmp_path, capsys):
    """--val-limit limits --val: alone it would be dropped without a word."""
    out = tmp_path / "out.onnx"
    data = str(bundled_model_path.parent / "fmnist_train_sample.npz")
    args = ["retrain", str(bundled_small), "-o", str(out), "--data", data, "--val-limit", "5"]
    args += ["--limit", "8", "--workers", "0"]
    assert main(args) == 2
    assert "--val-limit limits the --val data" in capsys.readouterr().err
    assert not out.exists()


def test_no_labels_without_a_teacher_says_so(bundled_small, bundled_model_path, tmp_path, capsys):
    """--no-labels on labelled data leaves nothing to learn from but a teacher: the refusal
    names the flag, not 'training data has no labels' (it has)."""
    out = tmp_path / "out.onnx"
    data = str(bundled_model_path.parent / "fmnist_train_sample.npz")
    args = ["retrain", str(bundled_small), "-o", str(out), "--data", data, "--no-labels"]
    args += ["--limit", "8", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--no-labels" in err and "--teacher" in err and "has no labels" not in err
    assert not out.exists()


@pytest.mark.parametrize("val_labels", [True, False], ids=["labelled", "unlabelled"])
def test_the_last_line_says_what_picked_the_best_epoch(
    val_labels, bundled_small, bundled_model_path, tmp_path, capsys
):
    """--no-labels ignores the --data labels only: a labelled --val still picks the best epoch
    by top-1 against its labels, without a teacher's agreement. The last line said "best epoch
    1: val top-1 ..." alone; it names the measure that picked it now."""
    x, y = (np.load(bundled_model_path.parent / "fmnist_sample.npz")[k][:8] for k in "xy")
    val = write_npz(tmp_path / "val.npz", x=x, **({"y": y} if val_labels else {}))
    out = tmp_path / "out.onnx"
    args = ["retrain", str(bundled_small), "-o", str(out), "--limit", "8", "--workers", "0"]
    args += ["--data", str(bundled_model_path.parent / "fmnist_train_sample.npz")]
    args += ["--no-labels", "--teacher", str(bundled_model_path), "--val", str(val)]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    if val_labels:
        assert last.startswith("best epoch 1 (by top-1 against the --val labels): val top-1 ")
    else:
        assert last.startswith(
            "best epoch 1 (by agreement with the teacher on --val): val agreement with the teacher "
        ), last


def test_data_lines_are_printed_by_rank_0_only(bundled_model_path, monkeypatch, capsys):
    """Under torchrun every rank opens the data: only rank 0 says what it read and how."""
    import argparse

    from onnx_mbs.cli import _open_for_model
    from onnx_mbs.passes import load_model

    model = load_model(str(bundled_model_path))
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    args = argparse.Namespace(mean=None, std=None)
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        _open_for_model(data, model, args, limit=8, split="train")
        err = capsys.readouterr().err
        assert ("data: " in err and "preprocessing: " in err) == printed, (rank, err)


def with_uint8_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` taking uint8 pixels, cast to float inside the graph."""
    graph = model.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = ["as_float" if i == name else i for i in node.input]
    graph.node.insert(0, onnx.helper.make_node("Cast", [name], ["as_float"], to=1))
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return model


def test_a_uint8_input_model_refuses_images_before_training(tmp_path, capsys) -> None:
    """Images are preprocessed to floats, which onnxruntime refuses for a uint8 input: that was
    said only after the whole training (when the written model was checked); now before."""
    onnx.save(with_uint8_input(export(keep_bn=True)), tmp_path / "u8.onnx")
    x, y = quadrant_data(32, seed=1)
    write_npz(tmp_path / "train.npz", x=np.clip(x * 60 + 60, 0, 255).astype(np.uint8), y=y)
    args = ["retrain", str(tmp_path / "u8.onnx"), "-o", str(tmp_path / "out.onnx")]
    args += ["--data", str(tmp_path / "train.npz"), "--batch-size", "16", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model input 'input' has type tensor(uint8); expected a float image tensor" in err
    assert "a model-ready .npz, an array named 'input'" in err
    assert "epoch 1/1" not in err and not (tmp_path / "out.onnx").exists()


def test_a_uint8_input_model_retrains_on_model_ready_data(tmp_path, capsys) -> None:
    """Model-ready uint8 data is what onnxruntime feeds a model taking uint8 pixels (a Cast in
    its graph); retrain() and reduce --recalibrate take it, the command line refused the model
    whatever the data ("expected a float image tensor"). It trains on it now: the written model
    keeps the uint8 input, passes the full checker, runs at every shape the original did, and
    the val top-1 printed is onnxruntime's on the written model. Images in --val are refused as
    in --data."""
    from test_retrain import ort_top1

    model = with_uint8_input(export(keep_bn=True))
    onnx.save(model, tmp_path / "u8.onnx")
    (x, y), (xv, yv) = quadrant_data(64, seed=1), quadrant_data(32, seed=2)
    pixels, val = (np.clip(a * 60 + 60, 0, 255).astype(np.uint8) for a in (x, xv))
    write_npz(tmp_path / "train.npz", input=pixels, y=y)
    write_npz(tmp_path / "val.npz", input=val, y=yv)
    write_npz(tmp_path / "images.npz", x=val, y=yv)
    out = tmp_path / "out.onnx"
    args = ["retrain", str(tmp_path / "u8.onnx"), "-o", str(out), "--seed", "0"]
    args += ["--data", str(tmp_path / "train.npz"), "--batch-size", "16", "--workers", "0"]
    assert main([*args, "--val", str(tmp_path / "images.npz")]) == 2
    err = capsys.readouterr().err
    last = "onnx-mbs: error: model input 'input' has type tensor(uint8); expected a float image"
    assert err.splitlines()[-1].startswith(last) and "epoch 1/" not in err and not out.exists()
    assert main([*args, "--val", str(tmp_path / "val.npz")]) == 0
    printed = capsys.readouterr().out
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert written.graph.input[0] == model.graph.input[0]  # name, uint8, dynamic batch
    assert_runs_at_declared_shapes(model, written)
    top1 = float(printed.split("val top-1 ")[1].split("%")[0]) / 100
    assert ort_top1(written, val, yv) == pytest.approx(top1, abs=5.1e-5)


def test_a_teacher_fed_another_input_type_is_refused_by_name(tmp_path, capsys) -> None:
    """The teacher is fed the model's data as it is: a float-input teacher of a model taking
    uint8 pixels was refused as "the teacher cannot run a batch of 16 in PyTorch (expected
    scalar type Byte but found Float); if its graph fixes the batch size ...", which is not
    the reason; now the two input types are named, before any training."""
    onnx.save(with_uint8_input(export(keep_bn=True)), tmp_path / "u8.onnx")
    onnx.save(export(keep_bn=True), tmp_path / "float.onnx")
    x, y = quadrant_data(32, seed=1)
    write_npz(tmp_path / "train.npz", input=np.clip(x * 60 + 60, 0, 255).astype(np.uint8), y=y)
    out = tmp_path / "out.onnx"
    args = ["retrain", str(tmp_path / "u8.onnx"), "-o", str(out), "--teacher"]
    args += [str(tmp_path / "float.onnx"), "--data", str(tmp_path / "train.npz"), "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "onnx-mbs: error: the teacher's input takes float, the model's uint8: the teacher is "
        "fed the model's data as it is; give a teacher with the model's input type"
    )
    assert "epoch 1/" not in err and not out.exists()


@pytest.mark.parametrize("uint8", ["model", "teacher"])
def test_eval_refuses_a_teacher_fed_another_input_type_as_retrain_does(tmp_path, capsys, uint8):
    """eval --teacher fed the teacher the model's uint8 pixels cast to float (or the
    teacher's uint8 the model's floats cut to integers), without a word: the agreement
    printed was right only where the uint8 graph does nothing before its Cast. retrain
    refuses such a teacher; eval and evaluate.agreement now do too, with its line."""
    from onnx_mbs.data.fit import open_for_model
    from onnx_mbs.evaluate import agreement

    paths = {"u8": tmp_path / "u8.onnx", "float": tmp_path / "float.onnx"}
    onnx.save(with_uint8_input(export(keep_bn=True)), paths["u8"])
    onnx.save(export(keep_bn=True), paths["float"])
    model, teacher = (
        (paths["u8"], paths["float"])
        if uint8 == "model"
        else (
            paths["float"],
            paths["u8"],
        )
    )
    x, _ = quadrant_data(16, seed=1)
    pixels = np.clip(x * 60 + 60, 0, 255).astype(np.uint8)
    write_npz(tmp_path / "d.npz", input=pixels if uint8 == "model" else pixels.astype(np.float32))
    kinds = ("float", "uint8") if uint8 == "model" else ("uint8", "float")
    line = (
        f"the teacher's input takes {kinds[0]}, the model's {kinds[1]}: the teacher is fed the "
        "model's data as it is; give a teacher with the model's input type"
    )
    argv = ["eval", str(model), "--teacher", str(teacher), "--data", str(tmp_path / "d.npz")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"onnx-mbs: error: {line}" and not captured.out
    data = open_for_model(str(tmp_path / "d.npz"), onnx.load(model), labels=False)
    with pytest.raises(BadInputError, match=f"^{line}$"):
        agreement(str(model), str(teacher), data, ["CPUExecutionProvider"], progress=False)


@pytest.mark.parametrize("ready", [False, True])
def test_a_model_with_two_inputs_is_refused_as_retrain_refuses_it(tmp_path, capsys, ready):
    """Retraining feeds one input. A model with a second (here unused) input was first told to
    "give an .npz with one array per input, named after it", which, given, was then refused
    ("retraining needs a model with one input"): both the data advice and, followed, the
    refusal; now the one refusal, before the data is read."""
    model = export(keep_bn=True)
    model.graph.input.append(
        onnx.helper.make_tensor_value_info("unused", onnx.TensorProto.FLOAT, ["n", 5])
    )
    onnx.save(model, tmp_path / "two.onnx")
    x, y = quadrant_data(16, seed=1)
    arrays = {"input": x, "unused": np.zeros((16, 5), np.float32)} if ready else {"x": x}
    write_npz(tmp_path / "train.npz", **arrays, y=y)
    args = ["retrain", str(tmp_path / "two.onnx"), "-o", str(tmp_path / "out.onnx")]
    args += ["--data", str(tmp_path / "train.npz"), "--batch-size", "8", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "retraining needs a model with one input, not ['input', 'unused']" in err
    assert "give an .npz" not in err and "data:" not in err


def test_an_audio_model_retrains_on_model_ready_data(tmp_path, capsys) -> None:
    """Retraining feeds one input, not only an NCHW image: the README's Limits said "`retrain`
    feeds one NCHW image input", yet a Conv1d model fed a model-ready npz (its one input,
    named after it) retrains from the command line. The written model keeps its input, passes
    the full checker and runs at every shape the original did."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(1, 8, 5, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv1d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).eval()
    path = tmp_path / "audio.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 32),),
        path,
        input_names=["wave"],
        output_names=["logits"],
        dynamic_axes={"wave": {0: "n"}, "logits": {0: "n"}},
        dynamo=False,
    )
    rng = np.random.default_rng(0)
    wave = rng.standard_normal((32, 1, 32)).astype(np.float32)
    write_npz(tmp_path / "ready.npz", wave=wave, y=rng.integers(0, 3, 32))
    out = tmp_path / "out.onnx"
    args = ["retrain", str(path), "-o", str(out), "--data", str(tmp_path / "ready.npz")]
    assert main([*args, "--teacher", str(path), "--batch-size", "16", "--workers", "0"]) == 0
    assert "error" not in capsys.readouterr().err
    written, model = onnx.load(out), onnx.load(path)
    onnx.checker.check_model(written, full_check=True)
    assert written.graph.input[0] == model.graph.input[0]
    assert_runs_at_declared_shapes(model, written)


def test_no_bn_reinsert_on_a_bn_kept_model_says_it_does_nothing(tmp_path, capsys) -> None:
    """--no-bn-reinsert only changes BN-folded graphs: on one that keeps its BatchNorms it was
    accepted without a word; now a note says so, and the run goes on."""
    onnx.save(export(keep_bn=True), tmp_path / "kept.onnx")
    x, y = quadrant_data(16, seed=1)
    write_npz(tmp_path / "train.npz", x=np.clip(x * 60 + 60, 0, 255).astype(np.uint8), y=y)
    args = ["retrain", str(tmp_path / "kept.onnx"), "-o", str(tmp_path / "out.onnx")]
    args += ["--data", str(tmp_path / "train.npz"), "--batch-size", "8", "--workers", "0"]
    assert main([*args, "--no-bn-reinsert"]) == 0
    assert "--no-bn-reinsert does nothing here" in capsys.readouterr().err
    onnx.save(export(keep_bn=False), tmp_path / "folded.onnx")
    args[1:4] = [str(tmp_path / "folded.onnx"), "-o", str(tmp_path / "out2.onnx")]
    assert main([*args, "--no-bn-reinsert"]) == 0
    assert "does nothing" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--teacher", "--val", "--checkpoint"])
def test_an_empty_path_is_refused(flag, tmp_path, capsys) -> None:
    """`--teacher "$TEACHER"` with TEACHER unset: an empty --teacher or --val was taken for none
    given, and the run trained without distilling (or kept the last epoch, not the best one)
    with exit 0."""
    from test_retrain_scale import pixels

    model, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(export(keep_bn=True), model)
    x, y = pixels(32, seed=1)
    data = write_npz(tmp_path / "t.npz", x=x, y=y)
    args = ["retrain", str(model), "-o", str(out), "--data", str(data), "--workers", "0"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--device", "cpu", flag, ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: an empty path" in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "command, flag",
    [("eval", "--teacher"), ("reduce", "--report"), ("reduce", "-o"), ("retrain", "-o")],
)
def test_an_empty_path_is_refused_by_every_command(
    command, flag, bundled_model_path, tmp_path, capsys
) -> None:
    """`eval --teacher "$T"` with T unset printed top-1 against the labels instead of the
    agreement asked for, exit 0; an empty --report read as the working directory."""
    data = bundled_model_path.parent / "fmnist_sample.npz"
    args = [command, str(bundled_model_path), "--data", str(data), "--limit", "16"]
    if flag == "--report":
        args += ["-o", str(tmp_path / "out.onnx")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, flag, ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "an empty path" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_augment_help_names_both_image_layouts(capsys) -> None:
    """`auto` augments image data read into an NHWC input too (docs/retrain.md): the help said
    "standard for image inputs (N, C, H, W)" alone."""
    with pytest.raises(SystemExit):
        main(["retrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(N, C, H, W) or (N, H, W, C) input" in text


@pytest.mark.parametrize("command", ["eval", "reduce", "retrain"])
def test_an_empty_data_path_is_refused_not_read_as_the_working_directory(
    command, bundled_model_path, tmp_path, monkeypatch, capsys
) -> None:
    """`--data "$DATA"` with DATA unset read the working directory as an image folder: run
    where class folders of images lie, eval scored them (exit 0) as the data asked for."""
    from PIL import Image

    for label in ("ant", "bee"):
        (tmp_path / label).mkdir()
        Image.new("L", (28, 28), 128).save(tmp_path / label / "x.png")
    monkeypatch.chdir(tmp_path)
    args = [command, str(bundled_model_path), "--data", ""]
    if command != "eval":
        args += ["-o", str(tmp_path / "out.onnx")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --data: an empty path" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.onnx").exists()
