"""In-graph activation statistics against a numpy reference on full activations."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import write_npz
from onnx import TensorProto, helper, numpy_helper

from onnx_mbs.data import open_data
from onnx_mbs.instrument import PACKED, SPATIAL_AXES, instrument
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.runtime import make_session
from onnx_mbs.stats import collect_stats

CPU = ["CPUExecutionProvider"]
SHAPE = (1, 1, 8, 8)


def three_class_model(
    nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], name: str
) -> onnx.ModelProto:
    """`nodes` from input x (n, 1, 8, 8) to logits (n, 3), `weights` their initializers."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_relu_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv(stride 2) -> Relu -> Flatten -> Gemm, random weights, opset 17.

    16 channels: onnxruntime's CPU provider then runs the convs in its NCHWc layout.
    """
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(size=(16, 1, 3, 3)).astype(np.float32),
        "b1": np.linspace(-3, 1, 16, dtype=np.float32),  # the first channels are mostly off
        "w2": rng.normal(size=(16, 16, 3, 3)).astype(np.float32) * 0.3,
        "b2": rng.normal(size=16).astype(np.float32),
        "wf": rng.normal(size=(3, 16 * 4 * 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1),
    ]
    return three_class_model(nodes, weights, "conv_relu")


def reference(
    model: onnx.ModelProto, tensors: list[str], x: np.ndarray, input_name: str = "x"
) -> dict[str, tuple]:
    """Full activations as extra graph outputs, reduced in numpy (float64); run a sample at
    a time (fixed batch-1 models too)."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    session = make_session(full, CPU)
    runs = [session.run(tensors, {input_name: x[k : k + 1]}) for k in range(len(x))]
    values = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
    result = {}
    for name, a in zip(tensors, values, strict=True):
        a = a.astype(np.float64)
        positive = (a > 0).sum(axis=(0, 2, 3))
        result[name] = (positive, np.abs(a).sum(axis=(0, 2, 3)), a.size // a.shape[1])
    return result


@pytest.fixture
def data(tmp_path):
    x = np.random.default_rng(1).random((10, 8, 8), dtype=np.float32)
    return open_data(write_npz(tmp_path / "d.npz", x=x), "x", SHAPE, mean=0.5, std=0.5)


def feed(data) -> np.ndarray:
    return np.concatenate([b.x for b in data.batches(100)])


def test_stats_match_numpy_reference(data):
    model = conv_relu_model()
    tensors = ["r1", "r2", "c2"]  # c2 can be negative: exercises the Abs path
    stats = collect_stats(model, tensors, data, CPU, batch_size=4, progress=False)
    expected = reference(model, tensors, feed(data))
    assert stats.samples == 10 and stats.provider == "CPUExecutionProvider"
    assert set(stats.tensors) == set(tensors)
    for name in tensors:
        positive, abs_sum, elements = expected[name]
        got = stats.tensors[name]
        assert got.elements_per_channel == elements
        np.testing.assert_array_equal(got.positive, positive)
        np.testing.assert_allclose(got.abs_sum, abs_sum, rtol=1e-5)
        rho = positive.sum() / (elements * len(positive))
        assert abs(got.ratio - rho) <= 1e-6
        np.testing.assert_allclose(got.channel_ratio, positive / elements, atol=1e-12)
        np.testing.assert_allclose(got.channel_mean_abs, abs_sum / elements, rtol=1e-5)
    # The biases make the statistics non-trivial: not all on, not all off.
    assert 0.05 < stats.tensors["r1"].ratio < 0.95
    assert stats.tensors["r1"].channel_ratio[0] < stats.tensors["r1"].channel_ratio[15]


def test_counts_equal_reference_for_every_batch_size(data):
    model = conv_relu_model(seed=2)
    expected = reference(model, ["r1"], feed(data))["r1"][0]
    for batch_size in (1, 3, 10, 64):
        stats = collect_stats(model, ["r1"], data, CPU, batch_size=batch_size, progress=False)
        np.testing.assert_array_equal(stats.tensors["r1"].positive, expected)


def test_instrumented_copy_returns_only_reductions_and_input_is_untouched():
    model = conv_relu_model()
    before = model.SerializeToString()
    instrumented, outputs = instrument(model, ["r1", "c2"], {"x": (2, 1, 8, 8)})
    assert model.SerializeToString() == before
    # One output for all of them (issue 15: one copy back per batch): positive and
    # mean |x| of r1, then of c2, 16 channels each, concatenated along the channels.
    assert [o.name for o in instrumented.graph.output] == [PACKED]
    # Counts of r1 and c2 first, then their sums of |x|.
    assert [(o.packed_at, o.abs_at) for o in outputs] == [(0, 32), (16, 48)]
    assert [o.spatial for o in outputs] == [64, 16]
    # The original nodes are all there, unchanged and in order.
    originals = [n for n in instrumented.graph.node if n in model.graph.node]
    assert originals == list(model.graph.node)
    onnx.checker.check_model(instrumented)
    ops = [n.op_type for n in instrumented.graph.node]
    assert ops.count("Abs") == 1  # only c2 may be negative; Relu output needs no Abs
    small = make_session(instrumented, CPU).run(None, {"x": np.ones((2, 1, 8, 8), np.float32)})
    assert [a.shape for a in small] == [(2, 64, 1, 1)]


def test_packed_output_holds_each_reduction_times_its_area(data):
    """The packed columns are the per-tensor reductions times H*W (counts rounded to whole
    numbers), and a tensor whose channel count is unknown keeps outputs of its own."""
    model = conv_relu_model(seed=4)
    graph = model.graph
    nodes = list(graph.node)
    unknown = [  # r1 reshaped to a shape computed at run time: no static channel count
        helper.make_node("Shape", ["r1"], ["r1_shape"]),
        helper.make_node("Reshape", ["r1", "r1_shape"], ["r1_again"]),
        helper.make_node("Relu", ["r1_again"], ["r3"]),
    ]
    del graph.node[:]
    graph.node.extend(nodes[:2] + unknown + nodes[2:])
    tensors = ["r1", "c2", "r3"]
    instrumented, outputs = instrument(model, tensors, {"x": (3, 1, 8, 8)})
    assert [o.packed_at for o in outputs] == [0, 16, None]
    names = [o.name for o in instrumented.graph.output]
    assert names == [PACKED, outputs[2].positive, outputs[2].mean_abs, outputs[2].shape]
    # The same reductions as separate graph outputs, the way they were returned before.
    separate = onnx.ModelProto()
    separate.CopyFrom(instrumented)
    separate.graph.output.extend(
        helper.make_empty_tensor_value_info(n) for o in outputs for n in (o.positive, o.mean_abs)
    )
    x = feed(data)[:3]
    values = make_session(separate, CPU).run(None, {"x": x})
    run = dict(zip([o.name for o in separate.graph.output], values, strict=True))
    for out in outputs[:2]:
        counts, sums = out.columns()
        area = np.float32(out.spatial)
        np.testing.assert_array_equal(run[PACKED][:, counts], np.rint(run[out.positive] * area))
        np.testing.assert_array_equal(run[PACKED][:, sums], run[out.mean_abs] * area)
    assert (run[PACKED][:, :32] > 0).any() and (run[PACKED][:, 32:] > 0).any()
    stats = collect_stats(model, tensors, data, CPU, batch_size=4, progress=False)
    expected = reference(model, tensors, feed(data))
    for name in tensors:
        np.testing.assert_array_equal(stats.tensors[name].positive, expected[name][0])
        np.testing.assert_allclose(stats.tensors[name].abs_sum, expected[name][1], rtol=1e-5)


def test_tensor_with_unknown_static_shape_uses_shape_output(data):
    """Reshape to a shape computed at run time: shape inference cannot see H*W."""
    model = conv_relu_model()
    graph = model.graph
    nodes = list(graph.node)
    extra = [
        helper.make_node("Shape", ["r1"], ["r1_shape"]),
        helper.make_node("Reshape", ["r1", "r1_shape"], ["r1_again"]),
        helper.make_node("Relu", ["r1_again"], ["r3"]),
    ]
    del graph.node[:]
    graph.node.extend(nodes[:2] + extra + nodes[2:])
    _, outputs = instrument(model, ["r3"], {"x": (2, 1, 8, 8)})
    assert outputs[0].shape is not None and outputs[0].spatial is None
    stats = collect_stats(model, ["r3", "r1"], data, CPU, batch_size=4, progress=False)
    np.testing.assert_array_equal(stats.tensors["r3"].positive, stats.tensors["r1"].positive)
    assert stats.tensors["r3"].elements_per_channel == 10 * 64


def test_clip_with_non_negative_min_skips_abs():
    model = conv_relu_model()
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
            numpy_helper.from_array(np.array(-1, np.float32), "minus"),
            numpy_helper.from_array(np.array(6, np.float32), "six"),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Clip", ["c1", "zero", "six"], ["relu6"]),
            helper.make_node("Clip", ["c1", "minus", "six"], ["clip_neg"]),
        ]
    )
    instrumented, _ = instrument(model, ["relu6"], {"x": (1, 1, 8, 8)})
    assert "Abs" not in [n.op_type for n in instrumented.graph.node]
    instrumented, _ = instrument(model, ["clip_neg"], {"x": (1, 1, 8, 8)})
    assert "Abs" in [n.op_type for n in instrumented.graph.node]


