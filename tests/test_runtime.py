"""Execution-provider choice, quiet sessions, and accuracy evaluation."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_mbs import runtime
from onnx_mbs.data import Batch
from onnx_mbs.evaluate import evaluate
from onnx_mbs.passes.errors import BadInputError


def cuda_driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


CPU = ["CPUExecutionProvider"]
cpu_only = pytest.mark.skipif(cuda_driver_loads(), reason="needs a machine without a GPU driver")


def doubling_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "double", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@cpu_only
def test_auto_on_cpu_machine_is_cpu_and_silent(capfd):
    runtime.cuda_unavailable_reason.cache_clear()  # really run the detection under capture
    assert runtime.choose_providers("auto") == ["CPUExecutionProvider"]
    assert runtime.choose_providers() == ["CPUExecutionProvider"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@cpu_only
def test_cuda_session_probe_is_silent_when_cuda_cannot_run(capfd):
    # The last check alone: onnxruntime would log a loud error without the silencing.
    reason = runtime._probe_session_reason()
    assert reason is not None and "CUDA" in reason
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@cpu_only
def test_cuda_request_without_cuda_is_bad_input():
    with pytest.raises(BadInputError, match="CUDA requested but"):
        runtime.choose_providers("cuda")


def test_cpu_request_and_unknown_request():
    assert runtime.choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(BadInputError, match="^unknown providers 'gpu': use auto, cpu or cuda$"):
        runtime.choose_providers("gpu")


@pytest.mark.parametrize("form", ["proto", "bytes", "path"])
def test_make_session_accepts_proto_bytes_and_path(tmp_path, form):
    model = doubling_model()
    if form == "bytes":
        given = model.SerializeToString()
    elif form == "path":
        given = str(tmp_path / "m.onnx")
        onnx.save(model, given)
    else:
        given = model
    session = runtime.make_session(given, ["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)
    assert runtime.session_provider(session) == "CPUExecutionProvider"
    assert runtime.feed_dtype(session, "x") == np.float32


def test_feed_dtype_rejects_unknown_input():
    session = runtime.make_session(doubling_model(), ["CPUExecutionProvider"])
    with pytest.raises(BadInputError, match=r"input 'images' but the model's inputs are \['x'\]"):
        runtime.feed_dtype(session, "images")


# --------------------------------------------------------------------------- evaluate


class Logits:
    """A DataSource whose samples are the logits themselves (the model flattens them)."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray | None) -> None:
        self.x = logits.reshape(len(logits), 1, 1, -1).astype(np.float32)
        self.y = labels
        self.description = "constructed logits"
        self.preprocess = None
        self.input_name = "x"

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int):
        for start in range(0, len(self.x), batch_size):
            y = None if self.y is None else self.y[start : start + batch_size]
            yield Batch(self.x[start : start + batch_size], y)


