"""Subprocesses for tests that leave nothing behind, however the test ends.

subprocess.run's own clean-up (on a timeout, a failed assertion, a Ctrl-C) kills the one process
it started: torchrun's ranks run in sessions of their own, and data-loader workers outlived them.
Every process started here carries a tag in its environment, which all its descendants inherit
whatever their session or parent; when the test is done, whatever still carries the tag is
killed, the process itself included. It is also killed if the test runner dies (SIGKILL, or a
SIGTERM, which runs no `finally`): what it started then ends with it (onnx_mbs.lifeline).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from onnx_mbs.lifeline import end_with_parent

TAG = "ONNX_MBS_TEST_PROCESS"
RUN_TIMEOUT = 1800  # seconds: a hung child fails its test rather than stalling the suite


def tagged(env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """`env` (default: this process's) with a tag of its own, and the tag."""
    tag = uuid.uuid4().hex
    return {**(os.environ if env is None else env), TAG: tag}, tag


def carrying(tag: str) -> list[int]:
    """The live processes whose environment holds `tag` (zombies hold none)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in entry.read_bytes().split(b"\0"):
                found.append(int(entry.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


def left(tag: str, timeout: float) -> list[int]:
    """The processes still carrying `tag` once they have had `timeout` seconds to end."""
    deadline = time.monotonic() + timeout
    while (alive := carrying(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_all(tag: str) -> None:
    """SIGKILL every process carrying `tag`, until none is left (a process forking meanwhile
    is caught on the next pass)."""
    for _ in range(100):
        alive = carrying(tag)
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@contextlib.contextmanager
def started(
    command: Sequence[str], env: dict[str, str] | None = None, **popen: object
) -> Iterator[subprocess.Popen]:
    """subprocess.Popen(command) in a session of its own, tagged; on the way out (however the
    test ends) it and every process it started are killed and it is reaped."""
    env, tag = tagged(env)
    then = popen.pop("preexec_fn", None)
    runner = os.getpid()

    def prepare() -> None:  # in the child, before exec
        end_with_parent(runner, signal.SIGKILL)
        if callable(then):
            then()

    process = subprocess.Popen(
        command, env=env, start_new_session=True, preexec_fn=prepare, **popen
    )
    process.tag = tag  # type: ignore[attr-defined]
    with process:
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            kill_all(tag)
            process.wait(timeout=60)


def run(
    command: Sequence[str],
    *,
    timeout: float = RUN_TIMEOUT,
    check: bool = False,
    capture_output: bool = False,
    input: str | bytes | None = None,
    **popen: object,
) -> subprocess.CompletedProcess:
    """subprocess.run, except that it starts the command as `started` does: nothing it started
    outlives it, a timeout (the default too) included."""
    if capture_output:
        popen["stdout"] = popen["stderr"] = subprocess.PIPE
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with started(command, **popen) as process:  # type: ignore[arg-type]
        out, err = process.communicate(input, timeout=timeout)
        code = process.returncode
    done = subprocess.CompletedProcess(list(command), code, out, err)
    if check:
        done.check_returncode()
    return done
