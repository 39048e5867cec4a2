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


def test_data_md_quotes_the_refusal_as_printed(bundled_model_path, tmp_path, monkeypatch, capsys):
    """docs/data.md's example refusal of a model-ready npz is the line the command prints (it
    quoted it without the `error:` every refusal carries)."""
    import numpy as np

    from onnx_mbs.cli import main

    text = (ROOT / "docs" / "data.md").read_text()
    quoted = re.search(r"for example:\n\n((?:    .*\n)+)", text).group(1)
    quoted = " ".join(line.strip() for line in quoted.splitlines())
    np.savez(tmp_path / "ready.npz", input=np.zeros((4, 1, 28, 28)), y=np.zeros(4, np.int64))
    monkeypatch.chdir(tmp_path)
    assert main(["reduce", str(bundled_model_path), "--data", "ready.npz", "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == quoted


def test_bench_readme_lists_every_benchmark_and_its_links_exist():
    """bench/README.md is "every benchmark, its cost and its full table": each bench/*.py has
    a row (importance.py, gpu.py and stats_profile.py had none), and its links lead somewhere."""
    page = ROOT / "bench" / "README.md"
    text = page.read_text()
    listed = set(re.findall(r"^\| `([\w]+\.py)` \|", text, re.M))
    scripts = {path.name for path in (ROOT / "bench").glob("*.py")}
    assert scripts <= listed, sorted(scripts - listed)
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (page.parent / link).exists(), link


def test_design_layers_name_every_module():
    """docs/design.md's Layers block names every module of passes/ and onnx_mbs/ (and
    onnx_mbs's packages), so a new module is placed in the design (dense_maps was not)."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = re.search(r"## Layers\n+```\n(.*?)```", text, re.S).group(1)
    named = set(re.findall(r"[A-Za-z_]+", block))
    for folder in ("passes", "onnx_mbs"):
        modules = {p.stem for p in (ROOT / folder).glob("*.py") if not p.stem.startswith("__")}
        packages = {p.parent.name for p in (ROOT / folder).glob("*/__init__.py")}
        assert not (modules | packages) - named, (folder, sorted((modules | packages) - named))


def _heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+ (.*)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_to_a_heading_find_it():
    """A link with an anchor (`retrain.md#the-papers-regime`) leads to a heading of that page:
    the file check above ignores anchors, and a renamed heading breaks them silently."""
    for page in [README, ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#]*)#([^)]+)\)", page.read_text()):
            path, anchor = link
            if path.startswith("http"):
                continue
            target = (page.parent / path).resolve() if path else page
            assert anchor in _heading_anchors(target), (page.name, f"{path}#{anchor}")
