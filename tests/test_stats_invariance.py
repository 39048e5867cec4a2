"""Metamorphic checks of the activation statistics and the plan they give: the same samples,
however they are batched, ordered, repeated, stored or run, measure the same statistics,
rank the same channels and plan the same widths; statistics that are not finite are refused,
never planned with."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import write_npz
from graphs import dynamic_input_model
from onnx import helper, numpy_helper
from test_plan import _analysis
from test_stats import CPU, SHAPE, conv_relu_model

import onnx_mbs.stats
from onnx_mbs.cli import main
from onnx_mbs.data import open_data
from onnx_mbs.instrument import instrument
from onnx_mbs.passes import BadInputError
from onnx_mbs.pipeline import reduce
from onnx_mbs.plan import GroupInfo, macroblock_redundancy, plan_widths
from onnx_mbs.stats import collect_stats

SAMPLES = 10  # with batch 4 the last batch is partial (2 samples)
WATCHED = ["r1", "r2", "c2"]  # c2 can be negative: the Abs path


@pytest.fixture(scope="module")
def images(fmnist_sample) -> np.ndarray:
    return fmnist_sample[0][:SAMPLES]


def _stats(x: np.ndarray, tmp_path, batch_size: int = 4, **kw):
    data = open_data(write_npz(tmp_path / "s.npz", x=x), "x", SHAPE, mean=0.5, std=0.5)
    return collect_stats(
        conv_relu_model(), WATCHED, data, CPU, batch_size=batch_size, progress=False, **kw
    )


def _pixels(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SAMPLES, 8, 8), dtype=np.uint8)


def _assert_same_means(got, expected) -> None:
    """The per-channel statistics that plan and rank: fraction of x > 0 and mean |x|."""
    for name in WATCHED:
        np.testing.assert_array_equal(got.tensors[name].channel_ratio,
                                      expected.tensors[name].channel_ratio)  # fmt: skip
        np.testing.assert_allclose(got.tensors[name].channel_mean_abs,
                                   expected.tensors[name].channel_mean_abs, rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 3, 4, 9, 64])
def test_statistics_do_not_depend_on_the_batch_size(tmp_path, batch_size):
    # batch 1 runs two or more single-threaded sessions at once; 3, 4 and 9 end on a short batch
    x = _pixels()
    expected = _stats(x, tmp_path, batch_size=SAMPLES)
    got = _stats(x, tmp_path, batch_size=batch_size)
    assert got.samples == SAMPLES
    _assert_same_means(got, expected)
    for name in WATCHED:
        assert got.tensors[name].elements_per_channel == expected.tensors[name].elements_per_channel


def test_duplicated_and_shuffled_samples_give_the_same_means(tmp_path):
    x = _pixels()
    expected = _stats(x, tmp_path)
    twice = _stats(np.concatenate([x, x]), tmp_path)
    assert twice.samples == 2 * SAMPLES
    _assert_same_means(twice, expected)
    for name in WATCHED:  # sums double, means stay
        np.testing.assert_array_equal(twice.tensors[name].positive,
                                      2 * expected.tensors[name].positive)  # fmt: skip
    order = np.random.default_rng(0).permutation(SAMPLES)
    _assert_same_means(_stats(x[order], tmp_path), expected)


def _force_sessions(monkeypatch, threads: int, level: str) -> None:
    """The statistics' sessions run on `threads` intra-op threads at optimisation `level`."""
    make_session = onnx_mbs.stats.make_session

    def forced(path, providers, **kw):
        return make_session(path, providers, **{**kw, "threads": threads, "level": level})

    monkeypatch.setattr(onnx_mbs.stats, "make_session", forced)


@pytest.mark.parametrize(("threads", "level"), [(1, "none"), (2, "extended"), (1, "full")])
def test_statistics_do_not_depend_on_threads_or_optimisation_level(tmp_path, monkeypatch,
                                                                    threads, level):  # fmt: skip
    x = _pixels()
    expected = _stats(x, tmp_path)
    _force_sessions(monkeypatch, threads, level)
    _assert_same_means(_stats(x, tmp_path), expected)


