"""Ops of another domain named like ONNX ops (a my.ops Conv, onnxruntime's
com.microsoft.nchwc Conv) are not those ops: never counted, rewritten, folded or run as
them. onnxruntime's com.microsoft FusedConv is a Conv with its activation fused: counted,
sized and cut as one."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graphs import Builder, saved_at_extended, shape_arith_head, standardised_conv_net
from onnx import helper

import onnx_mbs
from onnx_mbs.cli import main
from onnx_mbs.evaluate import evaluate, load_for_eval
from onnx_mbs.passes import (
    LoadedModel,
    activation_tensors,
    analyze_channels,
    analyze_model,
    load,
    load_model,
    op_id,
    shrink_channels,
)
from onnx_mbs.passes.channel_walk import FILTERS
from onnx_mbs.passes.importance import FilterNorm, choose_channels

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "bundled" / "resnet20_fmnist.onnx"


def _with_output(model: onnx.ModelProto, shape: list[int]) -> onnx.ModelProto:
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, shape))
    return model


def _custom_net(op: str, domain: str = "my.ops") -> onnx.ModelProto:
    """conv, Relu, `op` of `domain` (its outputs' shapes recorded), conv, Relu, conv."""
    b = Builder("custom")
    x = b.op("Relu", [b.conv(b.input("x", [1, 3, 16, 16]), 3, 16)])
    size = 16
    if op == "Identity":  # on a conv's weight
        w = b.op("Identity", [b.weight(16, 16, 3, 3)], domain=domain)
        x = b.op("Relu", [b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1] * 4)])
        shapes = {w: [16, 16, 3, 3]}
    elif op == "ReshapeWeight":  # a conv weight stored flat, reshaped by a custom op
        shape = b.const(np.array([16, 16, 3, 3]))
        w = b.op("Reshape", [b.weight(16, 144), shape], domain=domain)
        x = b.op("Relu", [b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1] * 4)])
        shapes = {w: [16, 16, 3, 3]}
    elif op == "Conv":  # stride 2
        w = b.weight(16, 16, 3, 3)
        x = b.op("Conv", [x, w], domain=domain, kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2])
        size, shapes = 8, {x: [1, 16, 8, 8]}
    elif op == "Add":
        x = b.op("Add", [x, b.op("Relu", [b.conv(x, 16, 16)])], domain=domain)
        shapes = {x: [1, 16, 16, 16]}
    elif op == "Reshape":
        x = b.op("Reshape", [x, b.const(np.array([1, 16, 16, 16]))], domain=domain)
        shapes = {x: [1, 16, 16, 16]}
    else:
        x = b.op(op, [b.conv(x, 16, 16)], domain=domain)
        shapes = {x: [1, 16, 16, 16]}
    x = b.op("Relu", [b.conv(x, 16, 16)])
    return _with_output(b.model([b.conv(x, 16, 4)], ["y"], shapes=shapes), [1, 4, size, size])


@pytest.mark.parametrize("op", ["Identity", "ReshapeWeight", "Conv", "Relu", "Add", "Reshape"])
def test_a_custom_op_named_like_an_onnx_op_stays_as_written(op):
    """A my.ops Identity on a conv weight was dropped at load as ONNX's Identity, so the
    written model no longer ran it, and the weight it reads was cut. Each custom op stays,
    its inputs as they were: its channels kept whole, pinned in one line naming it."""
    raw = _custom_net(op)
    (node,) = [n for n in raw.graph.node if n.domain == "my.ops"]
    read = {t.name: tuple(t.dims) for t in raw.graph.initializer if t.name in node.input}
    small, report = onnx_mbs.reduce(raw, budget="params=0.8")
    assert report.after.total_params < report.before.total_params
    (kept,) = [n for n in small.graph.node if n.domain == "my.ops"]
    assert (kept.op_type, list(kept.input)) == (node.op_type, list(node.input))
    assert {t.name: tuple(t.dims) for t in small.graph.initializer if t.name in read} == read
    assert any(f"{node.op_type} '{node.name}'" in reason for reason in report.pinned)
    onnx.checker.check_model(small, full_check=True)


