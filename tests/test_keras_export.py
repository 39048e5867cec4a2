"""A real tf2onnx export of a small Keras CNN, not one imitated by hand.

`fixtures/keras_small_cnn.onnx` was written by tf2onnx 1.17.0 (`from_keras`, opset 17) from
TensorFlow 2.21.0 / Keras 3.15.1: a 64x64x3 NHWC input with a dynamic batch, Rescaling(1/255),
Conv2D(16, 3, stride 2, SAME: asymmetric pads) + BatchNorm (folded) + ReLU, a SeparableConv2D
beside a DepthwiseConv2D + BatchNorm (left as Mul and Add), Concatenate, a 1x1 Conv2D, a 3x3
Conv2D + BatchNorm added to it, MaxPooling, a 3x3 Conv2D, GlobalAveragePooling, Dropout and a
Dense softmax head ("probs"). tf2onnx drops the biases Keras initialised to zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import kill_channels, run

from onnx_mbs.passes import analyze_model, count_parameters, load_model, shrink_channels
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.pipeline import reduce

MODEL = Path(__file__).parent / "fixtures" / "keras_small_cnn.onnx"

# Counted by hand from the Keras layers: weights, plus one bias per channel where a BatchNorm
# was folded into the conv and a Mul and an Add (16 each) where it was not.
PARAMS = {
    "conv 3x3/2, 3->16 (+BN bias)": 3 * 9 * 16 + 16,
    "separable: depthwise 3x3 + pointwise 16->16": 16 * 9 + 16 * 16,
    "depthwise 3x3 (BN as Mul, Add)": 16 * 9 + 16 + 16,
    "conv 1x1 32->32": 32 * 32,
    "conv 3x3 32->32 (+BN bias)": 32 * 32 * 9 + 32,
    "conv 3x3 32->48": 32 * 48 * 9,
    "dense 48->10": 48 * 10,
}
# Multiply-adds per conv: output pixels x output channels x (kernel area x input channels / group)
MACS = [
    32 * 32 * 16 * 27,
    32 * 32 * 16 * 9,
    32 * 32 * 16 * 16,
    32 * 32 * 16 * 9,
    32 * 32 * 32 * 32,
    32 * 32 * 32 * 288,
    16 * 16 * 48 * 288,
]


def batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).uniform(0, 255, (n, 64, 64, 3)).astype(np.float32)
    return {"input": x}


def test_counts_and_receptive_fields_match_a_hand_count() -> None:
    a = analyze_model(load_model(onnx.load(MODEL)))
    assert a.total_params == sum(PARAMS.values()) == 25600
    assert [layer.macs for layer in a.layers] == MACS
    # 3x3/2, then 3x3 at stride 2 (+4), 2x2 max pool (+2), 3x3 at stride 4 (+8)
    assert [layer.global_receptive_field for layer in a.layers] == [3, 7, 7, 7, 7, 11, 21]
    assert [m.resolution for m in a.macroblocks] == [(32, 32), (16, 16)]


@pytest.mark.parametrize(
    "options",
    [{"strategy": "mbs", "width_map": "linear:0"}, {"budget": "params=0.5"}],
    ids=["keep-all", "params=0.5"],
)
def test_reduced_model_is_valid_and_keeps_its_interface(options: dict) -> None:
    original = onnx.load(MODEL)
    small, report = reduce(original, **options, progress=False)
    onnx.checker.check_model(small, full_check=True)
    assert [i.name for i in small.graph.input] == ["input"]
    assert [o.name for o in small.graph.output] == ["probs"]
    assert count_parameters(load_model(small)) == report.after.total_params
    for n in (1, 3):
        (before,), (after,) = run(original, batch(n)), run(small, batch(n))
        assert after.shape == (n, 10)
        if "budget" not in options:
            np.testing.assert_allclose(after, before, atol=1e-6)
    if "budget" in options:
        assert report.plan.reached["params"] == pytest.approx(0.5, abs=0.02)


def test_dead_channels_are_removed_exactly() -> None:
    """Half of every free group's channels made provably zero, then cut: the same outputs."""
    model = load_model(onnx.load(MODEL))
    groups = analyze_channels(model)
    free = [g for g in groups.groups if not g.pinned and g.size > 1]
    assert len(free) == 4
    drop = {g.id: list(range(0, g.size, 2)) for g in free}
    keep = {g.id: list(range(1, g.size, 2)) for g in free}
    killed = kill_channels(model, groups.groups, drop)
    small = shrink_channels(killed, keep, groups)
    (a,), (b,) = run(killed, batch(1, seed=3)), run(small, batch(1, seed=3))
    np.testing.assert_allclose(b, a, atol=1e-6)
