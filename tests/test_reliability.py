# ruff: noqa: E501  (the case tables keep one case per line)
"""Reliability: every user error and environment fault gets one line and exit 2, with nothing
lost, nothing left behind and nothing silently wrong.

Each row of CASES is a command line (`{ws}` is a fresh copy of the inputs that
tests/reliability_inputs.py writes), the exit code and a fragment of stderr it
must give. Every case also checks: no "Traceback"; every input file's hash
unchanged; the files written are exactly the expected outputs (no temporary or
partial file); every written model passes the full checker and runs in
onnxruntime with the original's input names at every batch the original takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import assert_runs_at_declared_shapes
from processes import left, started
from processes import run as run_process
from reliability_inputs import write_inputs

import onnx_mbs
from onnx_mbs.cli import main
from onnx_mbs.data.fit import open_for_model
from onnx_mbs.passes import BadInputError, command_line

REPORT = ("rep/report.json", "rep/report.md", "rep/widths.png")
MNT_REPORT = ("mnt/report.json", "mnt/report.md", "mnt/widths.png")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # the command line after `onnx-mbs`; {ws} is the case's folder
    code: int
    fragment: str  # must appear on stderr
    outputs: tuple[str, ...] = ()  # the files it writes, relative to {ws}
    mount: str | None = None  # "ro", "full" or "rw": a small tmpfs at {ws}/mnt (root only)
    interrupt: str | None = None  # "TERM-run", "INT-run", "TERM-save", "INT-save"
    slow: bool = False  # the long tail, run with -m slow


# fmt: off
R = "reduce {ws}/tiny.onnx --no-eval"
RO = "-o {ws}/out/r.onnx"
T = "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/data.npz"
E = "eval {ws}/tiny.onnx --data {ws}/data.npz"
OUT = ("out/r.onnx",)
TOUT = ("out/t.onnx",)

# Data loss: an output that is, or resolves to, a file the run reads.
DATA_LOSS = [
    Case("reduce-o-is-data", "reduce {ws}/tiny.onnx -o {ws}/data.npz --data {ws}/data.npz", 2, "is --data"),
    Case("reduce-o-is-input", "reduce {ws}/tiny.onnx -o {ws}/tiny.onnx", 2, "is the input model"),
    Case("reduce-o-is-input-relative", "reduce {ws}/tiny.onnx -o {ws}/out/../tiny.onnx", 2, "is the input model"),
    Case("reduce-o-is-external-data", "reduce {ws}/ext.onnx -o {ws}/weights.bin", 2, "is the input model"),
    Case("reduce-o-is-function-external-data", "reduce {ws}/nested.onnx -o {ws}/fn.bin", 2, "is the input model"),
    Case("reduce-o-is-subgraph-external-data", "reduce {ws}/nested.onnx -o {ws}/branch.bin", 2, "is the input model"),
    Case("retrain-o-is-teachers-function-data", T.replace("{ws}/out/t.onnx", "{ws}/fn.bin") + " --teacher {ws}/nested.onnx", 2, "is --teacher"),
    Case("reduce-o-in-data-folder", "reduce {ws}/tiny.onnx -o {ws}/imgs/r.onnx --data {ws}/imgs", 2, "is inside --data"),
    Case("reduce-o-in-idx-folder", "reduce {ws}/tiny.onnx -o {ws}/idx/r.onnx --data {ws}/idx:train", 2, "is inside --data"),
    Case("reduce-o-is-idx-file", "reduce {ws}/tiny.onnx -o {ws}/idx/train-images-idx3-ubyte --data {ws}/idx:train", 2, "is inside --data"),
    Case("reduce-report-in-data-folder", R + " " + RO + " --data {ws}/imgs --report {ws}/imgs/rep", 2, "is inside --data"),
    Case("reduce-report-is-input", R + " " + RO + " --report {ws}/tiny.onnx", 2, "is the input model"),
    Case("reduce-o-symlink-to-data", "reduce {ws}/tiny.onnx -o {ws}/link.npz --data {ws}/data.npz", 2, "is --data"),
    Case("retrain-o-is-data", "retrain {ws}/tiny.onnx -o {ws}/data.npz --data {ws}/data.npz", 2, "is --data"),
    Case("retrain-o-is-val", "retrain {ws}/tiny.onnx -o {ws}/val.npz --data {ws}/data.npz --val {ws}/val.npz", 2, "is --val"),
    Case("retrain-o-is-teacher", "retrain {ws}/tiny.onnx -o {ws}/teacher.onnx --data {ws}/data.npz --teacher {ws}/teacher.onnx", 2, "is --teacher"),
    Case("retrain-o-is-input", "retrain {ws}/tiny.onnx -o {ws}/tiny.onnx --data {ws}/data.npz", 2, "is the input model"),
    Case("retrain-o-is-external-data", "retrain {ws}/ext.onnx -o {ws}/weights.bin --data {ws}/data.npz", 2, "is the input model"),
    Case("retrain-o-in-val-folder", "retrain {ws}/tiny.onnx -o {ws}/idx/t.onnx --data {ws}/data.npz --val {ws}/idx:test", 2, "is inside --val"),
    Case("retrain-o-symlink-to-teacher", "retrain {ws}/tiny.onnx -o {ws}/link.onnx --data {ws}/data.npz --teacher {ws}/teacher.onnx", 2, "is --teacher"),
]

# Outputs that cannot be written: refused before the work (or, for a full disk, cleaned up).
UNWRITABLE = [
    Case("reduce-o-missing-folder", R + " -o {ws}/nope/r.onnx", 2, "does not exist"),
    Case("reduce-o-is-folder", R + " -o {ws}/out", 2, "is a folder"),
    # A name ending in "/" means a folder: it wrote a file named "new" ("wrote {ws}/new/").
    Case("reduce-o-ends-in-slash", R + " -o {ws}/new/", 2, "names a folder"),
    Case("retrain-o-ends-in-slash", "retrain {ws}/tiny.onnx -o {ws}/new/ --data {ws}/data.npz", 2, "names a folder"),
    Case("reduce-report-is-file", R + " " + RO + " --report {ws}/notes.txt", 2, "is a file"),
    Case("reduce-report-is-output", R + " " + RO + " --report {ws}/out/r.onnx", 2, "output model's path"),
    Case("reduce-report-missing-parent", R + " " + RO + " --report {ws}/nope/rep", 2, "does not exist"),
    Case("reduce-dry-run-report-is-file", R + " --dry-run --report {ws}/notes.txt", 2, "is a file"),
    Case("retrain-o-missing-folder", "retrain {ws}/tiny.onnx -o {ws}/nope/t.onnx --data {ws}/data.npz", 2, "does not exist"),
    Case("retrain-o-is-folder", "retrain {ws}/tiny.onnx -o {ws}/out --data {ws}/data.npz", 2, "is a folder"),
    Case("reduce-o-read-only-fs", R + " -o {ws}/mnt/r.onnx", 2, "Read-only file system", mount="ro"),
    Case("reduce-report-read-only-fs", R + " " + RO + " --report {ws}/mnt/rep", 2, "Read-only file system", mount="ro"),
    Case("retrain-o-read-only-fs", "retrain {ws}/tiny.onnx -o {ws}/mnt/t.onnx --data {ws}/data.npz", 2, "Read-only file system", mount="ro"),
    Case("reduce-o-full-fs", R + " -o {ws}/mnt/r.onnx", 2, "No space left", mount="full"),
    Case("reduce-o-full-fs-report-not-left", R + " -o {ws}/mnt/r.onnx --report {ws}/rep", 2, "No space left", mount="full"),
    Case("reduce-report-full-fs-model-not-left", R + " " + RO + " --data {ws}/data.npz --report {ws}/mnt/rep", 2, "No space left", mount="full"),
    Case("retrain-o-full-fs", "retrain {ws}/tiny.onnx -o {ws}/mnt/t.onnx --data {ws}/data.npz", 2, "No space left", mount="full", slow=True),
    # A report folder that exists on another file system (a mount point, or a link to one)
    # was filled by renames from beside it: the model was written, then "Invalid cross-device
    # link; nothing was written".
    Case("reduce-report-is-a-mount-point", R + " " + RO + " --report {ws}/mnt", 0, "report:", (*OUT, *MNT_REPORT), mount="rw"),
    Case("reduce-report-links-to-another-fs", R + " " + RO + " --report {ws}/replink", 0, "report:", (*OUT, *MNT_REPORT), mount="rw"),
    Case("reduce-dry-run-report-is-a-mount-point", R + " --dry-run --report {ws}/mnt", 0, "no model written", MNT_REPORT, mount="rw"),
    Case("reduce-report-is-a-read-only-mount-point", R + " " + RO + " --report {ws}/mnt", 2, "Read-only file system", mount="ro"),
]

# Ctrl-C and SIGTERM mid-run and mid-save: the same clean exit, nothing left.
INTERRUPTS = [
    Case(f"{cmd}-{sig}-{when}", argv, 130 if sig == "INT" else 143, "nothing written", interrupt=f"{sig}-{when}")
    for cmd, argv in (("reduce", R + " " + RO + " --data {ws}/data.npz --report {ws}/rep"), ("retrain", T))
    for sig in ("INT", "TERM")
    for when in ("run", "save")
] + [
    Case(f"eval-{sig}-run", E, 130 if sig == "INT" else 143, "nothing written", interrupt=f"{sig}-run")
    for sig in ("INT", "TERM")
]

# Results that were silently wrong.
WRONG_RESULTS = [
    Case("eval-nhwc-detected", "eval {ws}/nhwc.onnx --data {ws}/data.npz", 0, "NHWC input"),
    Case("reduce-nhwc-detected", "reduce {ws}/nhwc.onnx -o {ws}/out/r.onnx --data {ws}/data.npz", 0, "NHWC input", OUT),
    Case("retrain-nhwc-detected", "retrain {ws}/nhwc.onnx -o {ws}/out/t.onnx --data {ws}/nhwcdata.npz", 0, "NHWC input", TOUT),
    Case("eval-nchw-printed", E, 0, "preprocessing: NCHW input"),
    Case("retrain-preprocessing-printed", T, 0, "preprocessing: NCHW input", TOUT),
    Case("eval-float255-detected", "eval {ws}/tiny.onnx --data {ws}/float255.npz", 0, "read as 0..255, /255"),
    Case("reduce-float255-detected", R + " " + RO + " --data {ws}/float255.npz", 0, "read as 0..255, /255", OUT),
    Case("retrain-float255-detected", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/float255.npz", 0, "read as 0..255", TOUT),
    Case("eval-float01-kept", "eval {ws}/tiny.onnx --data {ws}/float01.npz", 0, "floats in [0, 1] kept"),
    Case("eval-float-negative-refused", "eval {ws}/tiny.onnx --data {ws}/floatneg.npz", 2, "neither [0, 1] nor 0..255"),
    Case("reduce-float-negative-refused", R + " " + RO + " --data {ws}/floatneg.npz", 2, "neither [0, 1] nor 0..255"),
    Case("retrain-float-negative-refused", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/floatneg.npz", 2, "neither [0, 1] nor 0..255"),
    Case("retrain-lr-1e12-diverges", T + " --lr 1e12 --epochs 2 --batch-size 4", 2, "training diverged", slow=True),
    Case("retrain-lr-1e30-diverges", T + " --lr 1e30 --epochs 2 --batch-size 4", 2, "training diverged"),
    Case("eval-nan-logits-not-correct", "eval {ws}/nan.onnx --data {ws}/data.npz", 0, "24 of 24 samples gave NaN or inf"),
    Case("eval-labels-above-classes", "eval {ws}/tiny.onnx --data {ws}/badlabels.npz", 2, "label 12 in npz badlabels.npz does not exist"),
    Case("reduce-labels-above-classes", R + " " + RO + " --data {ws}/badlabels.npz", 2, "'logits' have 10 classes"),
    Case("retrain-labels-above-classes", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/badlabels.npz", 2, "'logits' have 10 classes"),
    Case("retrain-val-labels-above-classes", T + " --val {ws}/badlabels.npz", 2, "'logits' have 10 classes"),
    Case("retrain-idx-defaults-to-train", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/idx", 0, "(train split, the default here", TOUT),
    Case("eval-idx-defaults-to-test", "eval {ws}/tiny.onnx --data {ws}/idx", 0, "(test split, the default here"),
    Case("reduce-idx-default-printed", R + " " + RO + " --data {ws}/idx", 0, "split, the default here", OUT),
    Case("retrain-val-idx-needs-split", T + " --val {ws}/idx", 2, "say which IDX split"),
    Case("retrain-idx-named-split", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/idx:test", 0, "(test split)", TOUT, slow=True),
]

# Numeric options: finite, in range, one line each.
BAD_NUMBERS = [
    Case(f"{cmd}-{opt.strip('-')}-{value}", f"{base} {opt} {value}", 2, fragment)
    for cmd, base, opt, values, fragment in (
        ("reduce", R + " " + RO, "--width-map", ("linear:nan", "linear:inf", "power:-1", "power:-inf", "linear:x", "cubic:1"), "--width-map"),
        ("reduce", R + " " + RO, "--receptive-field", ("paper", "GLOBAL"), "--receptive-field"),
        ("analyze", "analyze {ws}/tiny.onnx", "--receptive-field", ("paper",), "--receptive-field"),
        ("reduce", R + " " + RO, "--beta-min", ("nan", "-1", "5", "0", "inf", "1.5"), "--beta-min"),
        ("reduce", R + " " + RO, "--channel-multiple", ("0", "-8", "2.5", "nan"), "--channel-multiple"),
        ("reduce", R + " " + RO + " --budget latency=0.5", "--latency-threads", ("-1", "100000", "2.5", "x"), "--latency-threads"),
        ("reduce", R + " " + RO + " --data {ws}/data.npz", "--limit", ("0", "-1", "2.5", "nan"), "--limit"),
        ("reduce", R + " " + RO + " --data {ws}/data.npz", "--batch-size", ("0", "-4", "1e3"), "--batch-size"),
        ("reduce", R + " " + RO, "--budget", ("params=nan", "params=0", "params=2", "flops=-1", "foo=0.5", "params=", "params=inf"), "--budget"),
        ("reduce", R + " " + RO, "--input-shape", ("x:1,1,16,99999999999999999999", "x:0,1,16,16", "x:a,b", "x:-1,1,16,16"), "--input-shape"),
        ("reduce", R + " " + RO + " --data {ws}/data.npz", "--std", ("0", "-1", "nan", "a"), "std"),
        ("reduce", R + " " + RO + " --data {ws}/data.npz", "--mean", ("nan", "inf", "a,b", "1,2"), "mean"),
        ("retrain", T, "--lr", ("nan", "inf", "0", "-1", "-inf"), "--lr"),
        ("retrain", T, "--epochs", ("0", "-1", "1.5"), "--epochs"),
        ("retrain", T, "--seed", ("-1", "1e23", "4294967296", "x"), "--seed"),
        ("retrain", T, "--batch-size", ("0", "-1"), "--batch-size"),
        ("retrain", T, "--limit", ("0", "2.5"), "--limit"),
        ("retrain", T + " --val {ws}/val.npz", "--val-limit", ("0", "-3"), "--val-limit"),
        ("retrain", T, "--device", ("foo", "tpu", "cuda:x"), "--device"),
        ("eval", E, "--batch-size", ("0", "-1"), "--batch-size"),
        ("eval", E, "--limit", ("0", "-5", "3.5"), "--limit"),
        ("eval", E, "--input-shape", ("x:1,1,16,99999999999999999999",), "--input-shape"),
        ("analyze", "analyze {ws}/tiny.onnx", "--input-shape", ("x:1,1,16,99999999999999999999", "x:0,1,16,16"), "--input-shape"),
    )
    for value in values
]

# Faults that printed a traceback.
TRACEBACKS = [
    Case("reduce-fixed-batch-short-last", "reduce {ws}/fixed8.onnx -o {ws}/out/r.onnx --data {ws}/data.npz --limit 13", 0, "13 samples", OUT),
    Case("eval-fixed-batch-short-last", "eval {ws}/fixed8.onnx --data {ws}/data.npz --limit 13", 0, "first 13 of 24"),
    Case("eval-fixed-batch-fewer-than-batch", "eval {ws}/fixed8.onnx --data {ws}/data.npz --limit 5", 0, "first 5 of 24"),
    Case("retrain-fixed-batch-short-last", "retrain {ws}/fixed8.onnx -o {ws}/out/t.onnx --data {ws}/data.npz --limit 13", 0, "first 13 of 24", TOUT),
    Case("retrain-device-cuda-9", T + " --device cuda:9", 2, "CUDA device"),
    Case("eval-text-npz", "eval {ws}/tiny.onnx --data {ws}/text.npz", 2, "not a zip archive"),
    Case("reduce-text-npz", R + " " + RO + " --data {ws}/text.npz", 2, "not a zip archive"),
    Case("retrain-text-npz", "retrain {ws}/tiny.onnx -o {ws}/out/t.onnx --data {ws}/text.npz", 2, "not a zip archive"),
]

# Messages that pointed the wrong way.
MESSAGES = [
    Case("analyze-model-is-folder", "analyze {ws}/model_dir.onnx", 2, "is a folder"),
    Case("reduce-model-is-folder", "reduce {ws}/model_dir.onnx -o {ws}/out/r.onnx", 2, "is a folder"),
    Case("eval-model-is-folder", "eval {ws}/model_dir.onnx --data {ws}/data.npz", 2, "is a folder"),
    Case("retrain-model-is-folder", "retrain {ws}/model_dir.onnx -o {ws}/out/t.onnx --data {ws}/data.npz", 2, "is a folder"),
    Case("eval-two-inputs", "eval {ws}/two.onnx --data {ws}/data.npz", 2, "has 2 inputs (x, z); give an .npz with one array per input"),
    Case("retrain-two-inputs", "retrain {ws}/two.onnx -o {ws}/out/t.onnx --data {ws}/data.npz", 2, "retraining needs a model with one input, not ['x', 'z']"),
    Case("reduce-two-inputs", "reduce {ws}/two.onnx -o {ws}/out/r.onnx --data {ws}/data.npz", 2, "has 2 inputs (x, z)"),
    Case("reduce-gemm-only-with-data", "reduce {ws}/mlp.onnx -o {ws}/out/r.onnx --data {ws}/data.npz", 0, "no Conv activations to measure", OUT),
    Case("reduce-latency-threads-range", R + " " + RO + " --latency-threads 100000", 2, f"100000 is not in [0, {os.cpu_count()}]"),
    Case("reduce-budget-limit-named", R + " " + RO + " --budget params=0.01 --beta-min 0.5", 2, "--beta-min 0.5; --channel-multiple 8"),
    Case("reduce-act-without-data", R + " " + RO + " --importance act", 2, "--importance act ranks channels by activations: give --data"),
    Case("reduce-mean-without-data", R + " " + RO + " --mean 0.5", 2, "--mean/--std preprocess the images of --data"),
    Case("reduce-mean-in-0-255", R + " " + RO + " --data {ws}/data.npz --mean 128", 2, "(--mean 0.502 --std 0.003922)"),
    Case("retrain-resume-without-checkpoint", T + " --resume", 2, "--resume continues from a --checkpoint DIR"),
    Case("retrain-loss-without-teacher", T + " --loss y=mse", 2, "--loss chooses distillation losses: it needs a --teacher"),
    Case("retrain-warmup-leaves-no-decay", T + " --warmup 0.99", 2, "--warmup 0.99 warms up over 1 of this run's 1 steps"),
    Case("retrain-feature-without-teacher", T + " --feature y", 2, "feature distillation needs a --teacher"),
    Case("reduce-bf16-conv-below-opset-22", "reduce {ws}/bf16.onnx -o {ws}/out/r.onnx", 2, "not valid ONNX"),
    # The statistics' model is a temporary file: its path ("Load model from .../instrumented.onnx
    # failed:") is not the user's model.
    Case("reduce-bf16-conv-below-opset-22-data", "reduce {ws}/bf16.onnx -o {ws}/out/r.onnx --data {ws}/data.npz", 2, "cannot load the model: [ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model"),
    Case("reduce-loop-after-input-shape", "reduce {ws}/loop.onnx -o {ws}/out/r.onnx --input-shape x:1,1,16,16", 0, "control flow not followed", OUT),
]

# What must keep working: each writes exactly its outputs, fully checked.
GOOD = [
    Case("analyze", "analyze {ws}/tiny.onnx", 0, ""),
    Case("reduce-no-data", R + " " + RO, 0, "wrote", OUT),
    Case("reduce-default-output", R, 0, "tiny.mbs.onnx", ("tiny.mbs.onnx",)),
    Case("reduce-data-report", R + " " + RO + " --data {ws}/data.npz --report {ws}/rep", 0, "report:", (*OUT, *REPORT), slow=True),
    Case("reduce-budget", R + " " + RO + " --data {ws}/data.npz --budget params=0.5", 0, "wrote", OUT),
    Case("reduce-dry-run-report", R + " --dry-run --report {ws}/rep", 0, "no model written", REPORT, slow=True),
    Case("reduce-dry-run", R + " --dry-run", 0, "no model written"),
    Case("reduce-external-data-input", "reduce {ws}/ext.onnx -o {ws}/out/r.onnx --no-eval", 0, "wrote", OUT),
    Case("reduce-nested-external-data-input", "reduce {ws}/nested.onnx -o {ws}/out/r.onnx --no-eval", 0, "wrote", OUT),
    Case("reduce-image-folder", R + " " + RO + " --data {ws}/imgs", 0, "3 classes", OUT),
    Case("reduce-nolabels", R + " " + RO + " --data {ws}/nolabels.npz", 0, "labels: no", OUT),
    Case("retrain", T, 0, "wrote", TOUT),
    Case("retrain-val-teacher", T + " --val {ws}/val.npz --teacher {ws}/teacher.onnx", 0, "best epoch", TOUT, slow=True),
    Case("retrain-device-cpu", T + " --device cpu --seed 4294967295", 0, "on cpu", TOUT, slow=True),
    Case("eval", E, 0, "preprocessing:"),
    Case("eval-image-folder", "eval {ws}/tiny.onnx --data {ws}/imgs", 0, "3 classes"),
]
# fmt: on

CASES = (
    DATA_LOSS + UNWRITABLE + INTERRUPTS + WRONG_RESULTS + BAD_NUMBERS + TRACEBACKS + MESSAGES + GOOD
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("inputs") / "ws")


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@contextlib.contextmanager
def _mounted(point: Path, kind: str | None):
    """A small tmpfs at `point`: read-only, full but for 8 KB (a 60 KB model does not fit), or
    empty (another file system), with `replink` beside it linking to it."""
    if kind is None:
        yield
        return
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    point.mkdir()
    options = {"ro": "ro,size=1m", "full": "size=64k", "rw": "size=1m"}[kind]
    done = run_process(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        if kind == "full":
            (point / ".filler").write_bytes(bytes(56 * 1024))
        if kind == "rw":
            (point.parent / "replink").symlink_to(point)
        yield
    finally:
        run_process(["umount", str(point)], check=True)


@contextlib.contextmanager
def _interrupt(kind: str | None, monkeypatch):
    """Deliver SIGINT/SIGTERM to this process once the run has loaded the model, or once the
    model's temporary file is fully written (just before it would be renamed into place)."""
    if kind is None:
        yield
        return
    assert threading.current_thread() is threading.main_thread()
    sig = signal.SIGINT if kind.startswith("INT") else signal.SIGTERM
    fired = []

    def deliver(real):
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            if not fired:
                fired.append(True)
                os.kill(os.getpid(), sig)
            return result

        return wrapper

    if kind.endswith("run"):
        import onnx_mbs.cli
        import onnx_mbs.evaluate
        import onnx_mbs.pipeline

        for module in (onnx_mbs.cli, onnx_mbs.pipeline, onnx_mbs.evaluate):  # eval's load
            monkeypatch.setattr(module, "load", deliver(module.load))
    else:
        import onnx_mbs.save

        monkeypatch.setattr(onnx_mbs.save, "write_model", deliver(onnx_mbs.save.write_model))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fired, "the interrupt was never delivered"


