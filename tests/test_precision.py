"""fp16 / bf16 graphs retrain with float32 master weights and are written back in their dtype."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from onnx_mbs import reduce
from onnx_mbs.bridge import OnnxModule, retrain
from onnx_mbs.bridge.precision import as_float32, is_low_precision
from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE
from onnx_mbs.passes import count_parameters

torch.set_num_threads(1)


def in_dtype(model: onnx.ModelProto, dtype: int, stored: bool | None = None) -> onnx.ModelProto:
    """fp16: every float initializer and the graph I/O in fp16 (an fp16 export). bf16: weights
    stored in bf16 and Cast to float before use (opset 17 Conv has no bf16). `stored=True`
    gives fp16 that form too (weight-only fp16: float I/O, each weight Cast before use)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    stored = dtype == TensorProto.BFLOAT16 if stored is None else stored
    casts = []
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(t).astype(np_dtype)
            name = t.name + "_stored" if stored else t.name
            if stored:
                casts.append(onnx.helper.make_node("Cast", [name], [t.name], to=1))
            t.CopyFrom(numpy_helper.from_array(value, name))
    if not stored:
        for v in [*out.graph.input, *out.graph.output]:
            v.type.tensor_type.elem_type = dtype
    nodes = casts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.fixture(scope="module")
def data(fmnist_train_sample) -> tuple:
    x, y = fmnist_train_sample
    meta = {p.key: p.value for p in onnx.load(BUNDLED_MODEL).metadata_props}
    mean, std = float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])
    return ((x[:256] / 255.0 - mean) / std).astype(np.float32), y[:256]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["fp16", "bf16"])
def test_low_precision_retrains_in_float32_and_keeps_its_dtype(data, dtype) -> None:
    model = in_dtype(onnx.load(BUNDLED_MODEL), dtype)
    assert is_low_precision(model) and not is_low_precision(as_float32(model))
    x, y = data
    result = retrain(model, (x, y), epochs=1, lr=0.01, batch_size=32, progress=False)
    written = result.model
    onnx.checker.check_model(written, full_check=True)
    assert [(t.name, t.data_type) for t in written.graph.initializer] == [
        (t.name, t.data_type) for t in model.graph.initializer
    ]
    assert written.graph.input == model.graph.input and written.graph.output == model.graph.output
    # Training moved weights by far less than one fp16 step in places: the master weights are
    # float32, so the written weights differ from a start that only rounding would keep.
    changed = [
        t.name
        for t, o in zip(written.graph.initializer, model.graph.initializer, strict=True)
        if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(o))
    ]
    assert len(changed) > len(model.graph.initializer) // 2
    # The written graph computes what the trained float32 weights compute, within its precision.
    ours = OnnxModule(as_float32(written)).eval()
    with torch.no_grad():
        expected = ours(torch.from_numpy(x[:64])).numpy()
    if dtype == TensorProto.FLOAT16:  # onnxruntime's CPU kernels run fp16, not bf16
        session = ort.InferenceSession(
            written.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        got = session.run(None, {"input": x[:64].astype(np.float16)})[0]
        assert got.dtype == np.float16
        np.testing.assert_allclose(
            got.astype(np.float32), expected, atol=0.05 * np.abs(expected).max()
        )
        assert (got.argmax(1) == expected.argmax(1)).mean() > 0.95


def _rounded_through(model: onnx.ModelProto, dtype: int) -> onnx.ModelProto:
    """`model` in float32 holding what `in_dtype(model, dtype, stored=True)` computes with."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(t).astype(np_dtype).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    return out


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["fp16", "bf16"])
def test_weights_stored_behind_casts_reduce_as_their_float_twin(data, dtype) -> None:
    """Weight-only fp16/bf16 (every weight stored low and Cast to float before use): planned
    as the float model holding the same values, every parameter counted, and written with
    each weight stored as it was (cut behind its Cast), not turned into a float32 constant."""
    model = onnx.load(BUNDLED_MODEL)
    stored = in_dtype(model, dtype, stored=True)
    options = {"budget": "params=0.5", "strategy": "mbs", "importance": "l2", "progress": False}
    small, report = reduce(stored, **options)
    twin_small, twin = reduce(_rounded_through(model, dtype), **options)
    assert report.plan.params == twin.plan.params
    assert report.plan.params[0] == count_parameters(model) == count_parameters(stored)
    assert report.plan.counts == twin.plan.counts and report.plan.changes_anything
    assert count_parameters(small) == report.plan.params[1]
    _assert_stored_as(small, stored, "Cast", twin_small, data[0][:16])


def _assert_stored_as(
    small: onnx.ModelProto, stored: onnx.ModelProto, op: str, want: onnx.ModelProto, x
) -> None:
    """`small` is valid, stores every weight in `stored`'s dtype behind its `op` node, and
    computes what `want` computes on `x` (within float32 rounding: onnxruntime folds Casts of
    constants, not CastLikes)."""
    onnx.checker.check_model(small, full_check=True)
    assert {t.name: t.data_type for t in small.graph.initializer} == {
        t.name: t.data_type for t in stored.graph.initializer
    }
    assert sum(n.op_type == op for n in small.graph.node) == len(stored.graph.initializer)
    got = ort.InferenceSession(small.SerializeToString()).run(None, {"input": x})[0]
    expected = ort.InferenceSession(want.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fp16_conversion_with_fp32_batchnorm_is_measured_and_kept_in_its_dtypes() -> None:
    """onnxruntime's fp16 conversion as a deployment engineer runs it: float I/O
    (keep_io_types), BatchNorm kept in float32 (Casts around it), the Casts appended after
    the nodes that read them. Read in order, measured on the data like the float model (the
    activation after each conv is found through the Casts), written in its own dtypes."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(BUNDLED_MODEL)
    mixed = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=["BatchNormalization"]
    )
    small, report = reduce(mixed, str(FMNIST_SAMPLE), budget="params=0.5", progress=False)
    _, plain = reduce(model, str(FMNIST_SAMPLE), budget="params=0.5", progress=False)
    assert report.samples == plain.samples == 512
    assert all(report.activation.values())
    assert report.rho == pytest.approx(plain.rho, abs=0.01)
    onnx.checker.check_model(small, full_check=True)
    dtypes = {t.name: t.data_type for t in mixed.graph.initializer}
    written = {t.name: t.data_type for t in small.graph.initializer}
    assert set(written.values()) == {TensorProto.FLOAT, TensorProto.FLOAT16}
    assert all(dtypes[name] == dtype for name, dtype in written.items())
    assert _io_types(small) == _io_types(mixed)


