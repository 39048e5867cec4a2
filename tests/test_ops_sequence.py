"""Ops of OCR / sequence heads and their shape arithmetic, against onnxruntime (as test_bridge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from test_bridge import assert_matches_ort, f32, i64, make_model, rnd

from onnx_mbs.bridge import OnnxModule
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)

SEQ, BATCH, FEAT, HID = 5, 3, 6, 4


def recurrent(op: str, gates: int, direction: str = "forward", **extra) -> tuple:
    dirs = 2 if direction == "bidirectional" else 1
    inits = {
        "w": rnd(dirs, gates * HID, FEAT, seed=1) * 0.5,
        "r": rnd(dirs, gates * HID, HID, seed=2) * 0.5,
        "b": rnd(dirs, 2 * gates * HID, seed=3) * 0.5,
    }
    names = ["x", "w", "r", "b"]
    if extra.pop("with_state", False):
        inits["h0"] = rnd(dirs, BATCH, HID, seed=4)
        names += ["", "h0"]
        if op == "LSTM":
            inits["c0"] = rnd(dirs, BATCH, HID, seed=5)
            names += ["c0", "p"]
            inits["p"] = rnd(dirs, 3 * HID, seed=6)
    outs = ["y", "yh", "yc"] if op == "LSTM" else ["y", "yh"]
    node = helper.make_node(op, names, outs, hidden_size=HID, direction=direction, **extra)
    return [node], inits, outs


CASES = {
    "lstm": recurrent("LSTM", 4),
    "lstm-reverse-state-peepholes": recurrent("LSTM", 4, "reverse", with_state=True),
    "lstm-bidirectional": recurrent("LSTM", 4, "bidirectional"),
    "gru": recurrent("GRU", 3),
    "gru-linear-before-reset": recurrent("GRU", 3, linear_before_reset=1),
    "gru-bidirectional-state": recurrent("GRU", 3, "bidirectional", with_state=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_matches_ort(case: str) -> None:
    nodes, inits, outs = CASES[case]
    model = make_model(nodes, {"x": [SEQ, BATCH, FEAT]}, outs, inits, 17)
    assert_matches_ort(model, {"x": rnd(SEQ, BATCH, FEAT, seed=7)})


def test_recurrent_weights_train() -> None:
    nodes, inits, outs = CASES["lstm"]
    module = OnnxModule(make_model(nodes, {"x": [SEQ, BATCH, FEAT]}, outs, inits, 17))
    assert {n for n, _ in module.named_parameters()} == {"w", "r", "b"}
    module(torch.from_numpy(rnd(SEQ, BATCH, FEAT)))[0].sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_norm_matches_ort(axis: int) -> None:
    x_shape = [2, 3, 4]
    inits = {"s": rnd(*x_shape[axis:], seed=1), "b": rnd(*x_shape[axis:], seed=2)}
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis)
    model = make_model([node], {"x": x_shape}, ["y"], inits, 17)
    assert_matches_ort(model, {"x": rnd(*x_shape, seed=3)})
    assert {n for n, _ in OnnxModule(model).named_parameters()} == {"s", "b"}


@pytest.mark.parametrize(
    ("scale", "bias"), [((4,), (1,)), ((3, 4), (4,)), ((4,), ())], ids=["1", "row", "scalar"]
)
def test_layer_norm_with_a_broadcast_bias_matches_ort(scale, bias) -> None:
    """ONNX broadcasts the bias as it does the scale; with a full-shaped scale the bias went
    to F.layer_norm, which takes only the full shape (a RuntimeError)."""
    axis = -len(scale)
    inits = {"s": rnd(*scale, seed=1), "b": rnd(*bias, seed=2)}
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis)
    model = make_model([node], {"x": [2, 3, 4]}, ["y"], inits, 17)
    assert_matches_ort(model, {"x": rnd(2, 3, 4, seed=3)})


def test_range_at_run_time_matches_ort() -> None:
    # Range over the input's length: positions for a sequence model.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=1),
        helper.make_node("Range", ["zero", "nf", "step"], ["pos"]),
        helper.make_node("Add", ["x", "pos"], ["y"]),
    ]
    inits = {"one": i64(1)[0], "zero": f32(0.0)[0], "step": f32(1.0)[0]}
    inits = {k: np.array(v) for k, v in inits.items()}
    model = make_model(nodes, {"x": [2, "n"]}, ["y"], inits, 17)
    assert_matches_ort(model, {"x": rnd(2, 7)})


def test_unsupported_recurrent_options_are_refused() -> None:
    nodes, inits, outs = recurrent("GRU", 3, activations=["Relu", "Tanh"])
    with pytest.raises(BadInputError, match="default activations"):
        OnnxModule(make_model(nodes, {"x": [SEQ, BATCH, FEAT]}, outs, inits, 17))
