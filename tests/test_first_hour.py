"""The first hour of a new user: --version, defaults in --help, one data line, torchvision."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest
from processes import run as run_process
from processes import started

from onnx_mbs.cli import build_parser, main
from onnx_mbs.models import FMNIST_SAMPLE


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"onnx-mbs {version('onnx-mbs')} (onnx {version('onnx')}, onnxruntime ")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", ["analyze", "reduce", "retrain", "eval"])
def test_every_option_says_its_default(command, capsys):
    parser = _subcommands()[command]
    owed = [
        a
        for a in parser._actions
        if a.option_strings and a.nargs != 0 and not a.required and a.dest != "help"
    ]
    assert owed
    text = " ".join(parser.format_help().split())
    for action in owed:
        assert "default" in (action.help or ""), action.option_strings
        if action.default is not None and not isinstance(action.default, list):
            # the value argparse will use is the one help shows, wherever the text says it
            shown = str(action.default)
            assert shown in text, (action.option_strings, shown)


def test_retrain_help_shows_its_training_defaults():
    parser = _subcommands()["retrain"]
    helps = {
        a.option_strings[-1]: parser._get_formatter()._expand_help(a)
        for a in parser._actions
        if a.option_strings
    }
    for option, default in [
        ("--epochs", "1"),
        ("--lr", "0.01"),
        ("--batch-size", "64"),
        ("--optimizer", "sgd"),
        ("--seed", "0"),
    ]:
        assert f"(default: {default}" in helps[option], (option, helps[option])
    text = " ".join(parser.format_help().split())
    assert all(" ".join(h.split()) in text for h in helps.values())  # and --help shows them


def test_eval_teacher_prints_its_data_line_once(bundled_model_path, capsys):
    model = str(bundled_model_path)
    args = ["eval", model, "--teacher", model, "--data", str(FMNIST_SAMPLE), "--limit", "32"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("data: npz fmnist_sample.npz") == 1
    assert err.count("preprocessing: ") == 1


def test_torchvision_imports_in_the_projects_environment():
    """The documented helper, in a fresh interpreter: a torchvision model builds, runs and
    exports to ONNX next to the CPU torch."""
    code = (
        "import io, torch\n"
        "from onnx_mbs.models.torchvision_cpu import import_torchvision\n"
        "tv = import_torchvision()\n"
        "m = tv.models.mobilenet_v3_small(num_classes=10).eval()\n"
        "x = torch.zeros(1, 3, 64, 64)\n"
        "print('x'.join(map(str, m(x).shape)))\n"
        "import onnx\n"
        "f = io.BytesIO()\n"
        "torch.onnx.export(m, (x,), f, dynamo=False)\n"
        "print(sum(n.op_type == 'Conv' for n in onnx.load_from_string(f.getvalue()).graph.node))\n"
    )
    done = run_process([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, convs = done.stdout.split()
    assert shape == "1x10"
    assert int(convs) > 40


def test_widths_png_keeps_labels_apart_and_the_x_axis_whole(zoo_onnx, tmp_path):
    """ShuffleNet V2: two one-layer macroblocks side by side, then 14, 26 and 14 layers."""
    from onnx_mbs.pipeline import reduce
    from onnx_mbs.report import widths_figure, write_report

    _, report = reduce(zoo_onnx("shufflenet_v2"), budget="flops=0.5", progress=False)
    assert [len(b.layers) for b in report.before.macroblocks][:2] == [1, 1]
    fig = widths_figure(report)
    (ax,) = fig.axes
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().isdigit()]
    assert [t.get_text() for t in labels] == [
        str(b.resolution[0]) for b in report.before.macroblocks
    ]
    boxes = [t.get_window_extent(renderer) for t in labels]
    for k, a in enumerate(boxes):
        for b in boxes[k + 1 :]:
            assert not a.overlaps(b), (a, b)
    figure = fig.bbox
    axes = ax.get_window_extent(renderer)
    title = ax.title.get_window_extent(renderer)
    for box in boxes:
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and box.y1 <= figure.y1
        assert box.y0 >= axes.y1 and box.y1 <= title.y0  # between the plot and its title
    assert not ax.get_legend().get_window_extent(renderer).overlaps(axes)
    layers = len(report.before.layers)
    assert ax.get_xlim() == (-0.5, layers - 0.5)  # every layer a whole unit, nothing beyond
    ticks = [t for t in ax.get_xticks() if -0.5 <= t <= layers - 0.5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert (tmp_path / "widths.png") in write_report(report, tmp_path)


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """`onnx-mbs analyze M | head -1`: the reader goes away; no traceback, the pipe's exit
    code (141, as a process SIGPIPE ends) and nothing on stderr."""
    from onnx_mbs.models import BUNDLED_DIR

    model = str(BUNDLED_DIR / "resnet20_fmnist.onnx")
    with started(
        [sys.executable, "-m", "onnx_mbs", "analyze", model],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        child.stdout.close()  # before the child writes: its first write meets a closed pipe
        err = child.stderr.read()
        assert child.wait(timeout=120) == 141
    assert err == ""