@pytest.mark.parametrize("form", ["float64 pixels", "float32 in [0, 1]", "NHWC"])
def test_the_same_pixels_stored_otherwise_give_the_same_statistics(tmp_path, form):
    x = _pixels()
    expected = _stats(x, tmp_path)
    stored = {
        "float64 pixels": x.astype(np.float64),
        "float32 in [0, 1]": x.astype(np.float32) / 255,
        "NHWC": x[..., None],
    }[form]
    _assert_same_means(_stats(stored, tmp_path), expected)


def test_float64_pixels_a_rounding_step_outside_0_1_are_still_read_as_0_1(tmp_path):
    # float64 arithmetic leaves a pixel at 1 + 2**-52, which float32 rounds to 1: both are
    # the same [0, 1] pixels, not 0..255 ones to divide by 255 again (nor refused below 0).
    x = _pixels().astype(np.float64) / 255
    x[0, 0, 0], x[1, 0, 0] = 1.0, 0.0
    expected = _stats(x, tmp_path)
    x[0, 0, 0], x[1, 0, 0] = np.nextafter(1.0, 2.0), -1e-17
    for stored in (x, x.astype(np.float32)):
        data = open_data(write_npz(tmp_path / "r.npz", x=stored), "x", SHAPE, mean=0.5, std=0.5)
        assert "floats in [0, 1] kept" in data.preprocess.scale
        _assert_same_means(_stats(stored, tmp_path), expected)


def test_a_zero_and_a_constant_image_give_finite_statistics(tmp_path):
    x = _pixels()
    x[3], x[7] = 0, 255
    stats = _stats(x, tmp_path)
    for name in WATCHED:
        assert np.isfinite(stats.tensors[name].positive).all()
        assert np.isfinite(stats.tensors[name].abs_sum).all()


def standardising_model() -> onnx.ModelProto:
    """conv_relu_model behind a per-image standardisation without epsilon: x - mean over
    H, W divided by the standard deviation, 0 / 0 (NaN) on a constant image."""
    model = conv_relu_model()
    graph = model.graph
    standardise = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[2, 3]),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[2, 3]),
        helper.make_node("Sqrt", ["variance"], ["deviation"]),
        helper.make_node("Div", ["centred", "deviation"], ["standard"]),
    ]
    first = graph.node[0]
    first.input[0] = "standard"
    nodes = [*standardise, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    for k, node in enumerate(graph.node):
        node.name = node.name or f"node{k}"
    return model


def overflowing_model() -> onnx.ModelProto:
    """conv_relu_model whose first activation is finite but about 1e37: its sum of |x| over
    an 8x8 map passes float32's range."""
    model = conv_relu_model()
    for tensor in model.graph.initializer:
        if tensor.name in ("w1", "b1"):
            scaled = numpy_helper.to_array(tensor) * np.float32(1e37)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))
        if tensor.name == "w2":  # back to ordinary sizes after r1
            scaled = numpy_helper.to_array(tensor) * np.float32(1e-37)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))
    for k, node in enumerate(model.graph.node):
        node.name = node.name or f"node{k}"
    return model


def _constant_image_data(tmp_path) -> str:
    x = _pixels()
    x[3] = 128
    return write_npz(tmp_path / "constant.npz", x=x)


@pytest.mark.parametrize("magnitudes", [True, False])
def test_statistics_that_are_not_finite_are_refused_naming_tensor_and_sample(tmp_path, magnitudes):
    data = open_data(_constant_image_data(tmp_path), "x", SHAPE, mean=0.5, std=0.5)
    with pytest.raises(BadInputError, match=r"not finite at 'r1' on sample 3 .*constant\.npz"):
        collect_stats(standardising_model(), ["r1", "r2"], data, CPU, batch_size=4,
                      progress=False, magnitudes=magnitudes)  # fmt: skip


def test_a_tensor_of_unknown_shape_that_is_not_finite_is_refused(tmp_path):
    # r1 reshaped by its own run-time shape: its reductions are outputs of their own, not packed
    model = standardising_model()
    model.graph.node.extend([
        helper.make_node("Shape", ["r1"], ["r1_shape"], name="shape"),
        helper.make_node("Reshape", ["r1", "r1_shape"], ["r1_again"], name="reshape"),
        helper.make_node("Relu", ["r1_again"], ["r3"], name="relu3"),
    ])  # fmt: skip
    assert instrument(model, ["r3"], {"x": (2, 1, 8, 8)})[1][0].packed_at is None
    data = open_data(_constant_image_data(tmp_path), "x", SHAPE, mean=0.5, std=0.5)
    with pytest.raises(BadInputError, match=r"not finite at 'r3' on sample 3"):
        collect_stats(model, ["r3"], data, CPU, batch_size=4, progress=False)


