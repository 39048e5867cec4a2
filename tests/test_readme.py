"""The README is a front page whose links lead somewhere, and the Python examples of the
README and of docs/python.md run as written (on the bundled model and sample)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import onnx
import pytest
from processes import run as run_process

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@pytest.mark.parametrize("page", ["README.md", "docs/python.md"])
def test_python_example_runs(page, bundled_model_path, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks, f"{page} has a Python example"
    code = blocks[0]
    model = tmp_path / "model.onnx"
    model.write_bytes(bundled_model_path.read_bytes())
    (tmp_path / "calib.npz").write_bytes(
        (bundled_model_path.parent / "fmnist_sample.npz").read_bytes()
    )
    code = code.replace('"calib/"', '"calib.npz"')
    code = code.replace("[1, 3, 224, 224]", "[1, 1, 28, 28]")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, page, "exec"), {})
    assert (tmp_path / "small.onnx").exists()


def test_readme_is_a_front_page_whose_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for heading in ("## Set-up", "## Quick start", "## Limits", "## Where to read on"):
        assert heading in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert "docs/design.md" in local
    for link in local:
        assert (ROOT / link).exists(), link
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not link.startswith("http"):
                assert (page.parent / link).exists(), (page.name, link)


@pytest.mark.slow  # two 2-epoch retrainings and two reductions: minutes on 2 cores
def test_quick_start_runs_as_written(tmp_path):
    """The Quick start's bash block, unchanged, in a fresh folder: `models/` is the project's,
    `.venv/bin/activate` puts this interpreter's scripts first on PATH."""
    block = re.search(r"## Quick start\n+```bash\n(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "models").symlink_to(ROOT / "models")
    activate = tmp_path / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    done = run_process(
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
