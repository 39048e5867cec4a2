"""Importance criteria: what each scores, per-producer normalisation, and that the
default keeps the channels that matter on a trained model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, run

from onnx_mbs.data import open_data
from onnx_mbs.passes import BadInputError, analyze_model, load_model
from onnx_mbs.passes.activations import activation_tensors
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.importance import (
    BatchNormScaled,
    FilterNorm,
    choose_channels,
    weight_importance,
)
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.pipeline import activation_importance
from onnx_mbs.stats import collect_stats


def _one_conv_model() -> onnx.ModelProto:
    b = Builder("norms")
    x = b.input("x", [1, 2, 4, 4])
    w = np.zeros((3, 2, 1, 1), np.float32)
    w[:, :, 0, 0] = [[1, -1], [0.5, 0], [-3, 2]]
    conv = b.op("Conv", [x, b.const(w, "w")], name="conv")
    return load_model(b.model([b.conv(b.op("Relu", [conv]), 3, 2, k=1)], ["y"]))


def test_filter_norms_score_producer_filters():
    model = _one_conv_model()
    group = next(g for g in analyze_channels(model).groups if g.producers == ["conv"])
    # one producer: normalised by its mean score
    l1 = np.array([2.0, 0.5, 5.0])
    np.testing.assert_allclose(FilterNorm(model, p=1)(group), l1 / l1.mean())
    l2 = np.sqrt([2.0, 0.25, 13.0])
    np.testing.assert_allclose(FilterNorm(model, p=2)(group), l2 / l2.mean())
    assert choose_channels([group], {group.id: 2}, FilterNorm(model)) == {group.id: [0, 2]}


def _residual_model(
    scale_a: float, gamma: np.ndarray | None = None, between: tuple[str, ...] = ()
) -> onnx.ModelProto:
    """Two 1x1 convs (4 channels) joined by an Add; conv_a's filters are `scale_a` times
    larger; optionally a BatchNorm with scale `gamma` (var 1) follows conv_b, after the ops
    `between` (each one input, one output: Identity, Dropout)."""
    b = Builder("residual")
    x = b.input("x", [1, 2, 4, 4])
    wa = np.ones((4, 2, 1, 1), np.float32) * scale_a
    wa[3] *= 1.1  # conv_a alone prefers channel 3
    wb = np.ones((4, 2, 1, 1), np.float32)
    wb[2] *= 10.0  # conv_b alone prefers channel 2
    a = b.op("Conv", [x, b.const(wa, "wa")], name="conv_a")
    c = b.op("Conv", [x, b.const(wb, "wb")], name="conv_b")
    for op in between:
        c = b.op(op, [c])
    if gamma is not None:
        zeros, ones = np.zeros(4, np.float32), np.ones(4, np.float32)
        params = [b.const(gamma.astype(np.float32), "g"), b.const(zeros, "beta")]
        params += [b.const(zeros, "mean"), b.const(ones - 1e-5, "var")]
        c = b.op("BatchNormalization", [c, *params], name="bn_b", epsilon=1e-5)
    joined = b.op("Add", [a, c], name="join")
    return load_model(b.model([b.conv(b.op("Relu", [joined]), 4, 2, k=1)], ["y"]))


def _residual_group(model: onnx.ModelProto):
    return next(g for g in analyze_channels(model).groups if len(g.producers) == 2)


def test_scores_are_normalised_across_a_groups_producers():
    """conv_a's filters are 1000x larger: summed raw, its preference (channel 3) would
    decide alone; normalised, conv_b's 10x preference for channel 2 wins."""
    model = _residual_model(scale_a=1000.0)
    group = _residual_group(model)
    for criterion in (FilterNorm(model, p=1), FilterNorm(model, p=2)):
        scores = criterion(group)
        assert int(np.argmax(scores)) == 2, (criterion, scores)
        # each producer contributes scores of mean 1
        assert scores.mean() == pytest.approx(2.0)