def check_written_model(path: Path, original: Path) -> None:
    """Full checker; takes every input shape the original declares (batch 1 and 2 where it
    is dynamic), with its input and output names."""
    onnx.checker.check_model(str(path), full_check=True)
    assert_runs_at_declared_shapes(_load_whole(original), onnx.load(path))


def _load_whole(path: Path) -> onnx.ModelProto:
    """onnx.load, with the external data of functions read too: onnx 1.16 (the floor) reads
    only the graphs', and onnxruntime cannot find the rest from a ModelProto."""
    from onnx_mbs.passes.integrity import read_external_data

    model = onnx.load(path)
    read_external_data(model, path.parent)
    return model


def run_case(case: Case, inputs: Path, tmp_path: Path, monkeypatch) -> str:
    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws, symlinks=True)
    (ws / "link.npz").symlink_to(ws / "data.npz")
    (ws / "link.onnx").symlink_to(ws / "teacher.onnx")
    argv = [a.format(ws=ws) for a in shlex.split(case.argv)]
    stderr, stdout = io.StringIO(), io.StringIO()
    with _mounted(ws / "mnt", case.mount), _interrupt(case.interrupt, monkeypatch):
        before = _hashes(ws)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse usage errors
                code = exit_.code
        after = _hashes(ws)
    err = stderr.getvalue()
    assert "Traceback" not in err, err
    assert code == case.code, err
    assert case.fragment in err + stdout.getvalue(), err
    if code == 2:
        assert err.count("error:") == 1 and err.strip().splitlines()[-1].startswith("onnx-mbs"), err
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"inputs modified: {changed}"
    assert sorted(set(after) - set(before)) == sorted(case.outputs)
    for output in case.outputs:
        if output.endswith(".onnx"):
            check_written_model(ws / output, Path(argv[1]))
    return err


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_case(case: Case, inputs, tmp_path, monkeypatch):
    run_case(case, inputs, tmp_path, monkeypatch)