def flatten_model(classes: int) -> onnx.ModelProto:
    """logits = Flatten(x): the answers are whatever the data says."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 1, classes])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["logits"])], "f", [x], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_evaluate_top1_top5_on_constructed_answers():
    logits = np.array(
        [
            [0, 0, 0, 9, 0, 0, 0, 0, 0, 0],  # label 3 first: top-1 and top-5
            [5, 4, 0, 0, 0, 0, 0, 0, 0, 0],  # label 1 second: top-5 only
            [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],  # label 7 eighth: neither
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # label 9 first
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # label 5 fifth: top-5 only
        ],
        np.float32,
    )
    labels = np.array([3, 1, 7, 9, 5])
    result = evaluate(flatten_model(10), Logits(logits, labels), CPU, batch_size=2, progress=False)
    assert result.top1 == pytest.approx(2 / 5)
    assert result.top5 == pytest.approx(4 / 5)
    assert result.samples == 5 and result.provider == "CPUExecutionProvider"


def test_evaluate_without_top5_for_few_classes_and_ties_are_not_free():
    logits = np.zeros((4, 3), np.float32)  # constant answers: only label 0 counts as first
    result = evaluate(flatten_model(3), Logits(logits, np.array([0, 1, 2, 0])), CPU)
    assert result.top1 == pytest.approx(0.5) and result.top5 is None


def test_evaluate_needs_labels_in_range():
    with pytest.raises(BadInputError, match="evaluation needs labels"):
        evaluate(flatten_model(3), Logits(np.zeros((2, 3)), None), CPU)
    with pytest.raises(
        BadInputError,
        match="label 7 in the data does not exist: the model's logits 'logits' have 3 classes",
    ):
        evaluate(flatten_model(3), Logits(np.zeros((2, 3)), np.array([0, 7])), CPU)


def test_a_model_onnxruntime_cannot_load_is_bad_input():
    from onnx import TensorProto, helper

    from onnx_mbs.runtime import make_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "too_new",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 99  # newer than any onnxruntime reads
    with pytest.raises(BadInputError, match="cannot load the model"):
        make_session(model, ["CPUExecutionProvider"])


def test_in_order_hands_back_results_in_order_and_reads_little_ahead():
    """Concurrent runs (statistics of batch-1 models on CPU) must add up in data order,
    whatever finishes first, and never pull the whole data set in at once."""
    import threading
    import time

    from onnx_mbs.runtime import in_order

    pulled = []

    def items():
        for k in range(20):
            pulled.append(k)
            yield k

    def run(k):
        time.sleep(0.02 if k % 2 == 0 else 0.0)  # even items finish last
        return k * k, threading.get_ident()

    seen = []
    for item, (square, _) in in_order(run, items(), workers=2):
        seen.append((item, square))
        assert len(pulled) <= item + 1 + 2 * 2  # at most 2 * workers read ahead
    assert seen == [(k, k * k) for k in range(20)]
    assert [k for k, _ in in_order(lambda k: k, iter(range(5)), workers=1)] == list(range(5))


def test_concurrent_runs_only_for_single_samples_on_cpu(monkeypatch):
    from onnx_mbs.runtime import CPU, CUDA, concurrent_runs

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: {0, 1, 2}, raising=False)
    assert concurrent_runs([CPU], rows=1, samples=16) == 3
    assert concurrent_runs([CPU], rows=1, samples=2) == 2
    assert concurrent_runs([CPU], rows=8, samples=16) == 1  # a batch spreads over cores itself
    assert concurrent_runs([CUDA, CPU], rows=1, samples=16) == 1
    assert concurrent_runs([CPU], rows=1, samples=1) == 1


def test_evaluate_takes_a_data_spec_as_the_eval_command_does(bundled_model_path):
    """`onnx_mbs.evaluate` is exported beside `reduce`, which takes a --data spec; given
    one it failed with AttributeError ('str' object has no attribute 'input_name')."""
    from onnx_mbs.data.fit import open_for_model
    from onnx_mbs.models import FMNIST_SAMPLE
    from onnx_mbs.passes import load_model

    model = str(bundled_model_path)
    by_spec = evaluate(model, str(FMNIST_SAMPLE), CPU, progress=False)
    source = open_for_model(str(FMNIST_SAMPLE), load_model(model))
    assert by_spec == evaluate(model, source, CPU, progress=False)
    assert by_spec.samples == 512 and by_spec.top1 > 0.9


@pytest.mark.parametrize(
    ("installed", "said"),
    [
        (None, "onnxruntime cannot be imported"),  # not installed
        (
            "empty",
            "onnxruntime is broken",
        ),  # onnxruntime-gpu's folder after `pip uninstall onnxruntime`
    ],
)
@pytest.mark.parametrize("providers", ["cpu", "auto"])
def test_an_unusable_onnxruntime_is_one_line_and_exit_2(
    installed, said, providers, bundled_model_path, monkeypatch, capsys
):
    """onnxruntime and onnxruntime-gpu share one package folder: with both installed,
    uninstalling one left a namespace package, and eval and reduce ended in "AttributeError:
    module 'onnxruntime' has no attribute 'get_available_providers'" (or 'SessionOptions'
    under --providers cpu), exit 1."""
    import sys
    import types

    from onnx_mbs.cli import main

    module = None if installed is None else types.ModuleType("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    runtime.cuda_unavailable_reason.cache_clear()  # a cached answer would import nothing
    data = str(bundled_model_path.parent / "fmnist_sample.npz")
    argv = ["eval", str(bundled_model_path), "--data", data, "--limit", "8"]
    assert main([*argv, "--providers", providers]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the data's lines
    assert last.startswith(f"onnx-mbs: error: {said}") and "pip install" in last


def test_evaluate_maps_the_weights_of_a_model_in_memory(bundled_model_path, monkeypatch):
    """A model in memory is run from a file whose large weights onnxruntime maps: a session
    made from the model itself held a serialized copy of them and its own beside the caller's
    (`eval` of ResNet-1202: 6x the file). A HeldModel (what `eval` hands over) is let go once
    written. The result is the one the file on disk gives."""
    from onnx_mbs import evaluate as module
    from onnx_mbs.data.fit import open_for_model
    from onnx_mbs.models import FMNIST_SAMPLE
    from onnx_mbs.passes import load_model
    from onnx_mbs.passes.external_data import WEIGHTS_FILE
    from onnx_mbs.weights_file import HeldModel

    made = []  # (the file's bytes, its weights file's bytes) of each session made from a file

    def spy(model, providers, **kwargs):
        run = Path(model)  # a path: not the model, nor its bytes
        made.append((run.stat().st_size, (run.parent / WEIGHTS_FILE).stat().st_size))
        return runtime.make_session(model, providers, **kwargs)

    path = str(bundled_model_path)
    source = open_for_model(str(FMNIST_SAMPLE), load_model(path))
    from_file = evaluate(path, source, CPU, progress=False)
    monkeypatch.setattr(module, "make_session", spy)
    size = onnx.load(path).ByteSize()
    held = HeldModel(onnx.load(path))
    for given in (onnx.load(path), held):
        assert evaluate(given, source, CPU, progress=False) == from_file
        graph, weights = made[-1]
        assert graph < size / 10 and weights >= 0.9 * size
    assert held.lent
