"""Quantised models after reduction: `eval` runs what onnxruntime's quantize_static writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import random_images, write_npz
from graphs import Builder, dynamic_input_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, quantize_static
from processes import run as run_process

from onnx_mbs.calibration import CalibrationReader
from onnx_mbs.cli import main
from onnx_mbs.models import FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE
from onnx_mbs.passes import BadInputError
from onnx_mbs.pipeline import MacroblockScaling, reduce

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quantise.py"


@pytest.fixture(scope="module")
def quantised(tmp_path_factory, bundled_model_path):
    """The bundled model quantised by onnxruntime (static, calibrated on 256 training images)
    in both formats."""
    folder = tmp_path_factory.mktemp("int8")
    paths = {}
    for fmt in ("QDQ", "QOperator"):
        paths[fmt] = folder / f"{fmt}.onnx"
        reader = CalibrationReader(str(FMNIST_TRAIN_SAMPLE), bundled_model_path, limit=256)
        quantize_static(
            str(bundled_model_path), str(paths[fmt]), reader, quant_format=QuantFormat[fmt]
        )
    return paths


def _eval(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_the_qdq_model_is_within_a_point_of_float(bundled_model_path, quantised, capsys):
    ops = {n.op_type for n in onnx.load(str(quantised["QDQ"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    data = str(FMNIST_SAMPLE)
    float_top1 = _eval(capsys, str(bundled_model_path), "--data", data)["top1"]
    int8 = _eval(capsys, str(quantised["QDQ"]), "--data", data)
    assert int8["samples"] == 512
    assert float_top1 > 0.9
    assert abs(int8["top1"] - float_top1) <= 0.01


def test_eval_of_the_qoperator_model_and_teacher_agreement(bundled_model_path, quantised, capsys):
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(quantised["QOperator"])).graph.node}
    data = str(FMNIST_SAMPLE)
    float_top1 = _eval(capsys, str(bundled_model_path), "--data", data)["top1"]
    assert (
        abs(_eval(capsys, str(quantised["QOperator"]), "--data", data)["top1"] - float_top1) <= 0.01
    )
    # agreement of the int8 student with the float teacher, and of the float student with an
    # int8 teacher: no labels needed
    for student, teacher in (
        (quantised["QDQ"], bundled_model_path),
        (bundled_model_path, quantised["QOperator"]),
    ):
        result = _eval(capsys, str(student), "--teacher", str(teacher), "--data", data)
        (logits,) = result["outputs"].values()
        assert logits["top1"] >= 0.95
        assert 0 < logits["relative_error"] < 0.2  # close, yet int8 arithmetic


def test_reduce_and_retrain_still_refuse_a_quantised_model(quantised, tmp_path, capsys):
    for command in (
        ["reduce", str(quantised["QDQ"]), "-o", str(tmp_path / "r.onnx")],
        [
            "retrain",
            str(quantised["QDQ"]),
            "-o",
            str(tmp_path / "t.onnx"),
            "--data",
            str(FMNIST_SAMPLE),
        ],
    ):
        assert main(command) == 2
        assert "reduce the float model first, then quantize" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_calibration_reader_gives_the_models_preprocessed_input(bundled_model_path):
    reader = CalibrationReader(str(FMNIST_SAMPLE), bundled_model_path, batch_size=100, limit=250)
    assert len(reader) == 3
    batches = list(iter(reader.get_next, None))
    assert [b["input"].shape for b in batches] == [
        (100, 1, 28, 28),
        (100, 1, 28, 28),
        (50, 1, 28, 28),
    ]
    with np.load(FMNIST_SAMPLE) as npz:
        x = npz["x"][:100]
    np.testing.assert_allclose(batches[0]["input"], (x / 255 - 0.286041) / 0.353024, atol=1e-5)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], batches[0]["input"])


def test_quantise_example_never_overwrites_its_input_and_refuses_in_one_line(
    bundled_model_path, quantised, tmp_path
):
    """examples/quantise.py small.onnx small.onnx (or ./small.onnx) replaced the float model by
    its int8 form; a model quantised already raised a QuantizedModelError traceback."""
    model = tmp_path / "small.onnx"
    model.write_bytes(bundled_model_path.read_bytes())
    before = model.read_bytes()
    runs = [
        [str(model), str(tmp_path / "." / "small.onnx")],
        [str(quantised["QDQ"]), str(tmp_path / "again.onnx")],
    ]
    errors = []
    for args in runs:
        done = run_process(
            [sys.executable, str(EXAMPLE), *args, "--data", str(FMNIST_SAMPLE), "--limit", "8"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        errors.append(done.stderr)
    assert "which this run reads" in errors[0] and "quantized graph" in errors[1]
    assert model.read_bytes() == before
    assert not (tmp_path / "again.onnx").exists()


def test_a_model_with_dynamic_height_and_width_is_calibrated_at_the_given_size(tmp_path):
    """A reduced model keeps the original's dynamic H and W; CalibrationReader refused it with
    advice to give input_shapes=..., which neither it nor examples/quantise.py took."""
    model = tmp_path / "dyn.onnx"
    onnx.save(dynamic_input_model(), model)
    data = write_npz(tmp_path / "rgb.npz", **random_images(8, (3, 24, 20), labels=False))
    with pytest.raises(BadInputError, match="input_shapes="):
        CalibrationReader(data, model)
    reader = CalibrationReader(data, model, batch_size=4, input_shapes={"input": [1, 3, 24, 20]})
    assert [b["input"].shape for b in iter(reader.get_next, None)] == [(4, 3, 24, 20)] * 2
    out = tmp_path / "dyn.int8.onnx"
    done = run_process(
        [sys.executable, str(EXAMPLE), str(model), str(out), "--data", data]
        + ["--input-shape", "input:1,3,24,20"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """`model` with its input and output batch fixed to `batch`."""
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return model


@pytest.mark.parametrize("batch", [1, 8])
def test_calibration_reader_follows_a_fixed_batch(bundled_model_path, tmp_path, batch):
    """A model whose input fixes the batch runs only at that batch: the reader gives batches of
    it (the last one padded by repeating its last sample), so quantize_static can run it."""
    path = tmp_path / f"b{batch}.onnx"
    onnx.save(_with_batch(onnx.load(str(bundled_model_path)), batch), path)
    reader = CalibrationReader(str(FMNIST_SAMPLE), path, limit=20)
    batches = [b["input"] for b in iter(reader.get_next, None)]
    assert len(reader) == len(batches) == -(-20 // batch)
    assert {b.shape for b in batches} == {(batch, 1, 28, 28)}
    fed = np.concatenate(batches)
    with np.load(FMNIST_SAMPLE) as npz:
        x = (npz["x"][:20] / 255 - 0.286041) / 0.353024
    np.testing.assert_allclose(fed[:20], x, atol=1e-5)
    np.testing.assert_array_equal(fed[20:], np.repeat(fed[19:20], len(fed) - 20, axis=0))
    reader.rewind()
    quantize_static(str(path), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}


def test_a_calibration_readers_padding_is_not_measured(bundled_model_path, tmp_path):
    """Given to reduce (or the pass, which replays it), the reader's last batch of a fixed
    batch of 8 repeats sample 20 four times to fill it: counted, 24 samples were reported and
    the statistics weighed the copies. Only the 20 real samples are measured."""
    path = tmp_path / "b8.onnx"
    onnx.save(_with_batch(onnx.load(str(bundled_model_path)), 8), path)
    reader = CalibrationReader(str(FMNIST_SAMPLE), path, limit=20)
    assert reader.samples == 20
    options = {"budget": "params=0.5", "evaluate_accuracy": False, "progress": False}
    _, report = reduce(str(path), reader, **options)
    assert report.samples == 20
    reader.rewind()
    result = MacroblockScaling(reader, **options)(onnx.load(str(path)))
    assert result.analyses["mbs"].samples == 20


def test_calibration_reader_refuses_another_batch_than_the_fixed_one(bundled_model_path, tmp_path):
    path = tmp_path / "b8.onnx"
    onnx.save(_with_batch(onnx.load(str(bundled_model_path)), 8), path)
    with pytest.raises(BadInputError, match="fixes its batch at 8; batch_size=100 cannot run"):
        CalibrationReader(str(FMNIST_SAMPLE), path, batch_size=100)


def _image_and_scale() -> onnx.ModelProto:
    """input (N, 1, 8, 8) * scale (N, 1, 1, 1) -> Conv 3x3 (4 ch) -> Relu: two inputs."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w"
    )
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "image_and_scale",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["n", 1, 1, 1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_calibration_reader_feeds_every_input_of_model_ready_data(tmp_path):
    """A model-ready npz for a two-input model: each batch holds both inputs, as they are."""
    path = tmp_path / "two.onnx"
    onnx.save(_image_and_scale(), path)
    rng = np.random.default_rng(0)
    x = rng.random((10, 1, 8, 8), dtype=np.float32)
    scale = rng.uniform(0.5, 2, (10, 1, 1, 1)).astype(np.float32)
    np.savez(tmp_path / "ready.npz", input=x, scale=scale)
    reader = CalibrationReader(str(tmp_path / "ready.npz"), path, batch_size=4)
    batches = list(iter(reader.get_next, None))
    assert [sorted(b) for b in batches] == [["input", "scale"]] * 3
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["scale"] for b in batches]), scale)
    reader.rewind()
    quantize_static(str(path), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ)