@pytest.mark.parametrize("command", ["reduce --no-eval", "retrain --data {ws}/data.npz"])
def test_o_dash_is_refused_not_written_as_a_file_named_dash(command, inputs, tmp_path, monkeypatch):
    """`-o -` reads as "to stdout" (which the commands do not do: stdout carries --json); it
    wrote a file named "-" in the current folder and said "wrote -"."""
    monkeypatch.chdir(tmp_path)
    name, *flags = command.format(ws=inputs).split()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([name, str(inputs / "tiny.onnx"), "-o", "-", *flags])
    assert code == 2 and "output - would write a file named '-', not to stdout" in stderr.getvalue()
    assert not list(tmp_path.iterdir())


def test_there_are_enough_cases():
    assert len(CASES) >= 150 and len({c.id for c in CASES}) == len(CASES)


def test_unique_ids_cover_every_command():
    commands = {shlex.split(c.argv)[0] for c in CASES}
    assert commands == {"analyze", "reduce", "retrain", "eval"}


# The Python API: the same refusals as BadInputError, one line, nothing written.
def _api_cases(ws: Path) -> dict[str, tuple[object, str]]:
    from onnx_mbs.bridge import retrain
    from onnx_mbs.data import open_data
    from onnx_mbs.save import save_model

    tiny, data = str(ws / "tiny.onnx"), str(ws / "data.npz")
    return {
        "reduce-limit-2.5": (lambda: onnx_mbs.reduce(tiny, data, limit=2.5), "whole number"),
        "reduce-limit-true": (lambda: onnx_mbs.reduce(tiny, data, limit=True), "whole number"),
        "reduce-width-map-nan": (
            lambda: onnx_mbs.reduce(tiny, width_map="linear:nan"),
            "width_map linear:nan: c must be in",
        ),
        "reduce-width-map-inf": (
            lambda: onnx_mbs.reduce(tiny, width_map=onnx_mbs.WidthMap("power", float("inf"))),
            "width_map power:inf",
        ),
        # A bare number (the c of linear:C): an AttributeError ('float' has no 'partition').
        "reduce-width-map-number": (
            lambda: onnx_mbs.reduce(tiny, width_map=0.4),
            "bad width_map 0.4: use linear:C or power:GAMMA",
        ),
        "reduce-receptive-field": (
            lambda: onnx_mbs.reduce(tiny, receptive_field="paper"),
            "unknown receptive_field 'paper'",
        ),
        "reduce-beta-min-5": (lambda: onnx_mbs.reduce(tiny, beta_min=5), "beta_min must be"),
        "reduce-beta-min-nan": (
            lambda: onnx_mbs.reduce(tiny, beta_min=float("nan")),
            "beta_min must be",
        ),
        "reduce-budget": (
            lambda: onnx_mbs.reduce(tiny, budget="params=2"),
            "bad budget 'params=2'",
        ),
        # A budget that is neither a spec string nor a Budget: an AttributeError from deep
        # in the strategy choice ('float' object has no attribute 'limits').
        **{
            f"reduce-budget-{kind}": (
                lambda budget=budget: onnx_mbs.reduce(tiny, budget=budget),
                "budget: a spec such as 'params=0.5' or a Budget",
            )
            for kind, budget in (
                ("float", 0.5),
                ("dict", {"params": 0.5}),
                ("pair", ("params", 0.5)),
            )
        },
        # beta_min as text: a TypeError from plan_widths' range check.
        "reduce-beta-min-text": (
            lambda: onnx_mbs.reduce(tiny, beta_min="0.1"),
            "beta_min must be a number in (0, 1], got '0.1'",
        ),
        # True is an int to Python: it planned at a channel multiple of True (1).
        "reduce-channel-multiple-true": (
            lambda: onnx_mbs.reduce(tiny, channel_multiple=True),
            "channel_multiple: a whole number or auto, not True",
        ),
        "reduce-budget-unreachable": (
            lambda: onnx_mbs.reduce(tiny, budget="params=0.01", beta_min=0.5),
            "beta_min=0.5; channel_multiple=8",
        ),
        **{
            f"reduce-latency-threads-{threads}": (
                lambda threads=threads: onnx_mbs.reduce(tiny, latency_threads=threads),
                f"latency_threads must be a whole number in [0, {os.cpu_count()}]",
            )
            for threads in (-1, 100000, 2.5, "4", True)
        },
        "reduce-channel-multiple-0": (
            lambda: onnx_mbs.reduce(tiny, channel_multiple=0),
            "channel_multiple must be >= 1",
        ),
        "reduce-channel-multiple-text": (
            lambda: onnx_mbs.reduce(tiny, channel_multiple="eight"),
            "channel_multiple: a whole number or auto",
        ),
        "reduce-strategy": (lambda: onnx_mbs.reduce(tiny, strategy="best"), "unknown strategy"),
        "reduce-importance": (lambda: onnx_mbs.reduce(tiny, importance="l3"), "unknown importance"),
        "reduce-act-without-data": (
            lambda: onnx_mbs.reduce(tiny, importance="act"),
            "importance='act' ranks channels by activations: give data",
        ),
        "reduce-mean-without-data": (
            lambda: onnx_mbs.reduce(tiny, mean=0.5),
            "mean/std preprocess the images of data",
        ),
        "reduce-mean-in-0-255": (
            lambda: onnx_mbs.reduce(tiny, data, mean=128),
            "(mean='0.502' std='0.003922')",
        ),
        "reduce-labels": (lambda: onnx_mbs.reduce(tiny, str(ws / "badlabels.npz")), "10 classes"),
        "reduce-float-neg": (lambda: onnx_mbs.reduce(tiny, str(ws / "floatneg.npz")), "neither"),
        "reduce-folder-model": (lambda: onnx_mbs.reduce(str(ws / "model_dir.onnx")), "is a folder"),
        "open-data-limit-2.5": (lambda: open_data(data, "x", [1, 1, 16, 16], limit=2.5), "whole"),
        "retrain-lr-nan": (
            lambda: retrain(onnx.load(tiny), data_arrays(ws), lr=float("nan")),
            "lr nan",
        ),
        "retrain-lr-inf": (
            lambda: retrain(onnx.load(tiny), data_arrays(ws), lr=float("inf")),
            "lr inf",
        ),
        "retrain-diverges": (
            lambda: retrain(onnx.load(tiny), data_arrays(ws), lr=1e30, epochs=2, batch_size=4),
            "nothing written: lower lr",
        ),
        "retrain-resume-without-checkpoint": (
            lambda: retrain(onnx.load(tiny), data_arrays(ws), resume=True),
            "resume continues from a checkpoint DIR",
        ),
        "retrain-no-labels-no-teacher": (
            lambda: retrain(onnx.load(tiny), (data_arrays(ws)[0], None)),
            "give labels or a teacher to distil",
        ),
        "retrain-features-without-teacher": (
            lambda: retrain(onnx.load(tiny), data_arrays(ws), features=["y"]),
            "feature distillation needs a teacher",
        ),
        "retrain-losses-without-teacher": (
            lambda: retrain(onnx.load(tiny), data_arrays(ws), losses={"y": "mse"}, progress=False),
            "losses chooses distillation losses: it needs a teacher",
        ),
        "save-missing-folder": (
            lambda: save_model(onnx.load(tiny), ws / "nope" / "m.onnx"),
            "cannot write",
        ),
        "save-over-folder": (lambda: save_model(onnx.load(tiny), ws / "out"), "cannot write"),
        "save-ends-in-slash": (
            lambda: save_model(onnx.load(tiny), f"{ws}/new/"),
            "names a folder",
        ),
    }


