"""Issue 9's findings, one test each: models from other exporters are read as one form."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import Builder, run
from onnx import TensorProto, helper
from variants import minus_one_dims, weights_in_constants

from onnx_mbs.cli import main
from onnx_mbs.passes import (
    analyze_channels,
    analyze_model,
    count_parameters,
    load_model,
    normalise,
    shrink_channels,
)
from onnx_mbs.pipeline import reduce


def _small_cnn(shape=("N", 3, 8, 8), seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x = b.input("x", list(shape))
    h = b.op("Relu", [b.conv(x, 3, 16, name="c1")])
    h = b.op("Relu", [b.conv(h, 16, 24, name="c2")])
    h = b.op("Relu", [b.conv(h, 24, 16, stride=2, name="c3")])
    return b.model([b.gap_head(h, 16, 5)])


def test_weights_in_constant_nodes_count_as_parameters(tmp_path, capsys):
    model = _small_cnn()
    expected = count_parameters(model)
    constants = weights_in_constants(model)
    assert analyze_model(load_model(constants)).total_params == expected
    path = tmp_path / "m.onnx"
    onnx.save(constants, path)
    args = ["reduce", str(path), "--json", "--dry-run", "--budget", "params=0.6"]
    assert main([*args, "--channel-multiple", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.5 < summary["plan"]["reached"]["params"] <= 0.62


def test_minus_one_dims_are_dynamic():
    model = minus_one_dims(_small_cnn(("N", 3, "H", "W")))
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == -1
    analysis = analyze_model(load_model(model, {"x": [1, 3, 8, 8]}))
    assert analysis.total_macs == analyze_model(load_model(_small_cnn((1, 3, 8, 8)))).total_macs
    assert analysis.total_macs > 0


def _resize_by_shape_model() -> onnx.ModelProto:
    """Dynamic N, H, W; a Resize whose sizes are computed from the input's shape (x2)."""
    b = Builder()
    x = b.input("x", ["N", 3, "H", "W"])
    h = b.op("Relu", [b.conv(x, 3, 16, name="c1")])
    shape = b.op("Shape", [h])
    sizes = b.op("Mul", [shape, b.const(np.array([1, 1, 2, 2], dtype=np.int64))])
    up = b.op("Resize", [h, "", "", sizes], mode="nearest")
    h = b.op("Relu", [b.conv(up, 16, 16, name="c2")])
    y = b.conv(h, 16, 4, k=1, name="c3")
    return b.model([y], ["y"])


def test_fixed_input_shape_is_for_the_analysis_only():
    model = _resize_by_shape_model()
    reduced, report = reduce(model, input_shapes={"x": [1, 3, 8, 8]}, budget="params=0.6")
    assert report.plan.changes_anything
    onnx.checker.check_model(reduced, full_check=True)
    dims = reduced.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    for shape in [(1, 3, 8, 8), (2, 3, 8, 8), (2, 3, 12, 10)]:
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        (y,) = run(reduced, {"x": x})
        assert y.shape == (shape[0], 4, 2 * shape[2], 2 * shape[3])


def _resize_by_shape_with_axes_model(axes: list[int], factors: list[int]) -> onnx.ModelProto:
    """As `_resize_by_shape_model`, but Resize (opset 18) with `axes`: `sizes` holds one
    entry per axis of `axes`, in its order, computed as the input's dims times `factors`."""
    b = Builder()
    x = b.input("x", ["N", 3, "H", "W"])
    h = b.op("Relu", [b.conv(x, 3, 16, name="c1")])
    dims = b.op("Gather", [b.op("Shape", [h]), b.const(np.array(axes, dtype=np.int64))])
    sizes = b.op("Mul", [dims, b.const(np.array(factors, dtype=np.int64))])
    up = b.op("Resize", [h, "", "", sizes], mode="nearest", axes=axes)
    h = b.op("Relu", [b.conv(up, 16, 16, name="c2")])
    y = b.conv(h, 16, 4, k=1, name="c3")
    model = b.model([y], ["y"])
    model.opset_import[0].version = 18
    return model


@pytest.mark.parametrize(
    "axes, factors", [([0, 1, 3, 2], [1, 1, 3, 2]), ([3, 2], [3, 2]), ([-1, -2], [3, 2])]
)
def test_resize_sizes_by_shape_with_axes_keep_each_axis_factor(axes, factors):
    """The analysed size is not square; the written model scales H by 2 and W by 3 at
    every size (a sizes/shape ratio taken in the data's axis order instead of `axes`'
    scaled W by 3 * W / H)."""
    model = _resize_by_shape_with_axes_model(axes, factors)
    reduced, report = reduce(model, input_shapes={"x": [1, 3, 8, 12]}, budget="params=0.6")
    assert report.plan.changes_anything
    onnx.checker.check_model(reduced, full_check=True)
    for shape in [(1, 3, 8, 12), (2, 3, 8, 8), (2, 3, 12, 10), (1, 3, 5, 16)]:
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        (y,) = run(reduced, {"x": x})
        assert y.shape == (shape[0], 4, 2 * shape[2], 3 * shape[3])
        (want,) = run(model, {"x": x})
        assert want.shape == y.shape