def _io_types(model: onnx.ModelProto) -> list[tuple[str, int]]:
    graph = model.graph
    return [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]]


def test_a_weight_stored_wider_than_it_is_used_keeps_its_stored_values() -> None:
    """A float32 weight Cast to fp16 for an fp16 conv is read as stored: narrowed for the
    analysis and widened back, it would be written rounded to fp16 (the same function, other
    stored values)."""
    model = in_dtype(onnx.load(BUNDLED_MODEL), TensorProto.FLOAT16)
    graph = model.graph
    stem = next(t for t in graph.initializer if t.name == "stem.0.weight")
    wide = numpy_helper.to_array(stem).astype(np.float32) + np.float32(1e-4)  # not fp16 values
    stem.CopyFrom(numpy_helper.from_array(wide, "stem.0.weight_fp32"))
    cast = onnx.helper.make_node("Cast", [stem.name], ["stem.0.weight"], to=TensorProto.FLOAT16)
    nodes = [cast, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    small, report = reduce(model, budget="params=0.5", strategy="mbs", progress=False)
    assert report.plan.changes_anything
    (written,) = [t for t in small.graph.initializer if t.name == stem.name]
    assert written.data_type == TensorProto.FLOAT and list(written.dims) == list(stem.dims)
    np.testing.assert_array_equal(numpy_helper.to_array(written), wide)


def test_weights_stored_behind_castlike_reduce_as_behind_cast(data) -> None:
    """CastLike(weight, input), as torch's dynamo exporter writes `weight.type_as(x)`, is the
    Cast to the input's type: weight-only fp16 stored that way had its BatchNorm statistics
    counted as parameters (273.75K for 272.19K) and every channel group pinned ('budget
    params=0.5 cannot be reached'). Now planned, cut and written as the Cast form is."""
    model = onnx.load(BUNDLED_MODEL)
    stored = in_dtype(model, TensorProto.FLOAT16, stored=True)
    like = onnx.ModelProto()
    like.CopyFrom(stored)
    for node in like.graph.node:
        if node.op_type == "Cast":
            node.op_type = "CastLike"
            del node.attribute[:]
            node.input.append("input")
    assert count_parameters(like) == count_parameters(model)
    options = {"budget": "params=0.5", "strategy": "mbs", "importance": "l2", "progress": False}
    small, report = reduce(like, **options)
    cast_small, cast = reduce(stored, **options)
    assert report.plan.params == cast.plan.params and report.plan.counts == cast.plan.counts
    _assert_stored_as(small, like, "CastLike", cast_small, data[0][:16])
