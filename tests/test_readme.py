"""The README's Python example runs as written (on the bundled model and sample)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

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


@pytest.mark.slow  # two 2-epoch retrainings and two reductions: minutes on 2 cores
def test_quick_start_runs_as_written(tmp_path):
    """The Quick start's bash block, unchanged, in a fresh folder: `models/` is the project's,
    `.venv/bin/activate` puts this interpreter's scripts first on PATH."""
    text = README.read_text()
    block = re.search(r"## Quick start\n+```bash\n(.*?)```", text, re.S).group(1)
    (tmp_path / "models").symlink_to(README.parent / "models")
    activate = tmp_path / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    done = subprocess.run(
        ["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=3000
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    for name in (
        "small.onnx",
        "small.ft.onnx",
        "folded.onnx",
        "folded_small.onnx",
        "small.kd.onnx",
    ):
        assert (out / name).is_file(), name
    assert (out / "report" / "widths.png").is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 2048
    # the BN-folded graph really has no BatchNorm, and its reduction kept it so
    for name in ("folded.onnx", "folded_small.onnx", "small.kd.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
        assert "BatchNormalization" not in ops and "Conv" in ops, name
    assert "agreement with the teacher on 512 samples" in done.stdout
    top1 = re.findall(r"top-1 (\d+\.\d+)%", done.stdout)
    assert len(top1) == 2 and float(top1[1]) > 85  # eval of small.ft.onnx after retraining