def test_value_float_clip_bounds_and_value_ints_split(tmp_path):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.conv(x, 3, 16, name="c1")
    low = b.op("Constant", [], value_float=0.0)
    high = b.op("Constant", [], value_float=6.0)
    h = b.op("Clip", [h, low, high])
    sizes = b.op("Constant", [], value_ints=[8, 8])
    a, c = b.op("Split", [h, sizes], n_out=2, axis=1)
    y = b.op("Concat", [b.conv(a, 8, 8, name="ca"), b.conv(c, 8, 8, name="cc")], axis=1)
    model = b.model([b.gap_head(b.op("Relu", [y]), 16, 5)])
    loaded = load_model(model)
    reasons = [r for g in analyze_channels(loaded).groups for r in g.pin_reasons]
    assert not any("Split" in r for r in reasons), reasons
    # Clip bounds are not parameters
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert count_parameters(loaded) == weights
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8))
    _, report = reduce(model, str(data), progress=False)
    assert set(report.rho) == {"c1", "ca", "cc"}


def test_no_activation_after_any_conv(tmp_path):
    """LayerNorm/GELU-style blocks: no activation to measure, rho is 1, no data error."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.conv(x, 3, 16, name="c1")
    h = b.op("Mul", [h, b.op("Erf", [h])])
    y = b.conv(h, 16, 4, name="c2")
    model = b.model([y], ["y"])
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8))
    _, report = reduce(model, str(data), progress=False)
    assert report.rho == {"c1": 1.0, "c2": 1.0}


@pytest.mark.parametrize("rank", [1, 3])
def test_conv1d_and_conv3d(rank):
    b = Builder()
    size = [8] * rank
    x = b.input("x", [1, 3, *size])

    def conv(x, cin, cout, stride=1):
        w = b.weight(cout, cin, *[3] * rank)
        return b.op(
            "Relu",
            [b.op("Conv", [x, w], pads=[1] * 2 * rank, strides=[stride] * rank)],
        )

    h = conv(conv(conv(x, 3, 16), 16, 16), 16, 8, stride=2)
    model = b.model([h], ["y"])
    analysis = analyze_model(load_model(model))
    assert len(analysis.layers) == 3
    expected = 8**rank * 3**rank * (3 * 16 + 16 * 16) + 4**rank * 3**rank * 16 * 8
    assert analysis.total_macs == expected
    assert [m.resolution for m in analysis.macroblocks] == [(8,) * rank, (4,) * rank]
    groups = analyze_channels(load_model(model)).groups
    free = [g for g in groups if not g.pinned]
    assert free
    loaded = load_model(model)
    keep = {g.id: np.arange(0, g.size, 2) for g in free}
    small = shrink_channels(loaded, keep)
    onnx.checker.check_model(small, full_check=True)
    assert count_parameters(small) < count_parameters(loaded)


def test_unknown_default_domain_op_is_opaque():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 16, name="c1")])
    h = b.op("Relu", [b.conv(h, 16, 16, name="c2")])
    y = b.op("EfficientNMS_TRT", [h], name="nms")
    model = b.model([b.op("Relu", [b.conv(h, 16, 8, name="c3")]), y], shapes={y: [1, 16, 8, 8]})
    model.graph.output[1].CopyFrom(
        helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 16, 8, 8])
    )
    groups = analyze_channels(load_model(model)).groups
    pinned = [g for g in groups if g.pinned and any("EfficientNMS_TRT" in r for r in g.pin_reasons)]
    assert pinned
    assert any(not g.pinned for g in groups)


def test_public_functions_accept_a_plainly_loaded_model(tmp_path):
    model = _small_cnn((1, 3, 8, 8))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    plain = onnx.load(path)
    groups = analyze_channels(plain).groups
    assert [g.size for g in groups] == [g.size for g in analyze_channels(load_model(plain)).groups]
    assert len(analyze_model(plain).layers) == 3
    free = [g for g in groups if not g.pinned]
    small = shrink_channels(plain, {g.id: np.arange(g.size // 2) for g in free})
    assert count_parameters(small) < count_parameters(plain)


def test_normalise_lifts_constants_collapses_identity_and_names_nodes():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    w = b.weight(8, 3, 3, 3)
    shared = b.op("Identity", [w])
    y = b.op("Add", [b.op("Conv", [x, shared]), b.op("Conv", [x, w])])
    model = weights_in_constants(b.model([y], ["y"]))
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    model.graph.node[-2].name = model.graph.node[-3].name
    out = normalise(model)
    ops = [n.op_type for n in out.graph.node]
    assert "Constant" not in ops and ops.count("Identity") == 1  # the output's Identity
    names = [n.name for n in out.graph.node]
    assert len(set(names)) == len(names) and all(names)
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(out, feeds)[0], run(reference, feeds)[0], rtol=1e-6)


def test_an_identity_of_an_initializer_read_in_nested_subgraphs_is_collapsed_there_too():
    """Readers of an Identity of an initializer inside an If inside an If read the initializer
    itself once the Identity is gone; the model computes what it did."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [3.0, 5.0])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])

    def branch(name: str, nodes: list) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            nodes[-1].output[0], TensorProto.FLOAT, [2])])  # fmt: skip

    inner = helper.make_node(
        "If", ["c"], ["in_out"],
        then_branch=branch("t2", [helper.make_node("Mul", ["x", "w_id"], ["t2"])]),
        else_branch=branch("e2", [helper.make_node("Add", ["x", "w_id"], ["e2"])]),
    )  # fmt: skip
    outer = helper.make_node(
        "If", ["c"], ["y"],
        then_branch=branch("t1", [inner]),
        else_branch=branch("e1", [helper.make_node("Sub", ["x", "w_id"], ["e1"])]),
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_id"]), outer],
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [y],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = normalise(model)
    assert [n.op_type for n in out.graph.node] == ["If"]
    onnx.checker.check_model(out, full_check=True)
    x = np.array([1.0, 2.0], np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_array_equal(run(out, feeds)[0], run(model, feeds)[0])
