"""onnx_mbs.interop.olive with the real Olive: the example workflow, and an external-data model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import run
from processes import run as run_process

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # read when Olive is imported

from onnx_mbs.interop.olive import (  # noqa: E402
    DATASET_NAME,
    PASS_NAME,
    MacroblockScaling,
    package_config,
)
from onnx_mbs.passes import count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _check_smaller(small: onnx.ModelProto, original: onnx.ModelProto, fraction: float) -> None:
    onnx.checker.check_model(small, full_check=True)
    assert [i.name for i in small.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in small.graph.output] == [o.name for o in original.graph.output]
    assert count_parameters(small) == pytest.approx(count_parameters(original) * fraction, rel=0.05)
    for batch in (1, 3):
        (y,) = run(small, {small.graph.input[0].name: np.zeros((batch, 1, 28, 28), np.float32)})
        assert y.shape == (batch, 10)


def test_olive_example_reduces_then_quantises(bundled_model_path, tmp_path):
    """examples/olive_workflow.py as a user runs it: a reduced model, then its int8 QDQ form."""
    out = tmp_path / "olive"
    done = run_process(
        [sys.executable, "examples/olive_workflow.py", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    original = onnx.load(str(bundled_model_path))
    reduced = onnx.load(str(out / "reduced" / "model.onnx"))
    _check_smaller(reduced, original, 0.5)
    assert (out / "reduced" / "model.onnx").stat().st_size < 0.6 * bundled_model_path.stat().st_size
    int8 = onnx.load(str(out / "int8" / "model.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # the int8 model is the reduced one quantised: the same Conv weight shapes
    shapes = {t.name: list(t.dims) for t in reduced.graph.initializer if len(t.dims) == 4}
    quantised = {t.name: list(t.dims) for t in int8.graph.initializer if len(t.dims) == 4}
    assert sorted(shapes.values()) == sorted(
        v for k, v in quantised.items() if k.endswith("_quantized")
    )
    # the preprocessing travels on through both passes
    meta = {p.key: p.value for p in int8.metadata_props}
    assert meta["onnx_mbs.mean"] == "0.286041"


def test_olive_pass_reduces_an_external_data_model(bundled_external, bundled_model_path, tmp_path):
    from olive.workflows import run as olive_run

    olive_run(
        {
            "input_model": {"type": "ONNXModel", "model_path": str(bundled_external)},
            "passes": {"mbs": {"type": PASS_NAME, "budget": "flops=0.6"}},
            "output_dir": str(tmp_path / "out"),
            "cache_dir": str(tmp_path / "cache"),
            "log_severity_level": 3,
        },
        package_config=package_config(),
    )
    small = onnx.load(str(tmp_path / "out" / "model.onnx"))
    report = MacroblockScaling.last_report
    assert report.plan.reached["flops"] == pytest.approx(0.6, abs=0.03)
    assert count_parameters(small) == report.plan.params[1]
    original = onnx.load(str(bundled_model_path))
    _check_smaller(small, original, report.plan.params[1] / count_parameters(original))


def test_olive_package_config_keeps_olives_passes_and_dataset_reads_the_data(
    bundled_model_path, fmnist_sample
):
    passes = package_config()["passes"]
    assert PASS_NAME in passes and "OnnxStaticQuantization" in passes
    from olive.data.registry import Registry

    samples = Registry.get_load_dataset_component(DATASET_NAME)(
        data=str(bundled_model_path.parent / "fmnist_sample.npz"),
        model_path=str(bundled_model_path),
        limit=4,
    )
    x, y = fmnist_sample
    assert [label for _, label in samples] == y[:4].tolist()
    first = samples[0][0]["input"].numpy()
    np.testing.assert_allclose(first, (x[0] / 255 - 0.286041) / 0.353024, atol=1e-5)


def test_olive_pass_bad_input_is_raised_not_swallowed(bundled_model_path, tmp_path):
    """Olive re-raises ValueErrors (onnx-mbs's BadInputError is one): no empty output, and
    no report: an earlier run's, left in last_report, read as the failed run's."""
    from olive.workflows import run as olive_run

    from onnx_mbs.passes import BadInputError

    MacroblockScaling.last_report = "the report of an earlier run"
    with pytest.raises(BadInputError, match="budget"):
        olive_run(
            {
                "input_model": {"type": "ONNXModel", "model_path": str(bundled_model_path)},
                "passes": {"mbs": {"type": PASS_NAME, "budget": "params=2"}},
                "output_dir": str(tmp_path / "out"),
                "cache_dir": str(tmp_path / "cache"),
                "log_severity_level": 4,
            },
            package_config=package_config(),
        )
    assert not list((tmp_path / "out").glob("*.onnx"))
    assert MacroblockScaling.last_report is None


def test_olive_dataset_reads_a_model_with_dynamic_height_and_width_at_the_given_size(tmp_path):
    """The MBS pass takes input_shapes; the dataset that calibrates the quantisation after it
    refused the reduced model (dynamic H, W kept) with advice to give input_shapes=."""
    from conftest import random_images, write_npz
    from graphs import dynamic_input_model
    from olive.data.registry import Registry

    model = tmp_path / "dyn.onnx"
    onnx.save(dynamic_input_model(), model)
    data = write_npz(tmp_path / "rgb.npz", **random_images(3, (3, 24, 20), labels=False))
    samples = Registry.get_load_dataset_component(DATASET_NAME)(
        data=data, model_path=str(model), input_shapes={"input": [1, 3, 24, 20]}
    )
    assert [tuple(x["input"].shape) for x, _ in samples] == [(3, 24, 20)] * 3
