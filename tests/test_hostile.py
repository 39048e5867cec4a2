# ruff: noqa: E501  (the case tables keep one case per line)
"""Hostile inputs (issue 26): crafted files, bounded resources, kills mid-save, bit depths, labels.

CASES run like the reliability suite's (tests/test_reliability.py: one line and exit 2 on
bad input, no traceback, every input unchanged, exactly the expected files written and each
fully checked), on the files tests/hostile_inputs.py crafts. The tests after them check what
a case table cannot: values, memory and time under a cap, real kills and stale leftovers.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile_inputs import constant_of_shape_bomb, expand_bomb, write_hostile_inputs
from processes import run as run_process
from processes import started
from test_reliability import TOUT, Case, run_case

import onnx_mbs
from onnx_mbs.cli import main
from onnx_mbs.data import open_data
from onnx_mbs.passes import BadInputError, load_model

R = "reduce {ws}/tiny.onnx --no-eval -o {ws}/out/r.onnx"
OUT = ("out/r.onnx",)

# fmt: off
CASES = [
    # Data loss: a report folder never replaces what the run did not write.
    Case("reduce-report-holds-input", R + " --report {ws}", 2, "holds the input model"),
    Case("reduce-report-holds-data", "reduce {ws}/tiny.onnx --no-eval -o {ws}/out/r.onnx --data {ws}/png8/c0 --report {ws}/png8", 2, "holds --data"),
    Case("reduce-report-holds-output", R + " --report {ws}/out", 2, "holds the output model"),
    Case("reduce-report-holds-foreign-files", R + " --report {ws}/sub", 2, "holds files onnx-mbs did not write (escape.onnx)"),
    # A folder named as a report file: the model was written, then 'nothing was written' (exit 2).
    Case("reduce-report-holds-a-folder-named-widths-png", R + " --report {ws}/dirrep", 2, "did not write (widths.png)"),
    Case("reduce-dry-run-report-holds-foreign-files", "reduce {ws}/tiny.onnx --dry-run --report {ws}/png8", 2, "did not write (c0, c1)"),
    # Silent wrong results.
    Case("eval-png16-scale-said", "eval {ws}/tiny.onnx --data {ws}/png16", 0, "16-bit /65535"),
    Case("eval-int32-image-refused", "eval {ws}/tiny.onnx --data {ws}/int32", 2, "32-bit integer pixels"),
    Case("reduce-training-info-dropped", (R + " --budget params=0.5").replace("tiny", "traininfo"), 0, "training_info (1 entry) was dropped", OUT),
    Case("retrain-bf16-invalid-refused", "retrain {ws}/bf16.onnx -o {ws}/out/t.onnx --data {ws}/data.npz", 2, "not valid ONNX"),
    # Crafted files: one line, exit 2.
    Case("analyze-raw-data-longer", "analyze {ws}/longraw.onnx", 2, "stores 584 bytes of data where its shape needs 576"),
    Case("reduce-raw-data-longer", "reduce {ws}/longraw.onnx -o {ws}/out/r.onnx", 2, "stores 584 bytes"),
    Case("retrain-raw-data-longer", "retrain {ws}/longraw.onnx -o {ws}/out/t.onnx --data {ws}/data.npz", 2, "stores 584 bytes"),
    Case("eval-raw-data-longer", "eval {ws}/longraw.onnx --data {ws}/data.npz", 2, "stores 584 bytes"),
    Case("reduce-external-data-longer", "reduce {ws}/extlong.onnx -o {ws}/out/r.onnx", 2, "where its shape needs 576"),
    Case("retrain-external-data-longer", "retrain {ws}/extlong.onnx -o {ws}/out/t.onnx --data {ws}/data.npz", 2, "where its shape needs 576"),
    Case("analyze-sparse-initializer", "analyze {ws}/sparse.onnx", 2, "sparse_initializer"),
    Case("reduce-sparse-initializer", "reduce {ws}/sparse.onnx -o {ws}/out/r.onnx", 2, "sparse_initializer"),
    Case("analyze-constant-of-shape-bomb", "analyze {ws}/cosbomb.onnx", 2, "ConstantOfShape 'bomb' makes a tensor of 1,500,000,000 elements"),
    Case("reduce-constant-of-shape-bomb-data", "reduce {ws}/cosbomb.onnx -o {ws}/out/r.onnx --data {ws}/data.npz", 2, "corrupt or crafted"),
    Case("eval-constant-of-shape-bomb", "eval {ws}/cosbomb.onnx --data {ws}/data.npz", 2, "corrupt or crafted"),
    Case("analyze-tile-bomb", "analyze {ws}/tilebomb.onnx", 2, "Tile 'bomb_tile' makes a tensor"),
    Case("reduce-huge-input-shape-data", "reduce {ws}/dyn.onnx -o {ws}/out/r.onnx --data {ws}/data.npz --input-shape x:1,1,300000,300000", 2, "more than the"),
    Case("eval-huge-input-shape", "eval {ws}/dyn.onnx --data {ws}/data.npz --input-shape x:1,1,300000,300000", 2, "more than the"),
    Case("retrain-huge-input-shape", "retrain {ws}/dyn.onnx -o {ws}/out/t.onnx --data {ws}/data.npz --input-shape x:1,1,300000,300000", 2, "more than the"),
    Case("eval-png-bomb", "eval {ws}/tiny.onnx --data {ws}/bomb", 2, "decompression bomb"),
    Case("reduce-png-bomb", "reduce {ws}/tiny.onnx -o {ws}/out/r.onnx --data {ws}/bomb", 2, "decompression bomb"),
    Case("retrain-png-bomb", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/bomb", 2, "decompression bomb"),
    # Misleading messages.
    # A Loop whose trip count follows the input size: its shape arithmetic now runs at run
    # time, so the model is analysed (the Loop pinned, see test_reliability) instead of refused.
    Case("analyze-loop-analysed", "analyze {ws}/loop.onnx", 0, "total: 36 params"),
    Case("eval-loop-says-what-it-outputs", "eval {ws}/loop.onnx --data {ws}/data.npz", 2, "no classifier output (batch, classes) with more than one class among its outputs ('y' (batch, 4, 16, 16))"),
    Case("reduce-conv1d-images-says-rank", "reduce {ws}/conv1d.onnx -o {ws}/out/r.onnx --data {ws}/png8", 2, "is 3-D (a Conv1d model's N, C, L): give a model-ready .npz"),
    Case("retrain-conv1d-images-says-rank", "retrain {ws}/conv1d.onnx -o {ws}/out/t.onnx --data {ws}/png8", 2, "give a model-ready .npz"),
    Case("reduce-conv1d-npz-named-after-input-is-model-ready", "reduce {ws}/conv1d.onnx -o {ws}/out/r.onnx --data {ws}/data.npz", 2, "model-ready data is fed as it is"),
    Case("retrain-no-labels-ignores-bad-labels", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/badlabels.npz --no-labels --teacher {ws}/teacher.onnx", 0, "labels: ignored", TOUT),
    Case("retrain-no-labels-ignores-2d-labels", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/badlabels2d.npz --no-labels --teacher {ws}/teacher.onnx", 0, "labels: ignored", TOUT),
    Case("eval-teacher-ignores-bad-labels", "eval {ws}/tiny.onnx --data {ws}/badlabels.npz --teacher {ws}/teacher.onnx", 0, "agreement with the teacher"),
    Case("eval-npz-channels-message", "eval {ws}/tiny.onnx --data {ws}/wide.npz", 2, "with C 1 or 3 (the model takes 1)"),
    Case("analyze-if-nested-40", "analyze {ws}/nested.onnx", 2, "nests subgraphs (If/Loop/Scan bodies) 40 levels deep"),
    Case("reduce-if-nested-40", "reduce {ws}/nested.onnx -o {ws}/out/r.onnx", 2, "40 levels deep"),
    Case("eval-npz-pickle-never-loaded", "eval {ws}/tiny.onnx --data {ws}/pickled.npz", 2, "allow_pickle=False"),
    Case("eval-onnxruntime-cannot-load", "eval {ws}/f64.onnx --data {ws}/data.npz", 2, "onnxruntime"),
]
# What must keep working beside them.
GOOD = [
    Case("analyze-if-nested-3", "analyze {ws}/nested3.onnx", 0, ""),
    Case("eval-png8", "eval {ws}/tiny.onnx --data {ws}/png8", 0, "8-bit pixels /255"),
]
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_hostile_inputs(tmp_path_factory.mktemp("hostile") / "ws")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES + GOOD])
def test_case(case: Case, inputs, tmp_path, monkeypatch):
    err = run_case(case, inputs, tmp_path, monkeypatch)
    assert "onnxruntime:" not in err and "[E:" not in err, err  # onnxruntime's own log lines
    if case.code == 2:
        assert len(err.strip().splitlines()) <= 3, err  # data: and preprocessing: at most


def test_there_are_enough_hostile_cases():
    assert len(CASES) >= 36 and len({c.id for c in CASES + GOOD}) == len(CASES + GOOD)


def _ws(inputs: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws, symlinks=True)
    return ws


def _run(argv: str, ws: Path, capsys) -> tuple[int, str]:
    code = main([a.format(ws=ws) for a in shlex.split(argv)])
    return code, capsys.readouterr().err


def test_earlier_report_replaced_file_by_file(inputs, tmp_path, capsys):
    """An earlier report's files are replaced by this run's, one by one."""
    ws = _ws(inputs, tmp_path)
    code, err = _run(R + " --report {ws}/oldrep", ws, capsys)
    assert code == 0, err
    report = json.loads((ws / "oldrep" / "report.json").read_text())
    assert report["provider"] == "none" and len(report["layers"]) == 3
    assert (ws / "oldrep" / "report.md").read_text() != "an earlier report\n"
    assert sorted(p.name for p in (ws / "oldrep").iterdir()) == [
        "report.json",
        "report.md",
        "widths.png",
    ]


@pytest.mark.parametrize("flags", [" -o {ws}/out/r.onnx", " --dry-run"], ids=["model", "dry-run"])
def test_report_path_a_dangling_link_is_refused_before_anything_is_written(
    flags, inputs, tmp_path, capsys
):
    """A --report path that is a link to nothing is neither a folder nor a name to make one
    at: the model was renamed into place, then the report's rename failed and the run said
    'nothing was written' (exit 2) beside the model it had written."""
    ws = _ws(inputs, tmp_path)
    (ws / "deadrep").symlink_to("nowhere")
    argv = "reduce {ws}/tiny.onnx --no-eval" + flags + " --report {ws}/deadrep"
    code, err = _run(argv, ws, capsys)
    assert code == 2, err
    assert "--report" in err and "a link to nothing" in err, err
    assert not (ws / "out" / "r.onnx").exists() and not list((ws / "out").iterdir())
    assert (ws / "deadrep").is_symlink() and not (ws / "nowhere").exists()


def test_png16_scores_like_png8(inputs):
    """The same pixels at 16 bits give the same model input as at 8 bits."""
    sources = [open_data(inputs / name, "x", [1, 1, 16, 16]) for name in ("png8", "png16")]
    x8, x16 = (next(iter(s.batches(64))).x for s in sources)
    assert x8.shape == x16.shape == (8, 1, 16, 16)
    np.testing.assert_allclose(x16, x8, atol=1e-6)
    assert x8.max() > 0.9  # the 16-bit pixels are not saturated either


def test_retrain_refuses_model_with_nonfinite_outputs(inputs, tmp_path, capsys, monkeypatch):
    """Finite weights can still overflow: the written model's outputs are checked first."""
    import onnx_mbs.bridge

    real = onnx_mbs.bridge.retrain

    def overflowing(*args, **kwargs):
        result = real(*args, **kwargs)
        for tensor in result.model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 4:
                values = onnx.numpy_helper.to_array(tensor) * np.float32(1e30)
                tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
        return result

    monkeypatch.setattr(onnx_mbs.bridge, "retrain", overflowing)
    ws = _ws(inputs, tmp_path)
    code, err = _run("retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/data.npz", ws, capsys)
    assert code == 2, err
    assert "NaN or inf outputs on" in err and "nothing written" in err
    assert not (ws / "out" / "t.onnx").exists()
    assert not [p for p in (ws / "out").iterdir()]


