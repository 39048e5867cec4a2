"""The `onnx-mbs` command as a deployment engineer meets it: its entry point, flags that would
be accepted and ignored, and what it prints where."""

from __future__ import annotations

import errno
import importlib.abc
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import random_images, write_npz
from graphs import run
from processes import run as run_process
from reliability_inputs import SIDE, tiny_cnn

from onnx_mbs.cli import main
from onnx_mbs.console import main as console_main

ROOT = Path(__file__).resolve().parent.parent


class _InterruptedImport(importlib.abc.MetaPathFinder):
    """Ctrl-C landing while `module` is imported (the command's imports take a second or more)."""

    def __init__(self, module: str) -> None:
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name == self.module:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_command_loads_gives_one_line_and_130(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "onnx_mbs.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport("onnx_mbs.cli"), *sys.meta_path])
    assert console_main(["analyze", "m.onnx"]) == 130
    err = capsys.readouterr().err
    assert err == "onnx-mbs: interrupted; nothing written\n"


def test_the_entry_points_load_nothing_heavy_before_they_can_catch_ctrl_c():
    assert 'onnx-mbs = "onnx_mbs.console:main"' in (ROOT / "pyproject.toml").read_text()
    assert "from onnx_mbs.console import main" in (ROOT / "onnx_mbs" / "__main__.py").read_text()
    code = "import sys, onnx_mbs.console; print(' '.join(sorted(sys.modules)))"
    out = run_process([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"onnx", "numpy", "onnx_mbs.cli", "onnx_mbs.passes"} & set(out.stdout.split())


def test_console_main_runs_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        console_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("onnx-mbs ")


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    """A 3-conv classifier on 1x16x16 images and 24 labelled images for it."""
    onnx.save(tiny_cnn(), tmp_path / "tiny.onnx")
    data = write_npz(tmp_path / "data.npz", **random_images(24, (1, SIDE, SIDE)))
    return tmp_path / "tiny.onnx", Path(data)


class _FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_stdout_on_a_full_disk_is_one_line_and_exit_2(tiny, json_flag, monkeypatch, capsys):
    model, _ = tiny
    monkeypatch.setattr(sys, "stdout", _FullDisk())
    assert main(["analyze", str(model), *json_flag]) == 2
    err = capsys.readouterr().err
    assert err == "onnx-mbs: error: cannot write to stdout: No space left on device\n"


def test_closed_stdout_is_refused_not_silently_dropped(tiny, monkeypatch, capsys):
    """With stdout closed (`>&-`) Python's sys.stdout is None and print() drops every line."""
    model, _ = tiny
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["analyze", str(model)]) == 2
    assert "cannot write to stdout: it is closed" in capsys.readouterr().err


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return run_process(
        [sys.executable, "-m", "onnx_mbs", *argv], stderr=subprocess.PIPE, text=True, **kwargs
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_stdout_to_dev_full_in_a_real_process(tiny):
    model, data = tiny
    with open("/dev/full", "w") as full:
        for argv in (["analyze", str(model), "--json"], ["eval", str(model), "--data", str(data)]):
            done = _run(argv, stdout=full)
            assert done.returncode == 2, done.stderr
            assert "Traceback" not in done.stderr
            assert done.stderr.splitlines()[-1] == (
                "onnx-mbs: error: cannot write to stdout: No space left on device"
            )


def test_closed_stdout_in_a_real_process(tiny):
    model, _ = tiny
    done = _run(["analyze", str(model), "--json"], preexec_fn=lambda: os.close(1))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write to stdout: it is closed" in done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_retrain_writes_its_model_before_its_stdout_line_can_fail(tiny, tmp_path):
    """Hours of training are not thrown away because the log's disk filled up."""
    model, data = tiny
    out = tmp_path / "ft.onnx"
    argv = ["retrain", str(model), "-o", str(out), "--data", str(data), "--batch-size", "8"]
    with open("/dev/full", "w") as full:
        done = _run([*argv, "--workers", "0"], stdout=full)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("onnx-mbs: error: cannot write to stdout")
    onnx.checker.check_model(onnx.load(out), full_check=True)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--limit", "5"], "--limit takes N samples of --data"),
        (["--logits", "nope"], "--logits names output 'nope' the model does not have"),
        (["--data", "{data}", "--no-eval", "--logits", "nope"], "--logits names output 'nope'"),
        (["--latency-threads", "1"], "--latency-threads sets the threads latency is timed"),
        (["--data", "{data}", "--latency-threads", "0"], "this run times nothing"),
    ],
    ids=[
        "limit-without-data",
        "logits-without-data",
        "logits-no-eval",
        "latency-threads-without-timing",
        "latency-threads-with-data",
    ],
)
def test_reduce_refuses_flags_it_would_ignore(tiny, tmp_path, extra, fragment, capsys):
    """As --mean without --data is: a typo or a flag that does nothing is said, not dropped."""
    model, data = tiny
    out = tmp_path / "r.onnx"
    argv = ["reduce", str(model), "-o", str(out), *[a.format(data=data) for a in extra]]
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_reduce_takes_the_logits_it_names_without_evaluating(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "r.onnx"
    argv = ["reduce", str(model), "-o", str(out), "--data", str(data), "--no-eval"]
    assert main([*argv, "--logits", "logits"]) == 0
    assert out.exists()


def test_two_input_shapes_for_one_input_are_refused_not_the_last_taken(tiny, capsys):
    model, _ = tiny
    shapes = ["--input-shape", "x:1,1,16,16", "--input-shape", "x:4,1,16,16"]
    assert main(["analyze", str(model), *shapes]) == 2
    assert "--input-shape gives input 'x' twice" in capsys.readouterr().err
    same = ["--input-shape", "x:4,1,16,16", "--input-shape", "x:4,1,16,16"]
    assert main(["analyze", str(model), "--json", *same]) == 0


def test_recalibrate_without_batchnorm_is_refused_before_the_reduction(tiny, tmp_path, capsys):
    """Not after minutes of statistics, planning and evaluation that are then thrown away."""
    model, data = tiny
    out = tmp_path / "r.onnx"
    argv = ["reduce", str(model), "-o", str(out), "--data", str(data), "--recalibrate"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnx-mbs: error: the model has no BatchNormalization"), err
    assert err.count("\n") == 1 and not out.exists()


def test_recalibrate_of_a_uint8_input_model_feeds_its_model_ready_data(tmp_path, capsys):
    """Model-ready uint8 data for a uint8-input model is what onnxruntime is fed: the reduction
    took it, then --recalibrate refused it ("expected a float image tensor"). It recalibrates
    on it now (the statistics: test_bn_reinsert.py); images, which are preprocessed to floats,
    are still refused for it in one line, before anything is written."""
    from test_cli_retrain import with_uint8_input
    from test_retrain import export, quadrant_data

    model, out, plain = tmp_path / "u8.onnx", tmp_path / "r.onnx", tmp_path / "plain.onnx"
    onnx.save(with_uint8_input(export(keep_bn=True)), model)
    x = np.clip(quadrant_data(32, seed=1)[0] * 60 + 60, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "ready.npz", input=x)
    argv = ["reduce", str(model), "--data", str(data)]
    assert main([*argv, "-o", str(plain)]) == 0
    assert main([*argv, "-o", str(out), "--recalibrate", "--batch-size", "8"]) == 0
    assert "BN recalibrated on 4 batches" in capsys.readouterr().out
    bn = next(n for n in onnx.load(out).graph.node if n.op_type == "BatchNormalization")
    stats = [{t.name: t for t in onnx.load(m).graph.initializer} for m in (plain, out)]
    assert stats[0][bn.input[3]] != stats[1][bn.input[3]]  # re-estimated
    assert run(onnx.load(out), {"input": x})[0].shape == (32, 4)
    images = write_npz(tmp_path / "images.npz", x=x)
    out.unlink()
    assert main(["reduce", str(model), "-o", str(out), "--data", str(images), "--recalibrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnx-mbs: error: ") and "tensor(uint8)" in err, err
    assert err.count("\n") == 1 and not out.exists()


def _batchnorm_in_a_function() -> onnx.ModelProto:
    """x (N,1,16,16) -> local.Block (Conv 1 -> 32, BatchNorm, Relu) -> pool -> Gemm (10): the
    graph itself shows no BatchNormalization; the function reduce inlines at load holds it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    block = helper.make_function(
        "local",
        "Block",
        ["x", "w", "s", "b", "m", "v"],
        ["y"],
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    weights = {
        "w": rng.standard_normal((32, 1, 3, 3)) / 3,
        "s": np.ones(32),
        "b": np.zeros(32),
        "m": np.zeros(32),
        "v": np.ones(32),
        "fc": rng.standard_normal((10, 32)) / 3,
        "fc_b": np.zeros(10),
    }
    nodes = [
        helper.make_node("Block", ["x", "w", "s", "b", "m", "v"], ["h"], domain="local"),
        helper.make_node("GlobalAveragePool", ["h"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_in_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[block], ir_version=8)


@pytest.mark.parametrize("batch_size", ["8", "1"])
def test_recalibrate_reads_the_batchnorms_of_the_functions_reduce_inlines(
    tiny, tmp_path, capsys, batch_size
):
    """The early refusal looks at the model as reduce sees it: a BatchNorm inside a local
    function that holds a layer is inlined at load, and recalibrated after the reduction.
    `--batch-size 1` was refused (batches of one were left out, as train-mode BatchNorm once
    needed): measured in eval mode, every sample is a batch of its own."""
    _, data = tiny
    model, out = tmp_path / "fn.onnx", tmp_path / "r.onnx"
    onnx.save(_batchnorm_in_a_function(), model)
    argv = ["reduce", str(model), "-o", str(out), "--data", str(data), "--no-eval"]
    argv += ["--budget", "params=0.5", "--recalibrate", "--batch-size", batch_size]
    assert main(argv) == 0, capsys.readouterr().err
    batches = -(-len(np.load(data)["x"]) // int(batch_size))
    assert batches == (3 if batch_size == "8" else 24)
    assert f"BN recalibrated on {batches} batches" in capsys.readouterr().out
    written = onnx.load(out)
    assert any(n.op_type == "BatchNormalization" for n in written.graph.node)


def test_recalibrate_of_a_fully_convolutional_net_of_any_size(tmp_path, capsys):
    """A segmentation net takes any H and W and is reduced at --input-shape; --recalibrate
    then refused it after the reduction, asking for the --input-shape it had been given."""
    from graphs import Builder, assert_runs_at_declared_shapes

    b = Builder("fcn")
    x = b.input("input", ["N", 3, "H", "W"])
    y = b.op("Relu", [b.bn(b.conv(x, 3, 16, bias=False), 16)])
    y = b.op("Relu", [b.bn(b.conv(y, 16, 16, bias=False), 16)])
    model, out = tmp_path / "fcn.onnx", tmp_path / "r.onnx"
    onnx.save(b.model([b.conv(y, 16, 4, k=1)], ["out"]), model)
    data = write_npz(tmp_path / "x.npz", **random_images(32, (12, 12, 3), labels=False))
    argv = ["reduce", str(model), "-o", str(out), "--data", data, "--budget", "params=0.6"]
    argv += ["--recalibrate", "--batch-size", "8", "--input-shape", "input:1,3,12,12"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "BN recalibrated on 4 batches" in capsys.readouterr().out
    assert_runs_at_declared_shapes(onnx.load(model), onnx.load(out), [1, 3, 12, 12])


def test_reduce_takes_latency_threads_where_it_times_and_notes_unused_providers(
    tiny, tmp_path, capsys
):
    """--latency-threads times --channel-multiple auto (and latency= budgets); --providers
    where no onnxruntime session is made (no --data, nothing timed) is said on stderr, as it
    does nothing this time."""
    model, _ = tiny
    out = tmp_path / "r.onnx"
    argv = ["reduce", str(model), "-o", str(out), "--providers", "cpu"]
    assert main([*argv, "--channel-multiple", "auto", "--latency-threads", "1"]) == 0
    assert "--providers cpu does nothing" not in capsys.readouterr().err
    out.unlink()
    assert main(argv) == 0
    assert "--providers cpu does nothing here: nothing runs on onnxruntime" in (
        capsys.readouterr().err
    )
    out.unlink()
    assert main(argv[:-2]) == 0  # auto, the default: nothing to say
    assert "does nothing" not in capsys.readouterr().err


def test_the_report_names_the_model_it_read_and_the_one_written_or_none(tmp_path, monkeypatch):
    """report.json and report.md named no file: a --dry-run into the folder of an earlier
    run's report replaced it with figures of a plan never written, beside the earlier model,
    and nothing in it said so. They name the model read and the model written (none on a
    dry run), as absolute paths: one relative to where the command ran is read from the
    report's folder as another file."""
    model, out, folder = tmp_path / "m.onnx", tmp_path / "small.onnx", tmp_path / "rep"
    onnx.save(tiny_cnn(), model)
    base = ["reduce", str(model), "--no-eval", "--report", str(folder)]
    monkeypatch.chdir(tmp_path)
    assert main([*base, "-o", "small.onnx", "--budget", "params=0.7"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["files"] == {"model": str(model), "written": str(out)}
    assert f"written: {out}" in (folder / "report.md").read_text()
    assert main([*base, "--dry-run", "--budget", "params=0.4"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["files"] == {"model": str(model), "written": None}
    assert "written: none (dry run)" in (folder / "report.md").read_text()