@pytest.mark.parametrize("tty", [True, False])
@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_only_for_a_person_at_a_terminal(data, capsys, monkeypatch, tty, progress):
    """stderr is never a terminal under pytest, so both answers are faked: the bar is
    drawn only when asked for and stderr is a terminal; stdout stays clean."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    collect_stats(conv_relu_model(), ["r1"], data, CPU, batch_size=4, progress=progress)
    out, err = capsys.readouterr()
    assert out == ""
    if tty and progress:
        assert "activation statistics" in err and "/10" in err  # the bar, over 10 images
    else:
        assert err == ""


def test_unknown_and_non_4d_tensors_are_bad_input(data):
    model = conv_relu_model()
    with pytest.raises(BadInputError, match="'nope' is not produced"):
        collect_stats(model, ["nope"], data, CPU, progress=False)
    with pytest.raises(BadInputError, match="'flat' has shape .*at least one spatial axis"):
        collect_stats(model, ["flat"], data, CPU, progress=False)


def test_data_that_does_not_fit_is_bad_input(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 6, 6), np.uint8))
    small = open_data(tmp_path / "d.npz", "x", (1, 1, 6, 6))
    with pytest.raises(BadInputError, match=r"expected shape \('n', 1, 8, 8\), got \(3, 1, 6, 6\)"):
        collect_stats(conv_relu_model(), ["r1"], small, CPU, progress=False)
    renamed = open_data(tmp_path / "d.npz", "image", (1, 1, 6, 6))
    with pytest.raises(BadInputError, match=r"input 'image' but the model's inputs are \['x'\]"):
        collect_stats(conv_relu_model(), ["r1"], renamed, CPU, progress=False)


def test_float16_model_is_fed_half_and_counted_exactly(data):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 1, 8, 8])
    y = helper.make_tensor_value_info("r", TensorProto.FLOAT16, ["n", 1, 8, 8])
    shift = numpy_helper.from_array(np.array(-0.3, np.float16), "shift")
    nodes = [
        helper.make_node("Add", ["x", "shift"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["r"]),
    ]
    graph = helper.make_graph(nodes, "half", [x], [y], [shift])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    stats = collect_stats(model, ["r", "shifted"], data, CPU, batch_size=4, progress=False)
    r = np.maximum(feed(data).astype(np.float16) + np.float16(-0.3), 0).astype(np.float64)
    np.testing.assert_array_equal(stats.tensors["r"].positive, (r > 0).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats.tensors["r"].abs_sum, r.sum(axis=(0, 2, 3)), rtol=1e-4)
    # The shifted input can be negative (Cast then Abs path); it is positive where r is.
    np.testing.assert_array_equal(stats.tensors["shifted"].positive, stats.tensors["r"].positive)
    assert stats.tensors["shifted"].abs_sum[0] > stats.tensors["r"].abs_sum[0]


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_instrumentation_counts_like_pooling(data, opset):
    """CUDA's instrumentation (ReduceMean over H, W) gives the same counts and sums as
    GlobalAveragePool, with axes as an attribute before opset 18 and an input from 18."""
    model = conv_relu_model(seed=3)
    model.opset_import[0].version = opset
    pooled = collect_stats(model, ["r1", "c2"], data, CPU, batch_size=4, progress=False)
    reduced = collect_stats(
        model, ["r1", "c2"], data, CPU, batch_size=4, progress=False, spatial_mean="reduce"
    )
    instrumented, _ = instrument(model, ["r1"], {"x": (2, 1, 8, 8)}, spatial_mean="reduce")
    assert {n.op_type for n in instrumented.graph.node} >= {"ReduceMean"}
    assert "GlobalAveragePool" not in {n.op_type for n in instrumented.graph.node}
    onnx.checker.check_model(instrumented, full_check=True)
    for name in ("r1", "c2"):
        np.testing.assert_array_equal(reduced.tensors[name].positive, pooled.tensors[name].positive)
        np.testing.assert_allclose(
            reduced.tensors[name].abs_sum, pooled.tensors[name].abs_sum, rtol=1e-5
        )


def test_shapes_the_model_already_carries_are_not_inferred_again(data, monkeypatch):
    """A model with inferred shapes whose input declares the fed shape: no second shape
    inference (seconds on large models), same counts."""
    model = onnx.shape_inference.infer_shapes(conv_relu_model(seed=3))
    expected = reference(model, ["r1", "r2"], feed(data))

    inferred = []
    real_infer = onnx.shape_inference.infer_shapes

    def counted(*args, **kwargs):
        inferred.append(args)
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", counted)
    stats = collect_stats(model, ["r1", "r2"], data, CPU, batch_size=4, progress=False)
    for name in ("r1", "r2"):
        np.testing.assert_array_equal(stats.tensors[name].positive, expected[name][0])
        assert stats.tensors[name].elements_per_channel == expected[name][2]
    assert not inferred
    # An input declared with another spatial size than the one fed: inferred afresh.
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    instrument(other, ["r1"], {"x": [4, 1, 8, 8]})
    assert len(inferred) == 1


def test_counts_stay_exact_on_large_maps_and_old_ir():
    """Whole counts per sample come out of the graph exact on a 512x512 map (fractions
    of 2**18 elements), in an IR 3 / opset 9 graph, where every constant must be a node."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 2, 512, 512)).astype(np.float32)
    x[0, 0] = np.abs(x[0, 0]) + 1  # every element counted: the largest count there is
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 512, 512])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 2, 512, 512])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    instrumented, outputs = instrument(model, ["r"], {"x": x.shape})
    assert [o.packed_at for o in outputs] == [0]
    onnx.checker.check_model(instrumented, full_check=True)
    source = open_data([{"x": x}], "x", x.shape)
    stats = collect_stats(model, ["r"], source, CPU, batch_size=2, progress=False)
    np.testing.assert_array_equal(stats.tensors["r"].positive, (x > 0).sum(axis=(0, 2, 3)))
    assert stats.tensors["r"].elements_per_channel == 3 * 512 * 512
    np.testing.assert_allclose(
        stats.tensors["r"].abs_sum,
        np.maximum(x, 0).sum(axis=(0, 2, 3), dtype=np.float64),
        rtol=1e-5,
    )