@pytest.mark.parametrize("make", [constant_of_shape_bomb, expand_bomb], ids=["cos", "tile"])
def test_shape_folding_never_evaluates_a_bomb(make, monkeypatch):
    """Nothing whose size numbers in the file set is made by the folding: sized first."""
    from onnx.reference import ReferenceEvaluator

    evaluated = []
    real = ReferenceEvaluator.run

    def spy(self, *args, **kwargs):
        evaluated.extend(n.op_type for n in self.proto_.graph.node)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ReferenceEvaluator, "run", spy)
    with pytest.raises(BadInputError, match="corrupt or crafted"):
        load_model(make())
    assert not {"ConstantOfShape", "Tile"} & set(evaluated)


def test_made_size_bound_lets_real_expansions_through():
    """An Expand of the input's own size (a mask) and a 2x Resize are not refused."""
    from graphs import Builder

    b = Builder("fine", seed=0)
    x = b.input("x", [1, 3, 64, 64])
    y = b.op("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = b.op("Relu", [b.conv(y, 3, 8)])
    shape = b.op("Shape", [y])
    mask = b.op("ConstantOfShape", [shape], value=onnx.helper.make_tensor("v", 1, [1], [1.0]))
    model = b.model([b.gap_head(b.op("Mul", [y, mask]), 8, 4)], ["logits"])
    analysis = onnx_mbs.passes.analyze_model(load_model(model))
    assert analysis.total_macs > 0


SUB_BYTE = ["INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2"]
SUB_BYTE = [name for name in SUB_BYTE if hasattr(onnx.TensorProto, name)]


@pytest.mark.parametrize("name", SUB_BYTE)
def test_sub_byte_tensors_are_sized_as_packed(name, tmp_path):
    """2-, 4- and 6-bit tensors store their elements packed (onnx writes 8 int2 values in 2
    bytes, 8 float6 in 6): the 2- and 6-bit ones were refused as 'corrupt or crafted', stored
    raw or as external data. One byte short is still refused."""
    from onnx_mbs.passes.integrity import check_stored_sizes

    dtype = onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, name))
    tensor = onnx.numpy_helper.from_array(np.zeros(8, dtype), "w")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [tensor]))
    assert check_stored_sizes(model) is False
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    external = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert check_stored_sizes(external, tmp_path) is True
    tensor.raw_data = tensor.raw_data[:-1]
    short = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [tensor]))
    with pytest.raises(BadInputError, match="corrupt or crafted"):
        check_stored_sizes(short)