def data_arrays(ws: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(ws / "data.npz") as npz:
        return (npz["x"] / 255.0).astype(np.float32), npz["y"]


API_IDS = sorted(_api_cases(Path("/nonexistent")))


@pytest.mark.parametrize("name", API_IDS)
def test_python_api(name, inputs, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws)
    before = _hashes(ws)
    call, fragment = _api_cases(ws)[name]
    with pytest.raises(BadInputError) as error:
        call()
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not re.search(r"--[a-z]", str(error.value))  # Python's keywords, not the flags
    assert _hashes(ws) == before  # nothing modified, nothing left


def test_every_option_a_message_names_is_a_flag_and_a_python_keyword():
    """Messages name options through `option("--flag")`: each is a flag of the command line
    and its Python spelling a keyword of `reduce`, `ReduceOptions`, `load` or `retrain`."""
    import inspect
    from dataclasses import fields

    from onnx_mbs.bridge import retrain
    from onnx_mbs.cli import build_parser
    from onnx_mbs.passes import load, option
    from onnx_mbs.passes.errors import keyword

    roots = [Path(onnx_mbs.__file__).parent, Path(onnx_mbs.passes.__file__).parent]
    named = {
        flag
        for root in roots
        for path in root.rglob("*.py")
        for flag in re.findall(r"""option\(['"](--[a-z-]+)""", path.read_text())
    }
    assert {"--budget", "--width-map", "--mean", "--teacher", "--input-shape"} <= named
    commands = build_parser()._subparsers._group_actions[0].choices.values()
    flags = {f for p in commands for a in p._actions for f in a.option_strings}
    keywords = {f.name for f in fields(onnx_mbs.ReduceOptions)}
    for function in (onnx_mbs.reduce, load, retrain):
        keywords |= set(inspect.signature(function).parameters)
    assert named <= flags
    assert {f: keyword(f) for f in named if keyword(f) not in keywords} == {}
    assert option("--beta-min", 0.5) == "beta_min=0.5" and option("--resume", True) == "resume=True"
    with command_line():
        assert (
            option("--beta-min", 0.5) == "--beta-min 0.5" and option("--resume", True) == "--resume"
        )


def test_nan_logits_score_zero_and_are_counted(inputs, capsys):
    assert (
        main(["eval", str(inputs / "nan.onnx"), "--data", str(inputs / "data.npz"), "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == 0.0 and result["top5"] == 0.0 and result["nonfinite"] == 24


def test_float_pixels_0_255_score_like_uint8(inputs, capsys):
    scores = []
    for name in ("data.npz", "float255.npz", "float01.npz"):
        assert (
            main(["eval", str(inputs / "tiny.onnx"), "--data", str(inputs / name), "--json"]) == 0
        )
        scores.append(json.loads(capsys.readouterr().out)["top1"])
    assert scores[0] == scores[1] == scores[2]


@pytest.mark.parametrize("rescaling", [False, True], ids=["transpose", "rescaling-first"])
def test_nhwc_model_scores_like_the_nchw_original(
    bundled_model_path, fmnist_sample, tmp_path, capsys, rescaling
):
    """The bundled ResNet-20 behind a Transpose from NHWC (as tf2onnx writes it) must score
    what the original scores: before, preprocessing fed it scrambled images. Also where a
    Keras Rescaling layer (Mul, Add by constants) comes before the Transpose, as tf2onnx
    leaves it: it was read as NCHW and fed 28 x 1 images of 28 channels."""
    original = onnx.load(bundled_model_path)
    nhwc = onnx.ModelProto()
    nhwc.CopyFrom(original)
    graph = nhwc.graph
    name = graph.input[0].name
    dims = graph.input[0].type.tensor_type.shape.dim
    for node in graph.node:
        node.input[:] = [f"{name}_nchw" if i == name else i for i in node.input]
    first, source = [], name
    if rescaling:  # x * 1 + 0 in NHWC, then the Transpose
        graph.initializer.extend(
            onnx.numpy_helper.from_array(np.array(v, np.float32), k)
            for k, v in (("one", 1), ("zero", 0))
        )
        first = [
            onnx.helper.make_node("Mul", [name, "one"], ["scaled"], name="rescale_mul"),
            onnx.helper.make_node("Add", ["scaled", "zero"], ["shifted"], name="rescale_add"),
        ]
        source = "shifted"
    first.append(
        onnx.helper.make_node(
            "Transpose", [source], [f"{name}_nchw"], name="to_nchw", perm=[0, 3, 1, 2]
        )
    )
    nodes = [*first, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    n, c, h, w = [d.dim_param or d.dim_value for d in dims]
    graph.input[0].CopyFrom(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [n, h, w, c])
    )
    onnx.save(nhwc, tmp_path / "nhwc.onnx")
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    scores = []
    for path in (bundled_model_path, tmp_path / "nhwc.onnx"):
        assert main(["eval", str(path), "--data", data, "--limit", "256", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["top1"])
    assert scores[0] == scores[1] > 0.85


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(inputs, tmp_path, umask):
    from onnx_mbs.save import save_model

    old = os.umask(umask)
    try:
        save_model(
            onnx.load(inputs / "tiny.onnx"),
            tmp_path / "m.onnx",
            (tmp_path / "rep", lambda d: (d / "r.txt").write_text("x")),
        )
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "rep" / "r.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "rep").stat().st_mode & 0o777 == 0o777 & ~umask


def test_external_data_written_atomically_and_caller_keeps_weights(inputs, tmp_path, monkeypatch):
    """Past 2 GB (here: a lowered limit) the weights go to OUT.data; the caller's model must
    keep its weights and nothing temporary may be left."""
    import onnx_mbs.save as save

    monkeypatch.setattr(save, "TWO_GB", 1000)
    model = onnx.load(inputs / "tiny.onnx")
    before = model.SerializeToString()
    save.save_model(model, tmp_path / "big.onnx")
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    written = onnx.load(tmp_path / "big.onnx")
    assert any(
        t.external_data
        for t in onnx.load(tmp_path / "big.onnx", load_external_data=False).graph.initializer
    )
    check_written_model(tmp_path / "big.onnx", inputs / "tiny.onnx")
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(written), run(model))


def test_a_save_past_2_gb_that_fails_leaves_the_callers_model_whole(inputs, tmp_path, monkeypatch):
    """onnx.save moves the weights out of the caller's model a tensor at a time: when the
    disk filled (or Ctrl-C came) mid-write, the tensors written had lost their bytes and the
    others pointed at a file that was then removed; the caller's model is now as it was."""
    import errno

    import onnx.external_data_helper as helper

    import onnx_mbs.save as save

    monkeypatch.setattr(save, "TWO_GB", 1000)
    real, calls = helper.save_external_data, []

    def fill_disk(tensor, base_path):
        calls.append(tensor.name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensor, base_path)

    monkeypatch.setattr(helper, "save_external_data", fill_disk)
    model = onnx.load(inputs / "tiny.onnx")
    before = model.SerializeToString()
    with pytest.raises(BadInputError, match="No space left on device; nothing was written"):
        save.save_model(model, tmp_path / "big.onnx")
    assert len(calls) == 2 and model.SerializeToString() == before
    assert not list(tmp_path.iterdir())


NOTHING = "nothing was written"


def test_a_report_on_a_full_disk_is_named_not_the_models_folder(inputs, tmp_path):
    """`reduce -o out/s.onnx --report full/rep` with only full/ out of space said "cannot
    write to out: No space left on device", the folder that had room; it names the report's
    folder now, and neither the model nor the report is written."""
    import errno

    import onnx_mbs.save as save

    def fill_disk(folder):
        (folder / "report.md").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "out").mkdir()
    (tmp_path / "full").mkdir()
    model = onnx.load(inputs / "tiny.onnx")
    with pytest.raises(BadInputError) as error:
        save.save_model(model, tmp_path / "out" / "s.onnx", (tmp_path / "full" / "rep", fill_disk))
    report = tmp_path / "full" / "rep"
    assert str(error.value) == f"cannot write to {report}: No space left on device; {NOTHING}"
    assert not list((tmp_path / "out").iterdir()) and not list((tmp_path / "full").iterdir())


def test_external_data_never_replaces_another_models_weights(inputs, tmp_path, monkeypatch):
    """Past 2 GB the weights go to OUT.data. A file of that name that is not the existing
    OUT's own external data holds another model's weights: the Python API refused nothing
    and replaced it (a.onnx, whose weights are b.onnx.data, no longer loaded); now it is
    refused in one line with nothing written, as the command line refuses an input's."""
    import onnx_mbs.save as save

    monkeypatch.setattr(save, "TWO_GB", 1000)
    model = onnx.load(inputs / "tiny.onnx")
    onnx.save(onnx.load(inputs / "tiny.onnx"), tmp_path / "a.onnx", save_as_external_data=True,
              location="b.onnx.data", size_threshold=0)  # fmt: skip
    (tmp_path / "c.onnx.data").write_bytes(b"someone's weights")  # no c.onnx names it
    before = _hashes(tmp_path)
    for name in ("b.onnx", "c.onnx"):
        with pytest.raises(BadInputError, match=rf"{name}\.data .*nothing was written") as error:
            save.save_model(model, tmp_path / name)
        assert "\n" not in str(error.value)
        assert _hashes(tmp_path) == before
    onnx.checker.check_model(str(tmp_path / "a.onnx"), full_check=True)
    # An earlier save's own data is replaced with it (a script run twice).
    save.save_model(model, tmp_path / "d.onnx")
    save.save_model(model, tmp_path / "d.onnx")
    check_written_model(tmp_path / "d.onnx", inputs / "tiny.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.onnx", "b.onnx.data", "c.onnx.data", "d.onnx", "d.onnx.data"
    ]  # fmt: skip


def test_saving_a_model_whose_external_data_was_not_read_is_refused(inputs, tmp_path):
    """A model loaded with onnx.load(..., load_external_data=False) holds references that only
    its own folder resolves: save_model wrote them as they were, so the written model named a
    data file that is not beside it (or another model's that is). Refused in one line, with
    nothing written."""
    from onnx_mbs.save import save_model

    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(onnx.load(inputs / "tiny.onnx"), tmp_path / "src" / "m.onnx",
              save_as_external_data=True, location="m.data", size_threshold=0)  # fmt: skip
    lazy = onnx.load(str(tmp_path / "src" / "m.onnx"), load_external_data=False)
    said = r"tensor '.+' of the model is external data that was not read .*load_external_data"
    with pytest.raises(BadInputError, match=said) as error:
        save_model(lazy, tmp_path / "out" / "m.onnx")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_report_folder_gets_new_files_beside_what_it_holds(inputs, tmp_path):
    """Issue 26: a report folder is never replaced whole (that deleted whatever it held)."""
    from onnx_mbs.save import save_model

    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "stale.txt").write_text("old")
    save_model(
        onnx.load(inputs / "tiny.onnx"),
        tmp_path / "m.onnx",
        (tmp_path / "rep", lambda d: (d / "new.txt").write_text("x")),
    )
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["new.txt", "stale.txt"]
    assert (tmp_path / "rep" / "stale.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "rep"]


def test_two_concurrent_writers_of_one_output(inputs, tmp_path):
    """Threads racing to write one path: the file is always one whole model, nothing is left."""
    from onnx_mbs.save import save_model

    models = [onnx.load(inputs / "tiny.onnx"), onnx.load(inputs / "teacher.onnx")]
    models[1].graph.name = "other"
    expected = {m.SerializeToString() for m in models}
    errors: list[BaseException] = []

    def write(model: onnx.ModelProto) -> None:
        try:
            for _ in range(15):
                save_model(model, tmp_path / "same.onnx")
                assert (tmp_path / "same.onnx").read_bytes() in expected
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["same.onnx"]
    check_written_model(tmp_path / "same.onnx", inputs / "tiny.onnx")


def _signals_as_from_a_terminal() -> None:
    """In the child before exec: SIGINT, SIGTERM and SIGHUP at their default, as a terminal
    gives."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnx_mbs", *args]


def _retraining(ws: Path, epochs: int) -> list[str]:
    """`onnx-mbs retrain` of ws's model on its data for `epochs`, into ws/out/t.onnx, with
    data-loader workers (which must end with it)."""
    return _cli(
        "retrain",
        str(ws / "tiny.onnx"),
        "-o",
        str(ws / "out" / "t.onnx"),
        "--data",
        str(ws / "data.npz"),
        "--epochs",
        str(epochs),
        "--batch-size",
        "2",
        "--workers",
        "1",
    )


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, id="TERM"),
        pytest.param(signal.SIGHUP, id="HUP"),
        pytest.param(signal.SIGINT, id="INT", marks=pytest.mark.slow),
    ],
)
def test_signal_mid_run_in_a_real_process(inputs, tmp_path, sig):
    """One line, the exit code for the signal, nothing written, no process left. SIGHUP (a
    terminal closed) killed the run on the spot, leaving its temporary files."""
    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws)
    before = _hashes(ws)
    # As from a terminal: a shell's background job (or nohup) starts with SIGINT ignored, which
    # the run would inherit, and the signal would never arrive.
    with started(
        _retraining(ws, 500),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_signals_as_from_a_terminal,
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("preprocessing:"):
                break
        process.send_signal(sig)
        err = process.stderr.read()
        process.wait(timeout=300)
        assert left(process.tag, timeout=30) == []
    # Ctrl-C: 130, or death by SIGINT (which a shell reports as 130 too): where the signal
    # lands inside torch's lazy import of torch._dynamo (the optimizer's first use), the
    # interpreter exits by SIGINT after main() has handled it and printed its one line.
    expected = {signal.SIGTERM: {143}, signal.SIGHUP: {129}}.get(sig, {130, -signal.SIGINT})
    assert process.returncode in expected, err
    assert "Traceback" not in err and "nothing written" in err
    assert _hashes(ws) == before


def test_a_run_under_nohup_outlives_its_terminal(inputs, tmp_path):
    """SIGHUP ignored, as `nohup` starts a run: the run goes on to the end."""

    def as_nohup() -> None:
        _signals_as_from_a_terminal()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws)
    with started(
        _retraining(ws, 2), stderr=subprocess.PIPE, text=True, preexec_fn=as_nohup
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("preprocessing:"):
                break
        process.send_signal(signal.SIGHUP)
        err = process.stderr.read()
        assert process.wait(timeout=300) == 0, err
    assert (ws / "out" / "t.onnx").exists()


@pytest.mark.slow
def test_two_concurrent_reduce_processes_of_one_output(inputs, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws)
    argv = _cli(
        "reduce",
        str(ws / "tiny.onnx"),
        "-o",
        str(ws / "out" / "r.onnx"),
        "--data",
        str(ws / "data.npz"),
    )
    with contextlib.ExitStack() as stack:
        processes = [
            stack.enter_context(started(argv, stderr=subprocess.PIPE, text=True)) for _ in range(2)
        ]
        results = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    assert [p.name for p in (ws / "out").iterdir()] == ["r.onnx"]
    check_written_model(ws / "out" / "r.onnx", ws / "tiny.onnx")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.mount is None and c.interrupt is None], ids=lambda c: c.id
)
def test_every_case_in_a_real_process_prints_no_traceback(case, inputs, tmp_path):
    """The installed entry point, not just main(): exit code, no Traceback, inputs intact."""
    ws = tmp_path / "ws"
    shutil.copytree(inputs, ws, symlinks=True)
    (ws / "link.npz").symlink_to(ws / "data.npz")
    (ws / "link.onnx").symlink_to(ws / "teacher.onnx")
    before = _hashes(ws)
    argv = [a.format(ws=ws) for a in shlex.split(case.argv)]
    done = run_process(_cli(*argv), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == case.code, done.stderr
    after = _hashes(ws)
    assert all(after.get(p) == h for p, h in before.items())
    assert sorted(set(after) - set(before)) == sorted(case.outputs)


@pytest.mark.parametrize(
    "rescaling",
    ["mul", "mul-identity", "div", "keras-offset", "normalization-first", "normalization-alone"],
)
def test_a_model_that_divides_by_255_itself_is_fed_0_to_255_pixels(
    bundled_model_path, tmp_path, capsys, rescaling
):
    """A Keras model with Rescaling(1/255) in its graph takes pixels in 0..255: fed the
    usual [0, 1] pixels it saw them divided twice and scored 0.15 where the original scored
    0.95, exit 0. With no mean/std given and none in the metadata, such a model is fed
    0..255 pixels, and the preprocessing line says why. A Rescaling after a Normalization
    adapted on 0..255 pixels (tf2onnx: a per-channel Sub and Div, then the Mul) too: only the
    first Mul or Div was looked at, the Normalization's, and it scored 0.09, exit 0. And a
    Normalization adapted on 0..255 pixels with no Rescaling (keras.applications' ConvNeXt):
    it subtracts a mean in 0..255 units, and scored 0.09, exit 0."""
    original = onnx.load(bundled_model_path)
    meta = {p.key: p.value for p in original.metadata_props}
    mean, std = float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])
    model = onnx.ModelProto()
    model.CopyFrom(original)
    del model.metadata_props[:]
    graph = model.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_ready" if i == name else i for i in node.input]
    channel = np.ones((1, 1, 1, 1))  # a Keras Normalization's constants are per channel
    # the [0, 1] or [-1, 1] pixels the Rescaling makes, normalised as the original's data was
    first = {
        "mul": [("Mul", 1 / 255), ("Add", 0.0), ("Sub", mean), ("Div", std)],
        # Mul(x, Identity(c)), as some exporters write it
        "mul-identity": [("Mul", 1 / 255), ("Add", 0.0), ("Sub", mean), ("Div", std)],
        "div": [("Div", 255.0), ("Add", 0.0), ("Sub", mean), ("Div", std)],
        # (x / 127.5 - 1) = 2 * x / 255 - 1
        "keras-offset": [
            ("Mul", 1 / 127.5),
            ("Add", -1.0),
            ("Sub", 2 * mean - 1),
            ("Div", 2 * std),
        ],
        # (x - 255 mean) / std / 255 = (x / 255 - mean) / std
        "normalization-first": [
            ("Sub", 255 * mean * channel),
            ("Div", std * channel),
            ("Mul", 1 / 255),
        ],
        # (x - 255 mean) / (255 std) = (x / 255 - mean) / std
        "normalization-alone": [("Sub", 255 * mean * channel), ("Div", 255 * std * channel)],
    }[rescaling]
    tensor, nodes = name, []
    for k, (op, value) in enumerate(first):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), f"c{k}"))
        out = f"{name}_ready" if k == len(first) - 1 else f"t{k}"
        constant = f"c{k}"
        if rescaling == "mul-identity" and k == 0:
            nodes.append(onnx.helper.make_node("Identity", [constant], ["c0_alias"]))
            constant = "c0_alias"
        nodes.append(onnx.helper.make_node(op, [tensor, constant], [out]))
        tensor = out
    nodes += graph.node
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, tmp_path / "keras.onnx")
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    scores = []
    for path in (bundled_model_path, tmp_path / "keras.onnx"):
        assert main(["eval", str(path), "--data", data, "--limit", "256", "--json"]) == 0
        captured = capsys.readouterr()
        scores.append(json.loads(captured.out)["top1"])
    assert abs(scores[0] - scores[1]) < 0.01 and scores[1] > 0.85, scores
    scale = 1 / 127.5 if rescaling == "keras-offset" else 1 / 255
    said = {"normalization-alone": f"subtracts a mean of {255 * mean:.4g} itself"}
    assert (
        f"0..255 pixels: the model {said.get(rescaling, f'scales its input by {scale:.4g} itself')}"
        in captured.err
    )
    # the Python API reads the model as loaded (an Identity not yet collapsed) the same way
    source = open_for_model(data, onnx.load(tmp_path / "keras.onnx"))
    assert f"preprocessing: {source.preprocess.describe()}" in captured.err


def test_the_command_line_imports_where_the_system_has_no_sighup():
    """Windows has no signal.SIGHUP; reading it when the CLI and the data loader were
    imported made `onnx_mbs.cli` fail to import there (AttributeError)."""
    code = (
        "import signal; del signal.SIGHUP\n"
        "import onnx_mbs.cli, onnx_mbs.bridge.loading\n"
        "assert onnx_mbs.cli._ENDING == (signal.SIGTERM,)\n"
        "assert signal.SIGINT in onnx_mbs.bridge.loading._DEFERRED\n"
    )
    run_process([sys.executable, "-c", code], check=True, timeout=300)
