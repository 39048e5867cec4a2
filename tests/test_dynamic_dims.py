"""Folded shape arithmetic that follows a dynamic input dim stays dynamic (dynamic_dims.py):
the written model computes what the original computes at every input shape the original
takes, not only at the analysed size and its double.

Each model here is run as `load` hands it to onnxruntime (`runnable`: the analysis form
with the declared I/O, weights untouched), so its outputs must equal the original's.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, assert_runs_at_declared_shapes, run
from onnx import helper

from onnx_mbs.passes import BadInputError, load
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.shrink import shrink_channels


def _shape(b: Builder, x: str, start: int, end: int | None = None) -> str:
    return b.op("Shape", [x], start=start, **({} if end is None else {"end": end}))


def _relu_conv(b: Builder, x: str, cin: int, cout: int, stride: int = 1) -> str:
    return b.op("Relu", [b.conv(x, cin, cout, stride=stride)])


def _same_outputs(model: onnx.ModelProto, written: onnx.ModelProto, feeds: list[dict]) -> None:
    """`written` computes what `model` does on each of `feeds` the original takes."""
    ran = 0
    for feed in feeds:
        try:
            expected = run(model, feed)
        except Exception:  # the original does not take this shape: nor need the written one
            continue
        got = run(written, feed)
        assert [y.shape for y in got] == [y.shape for y in expected], {
            k: v.shape for k, v in feed.items()
        }
        for a, e in zip(got, expected):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
        ran += 1
    assert ran > 1


def _images(*shapes: tuple[int, ...], name: str = "x") -> list[dict]:
    rng = np.random.default_rng(0)
    return [{name: rng.standard_normal(s).astype(np.float32)} for s in shapes]


SIZES = [(1, 3, 16, 16), (2, 3, 17, 17), (1, 3, 23, 15), (1, 3, 30, 30), (2, 3, 24, 40)]


def _fpn(channels: int | str = 3) -> onnx.ModelProto:
    """An FPN top-down step: the coarse map upsampled to the size of the finer one
    (`F.interpolate(c, size=b.shape[-2:])`), then added to it. Twice the coarse size only
    where the input size is a multiple of 4."""
    b = Builder("fpn")
    x = b.input("x", ["N", channels, "H", "W"])
    x = b.op("Sub", [x, b.const(np.full((1, 3, 1, 1), 0.5, np.float32))])  # normalised
    return b.model([_fpn_step(b, _relu_conv(b, x, 3, 8))], ["y"])


def _fpn_step(b: Builder, a: str) -> str:
    """The top-down step of `_fpn` on an 8-channel map `a`."""
    fine = _relu_conv(b, a, 8, 8, stride=2)
    coarse = _relu_conv(b, fine, 8, 8, stride=2)
    sizes = b.op("Concat", [_shape(b, coarse, 0, 2), _shape(b, fine, 2)], axis=0)
    up = b.op("Resize", [coarse, "", "", sizes], mode="nearest")
    y = b.op("Add", [up, b.conv(fine, 8, 8, k=1)])
    return b.conv(y, 8, 4, k=1)


@pytest.mark.parametrize("channels", [3, "C"])
def test_resize_to_the_size_of_another_map_is_not_taken_as_scales(channels):
    """At the analysed size (16) and its double the sizes are twice the coarse map's, so
    they looked like scales 2; at 17 or 30 they are not (9 -> 17), and the written model
    must take the finer map's size as the original does. Also where the channels (dim 1,
    which the normalisation and the first conv fix) are declared dynamic: then the other
    dims are varied alone."""
    model = _fpn(channels)
    read = load(model, {"x": [1, 3, 16, 16]})
    _same_outputs(model, read.runnable, _images(*SIZES))
    assert_runs_at_declared_shapes(model, read.runnable, [1, 3, 16, 16])


def _transposed_view() -> onnx.ModelProto:
    """`y.transpose(2, 3).reshape(y.shape)`: the target's height and width are the data's
    width and height, equal only for square inputs."""
    b = Builder("transposed_view")
    x = b.input("x", ["N", 3, "H", "W"])
    a = _relu_conv(b, x, 3, 8)
    t = b.op("Transpose", [a], perm=[0, 1, 3, 2])
    r = b.op("Reshape", [t, _shape(b, a, 0)])
    return b.model([b.conv(_relu_conv(b, r, 8, 8), 8, 4, k=1)], ["y"])


def test_a_reshape_entry_that_matches_the_data_only_at_square_sizes_is_not_copied():
    """Analysed at a square size (and at its double), the target's height equals the data's
    dim 2 (its width): copying it (0) gives (W, H) maps for non-square inputs."""
    model = _transposed_view()
    read = load(model, {"x": [1, 3, 16, 16]})
    _same_outputs(model, read.runnable, _images(*SIZES))


def _channels_last_input() -> onnx.ModelProto:
    """An NHWC input (N, H, W, 3), transposed to NCHW; a token view (N, C, H * W) and back
    to the conv map's own shape."""
    b = Builder("nhwc")
    x = b.input("x", ["N", "H", "W", 3])
    a = _relu_conv(b, b.op("Transpose", [x], perm=[0, 3, 1, 2]), 3, 8)
    tokens = b.op("Reshape", [a, b.op("Concat", [_shape(b, a, 0, 2), b.const([-1])], axis=0)])
    back = b.op("Reshape", [b.op("Relu", [tokens]), _shape(b, a, 0)])
    return b.model([b.conv(_relu_conv(b, back, 8, 8), 8, 4, k=1)], ["y"])


