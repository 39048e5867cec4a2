"""BN-folded graphs: BatchNorm re-inserted for training, folded back exactly; BN recalibration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from graphs import run as ort_run
from test_bridge import SmallNet, assert_close, export, randomized, torch_run

from onnx_mbs.bridge import OnnxModule, retrain, write_back
from onnx_mbs.bridge.bn import fold_back, recalibrate, reinsert_bn

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def x16() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(32, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def folded(x16) -> onnx.ModelProto:
    torch.manual_seed(0)
    return export(randomized(SmallNet()), torch.from_numpy(x16[:4]), keep_bn=False)


def _structure(model: onnx.ModelProto) -> list:
    return [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]


def test_reinserted_bn_computes_the_same_function(folded, x16) -> None:
    train_model, inserted = reinsert_bn(folded, [torch.from_numpy(x16)])
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert len(inserted) == len(convs) == 3
    ops = [n.op_type for n in train_model.graph.node]
    assert ops.count("BatchNormalization") == 3
    onnx.checker.check_model(train_model, full_check=True)
    module = OnnxModule(train_model).eval()
    assert_close(torch_run(module, {"input": x16})[0], ort_run(folded, {"input": x16})[0])
    # The BN's running statistics are the conv outputs' statistics on the data.
    pre = OnnxModule(folded)
    bn = inserted[0]
    with torch.no_grad():
        conv_out = torch.nn.functional.conv2d(
            torch.from_numpy(x16),
            pre.initializer(bn.weight),
            pre.initializer(bn.bias),
            padding=1,
        )
    mean = module.initializer(bn.mean).numpy()
    var = module.initializer(bn.var).numpy()
    np.testing.assert_allclose(mean, conv_out.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, conv_out.var((0, 2, 3), unbiased=False), rtol=1e-4)


def test_fold_back_is_exact_and_keeps_the_graph(folded, x16) -> None:
    train_model, inserted = reinsert_bn(folded, [torch.from_numpy(x16)])
    module = OnnxModule(train_model).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    for _ in range(3):
        loss = module(torch.from_numpy(x16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    written = fold_back(folded, write_back(train_model, module), inserted)
    assert _structure(written) == _structure(folded)
    assert written.graph.input == folded.graph.input
    assert written.graph.output == folded.graph.output
    assert [t.name for t in written.graph.initializer] == [t.name for t in folded.graph.initializer]
    onnx.checker.check_model(written, full_check=True)
    trained = torch_run(module, {"input": x16})[0]
    assert_close(ort_run(written, {"input": x16})[0], trained, rel=1e-4)
    assert not np.allclose(ort_run(folded, {"input": x16})[0], trained, atol=1e-3)


def test_retrain_reinserts_bn_by_default_and_can_be_turned_off(folded, x16) -> None:
    y = np.arange(len(x16)) % 5
    on = retrain(folded, (x16, y), epochs=1, lr=0.05, batch_size=8, progress=False)
    off = retrain(
        folded, (x16, y), epochs=1, lr=0.05, batch_size=8, progress=False, reinsert_bn=False
    )
    assert on.bn_reinserted == 3 and off.bn_reinserted == 0
    for result in (on, off):
        assert _structure(result.model) == _structure(folded)
        onnx.checker.check_model(result.model, full_check=True)
    # Different parameterisations train differently.
    a, b = (ort_run(r.model, {"input": x16})[0] for r in (on, off))
    assert not np.allclose(a, b, atol=1e-3)


def test_bn_kept_graph_gets_no_reinserted_bn(x16) -> None:
    torch.manual_seed(0)
    kept = export(randomized(SmallNet()), torch.from_numpy(x16[:4]), keep_bn=True)
    y = np.arange(len(x16)) % 5
    result = retrain(kept, (x16, y), epochs=1, lr=0.01, batch_size=8, progress=False)
    assert result.bn_reinserted == 0
    assert _structure(result.model) == _structure(kept)


def test_recalibrate_is_the_average_of_batch_statistics(x16) -> None:
    torch.manual_seed(0)
    net = randomized(SmallNet())
    model = export(net, torch.from_numpy(x16[:4]), keep_bn=True)
    module = OnnxModule(model).eval()
    batches = [torch.from_numpy(x16[i : i + 8]) for i in range(0, 32, 8)]
    assert recalibrate(module, batches) == 4
    assert not module.training
    # torch's own cumulative average (momentum=None) over the same batches is the reference.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for xb in batches:
            net(xb)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    refs = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(refs) == 3
    for node, ref in zip(bns, refs, strict=True):
        np.testing.assert_allclose(
            module.initializer(node.input[3]).numpy(), ref.running_mean.numpy(), atol=1e-5
        )
        np.testing.assert_allclose(
            module.initializer(node.input[4]).numpy(), ref.running_var.numpy(), rtol=1e-4
        )
