"""The base install (no optional extra): what needs torch or an interop package refuses in
one line naming the extra to install, the command line with exit code 2.

Each test hides a package as an environment without it has none (`sys.modules[name] = None`
makes its import fail) and drops onnx-mbs's modules that import it, so they are imported
anew; monkeypatch puts every module back after the test."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from onnx_mbs.cli import main
from onnx_mbs.passes import MissingExtraError

_TORCH_LINE = "pip install 'onnx-mbs[torch]'"


@pytest.fixture
def without(monkeypatch):
    """without(package, *prefixes): `package` not installed, and the modules named by
    `prefixes` (with their submodules) not imported yet."""

    def hide(package: str, *prefixes: str) -> None:
        monkeypatch.setitem(sys.modules, package, None)
        for name in list(sys.modules):
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                monkeypatch.delitem(sys.modules, name)

    return hide


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_retrain_without_torch_refuses_in_one_line(without, bundled_model_path, tmp_path, capsys):
    """It was a ModuleNotFoundError traceback (exit 1) from onnx_mbs/bridge/module.py."""
    without("torch", "onnx_mbs.bridge")
    out = tmp_path / "r.onnx"
    data = bundled_model_path.parent / "fmnist_train_sample.npz"
    argv = ["retrain", str(bundled_model_path), "--data", str(data), "-o", str(out)]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert line.startswith("onnx-mbs: error: retrain (and reduce --recalibrate) needs torch")
    assert _TORCH_LINE in line
    assert not out.exists()


def test_reduce_recalibrate_without_torch_refuses_before_reducing(
    without, bundled_model_path, tmp_path, capsys
):
    without("torch", "onnx_mbs.bridge")
    out = tmp_path / "s.onnx"
    data = bundled_model_path.parent / "fmnist_sample.npz"
    argv = ["reduce", str(bundled_model_path), "--data", str(data), "-o", str(out)]
    assert main([*argv, "--recalibrate", "--limit", "64"]) == 2
    assert _TORCH_LINE in _one_line(capsys)
    assert not out.exists()


def test_python_retrain_without_torch_names_the_extra(without):
    import onnx_mbs

    without("torch", "onnx_mbs.bridge")
    with pytest.raises(MissingExtraError, match=r"onnx_mbs\.bridge .* needs torch") as caught:
        onnx_mbs.retrain  # noqa: B018  (the lazy attribute imports the bridge)
    assert _TORCH_LINE in str(caught.value)
    assert isinstance(caught.value, ImportError)  # what `except ImportError` expects


def test_commands_without_torch_run(without, bundled_model_path, capsys):
    """analyze and eval (reduce: tests/test_cli.py) import no torch: the base install runs them."""
    without("torch", "onnx_mbs.bridge")
    data = bundled_model_path.parent / "fmnist_sample.npz"
    assert main(["analyze", str(bundled_model_path)]) == 0
    assert main(["eval", str(bundled_model_path), "--data", str(data), "--limit", "32"]) == 0
    assert "torch" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "package", "shown"),
    [
        ("ir_pass", "onnx_ir", "onnx-ir"),
        ("polygraphy", "polygraphy", "polygraphy"),
        ("graphsurgeon", "onnx_graphsurgeon", "onnx-graphsurgeon"),
    ],
)
def test_interop_doors_without_their_package_name_the_extra(without, module, package, shown):
    without(package, f"onnx_mbs.interop.{module}")
    with pytest.raises(MissingExtraError) as caught:
        importlib.import_module(f"onnx_mbs.interop.{module}")
    message = str(caught.value)
    assert message.startswith(f"onnx_mbs.interop needs {shown}: pip install 'onnx-mbs[interop]'")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("module", "package", "shown"),
    [
        ("ir_pass", "onnx_ir", "onnx-ir"),
        ("polygraphy", "polygraphy", "polygraphy"),
        ("graphsurgeon", "onnx_graphsurgeon", "onnx-graphsurgeon"),
    ],
)
def test_interop_doors_with_a_broken_package_name_the_extra(
    without, monkeypatch, tmp_path, module, package, shown
):
    """An installed package that fails to import other than by ImportError (onnx-graphsurgeon
    0.5.5 and 0.5.6 under onnx 1.23: "module 'onnx.helper' has no attribute
    'float32_to_bfloat16'") gave its AttributeError as a traceback; one line now, naming it."""
    broken = tmp_path / package
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "raise AttributeError(\"module 'onnx.helper' has no attribute 'float32_to_bfloat16'\")\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    without(package, f"onnx_mbs.interop.{module}")
    monkeypatch.delitem(sys.modules, package)
    with pytest.raises(MissingExtraError) as caught:
        importlib.import_module(f"onnx_mbs.interop.{module}")
    message = str(caught.value)
    assert message.startswith(f"onnx_mbs.interop needs {shown}: pip install 'onnx-mbs[interop]'")
    assert "float32_to_bfloat16" in message
    assert "\n" not in message


def test_olive_without_torch_names_torch(without):
    """It said "needs olive-ai: pip install 'onnx-mbs[olive]'" whatever was missing; torch is
    (olive-ai asks for it, unpinned: the torch extra installs the pinned one, first)."""
    if importlib.util.find_spec("olive") is None:
        pytest.skip("olive-ai is not installed")
    without("torch", "onnx_mbs.interop.olive", "olive", "torchvision", "torchmetrics")
    with pytest.raises(MissingExtraError) as caught:
        importlib.import_module("onnx_mbs.interop.olive")
    message = str(caught.value)
    assert message.startswith("onnx_mbs.interop needs torch: pip install 'onnx-mbs[torch]'")
    assert "\n" not in message


def test_olive_imports_without_torchvision(without, monkeypatch):
    """torchvision is no dependency of Olive (torchmetrics imports it only where it is
    installed), yet its absence refused the Olive pass: "needs olive-ai: pip install
    'onnx-mbs[olive]' (No module named 'torchvision')", with olive-ai installed. It is
    imported (next to the CPU torch) only where it is installed."""
    if importlib.util.find_spec("olive") is None:
        pytest.skip("olive-ai is not installed")
    from onnx_mbs.models import torchvision_cpu

    torchvision_cpu.import_torchvision()  # as installed here, for Olive's own imports

    def absent():
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr(torchvision_cpu, "import_torchvision", absent)
    without("torchvision_absent_marker", "onnx_mbs.interop.olive")
    olive_pass = importlib.import_module("onnx_mbs.interop.olive")
    assert olive_pass.PASS_NAME == "MacroblockScaling"