def test_a_dynamic_height_in_dim_1_is_varied_too():
    """Dims 1 and 2 of an NHWC input are the height and width: both follow the input, not
    dim 2 alone (the height was analysed at one size and written as a number)."""
    model = _channels_last_input()
    read = load(model, {"x": [1, 16, 16, 3]})
    shapes = [(s[0], s[2], s[3], s[1]) for s in SIZES]
    _same_outputs(model, read.runnable, _images(*shapes))


def _image_and_aux() -> onnx.ModelProto:
    """An image and an auxiliary vector of dynamic length (N, K), its mean added to the
    map; a token view (N, C, H * W) and back to the map's shape."""
    b = Builder("aux")
    x = b.input("x", ["N", 3, "H", "W"])
    aux = b.input("aux", ["N", "K"])
    a = _relu_conv(b, x, 3, 8)
    tokens = b.op("Reshape", [a, b.op("Concat", [_shape(b, a, 0, 2), b.const([-1])], axis=0)])
    back = b.op("Reshape", [b.op("Relu", [tokens]), _shape(b, a, 0)])
    mean = b.op("Unsqueeze", [b.op("ReduceMean", [aux], axes=[1]), b.const([2, 3])])
    y = b.op("Add", [back, mean])
    return b.model([b.conv(_relu_conv(b, y, 8, 8), 8, 4, k=1)], ["y"])


def test_another_input_with_a_dynamic_dim_does_not_keep_the_image_size_fixed():
    """The image's height and width follow the input although the other input has a
    dynamic length of its own (which the sizes tried at before left unset, so the image
    was never tried at another size)."""
    model = _image_and_aux()
    read = load(model, {"x": [1, 3, 16, 12], "aux": [1, 5]})
    rng = np.random.default_rng(0)
    feeds = [
        {
            "x": rng.standard_normal(s).astype(np.float32),
            "aux": rng.standard_normal((s[0], k)).astype(np.float32),
        }
        for s in SIZES
        for k in (5, 2)
    ]
    _same_outputs(model, read.runnable, feeds)


def _tf_same_padding() -> onnx.ModelProto:
    """TensorFlow's SAME padding computed from the map's size (timm's `Conv2dSame`, TF
    exports): total = max((ceil(H / 2) - 1) * 2 + 3 - H, 0), before a stride-2 conv."""
    b = Builder("tf_same")
    x = b.input("x", ["N", 3, "H", "W"])
    a = _relu_conv(b, x, 3, 8)
    hw = _shape(b, a, 2)
    ones, twos = b.const(np.array([1, 1])), b.const(np.array([2, 2]))
    out = b.op("Div", [b.op("Add", [hw, ones]), twos])  # ceil(H / 2)
    span = b.op("Add", [b.op("Mul", [b.op("Sub", [out, ones]), twos]), b.const([3, 3])])
    total = b.op("Max", [b.op("Sub", [span, hw]), b.const(np.array([0, 0]))])
    begin = b.op("Div", [total, twos])
    zeros = b.const(np.array([0, 0]))
    pads = b.op("Concat", [zeros, begin, zeros, b.op("Sub", [total, begin])], axis=0)
    padded = b.op("Pad", [a, pads])
    c = b.op("Conv", [padded, b.weight(8, 8, 3, 3)], kernel_shape=[3, 3], strides=[2, 2])
    return b.model([b.conv(b.op("Relu", [c]), 8, 4, k=1)], ["y"])