def test_bn_criterion_folds_the_batchnorm_scale_into_the_filter_norm():
    gamma = np.array([1.0, 1.0, 0.01, 20.0])
    model = _residual_model(scale_a=1.0, gamma=gamma)
    group = _residual_group(model)
    bn = BatchNormScaled(model)(group)
    # conv_b's folded filter: gamma times its L2 norm; conv_a has no BatchNorm
    norm_a = np.sqrt(2.0) * np.array([1, 1, 1, 1.1])
    norm_b = np.sqrt(2.0) * np.array([1, 1, 10, 1]) * gamma
    expected = norm_a / norm_a.mean() + norm_b / norm_b.mean()
    np.testing.assert_allclose(bn, expected, rtol=1e-6)
    # channel 2's large filter is all but switched off by its BatchNorm: l2 keeps it,
    # bn drops it for channel 3, which the BatchNorm amplifies
    keep = {group.id: 1}
    assert choose_channels([group], keep, FilterNorm(model, p=2)) == {group.id: [2]}
    assert choose_channels([group], keep, BatchNormScaled(model)) == {group.id: [3]}


@pytest.mark.parametrize("between", [("Identity",), ("Dropout",), ("Identity", "Dropout")])
def test_bn_criterion_reads_the_batchnorm_behind_ops_that_pass_the_conv_s_output_on(between):
    """An Identity or an inference Dropout between a conv and its BatchNorm changes nothing
    the model computes, nor the bn score (it fell back to the plain filter norm there)."""
    gamma = np.array([1.0, 1.0, 0.01, 20.0])
    plain = _residual_model(scale_a=1.0, gamma=gamma)
    model = _residual_model(scale_a=1.0, gamma=gamma, between=between)
    group = _residual_group(model)
    np.testing.assert_allclose(
        BatchNormScaled(model)(group), BatchNormScaled(plain)(_residual_group(plain)), rtol=1e-6
    )
    assert choose_channels([group], {group.id: 1}, BatchNormScaled(model)) == {group.id: [3]}


@pytest.mark.parametrize("trans_b", [1, 0])
def test_bn_criterion_folds_a_1d_batchnorm_after_a_gemm(trans_b):
    """Linear -> BatchNorm1d exports as Gemm -> BatchNormalization on (N, C): bn scored it
    as plain l2, as where no BatchNorm follows."""
    b = Builder("gemm_bn")
    x = b.input("x", [1, 2])
    w = np.array([[1, 0], [0, 5], [2, 2]], np.float32)  # (out, in)
    gamma = np.array([3.0, 0.01, 1.0], np.float32)
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    w = w if trans_b else w.T.copy()
    h = b.op("Gemm", [x, b.const(w, "w"), b.const(zeros, "b")], name="fc", transB=trans_b)
    params = [b.const(gamma, "g"), b.const(zeros, "beta"), b.const(zeros, "mean")]
    h = b.op("BatchNormalization", [h, *params, b.const(ones - 1e-5, "var")], name="bn")
    head = np.ones((2, 3), np.float32)
    y = b.op("Gemm", [b.op("Relu", [h]), b.const(head, "head")], name="out", transB=1)
    model = load_model(b.model([y], ["y"]))
    group = next(g for g in analyze_channels(model).groups if g.producers == ["fc"])
    norms = np.sqrt([1.0, 25.0, 8.0]) * gamma
    np.testing.assert_allclose(BatchNormScaled(model)(group), norms / norms.mean(), rtol=1e-6)


