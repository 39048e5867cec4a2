"""The GPU paths that can be checked without a GPU: device and backend choice under torchrun,
bf16 autocast, and the silent CUDA library preload. (bench/gpu.py measures them on a GPU.)"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_retrain import export, quadrant_data

from onnx_mbs.bridge import retrain
from onnx_mbs.bridge import train as bridge_train
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.runtime import _preload_cuda_libraries


@pytest.mark.parametrize(
    ("gpus", "local_world", "backend"),
    [(1, 1, "nccl"), (2, 2, "nccl"), (1, 2, "gloo"), (2, 4, "gloo")],
)
def test_nccl_only_when_every_process_has_a_gpu(monkeypatch, gpus, local_world, backend):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert bridge_train._dist_backend(torch.device("cuda", 0)) == backend
    assert bridge_train._dist_backend(torch.device("cpu")) == "gloo"


def test_processes_share_gpus_round_robin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    picked = [bridge_train._pick_device("cuda", rank) for rank in range(4)]
    assert picked == [torch.device("cuda", i) for i in (0, 1, 0, 1)]
    assert bridge_train._pick_device("cuda:1", 0) == torch.device("cuda", 1)


def test_bf16_autocast_retrains_and_writes_float32_weights():
    x, y = quadrant_data(128, seed=0)
    model = export(keep_bn=True)
    result = retrain(model, (x, y), epochs=1, lr=0.05, device="cpu", amp="bf16", progress=False)
    assert np.isfinite(result.history[0].train_loss)
    assert {t.data_type for t in result.model.graph.initializer} == {
        t.data_type for t in model.graph.initializer
    }
    session = ort.InferenceSession(result.model.SerializeToString())
    out = session.run(None, {session.get_inputs()[0].name: x[:4]})[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_unknown_amp_is_bad_input():
    x, y = quadrant_data(16, seed=0)
    with pytest.raises(BadInputError, match="amp must be one of off, bf16"):
        retrain(export(keep_bn=True), (x, y), amp="fp8", device="cpu", progress=False)


def test_cuda_library_preload_prints_nothing_and_restores_output(capfd):
    _preload_cuda_libraries()
    print("still here")
    captured = capfd.readouterr()
    assert captured.out == "still here\n"
    assert captured.err == ""
