"""Retraining checkpoints: everything needed to continue a run after any epoch, written atomically.

One file, DIR/checkpoint.pt, replaced after every epoch (written beside it under a temporary
name, then renamed, so a job killed while writing leaves the previous epoch's file whole; the
next run using DIR removes what it left, `passes/scratch.py`). It holds the weights, the
optimizer and schedule states, the epoch count done, the history, the best epoch so far (its
weights too), the random states (torch, CUDA, numpy, python) and what fixes the data order
(the seed; the order of epoch e is a function of (seed, e)). A fingerprint of the model, the
teacher and every option that changes training (the `--freeze` set included) refuses a
checkpoint written for another run. Saved with tensors and plain Python values only, so it
loads with torch's weights_only reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnx_mbs.passes.errors import BadInputError, option
from onnx_mbs.passes.scratch import clear_stale, scratch_name

FILE = "checkpoint.pt"


def path_in(directory: str | os.PathLike) -> Path:
    return Path(directory) / FILE


def model_digest(model: onnx.ModelProto | None) -> str:
    if model is None:
        return "none"
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def random_states() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": _plain(random.getstate()),
    }


def set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        # One state per GPU the writer saw: a machine with fewer takes the first ones.
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def save(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` as DIR/checkpoint.pt atomically (temporary file, fsync, rename)."""
    target = path_in(directory)
    partial = target.with_name(scratch_name())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except OSError as error:
        _remove(partial)
        raise BadInputError(
            f"cannot write checkpoint {target}: {error.strerror or error}; the previous "
            "epoch's checkpoint is unchanged"
        ) from None
    except BaseException:
        _remove(partial)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # where it cannot be removed, nothing was written
        path.unlink(missing_ok=True)


def prepare(directory: str | os.PathLike) -> list[Path]:
    """Make DIR, so that an unwritable one is refused before training rather than after, and
    remove the partial checkpoints of runs killed while writing one. Returns the folders made
    (DIR and its missing parents, DIR first), for `remove_made`: resolved, as the folders
    are, since a spelling's parents are not (`new/../theirs` is the user's `theirs`)."""
    try:
        path = Path(directory).resolve()
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        clear_stale(directory)
    except (OSError, RuntimeError) as error:  # RuntimeError: resolve() in a symlink loop
        raise BadInputError(
            f"cannot use {directory} as the checkpoint directory: "
            f"{getattr(error, 'strerror', None) or error}"
        ) from None
    return missing


def remove_made(made: list[Path]) -> None:
    """Remove the folders `prepare` made that are still empty, DIR first: a run stopped before
    its first checkpoint leaves no empty folder behind. A folder holding anything (a
    checkpoint, a file of the user's) stays, and so do the folders above it."""
    for folder in made:
        try:
            folder.rmdir()  # only ever removes an empty folder
        except OSError:
            return


def load(
    directory: str | os.PathLike,
    fingerprint: dict[str, Any],
    canonical: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> dict[str, Any] | None:
    """The checkpoint in DIR (None when there is none); refused when it was written for another
    model or other options, naming what differs. `canonical` rewrites the checkpoint's
    fingerprint as `fingerprint` was (what earlier versions recorded otherwise)."""
    target = path_in(directory)
    if not target.exists():
        return None
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: one line, not a traceback
        raise BadInputError(
            f"cannot read checkpoint {target} ({type(error).__name__}); remove it to start over"
        ) from None
    theirs = state.get("fingerprint", {}) if isinstance(state, dict) else {}
    theirs = canonical(theirs) if isinstance(theirs, dict) else {}
    keys = set(theirs) | set(fingerprint)
    differ = sorted(k for k in keys if theirs.get(k) != fingerprint.get(k))
    if differ:
        raise BadInputError(
            f"checkpoint {target} was written for another run (differs in: {', '.join(differ)}); "
            f"resume with the same model, data and options, or give another "
            f"{option('--checkpoint')} DIR"
        )
    return state
