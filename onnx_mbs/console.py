"""The `onnx-mbs` entry point (and `python -m onnx_mbs`'s).

The command's modules (onnx, numpy, ml_dtypes...) take a second or more to import; a Ctrl-C
then ends as one during the run does, in one line and exit 130, not a traceback. So this module
imports nothing heavy itself and loads the command inside its guard.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from onnx_mbs.lifeline import end_rank_with_launcher

INTERRUPTED = "onnx-mbs: interrupted; nothing written"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `onnx_mbs.cli.main`, answering a Ctrl-C that lands outside its own handling."""
    end_rank_with_launcher()
    try:
        from onnx_mbs.cli import main as run

        return run(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
