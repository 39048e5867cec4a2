"""Errors that mean "the user's input is wrong", as opposed to a bug.

The command line prints a BadInputError as one line and exits with code 2;
anything else is a bug (exit code 1). A message that names an option names it as the
door in use takes it (`option`): the command line's flag while it runs (`command_line`),
else the Python API's keyword.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

_COMMAND_LINE: ContextVar[bool] = ContextVar("onnx_mbs_command_line", default=False)


@contextmanager
def command_line() -> Iterator[None]:
    """What runs inside is the command line's run: messages name its flags."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """Whether the command line's run is the one going on (see `command_line`)."""
    return _COMMAND_LINE.get()


# The Python keyword of each flag whose keyword is not its argparse dest (`--beta-min` ->
# `beta_min`): the keywords of `reduce`, `ReduceOptions`, `load` and `retrain`.
_KEYWORDS = {
    "--input-shape": "input_shapes",
    "--loss": "losses",
    "--feature": "features",
    "--val": "val_data",
}


def keyword(flag: str) -> str:
    """The Python keyword of the command line's `flag`."""
    return _KEYWORDS.get(flag, flag.removeprefix("--").replace("-", "_"))


def option(flag: str, value: object = None) -> str:
    """The option `flag` (with `value`, if given) as the door in use spells it: `--beta-min 0.5`
    on the command line, `beta_min=0.5` in Python. A `value` of True is a flag that takes
    none: `--resume` on the command line, `resume=True` in Python."""
    if on_command_line():
        return flag if value is None or value is True else f"{flag} {value}"
    return keyword(flag) if value is None else f"{keyword(flag)}={value!r}"


def input_shape_option(name: str | None = None, dims: Sequence[object] = ()) -> str:
    """The input-shape option as the door in use spells it, with `name`'s `dims` if given:
    `--input-shape x:1,3,H,W` on the command line, `input_shapes={'x': [1, 3, H, W]}` in
    Python (the keyword of `reduce`, `load` and `ReduceOptions`)."""
    if name is None:
        return option("--input-shape")
    if on_command_line():
        return option("--input-shape", f"{name}:{','.join(map(str, dims))}")
    return f"{keyword('--input-shape')}={{{name!r}: [{', '.join(map(str, dims))}]}}"


class BadInputError(ValueError):
    """The model, data or options cannot be used as given; the message says how to fix it."""


class QuantizedModelError(BadInputError):
    """A quantised graph (QDQ or QOperator): MBS reduces float models; `eval` runs these."""


class UninferredShapesError(BadInputError):
    """Shape inference failed, or left a conv's shapes unsized: what an op without an ONNX
    schema causes (onnxruntime's own, a custom op), ONNX knowing nothing of its outputs. The
    analysis needs the shapes; a runtime that has the op runs the model without them."""


class MissingExtraError(ImportError):
    """An optional extra (torch, interop, olive) is not installed: the command line prints
    it as one line and exits with code 2, as it does a BadInputError."""


def missing_extra(what: str, package: str, extra: str, error: Exception) -> MissingExtraError:
    """The error for `what` needing `package`, which the optional `extra` installs."""
    return MissingExtraError(f"{what} needs {package}: pip install 'onnx-mbs[{extra}]' ({error})")


def temporary_folder_error(error: OSError) -> BadInputError:
    """What a run says when its temporary folder cannot be written."""
    return BadInputError(
        f"cannot write to a temporary folder ({error}); set TMPDIR to a writable folder"
    )
