"""Errors that mean "the user's input is wrong", as opposed to a bug.

The command line prints a BadInputError as one line and exits with code 2;
anything else is a bug (exit code 1).
"""


class BadInputError(ValueError):
    """The model, data or options cannot be used as given; the message says how to fix it."""


class QuantizedModelError(BadInputError):
    """A quantised graph (QDQ or QOperator): MBS reduces float models; `eval` runs these."""


def temporary_folder_error(error: OSError) -> BadInputError:
    """What a run says when its temporary folder cannot be written."""
    return BadInputError(
        f"cannot write to a temporary folder ({error}); set TMPDIR to a writable folder"
    )
