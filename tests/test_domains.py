"""Ops of another domain named like ONNX ops (a my.ops Conv, onnxruntime's
com.microsoft.nchwc Conv) are not those ops: never counted, rewritten, folded or run as
them. onnxruntime's com.microsoft FusedConv is a Conv with its activation fused: counted
as one, kept whole."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import Builder, shape_arith_head, standardised_conv_net
from onnx import helper

import onnx_mbs
from onnx_mbs.cli import main
from onnx_mbs.passes import activation_tensors, analyze_model, load_model
from onnx_mbs.passes.channel_groups import analyze_channels
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
    """conv, Relu, a stride-2 com.microsoft FusedConv (Relu fused), conv: the layout
    onnxruntime's extended optimisations write, the FusedConv's output shape recorded."""
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
        b.model([b.conv(fused, 16, 4)], ["y"], shapes={fused: [1, 16, 8, 8]}), [1, 4, 8, 8]
    )


def test_a_fused_conv_is_counted_at_its_output_size_and_kept_whole():
    """FusedConv was no conv layer: the MACs of onnxruntime's extended form left it out."""
    raw = _fused_net()
    analysis = analyze_model(load_model(raw))
    by_op = {layer.op_type: layer for layer in analysis.layers}
    fused = by_op["com.microsoft:FusedConv"]
    assert fused.macs == 8 * 8 * 3 * 3 * 8 * 16  # output pixels x kernel x C_in x C_out
    assert (fused.input_size, fused.output_size, fused.stride) == ((16, 16), (8, 8), (2, 2))
    assert fused.params == 16 * 8 * 9 + 16
    assert len(analysis.macroblocks) == 2  # the stride-2 FusedConv starts the 8x8 one
    assert analysis.total_macs == 16 * 16 * 9 * 3 * 8 + fused.macs + 8 * 8 * 16 * 4 * 9
    assert activation_tensors(load_model(raw), analysis)[fused.name] == fused.output  # Relu fused
    small, report = onnx_mbs.reduce(raw)
    (node,) = [n for n in small.graph.node if n.op_type == "FusedConv"]
    weights = {t.name: tuple(t.dims) for t in small.graph.initializer}
    assert weights[node.input[1]] == (16, 8, 3, 3)
    assert any("FusedConv" in reason for reason in report.pinned)
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