def test_a_custom_conv_is_not_counted_as_a_conv_layer_and_the_analysis_says_so(tmp_path, capsys):
    """A my.ops Conv was counted with ONNX Conv's MACs and joined the macroblocks."""
    raw = _custom_net("Conv")
    analysis = analyze_model(load_model(raw))
    assert all(layer.op_type == "Conv" for layer in analysis.layers)
    assert len(analysis.layers) == 3
    (custom,) = [n for n in raw.graph.node if n.domain]
    assert analysis.uncounted == [f"my.ops:Conv '{custom.name}'"]
    assert analysis.to_dict()["uncounted"] == analysis.uncounted
    _, report = onnx_mbs.reduce(raw)
    assert "MACs not counted: 1 my.ops:Conv (ops of another domain" in "".join(report.plan.notes)
    onnx.save(raw, tmp_path / "m.onnx")
    assert main(["analyze", str(tmp_path / "m.onnx")]) == 0
    assert "MACs not counted: 1 my.ops:Conv (ops of another domain" in capsys.readouterr().out


def _fused_net() -> onnx.ModelProto:
    """conv, Relu, a stride-2 com.microsoft FusedConv (Relu fused), conv, Relu, conv: the
    layout onnxruntime's extended optimisations write, the FusedConv's output shape
    recorded; the last conv's 16 channels free."""
    b = Builder("fused")
    x = b.op("Relu", [b.conv(b.input("x", [1, 3, 16, 16]), 3, 8)])
    fused = b.op(
        "FusedConv",
        [x, b.weight(16, 8, 3, 3), b.const(np.zeros(16, np.float32))],
        domain="com.microsoft",
        kernel_shape=[3, 3],
        pads=[1] * 4,
        strides=[2, 2],
        activation="Relu",
    )
    return _with_output(
        b.model(
            [b.conv(b.op("Relu", [b.conv(fused, 16, 16)]), 16, 4)],
            ["y"],
            shapes={fused: [1, 16, 8, 8]},
        ),
        [1, 4, 8, 8],
    )


def test_a_fused_conv_is_counted_at_its_output_size_and_followed():
    """FusedConv was no conv layer: the MACs of onnxruntime's extended form left it out.
    It was then kept whole; its channels are now cut as a Conv's, and counted so."""
    raw = _fused_net()
    analysis = analyze_model(load_model(raw))
    by_op = {layer.op_type: layer for layer in analysis.layers}
    fused = by_op["com.microsoft:FusedConv"]
    assert fused.macs == 8 * 8 * 3 * 3 * 8 * 16  # output pixels x kernel x C_in x C_out
    assert (fused.input_size, fused.output_size, fused.stride) == ((16, 16), (8, 8), (2, 2))
    assert fused.params == 16 * 8 * 9 + 16
    assert len(analysis.macroblocks) == 2  # the stride-2 FusedConv starts the 8x8 one
    assert analysis.total_macs == 16 * 16 * 9 * 3 * 8 + fused.macs + 8 * 8 * 16 * 20 * 9
    assert activation_tensors(load_model(raw), analysis)[fused.name] == fused.output  # Relu fused
    small, report = onnx_mbs.reduce(raw, budget="params=0.5")
    assert not any("FusedConv" in reason for reason in report.pinned)
    weights = {t.name: tuple(t.dims) for t in small.graph.initializer}
    (node,) = [n for n in small.graph.node if n.op_type == "FusedConv"]
    assert weights[node.input[1]][0] < 16 and weights[node.input[2]] == weights[node.input[1]][:1]
    # Counted again from the written weights: the first conv works at 16x16, the rest at 8x8.
    convs = [n for n in small.graph.node if n.op_type in ("Conv", "FusedConv")]
    sizes = [16 * 16] + [8 * 8] * (len(convs) - 1)
    filters = [math.prod(weights[n.input[1]]) for n in convs]
    assert report.after.total_macs == sum(f * p for f, p in zip(filters, sizes))
    assert report.after.total_params == sum(filters) + sum(weights[n.input[2]][0] for n in convs)
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    run = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    assert run.run(None, {"x": x})[0].shape == (1, 4, 8, 8)