def test_same_padding_that_is_one_at_every_even_size_follows_odd_sizes():
    """The padding is 1 at 16 and at 32 (the analysed size and its double) and 2 at odd
    sizes: it was folded to 1, and the written model took 17 to 8 rows, not 9."""
    model = _tf_same_padding()
    read = load(model, {"x": [1, 3, 16, 16]})
    _same_outputs(model, read.runnable, _images(*SIZES))


def _mean_by_size() -> onnx.ModelProto:
    """A map divided by the element count of another (`y / a.numel()`, exported as Size):
    the count follows the batch and counts `a`'s channels, 1 and 3 of which are dead."""
    b = Builder("numel")
    x = b.input("x", ["N", 3, 6, 6])
    w = b.rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w[[1, 3]] = 0
    a = b.op("Relu", [b.op("Conv", [x, b.const(w)], kernel_shape=[3, 3], pads=[1] * 4)])
    count = b.op("Cast", [b.op("Size", [a])], to=onnx.TensorProto.FLOAT)
    return b.model([b.op("Div", [b.conv(a, 8, 4, k=1), count], name="per_element")], ["y"])


def test_a_count_read_at_run_time_from_a_cut_map_is_refused_not_miscomputed():
    """Cutting a's dead channels leaves the analysed form's folded count (N * 8 * 36) as it
    was, but the written model counts the cut map at run time (N * 6 * 36): its outputs were
    silently scaled by 8 / 6. A count that follows the batch cannot be written as a number,
    so the cut is refused naming the reader; at a static batch the folded count is kept."""
    model = _mean_by_size()
    analysis = analyze_channels(load(model).model)
    (group,) = [g for g in analysis.groups if not g.pinned]
    keep = {group.id: [0, 2, 4, 5, 6, 7]}
    with pytest.raises(BadInputError, match="cannot keep the input size dynamic.*per_element"):
        shrink_channels(model, keep, analysis)
    static = load(model, {"x": [1, 3, 6, 6]})
    small = shrink_channels(static.model, keep, analyze_channels(static.model))
    x = _images((1, 3, 6, 6))[0]
    np.testing.assert_allclose(run(small, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-6)


def _mean_by_size_deeper() -> onnx.ModelProto:
    """`_mean_by_size` behind a first conv `h` whose channels 1 and 3 are dead: the count
    reads `a`'s channels, not `h`'s."""
    b = Builder("numel_deeper")
    x = b.input("x", ["N", 3, 6, 6])
    w = b.rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w[[1, 3]] = 0
    h = b.op("Relu", [b.op("Conv", [x, b.const(w)], kernel_shape=[3, 3], pads=[1] * 4)])
    a = _relu_conv(b, h, 8, 8)
    count = b.op("Cast", [b.op("Size", [a])], to=onnx.TensorProto.FLOAT)
    return b.model([b.op("Div", [b.conv(a, 8, 4, k=1), count], name="per_element")], ["y"])


def test_a_count_read_at_run_time_pins_the_group_it_counts_and_the_rest_is_cut():
    """Given the original's run-time arithmetic, the analysis pins the group whose channel
    count the run-time `Size` reads (a cut there would change the count at every batch), in
    one reason naming the reader, and leaves `h`'s group free: its dead channels cut, the
    written model computes the original's outputs at every batch."""
    model = _mean_by_size_deeper()
    read = load(model)
    analysis = analyze_channels(read.model, run_time=read.origin.run_time)
    pinned = [g for g in analysis.groups if any("per_element" in r for r in g.pin_reasons)]
    (free,) = [g for g in analysis.groups if not g.pinned]
    assert len(pinned) == 1 and "follows the input size" in pinned[0].pin_reasons[0]
    assert "(Size at run time)" in pinned[0].pin_reasons[0]
    first_conv = next(n.name for n in read.model.graph.node if n.op_type == "Conv")
    assert free.producers == [first_conv] and free.size == 8
    small = shrink_channels(read.model, {free.id: [0, 2, 4, 5, 6, 7]}, analysis)
    written = read.written(small)
    assert_runs_at_declared_shapes(model, written)
    _same_outputs(model, written, _images((1, 3, 6, 6), (2, 3, 6, 6), (3, 3, 6, 6)))


def test_reduce_pins_a_group_counted_at_run_time_instead_of_refusing():
    """`reduce` on a model dividing by `a.numel()` with a dynamic batch: the counted group
    kept whole (said among the pinned), the other cut; keeping every channel computes the
    original. Before, a budget that cut the counted group refused the whole reduction."""
    from onnx_mbs import reduce

    model = _mean_by_size_deeper()
    small, report = reduce(
        model, budget="params=0.5", channel_multiple=1, evaluate_accuracy=False, progress=False
    )
    assert any("per_element" in r and "Size" in r for r in report.pinned), report.pinned
    assert report.after.total_params < report.before.total_params
    assert_runs_at_declared_shapes(model, small)
    same, _ = reduce(
        model, strategy="mbs", width_map="linear:0", evaluate_accuracy=False, progress=False
    )
    _same_outputs(model, same, _images((1, 3, 6, 6), (2, 3, 6, 6)))


def _views_sized_by_another_map() -> onnx.ModelProto:
    """Two maps viewed as (N, C, -1) with C read from a third map's shape (`a.size(1)`),
    one target for both: computed at run time, as it has two readers."""
    b = Builder("views")
    x = b.input("x", ["N", 3, 6, 6])
    w = b.rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w[[1, 3]] = 0
    a = b.op("Relu", [b.op("Conv", [x, b.const(w)], kernel_shape=[3, 3], pads=[1] * 4)])
    shape = b.op("Shape", [a], end=2)
    target = b.op("Concat", [shape, b.const(np.array([-1], np.int64))], axis=0)
    views = [b.op("Reshape", [b.conv(x, 3, 8), target]) for _ in range(2)]
    means = [b.op("ReduceMean", [v], axes=[2], keepdims=0) for v in views]
    return b.model([*means, b.conv(a, 8, 4, k=1)], ["u", "v", "y"])


def test_a_channel_count_read_from_a_cut_map_keeps_the_value_the_other_views_need():
    """Cutting a's two dead channels changed the count its shape gives (8 to 6) while the
    views it sizes keep their 8 channels: the written model takes the count from the
    analysed constant and the batch from the input, instead of viewing them as 6 x 48."""
    model = _views_sized_by_another_map()
    analysis = analyze_channels(load(model).model)
    (group,) = [g for g in analysis.groups if not g.pinned]
    small = shrink_channels(model, {group.id: [0, 2, 4, 5, 6, 7]}, analysis)
    assert_runs_at_declared_shapes(model, small)
    _same_outputs(model, small, _images((1, 3, 6, 6), (2, 3, 6, 6)))


def _fpn_by_scales(opset: int) -> onnx.ModelProto:
    """The FPN step as opset 9/10 exports write `F.interpolate(c, size=b.shape[-2:])`: the
    scales are the ratio of the two maps' sizes, as floats (Upsample at 9, Resize at 10)."""
    b = Builder("fpn_by_scales")
    x = b.input("x", ["N", 3, "H", "W"])
    fine = _relu_conv(b, _relu_conv(b, x, 3, 8), 8, 8, stride=2)
    coarse = _relu_conv(b, fine, 8, 8, stride=2)
    sizes = [
        b.op("Cast", [b.op("Gather", [b.op("Shape", [t]), b.const([2, 3])], axis=0)], to=1)
        for t in (fine, coarse)
    ]
    scales = b.op("Concat", [b.const(np.ones(2, np.float32)), b.op("Div", sizes)], axis=0)
    up = b.op("Upsample" if opset < 10 else "Resize", [coarse, scales], mode="nearest")
    y = b.op("Add", [up, b.conv(fine, 8, 8, k=1)])
    model = b.model([b.conv(y, 8, 4, k=1)], ["y"])
    model.opset_import[0].version = opset
    del model.graph.output[:]  # as inferred at opset 17, where these ops mean other things
    model.graph.output.append(helper.make_tensor_value_info("y", 1, ["N", 4, "h", "w"]))
    return model


@pytest.mark.parametrize("opset", [9, 10])
def test_resize_scales_that_are_a_ratio_of_sizes_follow_odd_sizes(opset):
    """onnx's shape inference floors 5 x 1.8f in double precision (8), onnxruntime in float
    (9, the finer map's size): the model was refused at 17 ("Incompatible dimensions" at the
    Add), and at 16 the odd trial was refused alike, so the scales stayed 2 and the written
    model failed at every size whose ratio is not 2. Resize sizes are now inferred as
    onnxruntime computes them."""
    model = _fpn_by_scales(opset)
    for analysed in ([1, 3, 16, 16], [1, 3, 17, 17]):
        read = load(model, {"x": analysed})
        _same_outputs(model, read.runnable, _images(*SIZES, (1, 3, 33, 33)))


def _stereo() -> onnx.ModelProto:
    """Two images whose dims are named apart ('H', 'W' and 'height', 'width') but must be
    equal: their feature maps are concatenated. The result is resized to the left image's
    size (`F.interpolate(d, size=left.shape[-2:])`): 4 times the maps' size where the input
    size is a multiple of 4 only."""
    b = Builder("stereo")
    left = b.input("left", ["N", 3, "H", "W"])
    right = b.input("right", ["batch", 3, "height", "width"])
    first, second = b.weight(8, 3, 3, 3), b.weight(8, 8, 3, 3)

    def features(x: str) -> str:
        for weight in (first, second):
            conv = b.op("Conv", [x, weight], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
            x = b.op("Relu", [conv])
        return x

    joined = b.op("Concat", [features(left), features(right)], axis=1)
    d = b.conv(_relu_conv(b, joined, 16, 8), 8, 1, k=1)
    sizes = b.op("Concat", [_shape(b, d, 0, 2), _shape(b, left, 2)], axis=0)
    return b.model([b.op("Resize", [d, "", "", sizes], mode="nearest")], ["disparity"])


def test_inputs_whose_dims_are_named_apart_but_must_agree_are_varied_together():
    """Each dynamic dim took its own odd size (left 33 x 35, right 37 x 39), where the
    original does not run (its feature maps cannot be concatenated), so only the analysed
    size and its double were seen, and the Resize to the left image's size was written as
    scales 4: 36 x 48 for a 33 x 47 pair, without an error. The same odd size for the dims
    at one position of the inputs that had one size finds the constant follows the input."""
    model = _stereo()
    shape = [1, 3, 16, 16]
    read = load(model, {"left": shape, "right": shape})
    rng = np.random.default_rng(0)
    feeds = [
        {name: rng.standard_normal((n, 3, h, w)).astype(np.float32) for name in ("left", "right")}
        for n, h, w in [(1, 16, 16), (2, 32, 32), (2, 33, 47), (1, 17, 18)]
    ]
    _same_outputs(model, read.runnable, feeds)
    assert_runs_at_declared_shapes(model, read.runnable, {"left": shape, "right": shape})


def _fpn_after_space_to_depth() -> onnx.ModelProto:
    """`_fpn` after `F.pixel_unshuffle(x, 2)` as torch's TorchScript exporter writes it
    (Reshapes by constants of 0 and -1 around a Transpose): the model takes even sizes
    only, and the coarse map's double is the finer map's size only where the input size is
    a multiple of 8 (at 36 the finer map is 9 x 9, the coarse one 3 x 3)."""
    b = Builder("fpn_after_pixel_unshuffle")
    x = b.input("x", ["N", 3, "H", "W"])
    x = b.op("Unsqueeze", [x, b.const(np.array([3]))])
    for target in ([0, 0, -1, 2, 0], [0, 0, 0, 0, -1, 2]):
        x = b.op("Reshape", [x, b.const(np.array(target))])
    t = b.op("Transpose", [x], perm=[0, 1, 3, 5, 2, 4])
    t = b.op("Reshape", [t, b.const(np.array([0, -1, 1, 1, 0, 0]))])
    stem = b.op("Squeeze", [t, b.const(np.array([2, 3]))])
    return b.model([_fpn_step(b, _relu_conv(b, stem, 12, 8))], ["y"])


def test_a_model_that_takes_even_sizes_only_is_varied_at_sizes_not_a_multiple_of_4():
    """The odd sizes (33 x 35) are ones the original does not run at, so only 16 and 32
    were seen, where the Resize sizes are twice the coarse map's: written as scales 2, the
    model refused 36 x 44 inputs the original takes (its Add saw 10 x 12 against 9 x 11).
    Odd multiples of 2 (34 x 38) tell the two apart."""
    model = _fpn_after_space_to_depth()
    read = load(model, {"x": [1, 3, 16, 16]})
    _same_outputs(model, read.runnable, _images((1, 3, 16, 16), (2, 3, 36, 44), (1, 3, 34, 50)))
    assert_runs_at_declared_shapes(model, read.runnable, [1, 3, 16, 16])
