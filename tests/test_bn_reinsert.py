"""BN-folded graphs: BatchNorm re-inserted for training, folded back exactly; BN recalibration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from graphs import run as ort_run
from onnx import numpy_helper
from test_bridge import SmallNet, assert_close, export, randomized, torch_run
from test_precision import in_dtype

from onnx_mbs.bridge import OnnxModule, retrain, write_back
from onnx_mbs.bridge import train as train_mod
from onnx_mbs.bridge.bn import (
    EPS,
    channel_map,
    conv_output_stats,
    fold_back,
    is_bn_folded,
    recalibrate,
    recalibration_passes,
    reinsert_bn,
)
from onnx_mbs.bridge.module import with_outputs
from onnx_mbs.passes.errors import BadInputError

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


# Output channels of the grouped `down` conv a reduction keeps (6 of 8 in each group).
KEPT = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]


def _reduced(folded: onnx.ModelProto) -> onnx.ModelProto:
    """`folded` as a reduction leaves it: `down` loses output channels (and the classifier the
    matching inputs), `conv2` loses half its inputs (zeroed), so the kept channels' statistics
    drift from the unreduced graph's while their biases stay."""
    out = onnx.ModelProto()
    out.CopyFrom(folded)
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    down, conv2 = convs["/down/Conv"], convs["/conv2/Conv"]
    edits = {}
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in (down.input[1], down.input[2]):
            edits[t.name] = a[KEPT]
        elif t.name == "fc.weight":
            edits[t.name] = a[:, KEPT]
        elif t.name == conv2.input[1]:
            a = a.copy()
            a[:, :4] = 0.0
            edits[t.name] = a
    for t in out.graph.initializer:
        if t.name in edits:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(edits[t.name]), t.name))
    return out


def test_reference_equal_to_the_model_keeps_the_same_function(folded, x16) -> None:
    batches = [torch.from_numpy(x16)]
    for reference in (folded, export(randomized(SmallNet()), batches[0][:4], keep_bn=True)):
        # Itself as reference: every channel maps to itself. A BN-kept reference: no foldable
        # Conv to match, so the statistics are the model's own.
        train_model, inserted = reinsert_bn(folded, batches, reference=reference)
        assert len(inserted) == 3
        module = OnnxModule(train_model).eval()
        assert_close(torch_run(module, {"input": x16})[0], ort_run(folded, {"input": x16})[0], 1e-5)


def test_reinserted_bn_targets_the_reference_statistics(folded, x16) -> None:
    """Trained with batch statistics, a BN-kept graph's BN restores each channel to its trained
    mean and scale however a reduction shifted the conv's output. The re-inserted BN does the
    same with the unreduced graph's (the teacher's) conv-output statistics as its affine."""
    reduced = _reduced(folded)
    convs = {n.name: n for n in reduced.graph.node if n.op_type == "Conv"}
    np.testing.assert_array_equal(channel_map(reduced, folded, convs["/down/Conv"]), KEPT)
    np.testing.assert_array_equal(channel_map(reduced, folded, convs["/conv2/Conv"]), range(8))
    batches = [torch.from_numpy(x16)]
    train_model, inserted = reinsert_bn(reduced, batches, reference=folded)
    names = [bn.conv_output for bn in inserted]
    ref = conv_output_stats(folded, names, batches)
    own = conv_output_stats(reduced, names, batches)
    maps = {"/down/Conv": KEPT}
    module = OnnxModule(with_outputs(train_model, names)).train()
    for bn in inserted:
        # Running statistics stay the model's own (re-measured before folding back anyway).
        np.testing.assert_allclose(module.initializer(bn.mean), own[bn.conv_output][0], atol=1e-5)
    with torch.no_grad():
        outs = module(batches[0])
    for bn in inserted:
        index = maps.get(bn.conv, slice(None))
        mean, var = ref[bn.conv_output][0][index], ref[bn.conv_output][1][index]
        np.testing.assert_allclose(
            module.initializer(bn.scale).detach(), np.sqrt(var + EPS), rtol=1e-5
        )
        np.testing.assert_allclose(
            module.initializer(bn.shift).detach(), mean, rtol=1e-5, atol=1e-6
        )
        # In training the BN's output has the unreduced graph's per-channel statistics.
        y = outs[module.output_names.index(bn.conv_output)].double()
        np.testing.assert_allclose(y.mean((0, 2, 3)), mean, atol=1e-4)
        np.testing.assert_allclose(y.var((0, 2, 3), unbiased=False), var, rtol=1e-3)
    # The reduction moved conv2's and down's statistics: the targets differ from their own.
    assert not np.allclose(
        own["/conv2/Conv_output_0"][1], ref["/conv2/Conv_output_0"][1], rtol=0.05
    )