def _optimised(level: ort.GraphOptimizationLevel, path: Path) -> onnx.ModelProto:
    """The bundled ResNet-20 as onnxruntime optimises it at `level`, the shapes of the
    tensors it kept recorded from shape inference on the original, and of the others
    (NCHWc's blocked tensors) from a run."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(BUNDLED), options, providers=["CPUExecutionProvider"])
    model = onnx.load(path)
    original = onnx.shape_inference.infer_shapes(onnx.load(BUNDLED))
    known = {v.name: v for v in original.graph.value_info}
    outputs = {o.name for o in model.graph.output}
    made = [o for n in model.graph.node for o in n.output if o not in outputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in made)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    values = run.run(made, {"input": np.zeros((1, 1, 28, 28), np.float32)})
    for name, value in zip(made, values):
        model.graph.value_info.append(
            known.get(name) or helper.make_tensor_value_info(name, 1, list(value.shape))
        )
    return model


def test_onnxruntime_optimised_resnet20_counts(tmp_path):
    """The extended form (11 Conv, 10 com.microsoft FusedConv) read 16.46M MACs in 11 conv
    layers in one macroblock, the bundled model 31.02M in 21 in three."""
    bundled = analyze_model(load_model(str(BUNDLED)))
    extended = _optimised(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp_path / "x.onnx")
    assert Counter(n.op_type for n in extended.graph.node)["FusedConv"] == 10
    analysis = analyze_model(load_model(extended))
    assert len(analysis.layers) == 21
    assert sorted(x.macs for x in analysis.layers) == sorted(x.macs for x in bundled.layers)
    assert analysis.total_macs == bundled.total_macs
    assert [m.resolution for m in analysis.macroblocks] == [(28, 28), (14, 14), (7, 7)]


def test_onnxruntime_nchwc_resnet20_counts_no_conv_and_says_so(tmp_path):
    """The NCHWc form (every conv a com.microsoft.nchwc Conv, on CPUs whose onnxruntime
    blocks channels) was refused as if its convs were ONNX's, their outputs unsized."""
    nchwc = _optimised(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path / "a.onnx")
    if not any(n.domain == "com.microsoft.nchwc" for n in nchwc.graph.node):
        pytest.skip("this CPU's onnxruntime writes no NCHWc ops")
    analysis = analyze_model(load_model(nchwc))
    assert analysis.layers == []
    assert len(analysis.uncounted) == 21
    assert all(x.startswith("com.microsoft.nchwc:Conv '") for x in analysis.uncounted)
    assert math.isclose(analysis.total_macs, sum(analysis.other_macs.values()))


def test_the_bridge_refuses_a_custom_op_named_like_an_onnx_op():
    """The bridge runs ONNX's ops: a my.ops Relu is not one of them."""
    from onnx_mbs.bridge import OnnxModule
    from onnx_mbs.passes import BadInputError

    with pytest.raises(BadInputError, match="my.ops:Relu"):
        OnnxModule(_custom_net("Relu"))


SAMPLE = BUNDLED.parent / "fmnist_sample.npz"


def _saved_by_onnxruntime(level: ort.GraphOptimizationLevel, path: Path) -> Path:
    """The bundled ResNet-20 as onnxruntime saves it at `level`, nothing added."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(BUNDLED), options, providers=["CPUExecutionProvider"])
    return path


def _top1_by_onnxruntime(path: Path, limit: int) -> float:
    """onnxruntime's own top-1 on the bundled sample, the preprocessing written out."""
    data = np.load(SAMPLE)
    x = (data["x"][:limit].astype(np.float32) / 255 - 0.286) / 0.353
    x = x.reshape(limit, 1, 28, 28)
    run = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([run.run(None, {"input": x[k : k + 1]})[0] for k in range(limit)])
    return float((logits.argmax(1) == data["y"][:limit]).mean())


