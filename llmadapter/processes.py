"""Child processes: start one that dies with its parent, wait until its readiness URL answers 200, stop it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from llmadapter.errors import LLMAdapterError

__all__ = ["answers", "die_with_parent", "free_port", "running", "stop", "wait_until", "wait_until_ready"]

# How much of a server's log an error quotes when the server does not start.
_LOG_TAIL_CHARS = 3000
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for Popen that has the child sent `signum` when its parent dies, however it dies
    (kill -9 included, when no finally block or atexit hook runs); None where Linux's prctl is missing.

    The kernel sends it when the *thread* that started the child exits, so start the child from a
    thread that outlives it (the main thread, or the one that waits for the child).
    """
    if sys.platform != "linux":
        return None
    try:
        # Looked up here, in the parent: the forked child only calls it (no dlopen between fork and exec).
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum))
        if os.getppid() != parent:  # the parent died before the line above: nobody would send it
            os.kill(os.getpid(), signum)

    return arm


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether `url` answers 200 now (a refused connection, a timeout or another status is a no)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except OSError:  # urllib's URLError and HTTPError are OSErrors
        return False


def wait_until_ready(
    proc: subprocess.Popen[bytes], url: str, *, what: str, timeout_s: float, interval_s: float = 0.5
) -> None:
    """Poll `url` until it answers 200; LLMAdapterError when `proc` exits first or `timeout_s` passes."""
    wait_until(proc, lambda: answers(url), what=what, timeout_s=timeout_s, interval_s=interval_s)


def wait_until(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = 0.5,
) -> None:
    """Call `ready` until it says yes (a server without an HTTP route: a database, a TCP port); the same
    errors as wait_until_ready."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise LLMAdapterError(f"{what} exited with code {proc.returncode} at start.")
        if time.monotonic() > deadline:
            raise LLMAdapterError(f"{what} was not ready after {timeout_s} s.")
        time.sleep(interval_s)


def stop(proc: subprocess.Popen[bytes], *, signum: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
    """Send `signum` to a running process, wait up to `grace_s` for it to exit, then kill it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signum)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    ready_url: str,
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` as a child process, yielded once `ready_url` answers 200, stopped with SIGINT (Ctrl-C) after.

    Its output goes to `log` (quoted in the error when it does not start), else to this process's own.
    """
    with log.open("wb") if log is not None else contextlib.nullcontext() as out:
        proc = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    try:
        try:
            wait_until_ready(proc, ready_url, what=" ".join(argv[:4]), timeout_s=timeout_s)
        except LLMAdapterError as exc:
            if log is None:
                raise
            raise LLMAdapterError(f"{exc}\n{log.read_text(errors='replace')[-_LOG_TAIL_CHARS:]}") from None
        yield proc
    finally:
        stop(proc, signum=signal.SIGINT, grace_s=60.0)