def test_retrain_takes_bn_targets_from_the_teacher(folded, x16, monkeypatch) -> None:
    seen = []
    real = train_mod.reinsert_batchnorm

    def spy(model, batches, reference=None):
        seen.append(reference)
        return real(model, batches, reference)

    monkeypatch.setattr(train_mod, "reinsert_batchnorm", spy)
    reduced = _reduced(folded)
    y = np.arange(len(x16)) % 5
    result = retrain(reduced, (x16, y), teacher=folded, epochs=1, batch_size=8, progress=False)
    assert result.bn_reinserted == 3 and seen == [folded]
    assert _structure(result.model) == _structure(reduced)
    retrain(reduced, (x16, y), epochs=1, batch_size=8, progress=False)
    assert seen[-1] is None


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


def test_bn_is_reinserted_where_weights_are_stored_in_bf16(folded, x16) -> None:
    """Weights stored in bf16 and Cast before their Conv still get their BN, folded back into
    the stored bf16 initializers; the graph keeps its nodes and dtypes."""
    stored = in_dtype(folded, onnx.TensorProto.BFLOAT16)
    y = np.arange(len(x16)) % 5
    result = retrain(stored, (x16, y), epochs=1, lr=0.05, batch_size=8, progress=False)
    assert result.bn_reinserted == 3
    assert _structure(result.model) == _structure(stored)
    assert [(t.name, t.data_type) for t in result.model.graph.initializer] == [
        (t.name, t.data_type) for t in stored.graph.initializer
    ]
    onnx.checker.check_model(result.model, full_check=True)


def test_bn_kept_graph_gets_no_reinserted_bn(x16) -> None:
    torch.manual_seed(0)
    kept = export(randomized(SmallNet()), torch.from_numpy(x16[:4]), keep_bn=True)
    y = np.arange(len(x16)) % 5
    result = retrain(kept, (x16, y), epochs=1, lr=0.01, batch_size=8, progress=False)
    assert result.bn_reinserted == 0
    assert _structure(result.model) == _structure(kept)


def test_recalibrate_pools_the_statistics_of_all_batches(x16) -> None:
    """Each BN's running statistics become the mean and (population) variance of its inputs
    over all batches together, batches weighted by their size, the batch of one included.
    Not the average of the batch variances: that misses the variance of the batch means."""
    torch.manual_seed(0)
    net = randomized(SmallNet())
    model = export(net, torch.from_numpy(x16[:4]), keep_bn=True)
    module = OnnxModule(model).eval()
    sizes = [8, 3, 12, 1, 8]
    ends = np.cumsum(sizes)
    batches = [torch.from_numpy(x16[e - n : e]) for n, e in zip(sizes, ends, strict=True)]
    assert recalibrate(module, iter(batches)) == 5  # an iterator is read once, kept for passes
    assert not module.training
    # torch's net in eval mode gives each BN's inputs batch by batch, every BN before it
    # (the three are in series) already set to its pooled statistics; numpy pools them.
    refs = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == len(refs) == 3
    for ref, node in zip(refs, bns, strict=True):
        seen: list[np.ndarray] = []
        hook = ref.register_forward_pre_hook(lambda _, args, s=seen: s.append(args[0].numpy()))
        with torch.no_grad():
            for xb in batches:
                net(xb)
        hook.remove()
        inputs = np.concatenate(seen).astype(np.float64)
        assert len(inputs) == 32
        mean, var = inputs.mean((0, 2, 3)), inputs.var((0, 2, 3))
        np.testing.assert_allclose(module.initializer(node.input[3]).numpy(), mean, atol=1e-5)
        np.testing.assert_allclose(module.initializer(node.input[4]).numpy(), var, rtol=1e-4)
        # The average of the batches' own variances is clearly less here.
        average = np.mean([b.astype(np.float64).var((0, 2, 3), ddof=1) for b in seen], 0)
        assert (average < var).any()
        ref.running_mean.copy_(torch.from_numpy(mean))
        ref.running_var.copy_(torch.from_numpy(var))