def test_optimization_levels_are_built_only_where_they_repay_their_build():
    from onnx_mbs.level_costs import optimization_level

    resnet1202 = (6620, 74.6, 2_829_501_056)  # instrumented nodes, weight MB, MACs per sample
    assert optimization_level(*resnet1202[:2], 16, resnet1202[2]) == "none"
    assert optimization_level(*resnet1202[:2], 64, resnet1202[2]) == "extended"
    assert optimization_level(*resnet1202[:2], 512, resnet1202[2]) == "full"
    resnet101 = (559, 169.8, 7_801_405_440)  # at 224
    assert optimization_level(*resnet101[:2], 16, resnet101[2]) == "extended"
    assert optimization_level(*resnet101[:2], 256, resnet101[2]) == "full"
    resnet50 = (279, 97.3, 4_089_184_256)  # its reordered weights would pass 3x the file
    assert optimization_level(*resnet50[:2], 16, resnet50[2]) == "extended"
    # Small weights: the layout level is priced at what it saves (MobileNetV2 on 16
    # images: 0.25-0.29 s against 0.49-0.60 s at extended), unless the graph is deep
    # enough that building it costs more (ResNet-110 at 32x32).
    mobilenet_v2 = (215, 13.3, 300_774_272)
    assert optimization_level(*mobilenet_v2[:2], 16, mobilenet_v2[2]) == "full"
    resnet110 = (614, 6.7, 253_149_824)
    assert optimization_level(*resnet110[:2], 16, resnet110[2]) == "none"
    assert optimization_level(*resnet110[:2], 1024, resnet110[2]) == "full"