@pytest.mark.parametrize(
    "level",
    [ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL],
)
def test_eval_runs_a_model_onnxruntime_optimised_as_onnxruntime_does(tmp_path, capsys, level):
    """`eval` refused the extended form (com.microsoft FusedConv, which shape inference
    cannot size), which onnxruntime runs: it ran nothing of the analysis but shape
    inference. It runs the model as read, as onnxruntime does: the same top-1."""
    path = _saved_by_onnxruntime(level, tmp_path / "opt.onnx")
    args = ["eval", str(path), "--data", str(SAMPLE), "--limit", "64", "--json"]
    assert main(args) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["top1"] == pytest.approx(_top1_by_onnxruntime(path, 64))
    assert said["samples"] == 64
    assert main([*args, "--teacher", str(BUNDLED)]) == 0
    (output,) = json.loads(capsys.readouterr().out)["outputs"].values()
    assert output["top1"] == 1.0 and output["cosine"] > 0.9999
    result = evaluate(path, str(SAMPLE), ["CPUExecutionProvider"], progress=False)
    assert result.top1 == pytest.approx(_top1_by_onnxruntime(path, 512), abs=1 / 512)


ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize(
    "level, recorded, op",
    [
        (ALL, False, "com.microsoft.nchwc:Conv"),
        (ALL, True, "com.microsoft.nchwc:Conv"),
    ],
)
@pytest.mark.parametrize("budget", [[], ["--budget", "params=0.5"]])
def test_reduce_refuses_a_model_onnxruntime_left_nothing_to_cut_in(
    tmp_path, capsys, level, recorded, op, budget
):
    """The NCHWc form (ORT_ENABLE_ALL: every conv a com.microsoft.nchwc Conv, kept whole),
    its shapes recorded, was "reduced" without a budget: exit 0, the model written again
    unchanged, a note that every group is pinned; unrecorded, it was refused as its ops
    "may hide layers", without saying what to do. Both are refused in one line that says:
    save it at basic."""
    path = tmp_path / "opt.onnx"
    if recorded:
        onnx.save(_optimised(level, path), path)
    else:
        _saved_by_onnxruntime(level, path)
    if op.split(":")[0] not in {n.domain for n in onnx.load(path).graph.node}:
        pytest.skip("this CPU's onnxruntime writes no NCHWc ops")
    out = tmp_path / "small.onnx"
    assert main(["reduce", str(path), "-o", str(out), *budget]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert op in error and "ORT_ENABLE_BASIC" in error
    assert not out.exists()


def test_reduce_does_not_blame_onnxruntime_ops_that_pin_nothing(tmp_path, capsys):
    """A FusedConv (followed as its Conv) whose one group its graph input and output pin was
    refused as an onnxruntime op "kept whole" (advice: save it at basic, which pins the same
    group): any onnxruntime op was blamed once every group was pinned. As a plain Conv it is:
    written, with the note saying why nothing was cut."""
    b = Builder("fused_only")
    fused = b.op(
        "FusedConv",
        [b.input("x", [1, 3, 8, 8]), b.weight(8, 3, 3, 3), b.const(np.zeros(8, np.float32))],
        domain="com.microsoft",
        kernel_shape=[3, 3],
        pads=[1] * 4,
        activation="Relu",
    )
    model = _with_output(b.model([fused], ["y"], shapes={fused: [1, 8, 8, 8]}), [1, 8, 8, 8])
    path, out = tmp_path / "fused.onnx", tmp_path / "small.onnx"
    onnx.save(model, path)
    assert main(["reduce", str(path), "-o", str(out)]) == 0
    assert "every channel group is pinned" in capsys.readouterr().out
    assert out.exists()


class _Residual(torch.nn.Module):
    """conv, ReLU, conv, ReLU, a residual block (conv, ReLU, conv, add, ReLU), pool, linear:
    saved at extended, each conv a ReLU follows a FusedConv. The second conv's first 4 of
    12 channels are dead (zero weights, bias -1: ReLU gives 0), and so the stream's first 2
    of 16 (in both convs that write it)."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.c1, self.c2, self.c3 = (
            conv(3, 8, 3, padding=1),
            conv(8, 12, 3, padding=1),
            conv(12, 16, 3, padding=1),
        )
        self.b1, self.b2 = conv(16, 16, 3, padding=1), conv(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)
        with torch.no_grad():
            for layer, dead in ((self.c2, 4), (self.c3, 2), (self.b2, 2)):
                layer.weight[:dead] = 0
                layer.bias[:dead] = -1

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        x = torch.relu(self.b2(torch.relu(self.b1(x))) + x)
        return self.fc(x.mean((2, 3)))


def _extended_residual(directory: Path) -> Path:
    torch.manual_seed(0)
    return saved_at_extended(_Residual(), torch.randn(1, 3, 16, 16), directory)


def _outputs(model, x: np.ndarray) -> np.ndarray:
    bytes_ = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    run = ort.InferenceSession(bytes_, providers=["CPUExecutionProvider"])
    assert [i.name for i in run.get_inputs()] == ["x"]
    assert [o.name for o in run.get_outputs()] == ["y"]
    return run.run(None, {"x": x})[0]


def test_a_fused_conv_is_followed_and_its_dead_channels_cut_exactly(tmp_path):
    """FusedConv was kept whole (every group of an extended-form model pinned): now its
    channels are followed as its Conv's. Keeping all computes the same; cutting the
    channels its fused ReLU leaves dead computes the same, in a written model that passes
    the full checker and runs at any batch with the original names."""
    path = _extended_residual(tmp_path)
    ops = Counter(op_id(n) for n in onnx.load(path).graph.node)
    assert (ops["com.microsoft:FusedConv"], ops["Conv"]) == (4, 1)  # b2: an Add follows it
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    kept, report = onnx_mbs.reduce(str(path), channel_multiple=1)
    assert report.pinned == ["graph input 'x'", "graph output 'y'"]
    np.testing.assert_allclose(_outputs(kept, x), _outputs(path, x), rtol=1e-5, atol=1e-5)
    model = load_model(str(path))
    channels = analyze_channels(model)
    dead = {"c2.weight": 4, "c3.weight": 2}
    keep = {}
    for group in channels.groups:
        weights = {m.tensor for m in group.members if m.role == FILTERS}
        if weights & set(dead):
            (k,) = {dead[w] for w in weights & set(dead)}
            keep[group.id] = list(range(k, group.size))
    assert len(keep) == 2
    (stream,) = [g for g in channels.groups if g.id in keep and g.joined]
    assert {m.tensor for m in stream.members if m.role == FILTERS} == {"c3.weight", "b2.weight"}
    small = LoadedModel(model, load(str(path)).origin).written(
        shrink_channels(model, keep, channels)
    )
    onnx.checker.check_model(small, full_check=True)
    widths = {t.name: t.dims[0] for t in small.graph.initializer if t.name.endswith("weight")}
    assert (widths["c2.weight"], widths["c3.weight"], widths["b2.weight"]) == (8, 14, 14)
    np.testing.assert_allclose(_outputs(small, x), _outputs(path, x), rtol=1e-5, atol=1e-5)
    after = analyze_model(load_model(small))
    macs = {layer.name: layer.macs for layer in after.layers}
    c3 = next(n.name for n in small.graph.node if "c3.weight" in n.input)
    assert macs[c3] == 16 * 16 * 9 * 8 * 14  # pixels x kernel x C_in (12 - 4) x C_out (16 - 2)


def _fused_residual() -> onnx.ModelProto:
    """conv, Relu, then a com.microsoft FusedConv adding that Relu's output as its Z (a
    residual join, as onnxruntime fuses Conv + Add + Relu), conv. The stream's first 2 of
    8 channels are dead in both writers (zero weights, bias -1, Relu)."""
    b = Builder("fused_z")
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0, 0.3, (8, 8, 3, 3))
    b1, b2 = rng.normal(0, 0.1, 8), rng.normal(0, 0.1, 8)
    for w, bias in ((w1, b1), (w2, b2)):
        w[:2], bias[:2] = 0, -1
    pads = {"kernel_shape": [3, 3], "pads": [1] * 4}
    r = b.op(
        "Relu", [b.op("Conv", [b.input("x", ["N", 3, 8, 8]), b.const(w1), b.const(b1)], **pads)]
    )
    z = b.op(
        "FusedConv",
        [r, b.const(w2), b.const(b2), r],
        domain="com.microsoft",
        activation="Relu",
        **pads,
    )
    model = b.model([b.conv(z, 8, 4)], ["y"])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, ["N", 4, 8, 8]))
    return model


def test_a_fused_convs_residual_input_joins_its_channels():
    """FusedConv's Z is added to its conv's output: Z's channels and its output's are one
    residual stream, cut together; cutting its dead channels computes the same."""
    raw = _fused_residual()
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    kept, _ = onnx_mbs.reduce(raw, channel_multiple=1)
    np.testing.assert_allclose(_outputs(kept, x), _outputs(raw, x), rtol=1e-5, atol=1e-5)
    model = load_model(raw)
    channels = analyze_channels(model)
    (stream,) = [g for g in channels.groups if not g.pinned and g.macroblocks]
    assert stream.joined and stream.size == 8
    small = load(raw).written(shrink_channels(model, {stream.id: list(range(2, 8))}, channels))
    onnx.checker.check_model(small, full_check=True)
    (fused,) = [n for n in small.graph.node if n.op_type == "FusedConv"]
    weights = {t.name: t.dims for t in small.graph.initializer}
    assert list(weights[fused.input[1]]) == [6, 6, 3, 3]
    np.testing.assert_allclose(_outputs(small, x), _outputs(raw, x), rtol=1e-5, atol=1e-5)


class _MlpHead(torch.nn.Module):
    """conv, BatchNorm, ReLU, flatten, linear, ReLU, linear: saved at extended, the first
    linear and its ReLU a com.microsoft FusedGemm. Its first 8 of 32 units are dead (zero
    weights, bias -1: ReLU gives 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc1, self.fc2 = torch.nn.Linear(8 * 8 * 8, 32), torch.nn.Linear(32, 10)
        with torch.no_grad():
            self.fc1.weight[:8], self.fc1.bias[:8] = 0, -1

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_fused_gemm_is_counted_and_its_dead_units_cut_exactly(tmp_path):
    """onnxruntime's extended optimisations fuse Gemm and Relu into com.microsoft FusedGemm:
    its MACs, and those of the Gemm after it (its input unsized), were left out of the
    count without a word (13.82K MACs of the model's 30.53K). It is sized and counted as
    the Gemm it fuses, and cut as one: its dead units removed, the model computes the same."""
    torch.manual_seed(0)
    path = saved_at_extended(_MlpHead(), torch.randn(1, 3, 8, 8), tmp_path)
    raw = tmp_path / "raw.onnx"
    assert "com.microsoft:FusedGemm" in {op_id(n) for n in onnx.load(path).graph.node}
    before = analyze_model(load_model(str(path)))
    assert before.total_macs == analyze_model(load_model(str(raw))).total_macs
    assert before.total_macs == 8 * 8 * 27 * 8 + 512 * 32 + 32 * 10
    model = load_model(str(path))
    channels = analyze_channels(model)
    (hidden,) = [g for g in channels.groups if g.size == 32]
    assert not hidden.pinned
    small = load(str(path)).written(
        shrink_channels(model, {hidden.id: list(range(8, 32))}, channels)
    )
    onnx.checker.check_model(small, full_check=True)
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_outputs(small, x), _outputs(path, x), rtol=1e-5, atol=1e-5)
    after = analyze_model(load_model(small))
    assert after.total_macs == 8 * 8 * 27 * 8 + 512 * 24 + 24 * 10