@pytest.mark.parametrize("cout", [4, 8])
def test_bn_criterion_folds_the_batchnorm_after_a_grouped_conv_transpose(cout):
    """A grouped ConvTranspose's filters are its weight's rows by input channel, each
    reaching its conv-group's output channels: bn scaled row i by output channel i's scale
    (4 in, 4 out) or fell back to plain l2 (4 in, 8 out). Now the norm of the folded filter:
    each output channel's weights times its BatchNorm scale."""
    b = Builder("ct_bn")
    x = b.input("x", [1, 4, 4, 4])
    w = np.random.RandomState(0).randn(4, cout // 2, 2, 2).astype(np.float32)
    h = b.op("ConvTranspose", [x, b.const(w, "w")], name="ct", group=2, strides=[2, 2])
    gamma = np.linspace(0.1, 3.0, cout).astype(np.float32)
    zeros, ones = np.zeros(cout, np.float32), np.ones(cout, np.float32)
    params = [b.const(gamma, "g"), b.const(zeros, "beta"), b.const(zeros, "mean")]
    h = b.op("BatchNormalization", [h, *params, b.const(ones - 1e-5, "var")], name="bn")
    model = load_model(b.model([b.conv(b.op("Relu", [h]), cout, 2, k=1)], ["y"]))
    group = next(g for g in analyze_channels(model).groups if g.producers == ["ct"])
    per = cout // 2
    folded = [w[2 * k : 2 * k + 2] * gamma[k * per : (k + 1) * per, None, None] for k in (0, 1)]
    norms = np.array([np.sqrt(np.square(f.astype(np.float64)).sum()) for f in folded])
    np.testing.assert_allclose(BatchNormScaled(model)(group), norms / norms.mean(), rtol=1e-5)


def test_choose_channels_refuses_bad_scores():
    model = _one_conv_model()
    group = next(g for g in analyze_channels(model).groups if g.producers == ["conv"])
    with pytest.raises(ValueError, match="shape"):
        choose_channels([group], {group.id: 1}, lambda g: np.zeros(2))
    with pytest.raises(ValueError, match="not finite"):
        choose_channels([group], {group.id: 1}, lambda g: np.full(3, np.nan))
    with pytest.raises(ValueError, match="unknown importance"):
        weight_importance(model, "l3")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn"])
def test_weights_that_are_not_finite_are_refused_in_one_line(criterion, bad):
    # a diverged checkpoint: `reduce` without data ended in a ValueError traceback
    model = _one_conv_model()
    name = next(n.input[1] for n in model.graph.node if n.name == "conv")
    weight = next(t for t in model.graph.initializer if t.name == name)
    values = onnx.numpy_helper.to_array(weight).copy()
    values[1, 0, 0, 0] = bad
    weight.CopyFrom(onnx.numpy_helper.from_array(values, name))
    group = next(g for g in analyze_channels(model).groups if g.producers == ["conv"])
    with pytest.raises(BadInputError, match=rf"'conv'.*'{name}'.*NaN or inf"):
        weight_importance(model, criterion)(group)


def test_weight_criteria_score_zero_filters_with_a_bias_zero_though_not_dead():
    """docs/cli.md and docs/strategies.md: l1 and l2 read no bias, so a channel with zero
    filters scores 0 and goes first; with a non-zero bias it outputs relu(b), a constant the
    next layer reads, so it is not dead: cutting it changes the outputs."""
    b = Builder("bias")
    x = b.input("x", [1, 2, 4, 4])
    w = np.zeros((3, 2, 1, 1), np.float32)
    w[:, :, 0, 0] = [[1, -1], [0, 0], [-3, 2]]
    bias = b.const(np.array([0.0, 2.0, 0.0], np.float32), "bias")
    conv = b.op("Conv", [x, b.const(w, "w"), bias], name="conv")
    model = load_model(b.model([b.conv(b.op("Relu", [conv]), 3, 2, k=1)], ["y"]))
    analysis = analyze_channels(model)
    group = next(g for g in analysis.groups if g.producers == ["conv"])
    for criterion in (FilterNorm(model, p=1), FilterNorm(model, p=2)):
        assert criterion(group)[1] == 0
    assert choose_channels([group], {group.id: 2}, FilterNorm(model)) == {group.id: [0, 2]}
    feed = {"x": np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)}
    (whole,) = run(model, feed)
    (cut,) = run(shrink_channels(model, {group.id: [0, 2]}, analysis), feed)
    assert not np.allclose(whole, cut, atol=1e-3)