def test_counts_are_the_same_at_every_optimization_level(data, monkeypatch):
    import onnx_mbs.stats as stats_module

    levels = []
    real = stats_module.make_session

    def recording(model, providers, level="full", **options):
        levels.append(level)
        return real(model, providers, level=level, **options)

    monkeypatch.setattr(stats_module, "make_session", recording)
    model = conv_relu_model(seed=5)
    tensors = ["r1", "c2"]
    full = collect_stats(model, tensors, data, CPU, batch_size=4, progress=False)
    # 1 MAC a sample: no level is worth its build on this graph
    lean = collect_stats(model, tensors, data, CPU, 4, False, macs_per_sample=1)
    assert levels == ["full", "none"]
    expected = reference(model, tensors, feed(data))
    for name in tensors:
        np.testing.assert_array_equal(lean.tensors[name].positive, expected[name][0])
        np.testing.assert_array_equal(lean.tensors[name].positive, full.tensors[name].positive)
        np.testing.assert_allclose(lean.tensors[name].abs_sum, expected[name][1], rtol=1e-5)


def _read_back(path):
    """The model at `path` with its external data read in, as `instrument` would have it."""
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")
    return model


def test_model_written_for_onnxruntime_is_instrument_s_model(tmp_path, zoo_onnx):
    """collect_stats writes the weights apart from the instrumented nodes (no second copy
    of them, memory: issue 13); the file must read back as exactly `instrument`'s model,
    each weight of a page or more as external data at a page-aligned offset (which
    onnxruntime maps instead of copying)."""
    from onnx_mbs.instrument import instrument_without_weights
    from onnx_mbs.passes import load_model
    from onnx_mbs.weights_file import PAGE, WEIGHTS_FILE, write_with_weights

    model = load_model(zoo_onnx("resnet20", "deploy"))
    before = model.SerializeToString()
    tensors = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    for spatial_mean in ("pool", "reduce"):
        light, _ = instrument_without_weights(
            model, tensors, {"input": (2, 3, 32, 32)}, True, spatial_mean
        )
        assert not {t.name for t in light.graph.initializer} & {
            t.name for t in model.graph.initializer
        }
        folder = tmp_path / spatial_mean
        folder.mkdir()
        write_with_weights(light, model.graph.initializer, folder / "m.onnx")
        expected, _ = instrument(model, tensors, {"input": (2, 3, 32, 32)}, True, spatial_mean)
        assert _read_back(folder / "m.onnx").SerializeToString() == expected.SerializeToString()
        written = onnx.load(folder / "m.onnx", load_external_data=False).graph.initializer
        external = {
            t.name: {e.key: e.value for e in t.external_data}
            for t in written
            if t.data_location == TensorProto.EXTERNAL
        }
        large = {t.name for t in model.graph.initializer if len(t.raw_data) >= PAGE}
        assert large and set(external) == large
        assert all(int(e["offset"]) % PAGE == 0 for e in external.values())
        assert {e["location"] for e in external.values()} == {WEIGHTS_FILE}
    assert model.SerializeToString() == before
    # At opset 18 the ReduceMean reading adds an initializer of its own (its axes): it must
    # come after the weights, as in `instrument`'s model.
    opset18 = conv_relu_model(seed=6)
    opset18.opset_import[0].version = 18
    light, _ = instrument_without_weights(
        opset18, ["r1", "c2"], {"x": (2, 1, 8, 8)}, True, "reduce"
    )
    assert [t.name for t in light.graph.initializer] == [SPATIAL_AXES]
    write_with_weights(light, opset18.graph.initializer, tmp_path / "axes.onnx")
    expected, _ = instrument(opset18, ["r1", "c2"], {"x": (2, 1, 8, 8)}, True, "reduce")
    assert _read_back(tmp_path / "axes.onnx").SerializeToString() == expected.SerializeToString()


