"""The README's Python example runs as written (on the bundled model and sample)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(bundled_model_path, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has a Python example"
    code = blocks[0]
    model = tmp_path / "model.onnx"
    model.write_bytes(bundled_model_path.read_bytes())
    (tmp_path / "calib.npz").write_bytes(
        (bundled_model_path.parent / "fmnist_sample.npz").read_bytes()
    )
    code = code.replace('"calib/"', '"calib.npz"')
    code = code.replace("[1, 3, 224, 224]", "[1, 1, 28, 28]")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "small.onnx").exists()
