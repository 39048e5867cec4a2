"""The layering docs/design.md promises: passes are framework-neutral, torch stays in the bridge."""

from __future__ import annotations

import sys

import pytest
from processes import run as run_process


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = run_process([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_passes_import_neither_onnxruntime_nor_torch():
    modules = _imported_after(
        "import onnx_mbs.passes, onnx_mbs.passes.channel_groups, onnx_mbs.passes.shrink, "
        "onnx_mbs.passes.cost, onnx_mbs.passes.fold, onnx_mbs.passes.importance, "
        "onnx_mbs.passes.activations"
    )
    assert "onnxruntime" not in modules
    assert "torch" not in modules


@pytest.mark.parametrize("statement", ["import onnx_mbs.pipeline", "import onnx_mbs.cli"])
def test_only_the_bridge_needs_torch(statement):
    assert "torch" not in _imported_after(statement)


def test_reduce_without_data_imports_no_runtime_images_bars_or_plots(tmp_path, zoo_onnx):
    """`onnx-mbs reduce` without --data runs no session, reads no image and shows no bar:
    it imports neither onnxruntime, Pillow, tqdm, matplotlib nor torch, whose imports would
    be most of a small model's run (issue 23)."""
    model = tmp_path / "m.onnx"
    model.write_bytes(zoo_onnx("resnet20", "deploy").SerializeToString())
    out = tmp_path / "out.onnx"
    modules = _imported_after(  # the JSON printed first only adds quoted words to the set
        "from onnx_mbs.cli import main; "
        f"main(['reduce', {str(model)!r}, '--budget', 'params=0.5', '--json', '-o', {str(out)!r}])"
    )
    assert out.exists()
    assert not {"onnxruntime", "PIL", "tqdm", "matplotlib", "torch"} & modules


def test_public_api_resolves():
    import onnx_mbs

    assert callable(onnx_mbs.reduce) and callable(onnx_mbs.save_model)
    assert onnx_mbs.Budget.parse("params=0.5").fractions == {"params": 0.5}
    with pytest.raises(AttributeError):
        onnx_mbs.no_such_thing  # noqa: B018


def test_reduce_stays_the_function_whatever_was_imported_first():
    code = (
        "import onnx_mbs.pipeline, onnx_mbs.cli, onnx_mbs; "
        "assert callable(onnx_mbs.reduce), onnx_mbs.reduce"
    )
    run_process([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", ["pipeline", "cli", "options"])
def test_the_pipeline_and_cli_use_only_what_passes_exports(module):
    """onnx_mbs reaches into passes/ only through `onnx_mbs.passes.__all__`."""
    import ast
    from pathlib import Path

    import onnx_mbs
    import onnx_mbs.passes

    source = Path(onnx_mbs.__file__).parent / f"{module}.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnx_mbs.passes"):
            assert node.module == "onnx_mbs.passes", (module, node.module)
            hidden = {alias.name for alias in node.names} - set(onnx_mbs.passes.__all__)
            assert not hidden, (module, hidden)


def test_reduce_is_a_short_sequence_of_stages():
    import inspect

    from onnx_mbs.pipeline import reduce

    assert len(inspect.getsource(reduce).splitlines()) <= 80
