"""Writing models safely: never over the input, never a partial file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnx_mbs.passes import BadInputError

TWO_GB = 2**31 - 1


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output that would overwrite an input or land in a missing folder."""
    out = Path(output)
    for source in inputs:
        if source is not None and not isinstance(source, onnx.ModelProto):
            src = Path(source)
            if out.resolve() == src.resolve():
                raise BadInputError(
                    f"output path {out} is the input model; choose another -o (the input is "
                    "never modified)"
                )
    if not out.parent.resolve().is_dir():
        raise BadInputError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise BadInputError(f"output path {out} is a folder; give a file name")
    return out


def default_output(model: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.mbs.onnx` beside it: `onnx-mbs reduce model.onnx` needs no -o."""
    path = Path(model)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.mbs.onnx")


def save_model(model: onnx.ModelProto, output: str | os.PathLike) -> Path:
    """Write to a temporary file next to `output`, then rename: readers never see half a model."""
    out = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if model.ByteSize() > TWO_GB:
            onnx.save(model, tmp, save_as_external_data=True, location=f"{out.name}.data")
        else:
            onnx.save(model, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