def test_a_subgraph_under_an_attribute_typed_otherwise_has_its_tensors_checked():
    """An attribute typed INT whose `g` holds a graph: protobuf parses its tensors all the
    same, so `stored_tensors` walks the fields set, not the type (`graph.subgraphs` would skip
    it), and a corrupt tensor there is refused before anything reads it."""
    from onnx import helper, numpy_helper

    bad = numpy_helper.from_array(np.zeros(4, np.float32), "t")
    bad.dims[:] = [1_000_000]
    body = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["o"])],
        "body",
        [],
        [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, None)],
        [bad],
    )
    node = helper.make_node("Relu", ["x"], ["y"])
    attribute = node.attribute.add()
    attribute.name, attribute.type = "junk", onnx.AttributeProto.INT
    attribute.g.CopyFrom(body)
    value = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
    model = helper.make_model(helper.make_graph([node], "g", value[:1], value[1:]))
    with pytest.raises(BadInputError, match="'t' .*corrupt or crafted"):
        load_model(model)


# Leftovers -----------------------------------------------------------------------------


def _dead_pid() -> int:
    with started([sys.executable, "-c", "pass"]) as child:
        child.wait(timeout=120)
    return child.pid


def test_stale_temporaries_cleared_and_only_those(inputs, tmp_path, capsys, monkeypatch):
    """A later run removes what killed runs of this tool left (by name and pid, or by name and
    age for earlier versions' names), and nothing else."""
    ws = _ws(inputs, tmp_path)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)
    dead, alive = _dead_pid(), os.getpid()
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
    stale = []
    for folder in (ws / "out", tmpdir):
        for name in (
            f".onnx-mbs.{host}.{dead}.abcd1234.tmp",
            ".onnx-mbs.k2j4h5g6.tmp",
            "onnx-mbs-q1w2e3r4",
        ):
            if name.startswith("onnx-mbs-") and folder != tmpdir:
                continue  # made in TMPDIR only (beside an output that name is a user's)
            (folder / name).mkdir(mode=0o700)  # as TemporaryDirectory made it
            (folder / name / "model.onnx").write_bytes(b"partial")
            stale.append(folder / name)
        day_old = time.time() - 2 * 86400
        for name in (".onnx-mbs.k2j4h5g6.tmp", "onnx-mbs-q1w2e3r4"):
            if (folder / name).exists():
                os.utime(folder / name, (day_old, day_old))
    kept = [
        ws / "out" / f".onnx-mbs.{host}.{alive}.live0000.tmp",  # a run still going
        ws / "out" / f".onnx-mbs.otherhost.{dead}.abcd1234.tmp",  # another host's run
        ws / "out" / ".onnx-mbs.fresh000.tmp",  # an earlier version's, not a day old
        ws / "out" / ".onnx-mbs-notes.txt",  # the user's own
    ]
    for path in kept[:3]:
        path.mkdir()
    kept[3].write_text("mine")
    code, err = _run(
        "reduce {ws}/tiny.onnx --no-eval -o {ws}/out/r.onnx --data {ws}/data.npz", ws, capsys
    )
    assert code == 0, err
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert [p.name for p in tmpdir.iterdir()] == []


