"""Receptive fields in input pixels (the global reading) against hand-computed values.

Each chain's expected field is worked out in the comments: a window of effective size
k = dilation*(K-1)+1 and stride s adds (k-1)*step and multiplies the step by s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from graphs import Builder

from onnx_mbs.passes import BadInputError, analyze_model, load_model


def _fields(model, reading: str = "global"):
    analysis = analyze_model(load_model(model), reading)
    return analysis, {x.name: x.global_receptive_field for x in analysis.layers}


def _conv(b: Builder, x: str, cin: int, cout: int, k, *, stride: int = 1, dilation: int = 1,
          name: str) -> str:  # fmt: skip
    kh, kw = (k, k) if isinstance(k, int) else k
    pads = [dilation * (kh // 2), dilation * (kw // 2)] * 2
    return b.op("Conv", [x, b.weight(cout, cin, kh, kw)], name=name, kernel_shape=[kh, kw],
                strides=[stride, stride], dilations=[dilation, dilation], pads=pads)  # fmt: skip


def test_conv_stride_pool_dilation_chain():
    b = Builder("chain")
    x = b.input("x", [1, 3, 64, 64])
    x = _conv(b, x, 3, 4, 3, name="c1")  # 1 + 2*1 = 3, step 1
    x = _conv(b, x, 4, 4, 3, stride=2, name="c2")  # 3 + 2*1 = 5, step 2
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # 9, step 4
    x = _conv(b, x, 4, 4, 3, dilation=2, name="c3")  # k 5: 9 + 4*4 = 25, step 4
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])  # 25 + 1*4 = 29, step 8
    x = _conv(b, x, 4, 4, 1, name="c4")  # 29
    x = _conv(b, x, 4, 4, 3, name="c5")  # 29 + 2*8 = 45
    _, rf = _fields(b.model([x]))
    assert rf == {"c1": 3, "c2": 5, "c3": 25, "c4": 29, "c5": 45}


def test_joins_take_the_largest_field():
    b = Builder("joins")
    x = b.input("x", [1, 3, 32, 32])
    a = _conv(b, x, 3, 4, 3, name="a")  # 3
    c = _conv(b, x, 3, 4, 5, name="c")  # 5
    cat = b.op("Concat", [a, c], axis=1)
    d = _conv(b, cat, 8, 4, 1, name="d")  # max(3, 5) = 5
    e = _conv(b, d, 4, 4, 3, name="e")  # 7
    y = _conv(b, b.op("Add", [a, e]), 4, 4, 3, name="y")  # max(3, 7) + 2 = 9
    _, rf = _fields(b.model([y]))
    assert rf == {"a": 3, "c": 5, "d": 5, "e": 7, "y": 9}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("nearest", 5.0), ("linear", 7.0)],  # linear reads 2 pixels: +1 input pixel at step 2
)
def test_resize_shrinks_the_step(mode, expected):
    b = Builder("up")
    x = b.input("x", [1, 3, 32, 32])
    x = _conv(b, x, 3, 4, 3, stride=2, name="down")  # 3, step 2
    scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
    x = b.op("Resize", [x, "", scales], mode=mode)  # step 1; nearest 3, linear 3 + 2 = 5
    x = _conv(b, x, 4, 4, 3, name="after")  # + 2*1
    _, rf = _fields(b.model([x]))
    assert rf == {"down": 3.0, "after": expected}


@pytest.mark.parametrize(("k", "expected_up", "expected_after"), [(2, 3.0, 5.0), (4, 5.0, 7.0)])
def test_conv_transpose_shrinks_the_step(k, expected_up, expected_after):
    """An output pixel of a stride-2 ConvTranspose with kernel k reads ceil(k/2) input pixels."""
    b = Builder("deconv")
    x = b.input("x", [1, 3, 32, 32])
    x = _conv(b, x, 3, 4, 3, stride=2, name="down")  # 3, step 2
    w = b.weight(4, 4, k, k)
    pads = [(k - 2) // 2] * 4
    x = b.op("ConvTranspose", [x, w], name="up", kernel_shape=[k, k], strides=[2, 2], pads=pads)
    x = _conv(b, x, 4, 4, 3, name="after")  # step 1: + 2
    _, rf = _fields(b.model([x]))
    assert rf == {"down": 3.0, "up": expected_up, "after": expected_after}


def test_separable_kernels_count_per_axis():
    """1x7 then 7x1 sees 7x7 pixels, not 13: the field is tracked per axis."""
    b = Builder("sep")
    x = b.input("x", [1, 3, 32, 32])
    x = _conv(b, x, 3, 4, (1, 7), name="row")
    x = _conv(b, x, 4, 4, (7, 1), name="col")
    _, rf = _fields(b.model([x]))
    assert rf == {"row": 7.0, "col": 7.0}


def test_global_pooling_and_gates():
    """Convs on a globally pooled map see everything; the gate they feed adds no spatial
    context to the map it scales."""
    b = Builder("se")
    x = b.input("x", [1, 3, 16, 16])
    x = _conv(b, x, 3, 4, 3, name="stem")
    x = b.se(x, 4, 2)
    x = _conv(b, x, 4, 4, 3, name="after")
    analysis, rf = _fields(b.model([x]))
    se = [x.name for x in analysis.layers if x.output_size == (1, 1)]
    assert len(se) == 2 and all(math.isinf(rf[n]) for n in se)
    assert rf["stem"] == 3 and rf["after"] == 5


def test_base_is_the_layers_within_the_image():
    """16x16 input, 3x3 convs: fields 3, 5, ..., 15 fit, 17 does not; the first layer of a
    macroblock is always in its base."""
    b = Builder("deep")
    x = b.input("x", [1, 3, 16, 16])
    names = []
    for k in range(10):
        names.append(f"c{k}")
        x = _conv(b, x, 3 if k == 0 else 4, 4, 3, name=names[-1])
    x = _conv(b, x, 4, 4, 3, stride=2, name="down")  # 23: past the image
    x = _conv(b, x, 4, 4, 3, name="d1")
    model = b.model([x])
    analysis = analyze_model(load_model(model))
    assert analysis.receptive_field == "global" and analysis.image_size == 16
    first, second = analysis.macroblocks
    assert first.base_layers == names[:7]  # 3..15
    assert second.base_layers == ["down"]
    local = analyze_model(load_model(model), "local")
    assert local.macroblocks[1].base_layers == ["down", "d1"]  # 2, 6 in 8x8 pixels
    with pytest.raises(BadInputError, match="unknown receptive_field"):
        analyze_model(load_model(model), "paper")


@pytest.mark.parametrize("crop", [False, True])
def test_a_slice_that_subsamples_or_crops_the_map_starts_a_macroblock(crop):
    """A CIFAR ResNet's option-A shortcut subsamples the stream with x[:, :, ::2, ::2] (a
    strided Slice) and pads the channels; a U-Net crops a skip with a Slice. Either way the
    convs after it make a map of another size: a macroblock of their own, not the one
    before (one "32x32" macroblock held every layer of such a ResNet-20)."""
    b = Builder("option_a")
    x = b.input("x", [1, 3, 32, 32])
    x = b.op("Relu", [_conv(b, x, 3, 4, 3, name="stem")])
    x = b.op("Relu", [b.op("Add", [_conv(b, x, 4, 4, 3, name="a1"), x])])
    if crop:  # 32 -> 24, the pixels keep their size
        x = b.op("Slice", [x, b.const(np.array([4, 4])), b.const(np.array([28, 28])),
                           b.const(np.array([2, 3]))])  # fmt: skip
        y = _conv(b, x, 4, 8, 3, name="b1")
        short = b.op("Pad", [x, b.const(np.array([0, 2, 0, 0, 0, 2, 0, 0]))])
    else:  # 32 -> 16
        y = _conv(b, x, 4, 8, 3, stride=2, name="b1")
        sub = b.op("Slice", [x, b.const(np.array([0, 0])), b.const(np.array([32, 32])),
                             b.const(np.array([2, 3])), b.const(np.array([2, 2]))])  # fmt: skip
        short = b.op("Pad", [sub, b.const(np.array([0, 2, 0, 0, 0, 2, 0, 0]))])
    x = b.op("Relu", [b.op("Add", [_conv(b, b.op("Relu", [y]), 8, 8, 3, name="b2"), short])])
    x = _conv(b, x, 8, 8, 3, name="b3")
    for reading in ("global", "local"):
        analysis = analyze_model(load_model(b.model([x])), reading)
        blocks = [(m.resolution, m.layers) for m in analysis.macroblocks]
        small = (24, 24) if crop else (16, 16)
        assert blocks == [((32, 32), ["stem", "a1"]), (small, ["b1", "b2", "b3"])], reading
        # b1 starts its macroblock; in its own pixels nothing before the Slice counts.
        local = {x.name: x.local_receptive_field for x in analysis.layers}
        assert local["b2"] == local["b1"] + 2 and local["b3"] == local["b2"] + 2
        assert local["b1"] == (3 if crop else 2)


def test_convs_after_a_strided_slice_see_at_its_step():
    """x[:, :, ::2, ::2] is a 1x1 window of stride 2: 3, then 3 + 2*2 = 7, 7 + 2*2 = 11
    (the empirical field of these convs; the step was left at 1: 5 and 7)."""
    b = Builder("subsample")
    x = b.input("x", [1, 3, 64, 64])
    x = _conv(b, x, 3, 4, 3, name="a")
    x = b.op("Slice", [x, b.const(np.array([0, 0])), b.const(np.array([64, 64])),
                       b.const(np.array([-2, -1])), b.const(np.array([2, 2]))])  # fmt: skip
    x = _conv(b, x, 4, 4, 3, name="b")
    x = _conv(b, x, 4, 4, 3, name="c")
    _, rf = _fields(b.model([x]))
    assert rf == {"a": 3, "b": 7, "c": 11}


# A map pooled over H and W, written as each exporter writes it: torch.onnx's dynamo
# exporter writes x.mean((2, 3), keepdim=True) (squeeze-and-excitation) as ReduceMean.
SPATIAL_POOLS = {
    "GlobalAveragePool": lambda b, x: b.op("GlobalAveragePool", [x]),
    "ReduceMean(axes=[2, 3])": lambda b, x: b.op("ReduceMean", [x], axes=[2, 3]),
    "ReduceMax(axes=[-1, -2])": lambda b, x: b.op("ReduceMax", [x], axes=[-1, -2]),
    "ReduceSum(input axes)": lambda b, x: b.op("ReduceSum", [x, b.const(np.array([2, 3]))]),
}


@pytest.mark.parametrize("pool", SPATIAL_POOLS.values(), ids=SPATIAL_POOLS.keys())
def test_a_reduce_over_the_whole_map_is_global_pooling(pool):
    """Convs on a map reduced over H and W see everything, however the pooling is written;
    as a field of 3 (the map's), the squeeze-and-excitation convs of a dynamo export were
    in the base where a TorchScript export of the same model had them past it."""
    b = Builder("se_reduce")
    x = b.input("x", [1, 3, 16, 16])
    x = _conv(b, x, 3, 4, 3, name="stem")
    s = b.op("Relu", [b.conv(pool(b, x), 4, 2, k=1, name="squeeze")])
    s = b.op("Sigmoid", [b.conv(s, 2, 4, k=1, name="excite")])
    x = _conv(b, b.op("Mul", [x, s]), 4, 4, 3, name="after")
    for reading in ("global", "local"):
        analysis = analyze_model(load_model(b.model([x])), reading)
        fields = {x.name: x.global_receptive_field for x in analysis.layers}
        local = {x.name: x.local_receptive_field for x in analysis.layers}
        assert math.isinf(fields["squeeze"]) and math.isinf(fields["excite"])
        assert math.isinf(local["squeeze"]) and math.isinf(local["excite"])
        assert fields["stem"] == 3 and fields["after"] == 5
        (block,) = analysis.macroblocks
        assert block.base_layers == ["stem", "after"], reading


def test_a_reduce_over_one_axis_sees_all_of_it():
    """Pooled over H alone (coordinate attention's pooling), a conv on the (1, W) map sees
    the whole height: its field is global along H (fields compare by their largest axis)."""
    b = Builder("pool_h")
    x = b.input("x", [1, 3, 16, 16])
    x = _conv(b, x, 3, 4, 3, name="stem")
    x = _conv(b, b.op("ReduceMean", [x], axes=[2]), 4, 4, (1, 3), name="row")
    analysis = analyze_model(load_model(b.model([x])))
    assert math.isinf(analysis.layer("row").global_receptive_field)
    assert math.isinf(analysis.layer("row").local_receptive_field)


def test_a_map_made_from_a_pooled_or_flattened_one_sees_everything():
    """x.mean((2, 3)) reshaped back to (N, C, 1, 1) for a conv gate, and a map a fully
    connected layer makes from a flattened one, read every pixel: their convs' fields are
    global, as after GlobalAveragePool, not restarted at 1."""
    b = Builder("unpooled")
    x = b.input("x", [1, 3, 16, 16])
    x = _conv(b, x, 3, 4, 3, name="stem")
    s = b.op("ReduceMean", [x], axes=[2, 3], keepdims=0)
    s = b.op("Unsqueeze", [s, b.const(np.array([2, 3]))])
    s = b.op("Sigmoid", [b.conv(s, 4, 4, k=1, name="gate")])
    x = _conv(b, b.op("Mul", [x, s]), 4, 4, 3, name="after")
    f = b.op("Gemm", [b.op("Flatten", [x]), b.weight(64, 4 * 16 * 16)], transB=1)
    m = b.op("Reshape", [f, b.const(np.array([1, 4, 4, 4]))])
    m = _conv(b, m, 4, 4, 3, name="decoder")
    for reading in ("global", "local"):
        analysis = analyze_model(load_model(b.model([m, b.op("Flatten", [x])])), reading)
        fields = {x.name: x.global_receptive_field for x in analysis.layers}
        local = {x.name: x.local_receptive_field for x in analysis.layers}
        assert fields["stem"] == 3 and fields["after"] == 5
        for name in ("gate", "decoder"):
            assert math.isinf(fields[name]) and math.isinf(local[name]), (reading, name)
