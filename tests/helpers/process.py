"""Child processes that never outlive their test.

A `dqrm` run with several ranks is a process tree (Lightning's launcher, torchrun or SLURM start the other ranks). A
test that times out or fails must not leave ranks behind that hold the cores or a port: every child starts in its own
session, and the whole session is killed when the test leaves for any reason (pytest-timeout's failure included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def session(command: list[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """``Popen(command)`` in a new session; on exit the session's every process is killed (SIGKILL)."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        kill_session(process)


def kill_session(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, but a timeout (or any failure
    while waiting) kills the whole process tree and reports the output so far."""
    with session(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            kill_session(process)
            raise AssertionError(
                f"{' '.join(command[:6])} ... did not finish within {timeout} s (killed with its children)"
            ) from err
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no process listens on now (for a run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