def test_many_watched_tensors_are_joined_by_small_concats_and_counted_exactly(
    tmp_path, zoo_onnx, monkeypatch
):
    """Past DEEP watched tensors PACKED is built by a tree of Concats of at most 32 inputs
    (one Concat of ResNet-1202's 1,201 took onnxruntime 2 s to build), and the counts stay
    exact; ResNet-56's 55 are watched as if its graph were deep (DEEP lowered to 40)."""
    import onnx_mbs.instrument as instrument_module
    from onnx_mbs.instrument import CONCAT_FAN_IN

    monkeypatch.setattr(instrument_module, "DEEP", 40)
    model = zoo_onnx("resnet56", "deploy")
    tensors = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    assert len(tensors) > 40
    instrumented, _ = instrument(model, tensors, {"input": (3, 3, 32, 32)})
    concats = [n for n in instrumented.graph.node if n.op_type == "Concat"]
    assert max(len(n.input) for n in concats) <= CONCAT_FAN_IN
    x = np.random.default_rng(2).random((3, 3, 32, 32), dtype=np.float32)
    source = open_data(
        write_npz(tmp_path / "d.npz", x=x), "input", (1, 3, 32, 32), mean=0.5, std=0.25
    )
    stats = collect_stats(model, tensors, source, CPU, batch_size=1, progress=False)
    expected = reference(model, tensors, np.concatenate([b.x for b in source.batches(3)]), "input")
    for name in tensors:
        np.testing.assert_array_equal(stats.tensors[name].positive, expected[name][0])
        np.testing.assert_allclose(stats.tensors[name].abs_sum, expected[name][1], rtol=1e-5)