def test_sums_of_abs_past_float32_are_refused(tmp_path):
    data = open_data(write_npz(tmp_path / "d.npz", x=_pixels()), "x", SHAPE, mean=0.5, std=0.5)
    with pytest.raises(BadInputError, match=r"not finite at 'r1' on sample 0"):
        collect_stats(overflowing_model(), ["r1", "r2"], data, CPU, batch_size=4, progress=False)
    # the counts alone (no magnitudes) are exact and finite
    stats = collect_stats(overflowing_model(), ["r1", "r2"], data, CPU, batch_size=4,
                          progress=False, magnitudes=False)  # fmt: skip
    assert all(np.isfinite(s.positive).all() for s in stats.tensors.values())


@pytest.mark.parametrize("importance", ["act", "l2"])
def test_reduce_refuses_a_model_computing_nan_rather_than_planning_with_it(tmp_path, importance):
    # l2 measures only the counts of x > 0: their NaN gave rho NaN, read as no redundancy
    with pytest.raises(BadInputError, match="not finite at"):
        reduce(standardising_model(), _constant_image_data(tmp_path), budget="params=0.5",
               importance=importance, progress=False, evaluate_accuracy=False)  # fmt: skip


def test_cli_refuses_statistics_that_are_not_finite_in_one_line(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(standardising_model(), model)
    code = main(["reduce", str(model), "-o", str(tmp_path / "s.onnx"), "--data",
                 _constant_image_data(tmp_path), "--budget", "params=0.5"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "not finite at 'r1' on sample 3" in err and "Traceback" not in err
    assert not (tmp_path / "s.onnx").exists()


def test_a_rho_that_is_not_finite_never_reaches_a_plan():
    analysis = _analysis([1], [2])
    rho = {layer.name: 0.5 for layer in analysis.layers}
    rho[analysis.layers[1].name] = float("nan")
    with pytest.raises(BadInputError, match="b0_l1"):
        macroblock_redundancy(analysis, rho)
    groups = [GroupInfo(0, 64, (0,), False)]
    with pytest.raises(BadInputError, match="b0_l1"):
        plan_widths(analysis, groups, rho, lambda counts: (counts[0], counts[0]))


# End to end on the bundled ResNet-20: what reduce measures, plans and keeps.


def _fixed_batch(path, batch: int, tmp_path) -> str:
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    written = tmp_path / f"fixed{batch}.onnx"
    onnx.save(model, written)
    return str(written)


def _folder(images: np.ndarray, tmp_path) -> str:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for k, image in enumerate(images):
        Image.fromarray(image[0]).save(folder / f"{k:03d}.png")
    return str(folder)


def _reduced(model, data, strategy: str, **options):
    small, report = reduce(str(model), data, budget="params=0.5", strategy=strategy,
                           progress=False, evaluate_accuracy=False, **options)  # fmt: skip
    weights = {t.name: numpy_helper.to_array(t) for t in small.graph.initializer}
    return report, weights


def _assert_same_reduction(got, expected) -> None:
    (report, weights), (report0, weights0) = got, expected
    assert report.rho == pytest.approx(report0.rho, rel=1e-9, abs=1e-12)
    assert report.plan.counts == report0.plan.counts
    assert set(weights) == set(weights0)
    for name, value in weights.items():  # the same channels kept, the same weights written
        np.testing.assert_array_equal(value, weights0[name], err_msg=name)


VARIANTS = ["batch 1", "batch 4", "twice", "shuffled", "float64", "folder", "fixed batch 4",
            "fixed batch 16"]  # fmt: skip


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, bundled_model_path, images):
    """strategy -> the reduction of `images` in one batch, computed once."""
    data = write_npz(tmp_path_factory.mktemp("baseline") / "a.npz", x=images)
    done = {}

    def get(strategy: str):
        if strategy not in done:
            done[strategy] = _reduced(bundled_model_path, data, strategy)
        return done[strategy]

    return get


@pytest.mark.parametrize("strategy", ["mbs", "global"])  # global ranks by the importance
@pytest.mark.parametrize("variant", VARIANTS)
def test_reduce_plans_and_keeps_the_same_channels_for_the_same_data(
    tmp_path, bundled_model_path, images, baseline, variant, strategy
):
    expected = baseline(strategy)
    model, x, options = bundled_model_path, images, {}
    if variant.startswith("batch"):
        options["batch_size"] = int(variant.split()[1])
    elif variant == "twice":
        x = np.repeat(images, 2, axis=0)
    elif variant == "shuffled":
        x = images[np.random.default_rng(0).permutation(len(images))]
    elif variant == "float64":
        x = images.astype(np.float64) / 255
    elif variant.startswith("fixed"):
        model = _fixed_batch(bundled_model_path, int(variant.split()[-1]), tmp_path)
    data = _folder(images, tmp_path) if variant == "folder" else write_npz(tmp_path / "b.npz", x=x)
    got = _reduced(model, data, strategy, **options)
    assert got[0].samples == len(x)
    _assert_same_reduction(got, expected)


@pytest.mark.parametrize(("threads", "level"), [(1, "none"), (2, "extended")])
def test_reduce_plans_alike_at_every_thread_count_and_optimisation_level(
    tmp_path, bundled_model_path, images, baseline, monkeypatch, threads, level
):
    # the level is chosen by the model's size and the number of samples (level_costs.py):
    # folding BatchNorm into the convs or not moves a few elements across 0, no more
    _force_sessions(monkeypatch, threads, level)
    data = write_npz(tmp_path / "a.npz", x=images)
    report, weights = _reduced(bundled_model_path, data, "global")
    expected, expected_weights = baseline("global")
    assert report.rho == pytest.approx(expected.rho, abs=1e-5)
    assert report.plan.counts == expected.plan.counts
    for name, value in weights.items():
        np.testing.assert_array_equal(value, expected_weights[name], err_msg=name)


def test_dynamic_and_fixed_dims_measure_and_plan_alike(tmp_path):
    # dynamic batch, height and width read at --input-shape, against the sizes fixed in the model
    dynamic = dynamic_input_model()
    fixed = onnx.ModelProto()
    fixed.CopyFrom(dynamic)
    for value, sizes in ((fixed.graph.input[0], (3, 3, 24, 20)), (fixed.graph.output[0], (3, 5))):
        for dim, size in zip(value.type.tensor_type.shape.dim, sizes):
            dim.dim_value = size
    x = np.random.default_rng(0).integers(0, 256, (SAMPLES, 3, 24, 20), dtype=np.uint8)
    data = write_npz(tmp_path / "d.npz", x=x)
    options = dict(budget="params=0.8", channel_multiple=1, strategy="global", progress=False,
                   evaluate_accuracy=False, logits="none")  # fmt: skip
    shapes = {"input": [1, 3, 24, 20]}
    expected = reduce(dynamic, data, input_shapes=shapes, **options)[1]
    for model, extra in ((dynamic, {"input_shapes": shapes, "batch_size": 4}), (fixed, {})):
        got = reduce(model, data, **extra, **options)[1]
        assert got.rho == expected.rho and got.plan.counts == expected.plan.counts


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["mbs", "global", "mbs-branch", "mbs-cost"])
@pytest.mark.parametrize("importance", ["act", "l2"])
def test_wide_sweep_of_batch_sizes_and_forms(tmp_path, bundled_model_path, fmnist_sample,
                                              strategy, importance):  # fmt: skip
    images = fmnist_sample[0][:37]
    options = {"importance": importance}
    expected = _reduced(bundled_model_path, write_npz(tmp_path / "a.npz", x=images), strategy,
                        **options)  # fmt: skip
    for batch_size in (1, 2, 5, 7, 36, 37, 38):
        got = _reduced(bundled_model_path, write_npz(tmp_path / "a.npz", x=images), strategy,
                       batch_size=batch_size, **options)  # fmt: skip
        _assert_same_reduction(got, expected)
    order = np.random.default_rng(1).permutation(len(images))
    for x in (np.concatenate([images, images, images]), images[order], images / 255.0):
        got = _reduced(bundled_model_path, write_npz(tmp_path / "b.npz", x=x), strategy,
                       **options)  # fmt: skip
        _assert_same_reduction(got, expected)
    for batch in (1, 5, 64):
        model = _fixed_batch(bundled_model_path, batch, tmp_path)
        _assert_same_reduction(_reduced(model, write_npz(tmp_path / "a.npz", x=images),
                                        strategy, **options), expected)  # fmt: skip