def _batchnorms(nodes: list[onnx.NodeProto], bns: list[str]) -> onnx.ModelProto:
    """x (N, 1) through `nodes`, each BN of `bns` (x_name, out_name) with scale 1, shift 0,
    running statistics 0 and 1; the last node's output is y."""
    helper = onnx.helper
    inits = []
    for name in bns:
        for part, value in (("scale", 1.0), ("shift", 0.0), ("mean", 0.0), ("var", 1.0)):
            inits.append(numpy_helper.from_array(np.array([value], np.float32), f"{name}_{part}"))
    graph = helper.make_graph(
        nodes,
        "bns",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn(name: str, x: str, y: str) -> onnx.NodeProto:
    parts = [f"{name}_{p}" for p in ("scale", "shift", "mean", "var")]
    return onnx.helper.make_node("BatchNormalization", [x, *parts], [y], name=name, epsilon=EPS)


def test_recalibration_measures_each_bn_on_what_the_written_model_feeds_it() -> None:
    """x -> BN1 -> Relu -> BN2, batches [0, 2] and [4, 6]: BN1's statistics are x's (mean 3,
    variance 5); the written model feeds BN2 relu((x - 3) / s) = [0, 0, 1, 3] / s with
    s = sqrt(5 + eps), whose mean is 1 / s and variance 1.5 / s^2. Measured in train mode,
    each batch was normalised with its own statistics before the Relu ([0, 1] / s' in both,
    s' = sqrt(1 + eps)): BN2 got mean 0.5 / s' and variance 0.25 / s'^2, and the written model
    computed another function than the one measured."""
    relu = onnx.helper.make_node("Relu", ["a"], ["r"])
    nodes = [_bn("bn1", "x", "a"), relu, _bn("bn2", "r", "y")]
    model = _batchnorms(nodes, ["bn1", "bn2"])
    batches = [torch.tensor([[0.0], [2.0]]), torch.tensor([[4.0], [6.0]])]
    module = OnnxModule(model)
    assert recalibrate(module, batches) == 2
    s2 = 5.0 + EPS
    names = ("bn1_mean", "bn1_var", "bn2_mean", "bn2_var")
    np.testing.assert_allclose(
        [float(module.initializer(n)) for n in names],
        [3.0, 5.0, 1.0 / np.sqrt(s2), 1.5 / s2],
        rtol=1e-6,
    )
    # The written model normalises BN2's input over the data: mean 0, variance 1 (less eps).
    written = write_back(model, module)
    (y,) = ort_run(written, {"x": np.array([[0.0], [2.0], [4.0], [6.0]], np.float32)})
    np.testing.assert_allclose([y.mean(), y.var()], [0.0, 1.5 / (1.5 + EPS * s2)], atol=1e-6)
    # Only BN2 measured: BN1 keeps statistics 0 and 1, so BN2 sees relu(x) / sqrt(1 + eps).
    module = OnnxModule(model)
    recalibrate(module, batches, {"bn2_mean"})
    assert float(module.initializer("bn1_mean")) == 0.0
    assert float(module.initializer("bn1_var")) == 1.0
    seen = np.array([0.0, 2.0, 4.0, 6.0]) / np.sqrt(1.0 + EPS)
    np.testing.assert_allclose(float(module.initializer("bn2_mean")), seen.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(module.initializer("bn2_var")), seen.var(), rtol=1e-6)


def test_recalibration_passes_group_the_bns_that_do_not_feed_each_other() -> None:
    """BN1 and BN2 read x side by side, their sum feeds BN3: two passes, not three."""
    helper = onnx.helper
    nodes = [
        _bn("bn1", "x", "a"),
        _bn("bn2", "x", "b"),
        helper.make_node("Add", ["a", "b"], ["s"]),
        _bn("bn3", "s", "y"),
    ]
    module = OnnxModule(_batchnorms(nodes, ["bn1", "bn2", "bn3"]))
    passes = recalibration_passes(module)
    assert [sorted(p) for p in passes] == [["bn1_mean", "bn2_mean"], ["bn3_mean"]]
    assert recalibration_passes(module, {"bn3_mean"}) == [["bn3_mean"]]
    x = np.array([[1.0], [3.0], [-2.0], [6.0]], np.float32)
    assert recalibrate(module, [torch.from_numpy(x)]) == 1
    # BN1 and BN2 each give (x - mean) / s: their sum has mean 0 and variance 4 var / (var + eps).
    var = float(x.var())
    expected = 4 * var / (var + EPS)
    np.testing.assert_allclose(float(module.initializer("bn3_var")), expected, rtol=1e-6)
    np.testing.assert_allclose(float(module.initializer("bn3_mean")), 0.0, atol=1e-6)


def test_a_bn_applied_twice_is_measured_on_both_inputs() -> None:
    """One BatchNorm's statistics read by two nodes (a siamese branch applied to two inputs):
    the written model normalises both with them, so they are pooled over both inputs, as
    train-mode recalibration pooled them; the pass ran on until both nodes had seen the
    batch, not stopping at the first. The node applied second, downstream of a BN measured,
    puts the shared one in the later pass."""
    helper = onnx.helper
    ten = numpy_helper.from_array(np.array([10.0], np.float32))
    nodes = [
        _bn("bn1", "x", "a"),
        helper.make_node("Constant", [], ["ten"], value=ten),
        helper.make_node("Add", ["a", "ten"], ["a10"]),
        _bn("shared", "x", "b"),
        onnx.helper.make_node(
            "BatchNormalization",
            ["a10", *(f"shared_{p}" for p in ("scale", "shift", "mean", "var"))],
            ["c"],
            name="shared_again",
            epsilon=EPS,
        ),
        helper.make_node("Add", ["b", "c"], ["y"]),
    ]
    model = _batchnorms(nodes, ["bn1", "shared"])
    module = OnnxModule(model)
    assert recalibration_passes(module) == [["bn1_mean"], ["shared_mean"]]
    x = np.array([[1.0], [3.0], [-2.0], [6.0]], np.float32)
    assert recalibrate(module, [torch.from_numpy(x)]) == 1
    var = float(x.var())
    both = np.concatenate([x[:, 0], (x[:, 0] - x.mean()) / np.sqrt(var + EPS) + 10.0])
    np.testing.assert_allclose(float(module.initializer("shared_mean")), both.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(module.initializer("shared_var")), both.var(), rtol=1e-5)


def test_statistics_stored_in_float16_and_cast_are_recalibrated() -> None:
    """A BN whose running statistics are stored in float16 and Cast to float before it (an
    alias the module runs): the layered passes looked for BNs reading a buffer by name, found
    none, and `recalibrate_model` reported 4 batches with the statistics left at 0 and 1."""
    helper = onnx.helper
    inits = [
        numpy_helper.from_array(np.array(v, np.float16), n)
        for n, v in (("s", [1, 1]), ("b", [0, 0]), ("m", [0, 0]), ("v", [1, 1]))
    ]
    nodes = [helper.make_node("Cast", [n], [f"{n}f"], to=onnx.TensorProto.FLOAT) for n in "sbmv"]
    nodes.append(helper.make_node("BatchNormalization", ["x", "sf", "bf", "mf", "vf"], ["y"]))
    shape = ["N", 2, 4, 4]
    graph = helper.make_graph(
        nodes,
        "cast_bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = (np.random.default_rng(0).standard_normal((32, 2, 4, 4)) * 2 + 3).astype(np.float32)
    written, count = train_mod.recalibrate_model(model, (x, np.zeros(32, np.int64)), batch_size=8)
    assert count == 4
    stats = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    np.testing.assert_allclose(stats["m"], x.mean((0, 2, 3)), rtol=2e-3)
    np.testing.assert_allclose(stats["v"], x.var((0, 2, 3)), rtol=2e-3)


def test_a_uint8_input_model_is_recalibrated_on_what_onnxruntime_is_fed(tmp_path) -> None:
    """A model that takes uint8 pixels (a Cast in its graph) was refused: x had to be floats.
    Its model-ready uint8 arrays, or a DataSource that gives them, are fed as they are; the
    statistics are those of the BatchNorm inputs onnxruntime computes from the same batches.
    Floats for it (images preprocessed to [0, 1]) are refused: they are not what it is fed."""
    from conftest import write_npz
    from test_cli_retrain import with_uint8_input
    from test_retrain import export as export_quadnet
    from test_retrain import quadrant_data

    from onnx_mbs.data import open_data
    from onnx_mbs.data.sources import ArraySource

    model = with_uint8_input(export_quadnet(keep_bn=True))
    x = np.clip(quadrant_data(32, seed=1)[0] * 60 + 60, 0, 255).astype(np.uint8)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    probe = with_outputs(model, [n.input[0] for n in bns])
    features: list[list[np.ndarray]] = []
    for i in range(0, len(x), 8):  # the BN inputs onnxruntime computes, batch by batch
        features.append(ort_run(probe, {"input": x[i : i + 8]}, [n.input[0] for n in bns]))
    ready = ArraySource(x, None, None, None, "input", "model-ready uint8")  # fed as it is
    for data in ((x, None), ready):
        written, count = train_mod.recalibrate_model(model, data, batch_size=8)
        assert count == 4
        stats = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
        for k, node in enumerate(
            n for n in written.graph.node if n.op_type == "BatchNormalization"
        ):
            pooled = np.concatenate([f[k] for f in features]).astype(np.float64)
            np.testing.assert_allclose(
                stats[node.input[3]], pooled.mean((0, 2, 3)), rtol=1e-5, atol=1e-4
            )
            np.testing.assert_allclose(stats[node.input[4]], pooled.var((0, 2, 3)), rtol=1e-4)
        assert ort_run(written, {"input": x})[0].shape == (32, 4)
    images = open_data(write_npz(tmp_path / "x.npz", x=x), "input", [1, 1, 8, 8])  # to floats
    for floats in ((x / 255.0).astype(np.float32), None), images:
        with pytest.raises(BadInputError, match=r"uint8.*model-ready"):
            train_mod.recalibrate_model(model, floats, batch_size=8)


@pytest.mark.parametrize("batch_size", [8, 1])
def test_a_trailing_batch_of_one_is_in_the_statistics(batch_size) -> None:
    """Batches of one were left out (train-mode BatchNorm once needed 2 samples): 17 samples
    in batches of 8 were measured on 16, and batch size 1 was refused. Measured in eval mode,
    a (1, C) batch is pooled as any other: the statistics are numpy's over all 17 samples."""
    helper = onnx.helper
    inits = [
        numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("s", [1, 1, 1]), ("b", [0, 0, 0]), ("m", [0, 0, 0]), ("v", [1, 1, 1]))
    ]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
        "features_bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = (np.random.default_rng(0).standard_normal((17, 3)) * 2 + 3).astype(np.float32)
    x[-1] = [40.0, -30.0, 9.0]  # the sample alone in the last batch moves every statistic
    written, count = train_mod.recalibrate_model(model, (x, None), batch_size=batch_size)
    assert count == -(-17 // batch_size)
    stats = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    np.testing.assert_allclose(stats["m"], x.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["v"], x.astype(np.float64).var(0), rtol=1e-5)


def test_a_batch_of_one_through_a_training_mode_batchnorm_is_refused_in_one_line() -> None:
    """A training_mode=1 BatchNorm normalises with its batch's statistics in eval mode too: a
    (1, C) batch has none, and torch's ValueError came through once batches of one were no
    longer left out of recalibration."""
    helper = onnx.helper
    inits = [
        numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("s", [1, 1, 1]), ("b", [0, 0, 0]), ("m", [0, 0, 0]), ("v", [1, 1, 1]))
    ]
    node = helper.make_node(
        "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], "bn", training_mode=1
    )
    graph = helper.make_graph(
        [node],
        "train_bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    x = np.random.default_rng(0).standard_normal((17, 3)).astype(np.float32)
    with pytest.raises(BadInputError, match="'bn' has training_mode=1.*no batch of 1"):
        train_mod.recalibrate_model(model, (x, None), batch_size=8)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_recalibration_in_no_batches_is_refused_in_one_line(x16, batch_size) -> None:
    """recalibrate_model(..., batch_size=0) stopped with range()'s ValueError traceback: the
    batch-size rule `reduce --recalibrate` asks before it reduces was not asked here."""
    torch.manual_seed(0)
    model = export(randomized(SmallNet()), torch.from_numpy(x16[:4]), keep_bn=True)
    with pytest.raises(BadInputError, match=f"batch size of at least 1.*={batch_size}"):
        train_mod.recalibrate_model(model, (x16, None), batch_size=batch_size)


def test_recalibration_refusal_promises_a_reinsertion_only_where_retrain_makes_one() -> None:
    """tf2onnx writes a Keras BatchNorm it does not fold as a per-channel Mul and Add after a
    Conv without bias: `reduce --recalibrate` refused it saying 'retrain it instead (BatchNorm
    is re-inserted there)', but retrain re-inserts a BatchNorm only after a biased Conv and
    trained this model with none."""
    helper = onnx.helper
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.normal(size=(4, 3, 3, 3)),
        "k": rng.normal(size=(4, 1, 1)),
        "c": rng.normal(size=(4, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["conv", "k"], ["scaled"]),
        helper.make_node("Add", ["scaled", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "keras_bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInputError) as refused:
        train_mod.check_recalibration(model)
    assert "re-inserted" not in str(refused.value)
    assert "no BatchNormalization" in str(refused.value)


def test_a_retrain_that_trains_nothing_writes_the_folded_model_back(
    bundled_model_path, fmnist_sample, fmnist_train_sample, tmp_path
) -> None:
    """Metamorphic: at a vanishing lr no weight moves, so folding the re-inserted BNs back must
    give the folded model again. Their statistics start as the whole calibration set's and are
    re-measured after training. Re-measured as the plain average of per-batch statistics the
    variance lost the variance of the batch means (batches of 16: logits moved by 1.9 of ~16);
    pooled, but in train mode, each BN's input was normalised upstream with its batch's
    statistics, not the running ones the written model uses (logits still moved by 1.86).
    Measured layer by layer in eval mode they are the same statistics again: what is left is
    float32 rounding (conv outputs in torch vs. the statistics in float64, stored as float32),
    ~1e-6 relative per layer over 21 of them, so 1e-3 of logits of size ~16."""
    from onnx_mbs.models.deployment_form import fold_batchnorm

    path = tmp_path / "folded.onnx"
    fold_batchnorm(bundled_model_path, path)
    folded = onnx.load(str(path))
    assert is_bn_folded(folded)
    meta = {p.key: p.value for p in folded.metadata_props}
    mean, std = float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])

    def normalised(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    x_train, y_train = fmnist_train_sample
    result = retrain(
        folded,
        (normalised(x_train[:256]), y_train[:256]),
        epochs=1,
        lr=1e-30,
        batch_size=16,
        progress=False,
    )
    assert result.bn_reinserted == 21  # 19 convs, 2 projection shortcuts
    name = folded.graph.input[0].name
    x_test = normalised(fmnist_sample[0][:256])
    (before,) = ort_run(folded, {name: x_test})
    (after,) = ort_run(result.model, {name: x_test})
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-3)
    assert (after.argmax(1) == before.argmax(1)).all()