def test_a_shallow_graph_runs_in_the_default_order_with_one_concat(zoo_onnx):
    """The Concat tree and the priority-based order pay only where the watched tensors
    would pile up (issue 23: both cost ResNet-56 at batch 64 1.28x against 1.14x plain
    inference per batch): ResNet-56's 55 tensors at batch 64 (136 MB) are joined by one
    Concat per kind and run in onnxruntime's default order; a deep graph, a large batch
    or tensors of unknown size take the priority-based order."""
    from dataclasses import replace

    from onnx_mbs.instrument import DEEP
    from onnx_mbs.stats import HELD_LIMIT, piles_up

    model = zoo_onnx("resnet56", "deploy")
    tensors = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    instrumented, outputs = instrument(model, tensors, {"input": (64, 3, 32, 32)}, False)
    concats = [n for n in instrumented.graph.node if n.op_type == "Concat"]
    assert [len(n.input) for n in concats] == [len(tensors), 1]  # the counts, then PACKED
    held = 4 * 64 * sum(o.channels * o.spatial for o in outputs)
    assert 100 * 2**20 < held < HELD_LIMIT
    assert not piles_up(outputs, 64)
    assert piles_up(outputs, 64 * 2)  # two such runs at once: 272 MB
    assert piles_up(outputs * (DEEP // len(outputs) + 1), 1)  # deep: ResNet-1202's 1,201
    assert piles_up([replace(outputs[0], spatial=None), *outputs[1:]], 1)
    one = held // 64  # a sample's watched tensors: 2 MB
    assert not piles_up(outputs, 2, weight_bytes=32 * 2**20)  # small weights: 4 MB held
    assert piles_up(outputs, 40, weight_bytes=100 * 2**20)  # large weights: past half
    assert not piles_up(outputs, 40, weight_bytes=200 * 2**20) and 40 * one < 100 * 2**20


def test_weights_aside_lends_the_analysis_form_and_gives_back_the_same_model(zoo_onnx):
    """While the statistics run nothing holds the model's weights (memory: issue 13);
    after, the held model is byte for byte what it was."""
    from onnx_mbs.passes.load import load
    from onnx_mbs.weights_file import PAGE, WEIGHTS_FILE, HeldModel, weights_aside

    model = load(zoo_onnx("resnet20", "deploy")).model
    # onnx.load marks tensors it read from external data as DEFAULT: kept as they were
    large = next(t for t in model.graph.initializer if len(t.raw_data) >= PAGE)
    large.data_location = onnx.TensorProto.DEFAULT
    before = model.SerializeToString()
    held = HeldModel(model)
    del model, large
    with weights_aside(held) as (light, folder):
        assert held.lent
        assert light.ByteSize() < len(before) / 10  # the weights are in the file
        assert (folder / WEIGHTS_FILE).stat().st_size >= len(before) * 0.9
    assert held.take().SerializeToString() == before


def pooled_model(pool: str) -> onnx.ModelProto:
    """Conv -> `pool` 2x2 -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: the
    classic `relu(max_pool2d(conv(x)))`, whose first conv's activation follows the pool."""
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.normal(size=(16, 1, 3, 3)).astype(np.float32),
        "b1": np.linspace(-3, 1, 16, dtype=np.float32),
        "w2": rng.normal(size=(16, 16, 3, 3)).astype(np.float32) * 0.3,
        "wf": rng.normal(size=(3, 16)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(pool, ["c1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["p1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1),
    ]
    return three_class_model(nodes, weights, "pooled")


@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool"])
def test_rho_is_read_at_the_activation_after_a_pool(tmp_path, pool):
    """rho is the fraction of outputs > 0 of the first activation after the conv: a pool
    between them keeps every channel where it is, so the Relu after it is that activation
    (it was taken as no activation: rho 1, the layer's full MACs)."""
    from onnx_mbs.pipeline import reduce

    model = pooled_model(pool)
    x = np.random.default_rng(1).random((10, 8, 8), dtype=np.float32)
    path = write_npz(tmp_path / "d.npz", x=x)
    _, report = reduce(model, path, progress=False, evaluate_accuracy=False, mean=0.5, std=0.5)
    expected = reference(model, ["r1", "r2"], ((x[:, None] - 0.5) / 0.5).astype(np.float32))
    for layer, tensor in (("conv1", "r1"), ("conv2", "r2")):
        positive, _, elements = expected[tensor]
        rho = positive.sum() / (elements * len(positive))
        assert 0.05 < rho < 0.95
        assert report.rho[layer] == pytest.approx(rho, abs=1e-9)


def dense_block_model() -> onnx.ModelProto:
    """DenseNet's layer: Conv(8) -> Relu, a growth Conv(4) with no activation of its own,
    Concat of both -> BatchNorm -> Relu -> Conv -> Relu -> GlobalAveragePool -> Gemm."""
    rng = np.random.default_rng(4)
    weights = {
        "w0": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "w1": rng.normal(size=(4, 8, 3, 3)).astype(np.float32) * 0.3,
        "b1": np.array([-1.5, -0.5, 0.5, 1.5], np.float32),
        "scale": np.linspace(0.5, 2, 12, dtype=np.float32),
        "bias": np.linspace(-1, 1, 12, dtype=np.float32),
        "mean": np.zeros(12, np.float32),
        "var": np.ones(12, np.float32),
        "w2": rng.normal(size=(8, 12, 1, 1)).astype(np.float32),
        "wf": rng.normal(size=(3, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="growth", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["r0", "c1"], ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1),
    ]
    return three_class_model(nodes, weights, "dense")


def test_rho_of_a_conv_joined_by_concat_is_read_on_its_own_channels(tmp_path):
    """DenseNet's growth convs reach their activation through a Concat (and the BatchNorm
    after it): rho is the fraction > 0 of that activation's channels the conv makes, and act
    importance reads the same channels (it was taken as no activation: rho 1)."""
    from onnx_mbs.pipeline import reduce

    model = dense_block_model()
    x = np.random.default_rng(1).random((10, 8, 8), dtype=np.float32)
    path = write_npz(tmp_path / "d.npz", x=x)
    _, report = reduce(model, path, progress=False, evaluate_accuracy=False)
    positive, _, elements = reference(model, ["r1", "r0"], x[:, None])["r1"]
    growth = positive[8:].sum() / (elements * 4)
    assert 0.05 < growth < 0.95
    assert report.rho["growth"] == pytest.approx(growth, abs=1e-9)
    assert report.activation["growth"] == "r1"
    r0 = reference(model, ["r0"], x[:, None])["r0"]
    assert report.rho["conv0"] == pytest.approx(r0[0].sum() / (r0[2] * 8), abs=1e-9)


def test_act_importance_of_a_concat_joined_conv_reads_its_own_channels(tmp_path):
    from onnx_mbs.passes import Site, activation_sites, analyze_model, load_model
    from onnx_mbs.pipeline import activation_importance

    model = load_model(dense_block_model())  # the analysis form: shapes known
    sites = activation_sites(model, analyze_model(model))
    assert sites == {"conv0": Site("r0"), "growth": Site("r1", 8), "conv2": Site("r2")}
    x = np.random.default_rng(1).random((10, 8, 8), dtype=np.float32)
    data = open_data(write_npz(tmp_path / "d.npz", x=x), "x", SHAPE)
    stats = collect_stats(model, ["r0", "r1", "r2"], data, CPU, batch_size=1, progress=False)
    scores = activation_importance(model, stats, sites).per_layer
    np.testing.assert_array_equal(scores["growth"], stats.tensors["r1"].channel_mean_abs[8:])
    np.testing.assert_array_equal(scores["conv0"], stats.tensors["r0"].channel_mean_abs)


def test_a_model_using_the_instrumentation_s_names_is_measured_all_the_same(data):
    """Tensor names are the model's to choose: a model whose tensors are named as the
    instrumented copy names its own (onnx_mbs_stats/...) is measured as the same model under
    other names (onnxruntime refused the copy: 'Duplicate definition of name')."""
    model = conv_relu_model(seed=5)
    taken = {"c1": f"{PACKED}", "r1": "onnx_mbs_stats/0/positive", "c2": SPATIAL_AXES}
    for node in model.graph.node:
        node.input[:] = [taken.get(t, t) for t in node.input]
        node.output[:] = [taken.get(t, t) for t in node.output]
    tensors = ["onnx_mbs_stats/0/positive", "r2"]
    stats = collect_stats(model, tensors, data, CPU, batch_size=4, progress=False)
    expected = reference(model, tensors, feed(data))
    for name in tensors:
        np.testing.assert_array_equal(stats.tensors[name].positive, expected[name][0])
        np.testing.assert_allclose(stats.tensors[name].abs_sum, expected[name][1], rtol=1e-5)
