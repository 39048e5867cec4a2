"""The `onnx-mbs` command as a deployment engineer meets it: its entry point, flags that would
be accepted and ignored, and what it prints where."""

from __future__ import annotations

import importlib.abc
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_mbs.console import main as console_main

ROOT = Path(__file__).resolve().parent.parent


class _InterruptedImport(importlib.abc.MetaPathFinder):
    """Ctrl-C landing while `module` is imported (the command's imports take a second or more)."""

    def __init__(self, module: str) -> None:
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name == self.module:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_command_loads_gives_one_line_and_130(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "onnx_mbs.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport("onnx_mbs.cli"), *sys.meta_path])
    assert console_main(["analyze", "m.onnx"]) == 130
    err = capsys.readouterr().err
    assert err == "onnx-mbs: interrupted; nothing written\n"


def test_the_entry_points_load_nothing_heavy_before_they_can_catch_ctrl_c():
    assert 'onnx-mbs = "onnx_mbs.console:main"' in (ROOT / "pyproject.toml").read_text()
    assert "from onnx_mbs.console import main" in (ROOT / "onnx_mbs" / "__main__.py").read_text()
    code = "import sys, onnx_mbs.console; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"onnx", "numpy", "onnx_mbs.cli", "onnx_mbs.passes"} & set(out.stdout.split())


def test_console_main_runs_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        console_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("onnx-mbs ")
