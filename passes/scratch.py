"""Temporary folders this tool makes, and the clearing of those a killed run left behind.

Every temporary folder is named `.onnx-mbs.HOST.PID.XXXXXXXX.tmp`: the host and process that
made it. The name is recorded before the folder is made, so an interrupt at any moment leaves
nothing the cleanup does not know of. A run killed outright (SIGKILL, power loss) cannot clean
up; a later run on the same host, making a temporary folder in the same place, removes the
folders of processes that no longer exist there, and only those. Folders named by versions
before this scheme (`.onnx-mbs.XXXXXXXX.tmp` beside outputs, `onnx-mbs-XXXXXXXX` in TMPDIR,
`.checkpoint.pt.PID.partial` in a retraining checkpoint folder) are removed once they are a day
old; `onnx-mbs-XXXXXXXX` only where it was made, as it was made (a folder of mode 0700 in
TMPDIR): anywhere else that name is a user's.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import string
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import temporary_folder_error

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_OURS = re.compile(r"^\.onnx-mbs\.(?P<host>[A-Za-z0-9-]{1,32})\.(?P<pid>\d+)\.[a-z0-9]{8}\.tmp$")
_EARLIER = re.compile(r"^(\.onnx-mbs\.[a-z0-9_]{8}\.tmp(\.old)?|\.checkpoint\.pt\.\d+\.partial)$")
# Earlier versions' TemporaryDirectory: in TMPDIR only, a folder only its owner may enter.
_EARLIER_TMPDIR = re.compile(r"^onnx-mbs-[a-z0-9_]{8}$")
EARLIER_AGE_S = 24 * 3600


def scratch_name() -> str:
    """A fresh temporary name of this host and process."""
    token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    return f".onnx-mbs.{_HOST}.{os.getpid()}.{token}.tmp"


def is_ours(name: str) -> bool:
    """Whether `name` is a temporary name this tool gives (of any run)."""
    return bool(_OURS.match(name))


def clear_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders (and files) in `folder` that runs on this host left when
    they were killed (their process is gone), and those of earlier versions a day old; what was
    removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _OURS.match(entry.name)
        if match:
            stale = match["host"] == _HOST and not _alive(int(match["pid"]))
        else:
            stale = _earlier(entry, folder) and _age(entry, now) > EARLIER_AGE_S
        if stale:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _earlier(entry: os.DirEntry, folder: str | os.PathLike) -> bool:
    """Whether `entry` is named as earlier versions named their temporaries where they made
    them: the hidden names anywhere, `onnx-mbs-XXXXXXXX` only as a folder of mode 0700 in
    TMPDIR. Elsewhere that name is a user's ("onnx-mbs-research" beside an output)."""
    if _EARLIER.match(entry.name):
        return True
    if not _EARLIER_TMPDIR.match(entry.name) or not entry.is_dir(follow_symlinks=False):
        return False
    try:
        private = entry.stat(follow_symlinks=False).st_mode & 0o777 == 0o700
        return private and os.path.samefile(folder, tempfile.gettempdir())
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number no process has: leave it
    return True


def _age(entry: os.DirEntry, now: float) -> float:
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


class TempFolders:
    """Temporary folders made in given parents, each removed by `remove_all` (call it in a
    `finally`). The name is recorded first, then the folder made, so no interrupt can leave
    one unrecorded."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def make(self, parent: str | os.PathLike) -> Path:
        clear_stale(parent)
        for _ in range(100):
            path = Path(parent) / scratch_name()
            self.paths.append(path)
            try:
                os.mkdir(path, 0o700)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary name in {parent}")

    def remove_all(self) -> None:
        for path in self.paths:
            shutil.rmtree(path, ignore_errors=True)
        self.paths.clear()


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary folder in TMPDIR, removed however the block ends. A folder that cannot be
    made is bad input (one line: set TMPDIR)."""
    folders = TempFolders()
    try:
        try:
            path = folders.make(tempfile.gettempdir())
        except OSError as error:
            raise temporary_folder_error(error) from None
        yield path
    finally:
        folders.remove_all()