def test_a_users_onnx_mbs_named_folder_is_never_cleared(inputs, tmp_path, capsys, monkeypatch):
    """Earlier versions made `onnx-mbs-XXXXXXXX` folders (mode 0700) in TMPDIR only; a run
    cleared every day-old entry of that name in every folder it wrote to, so a user's
    `onnx-mbs-research` folder (or file) beside the output was removed with all it held."""
    ws = _ws(inputs, tmp_path)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)
    day_old = time.time() - 2 * 86400
    mine = []
    for folder in (ws / "out", tmpdir):
        (folder / "onnx-mbs-research").mkdir(mode=0o755)
        (folder / "onnx-mbs-research" / "notes.txt").write_text("mine")
        (folder / "onnx-mbs-baseline").write_text("mine")
        mine += [folder / "onnx-mbs-research", folder / "onnx-mbs-baseline"]
    for path in mine:
        os.chmod(path, 0o755)
        os.utime(path, (day_old, day_old))
    code, err = _run(
        "reduce {ws}/tiny.onnx --no-eval -o {ws}/out/r.onnx --data {ws}/data.npz", ws, capsys
    )
    assert code == 0, err
    assert [p for p in mine if not p.exists()] == []
    assert (ws / "out" / "onnx-mbs-research" / "notes.txt").read_text() == "mine"