class _Attention(torch.nn.Module):
    """conv, ReLU, then one attention over its 64 pixels: q @ k^T / 4, softmax, @ v. Saved
    at extended, both products are com.microsoft FusedMatMul (transpose and scale fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.q, self.k = (
            torch.nn.Conv2d(3, 16, 3, padding=1),
            *(torch.nn.Linear(16, 16) for _ in "qk"),
        )
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        t = torch.relu(self.c1(x)).flatten(2).transpose(1, 2)
        a = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2) / 4.0, -1)
        return self.fc((a @ t).mean(1))


def test_a_fused_matmul_is_named_among_the_ops_not_counted(tmp_path, capsys):
    """onnxruntime's FusedMatMul left its MACs (and those of the Gemm after it) out of the
    count without a word: analyze said 60.42K MACs of the model's 191.65K. The ops not
    counted are named, as a custom-domain Conv is."""
    torch.manual_seed(0)
    raw = tmp_path / "raw.onnx"
    torch.onnx.export(
        _Attention().eval(), torch.randn(1, 3, 8, 8), raw, input_names=["x"], dynamo=False
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ext.onnx")
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(tmp_path / "ext.onnx").graph.node if n.op_type == "FusedMatMul"]
    assert len(fused) == 2
    analysis = analyze_model(load_model(str(tmp_path / "ext.onnx")))
    assert analysis.total_macs < analyze_model(load_model(str(raw))).total_macs
    assert sorted(analysis.uncounted) == sorted(
        f"com.microsoft:FusedMatMul '{n.name}'" for n in fused
    )
    assert main(["analyze", str(tmp_path / "ext.onnx")]) == 0
    assert "MACs not counted: 2 com.microsoft:FusedMatMul (" in capsys.readouterr().out


def test_eval_runs_a_model_whose_onnxruntime_op_leaves_a_conv_unsized(tmp_path, capsys):
    """A com.microsoft op before a conv (here onnxruntime's Gelu) leaves the conv unsized:
    reduce refuses it, and so did eval, though onnxruntime runs it. eval runs it as read:
    the top-1 onnxruntime's own run gives; a custom op onnxruntime lacks is still refused."""
    from conftest import random_images, write_npz

    b = Builder("gelu")
    x = b.op("Gelu", [b.input("x", ["N", 3, 8, 8])], domain="com.microsoft")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.conv(x, 3, 8)])])])
    model = b.model([b.op("Gemm", [x, b.weight(10, 8), b.const(np.zeros(10))], transB=1)], ["y"])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, ["N", 10]))
    onnx.save(model, tmp_path / "m.onnx")
    data = write_npz(tmp_path / "d.npz", **random_images(32, (3, 8, 8)))
    with pytest.raises(onnx_mbs.passes.BadInputError, match="com.microsoft:Gelu"):
        load_model(model)
    assert main(["eval", str(tmp_path / "m.onnx"), "--data", data, "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    arrays = np.load(data)
    run = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits = run.run(None, {"x": arrays["x"].astype(np.float32) / 255})[0]
    assert said["top1"] == pytest.approx(float((logits.argmax(1) == arrays["y"]).mean()))
    next(n for n in model.graph.node if n.op_type == "Gelu").domain = "my.ops"
    model.opset_import.append(helper.make_opsetid("my.ops", 1))
    onnx.save(model, tmp_path / "custom.onnx")
    assert main(["eval", str(tmp_path / "custom.onnx"), "--data", data]) == 2
    assert "cannot size the output of my.ops:Gelu" in capsys.readouterr().err


@pytest.mark.parametrize("build", [shape_arith_head, standardised_conv_net])
def test_a_model_importing_ai_onnx_by_name_is_read_as_one_importing_the_default_domain(build):
    """ "ai.onnx" is the default domain's other name. A model importing it so was folded by
    nothing (the reference runtime knew no opset for its nodes: shape_arith_head's Reshape
    target stayed computed, pinning conv2), and choosing the channels of a conv whose weight
    the graph computes stopped with the reference runtime's RuntimeError."""
    read = {}
    for domain in ("", "ai.onnx"):
        model = build()
        model.opset_import[0].domain = domain
        loaded = load_model(model)
        free = [g for g in analyze_channels(loaded).groups if not g.pinned]
        keep = choose_channels(free, {g.id: g.size // 2 for g in free}, FilterNorm(loaded))
        read[domain] = [n.op_type for n in loaded.graph.node], keep
    assert read["ai.onnx"] == read[""]


@pytest.mark.parametrize("domain", ["com.microsoft", "com.microsoft.nchwc"])
def test_an_onnxruntime_op_leaving_a_conv_unsized_is_refused_with_the_one_advice(domain):
    """The refusal of a conv left unsized by an op without an ONNX schema said what to do
    (save at basic) for com.microsoft ops only, in words of its own; an NCHWc op (what
    ORT_ENABLE_ALL writes) got none. Every onnxruntime op gets the one advice."""
    b = Builder("ort_op")
    x = b.op("Gelu", [b.input("x", [1, 3, 8, 8])], domain=domain)
    model = _with_output(b.model([b.op("Relu", [b.conv(x, 3, 8)])], ["y"]), [1, 8, 8, 8])
    with pytest.raises(onnx_mbs.passes.BadInputError, match=f"{domain}:Gelu.*ORT_ENABLE_BASIC"):
        load_model(model)


def _fused_gemm_net(activation: str, **params: float) -> onnx.ModelProto:
    """x (16 features), a com.microsoft FusedGemm to 32 units with `activation` fused, a Gemm
    to 10: the 32 units free but for the fused activation."""
    b = Builder("fused_gemm")
    hidden = b.op(
        "FusedGemm",
        [b.input("x", [1, 16]), b.weight(32, 16), b.const(np.zeros(32, np.float32))],
        domain="com.microsoft",
        transB=1,
        activation=activation,
        **{f"activation_{k}": v for k, v in params.items()},
    )
    y = b.op("Gemm", [hidden, b.weight(10, 32), b.const(np.zeros(10, np.float32))], transB=1)
    return _with_output(b.model([y], ["y"], shapes={hidden: [1, 32]}), [1, 10])


def test_a_fused_gemm_with_clip_is_not_followed_as_onnxruntime_cannot_run_it():
    """The walk followed every activation onnxruntime fuses into FusedConv on FusedGemm too,
    Clip among them, which onnxruntime's FusedGemm does not run: its units were cut as if it
    did. The activations each op runs are one fact (passes.domains.FUSED_ACTIVATIONS) that
    the walk and the bridge read: a FusedGemm with Clip is not followed, saying so."""

    def units(activation: str):
        groups = analyze_channels(load_model(_fused_gemm_net(activation))).groups
        (group,) = [g for g in groups if g.size == 32]
        return group

    assert not units("Relu").pinned
    clip = units("Clip")
    assert clip.pinned
    assert any("fused activation 'Clip' not followed" in r for r in clip.pin_reasons)


def _gelu_in_a_function_then_conv() -> onnx.ModelProto:
    """x, a call of local function Act (a com.microsoft Gelu, onnxruntime's), conv, Relu: the
    conv left unsized by the Gelu inside the function."""
    b = Builder("ort_in_function")
    act = b.op("Act", [b.input("x", [1, 3, 8, 8])], domain="local")
    model = _with_output(b.model([b.op("Relu", [b.conv(act, 3, 8)])], ["y"]), [1, 8, 8, 8])
    gelu = helper.make_node("Gelu", ["i"], ["o"], domain="com.microsoft")
    opsets = [helper.make_opsetid("com.microsoft", 1)]
    model.functions.append(helper.make_function("local", "Act", ["i"], ["o"], [gelu], opsets))
    model.opset_import.extend([*opsets, helper.make_opsetid("local", 1)])
    return model


def test_eval_runs_an_onnxruntime_op_inside_a_local_function_as_read():
    """`load_for_eval` ran a model as read when `load` refused it and it held an onnxruntime
    op among its top-level nodes only: one inside a local function was refused though
    onnxruntime runs it. Every node counts now, subgraphs and functions included."""
    model = _gelu_in_a_function_then_conv()
    with pytest.raises(onnx_mbs.passes.BadInputError, match="shape inference failed"):
        load_model(model)
    read = load_for_eval(model)
    assert [n.op_type for n in read.runnable.graph.node] == [n.op_type for n in model.graph.node]
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    run = ort.InferenceSession(
        read.runnable.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert run.run(None, {"x": x})[0].shape == (1, 8, 8, 8)


def test_eval_refuses_an_invalid_model_that_holds_an_onnxruntime_op():
    """Any BadInputError of `load` was taken for the onnxruntime op's doing when the model held
    one, and the model run as read: a conv whose weight reads 4 channels of the 3 it is given
    (load's refusal: onnxruntime refuses to run it) went on to onnxruntime's own error. Only
    shape inference failing to size an op's outputs falls back."""
    b = Builder("invalid")
    h = b.op("Conv", [b.input("x", [1, 3, 8, 8]), b.weight(8, 4, 3, 3)], kernel_shape=[3, 3])
    y = b.op("Gelu", [b.op("Relu", [h])], domain="com.microsoft")
    model = _with_output(b.model([y], ["y"]), [1, 8, 6, 6])
    with pytest.raises(onnx_mbs.passes.BadInputError, match="reads 3 input channels"):
        load_for_eval(model)
