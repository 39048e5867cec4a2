"""Processes a run starts end with the process that started them.

A data-loader worker whose process died before the worker got going took the reaper for its
parent (torch's watchdog keeps the parent pid it finds first) and waited for batches for ever;
a torchrun rank whose launcher was killed trained on, for nobody. Linux's parent-death signal
(prctl PR_SET_PDEATHSIG) ends them; elsewhere only the check for a parent already gone is made.
This module imports nothing heavy: the command line calls it before anything else loads.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    """libc's prctl (None: not Linux, or no prctl in this libc)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Found at import, in the parent: the child of a threaded process must not dlopen after fork.
_PRCTL = _find_prctl()


def end_with_parent(parent: int, sig: int) -> None:
    """Have `sig` delivered to this process once `parent` (the pid that started it) goes; gone
    already (the process was reparented before it could ask), it gets `sig` at once."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def end_rank_with_launcher() -> None:
    """A torchrun rank ends, as on SIGTERM (one line, nothing written), when torchrun goes:
    killed outright, torchrun cannot stop its ranks itself (they run in sessions of their own).
    A plain run keeps running when its parent goes, as `nohup` and job schedulers expect."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun's agent for its ranks alone
        end_with_parent(os.getppid(), signal.SIGTERM)