def test_sigkill_mid_save_leftovers_cleared_by_next_run(inputs, tmp_path):
    """A run killed outright while saving leaves its temporary folder; the next run in that
    folder removes it."""
    ws = _ws(inputs, tmp_path)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killer = (
        "import os, signal, sys\n"
        "import onnx_mbs.save as save\n"
        "real = save.write_model\n"
        "def write_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "save.write_model = write_then_die\n"
        "from onnx_mbs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["reduce", str(ws / "tiny.onnx"), "--no-eval", "-o", str(ws / "out" / "r.onnx")]
    done = run_process([sys.executable, "-c", killer, *argv], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    left = [p for p in (ws / "out").iterdir()]
    assert len(left) == 1 and re.match(r"^\.onnx-mbs\..+\.tmp$", left[0].name), left
    done = run_process([sys.executable, "-m", "onnx_mbs", *argv], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert [p.name for p in (ws / "out").iterdir()] == ["r.onnx"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signal_the_moment_a_temporary_folder_appears(sig, inputs, tmp_path, capsys, monkeypatch):
    """An interrupt right after a temporary folder is made (beside -o or in TMPDIR) leaves
    nothing behind."""
    ws = _ws(inputs, tmp_path)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)
    real_mkdir = os.mkdir
    made: list[str] = []

    def mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        name = os.path.basename(os.fspath(path))
        if "onnx-mbs" in name and "probe" not in name:
            made.append(name)
            if len(made) == firing:
                os.kill(os.getpid(), sig)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for firing in range(1, 9):  # each temporary folder the run makes, in turn
            made.clear()
            monkeypatch.setattr(os, "mkdir", mkdir)
            code, err = _run(
                "reduce {ws}/tiny.onnx -o {ws}/out/r.onnx --data {ws}/data.npz --report {ws}/rep",
                ws,
                capsys,
            )
            monkeypatch.setattr(os, "mkdir", real_mkdir)
            if len(made) < firing:
                break  # the run made fewer folders: every one was tried
            assert code == (130 if sig == signal.SIGINT else 143), err
            assert "nothing written" in err
            assert sorted(p.name for p in (ws / "out").iterdir()) == [], firing
            assert not (ws / "rep").exists()
            assert [p.name for p in tmpdir.iterdir()] == [], firing
            assert not [p for p in ws.iterdir() if "onnx-mbs" in p.name], firing
    finally:
        signal.signal(signal.SIGINT, previous)
    assert firing >= 3  # the check's folder, the statistics' folder, the output's


# Bounded resources -------------------------------------------------------------------------

MEMORY_CAP = 2**30  # bytes of address space
TIME_LIMIT_S = 60
CAPPED = [
    "analyze {ws}/cosbomb.onnx",
    "analyze {ws}/tilebomb.onnx",
    "reduce {ws}/cosbomb.onnx -o {ws}/out/r.onnx --data {ws}/data.npz",
    "eval {ws}/cosbomb.onnx --data {ws}/data.npz",
    "eval {ws}/tiny.onnx --data {ws}/bomb",
    "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/bomb",
    "reduce {ws}/dyn.onnx -o {ws}/out/r.onnx --data {ws}/data.npz --input-shape x:1,1,300000,300000",
    "eval {ws}/dyn.onnx --data {ws}/data.npz --input-shape x:1,1,60000,60000",
    "reduce {ws}/extlong.onnx -o {ws}/out/r.onnx",
    "analyze {ws}/nested.onnx",
]


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


@pytest.mark.parametrize(
    "argv",
    CAPPED,
    ids=[a.split()[0] + "-" + a.split()[1].split("/")[-1] + f"-{k}" for k, a in enumerate(CAPPED)],
)
def test_small_crafted_inputs_refused_within_bounds(argv, inputs, tmp_path):
    """Every crafted input is at most 1 MB; under a 1 GB address-space cap and a minute, each
    command refuses it in one line (exit 2), with no file written."""
    ws = _ws(inputs, tmp_path)
    args = [a.format(ws=ws) for a in shlex.split(argv)]
    read = [Path(a) for a in args if Path(a).exists()]
    assert all(
        p.stat().st_size <= 2**20
        for f in read
        for p in ([f] if f.is_file() else f.rglob("*"))
        if p.is_file()
    )
    start = time.monotonic()
    done, lines = _one_line_refusal(args, tmp_path, _capped)
    assert time.monotonic() - start < TIME_LIMIT_S
    assert done.returncode == 2 and len(lines) == 1, done.stderr.decode()
    assert [p.name for p in (ws / "out").iterdir()] == []


def _one_line_refusal(args: list[str], tmp_path: Path, preexec=None):
    """Run the command in a process of its own (onnxruntime logs to the file descriptor, not to
    sys.stderr); its stderr lines other than the data and preprocessing it reports."""
    done = run_process(
        [sys.executable, "-m", "onnx_mbs", *args],
        capture_output=True,
        preexec_fn=preexec,
        timeout=TIME_LIMIT_S,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    err = done.stderr.decode()
    lines = [
        line
        for line in err.strip().splitlines()
        if not line.startswith(("data:", "preprocessing:"))
    ]
    assert all(line.startswith("onnx-mbs: error:") for line in lines), err
    return done, lines


@pytest.mark.parametrize(
    "argv",
    [
        "eval {ws}/badgather.onnx --data {ws}/data.npz",
        "reduce {ws}/badgather.onnx -o {ws}/out/r.onnx --data {ws}/data.npz",
        "eval {ws}/f64.onnx --data {ws}/data.npz",
    ],
    ids=["eval-run", "reduce-run", "eval-load"],
)
def test_onnxruntime_prints_no_lines_of_its_own(argv, inputs, tmp_path):
    """When onnxruntime fails, the user sees onnx-mbs's one line, not onnxruntime's log first."""
    ws = _ws(inputs, tmp_path)
    done, lines = _one_line_refusal([a.format(ws=ws) for a in shlex.split(argv)], tmp_path)
    assert done.returncode == 2 and len(lines) == 1 and "onnxruntime" in lines[0], lines
