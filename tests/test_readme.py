"""The README is a front page whose links lead somewhere, and the Python examples of the
README and of docs/python.md run as written (on the bundled model and sample)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