def test_retrain_refuses_a_quantised_teacher_saying_to_give_the_float_one(
    bundled_model_path, quantised, tmp_path, capsys
):
    """`retrain --teacher int8.onnx` was refused with reduce's advice ("reduce the float model
    first, then quantize"), which does not apply to a teacher, and from Python the bridge's
    refusal did not say that the teacher was the model it could not run."""
    out = tmp_path / "t.onnx"
    command = ["retrain", str(bundled_model_path), "-o", str(out), "--data", str(FMNIST_SAMPLE)]
    assert main([*command, "--teacher", str(quantised["QDQ"]), "--limit", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reduce the float model first" not in err
    assert "teacher" in err and "DequantizeLinear" in err and "float model" in err
    assert not out.exists()
    from onnx_mbs.bridge import retrain

    with np.load(FMNIST_SAMPLE) as npz:
        x = ((npz["x"][:8] / 255 - 0.286041) / 0.353024).astype(np.float32)
        y = npz["y"][:8]
    with pytest.raises(BadInputError, match="teacher .*QuantizeLinear.*float model"):
        retrain(
            onnx.load(str(bundled_model_path)),
            (x, y),
            teacher=onnx.load(str(quantised["QOperator"])),
            progress=False,
        )


def _matmul_nbits_model() -> onnx.ModelProto:
    """A conv and two MatMuls, the MatMuls quantised to 4 bits by onnxruntime (MatMulNBits)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    b = Builder("mm")
    h = b.op("Relu", [b.conv(b.input("x", [1, 3, 8, 8]), 3, 16)])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    h = b.op("Relu", [b.op("MatMul", [h, b.weight(16, 64)])])
    quantizer = MatMulNBitsQuantizer(
        b.model([b.op("MatMul", [h, b.weight(64, 10)])]), block_size=16
    )
    quantizer.process()
    model = quantizer.model.model
    assert {n.op_type for n in model.graph.node} >= {"MatMulNBits"}
    return model


def test_a_matmul_nbits_model_is_refused_as_quantized_and_still_evaluated(tmp_path, capsys):
    """MatMulNBits (onnxruntime's 4-bit weight-only quantisation) holds its weights as packed
    uint8 bytes: `analyze` exited 0 counting its float scales as the layers' parameters (552
    here, of the float model's 2112) and none of their MACs. It is a quantized graph: refused
    by analyze and reduce, run by eval."""
    model = _matmul_nbits_model()
    path = tmp_path / "q4.onnx"
    onnx.save(model, str(path))
    for command in (["analyze", str(path)], ["reduce", str(path), "-o", str(tmp_path / "r.onnx")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "quantized graph (com.microsoft:MatMulNBits)" in err, err
    assert not (tmp_path / "r.onnx").exists()
    data = write_npz(tmp_path / "d.npz", **random_images(8, (3, 8, 8)))
    assert _eval(capsys, str(path), "--data", data)["samples"] == 8


def test_count_parameters_refuses_a_quantized_graph_as_analyze_does(quantised) -> None:
    """`count_parameters` from Python counted a MatMulNBits model's float scales as its
    layers' parameters (and a QDQ model's scales and zero points), where the CLI and
    `analyze_model` refuse the model as quantized; it refuses it with their message."""
    from onnx_mbs.passes import QuantizedModelError, analyze_model, count_parameters

    for model, ops in [
        (_matmul_nbits_model(), "com.microsoft:MatMulNBits"),
        (onnx.load(str(quantised["QDQ"])), "DequantizeLinear"),
    ]:
        for count in (count_parameters, analyze_model):
            with pytest.raises(QuantizedModelError, match=f"quantized graph \\(.*{ops}"):
                count(model)