def test_act_ranks_residual_groups_better_than_random(
    bundled_model_path, fmnist_sample, fmnist_train_sample
):
    """Before any retraining, removing the least important quarter of each residual
    group by activations (what `reduce` does with data) hurts the trained model less
    than removing a random quarter. `bench/importance.py` has the full table: filter
    L1 and the BatchNorm-scaled norm rank no better than chance here."""
    raw = onnx.load(str(bundled_model_path))
    meta = {p.key: p.value for p in raw.metadata_props}
    mean, std = float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])
    name = raw.graph.input[0].name

    def normalised(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    x = normalised(fmnist_sample[0][:256])
    model = load_model(raw, {name: list(x.shape)})
    (reference,) = run(model, {name: x})
    analysis = analyze_channels(model)
    residual = [g for g in analysis.groups if not g.pinned and len(g.producers) > 1]
    assert len(residual) == 3  # ResNet-20: one residual group per stage
    counts = {g.id: g.size - g.size // 4 for g in residual}

    def error(keep) -> float:
        (y,) = run(shrink_channels(model, keep, analysis), {name: x})
        return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))

    train = normalised(fmnist_train_sample[0][:512])
    source = open_data(
        [{name: train[k : k + 64]} for k in range(0, 512, 64)], name, [64, 1, 28, 28]
    )
    calibration = load_model(raw, {name: [64, 1, 28, 28]})
    activation = activation_tensors(calibration, analyze_model(calibration))
    tensors = sorted({t for t in activation.values() if t})
    stats = collect_stats(calibration, tensors, source, ["CPUExecutionProvider"], progress=False)
    by_act = error(
        choose_channels(residual, counts, activation_importance(model, stats, activation))
    )
    rng = np.random.default_rng(0)
    randoms = [
        error({g.id: sorted(rng.choice(g.size, counts[g.id], replace=False)) for g in residual})
        for _ in range(8)
    ]
    assert by_act < 0.9 * np.mean(randoms), (by_act, randoms)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn"])
def test_weight_criteria_score_a_standardised_conv_by_the_filters_it_computes(criterion):
    """A weight-standardised conv (NFNet) computes its filters from an initializer: each
    output row standardised, times a gain. Scored on the initializer, a channel whose gain
    is 0 (its filters and output exactly 0) ranked as any other and a live one was cut."""
    from graphs import load_unfolded, standardised_conv_net

    model = load_unfolded(standardised_conv_net(width=8))
    gain = next(
        t
        for t in model.graph.initializer
        if t.dims == [8] and onnx.numpy_helper.to_array(t)[0] == 0.5
    )
    values = onnx.numpy_helper.to_array(gain).copy()
    values[5] = 0.0
    gain.CopyFrom(onnx.numpy_helper.from_array(values, gain.name))
    analysis = analyze_channels(model)
    (group,) = [g for g in analysis.groups if g.producers == ["std"]]
    scores = weight_importance(model, criterion)(group)
    assert scores[5] == 0.0 and (np.delete(scores, 5) > 0).all()
    keep = choose_channels(analysis.groups, {group.id: 7}, {group.id: scores})
    assert keep == {group.id: [0, 1, 2, 3, 4, 6, 7]}
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        run(shrink_channels(model, keep, analysis), x)[0], run(model, x)[0], atol=1e-5
    )


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn"])
def test_a_conv_weight_scaled_by_a_model_input_is_scored_by_its_initializer(criterion):
    """A weight the graph computes from a model input (here Mul by an input `g`) has no value
    before the model runs: it is scored by the initializer it is computed from, as before the
    standardised-weight rule; evaluating it from constants alone stopped with the reference
    evaluator's RuntimeError."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["w1", "g"], ["w1g"], name="scale"),
        helper.make_node("Conv", ["x", "w1g"], ["a"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"], name="r1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "input_scaled_weight",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = load_model(model)
    (group,) = [g for g in analyze_channels(model).groups if g.producers == ["c1"]]
    scores = weight_importance(model, criterion)(group)
    p = 1 if criterion == "l1" else 2
    norms = np.linalg.norm(w1.reshape(16, -1), ord=p, axis=1)
    np.testing.assert_allclose(scores / scores.mean(), norms / norms.mean(), rtol=1e-5)
