"""One server process of the local stack: its own session, its log file, a readiness check, a group stop."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmadapter.errors import LLMAdapterError
from llmadapter.processes import die_with_parent, wait_until

__all__ = ["Service", "console_script", "free_ports"]

_LOG_TAIL_CHARS = 3000
# SeaweedFS puts each server's gRPC port 10000 above its HTTP port, so HTTP ports stay below 55535.
GRPC_OFFSET = 10000
_PORT_RANGE = (20000, 45000)


def console_script(name: str) -> str:
    """A console script of this environment (the venv's bin beside this Python), else `name` on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, offset: int | None = None) -> list[int]:
    """`count` distinct loopback ports nothing listens on now; with `offset`, port + offset is free too.

    Drawn at random from 20000-44999, below the kernel's ephemeral range, so that a port picked now is
    not taken by some client's outgoing connection before the server binds it.
    """
    chosen: list[int] = []
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(*_PORT_RANGE)
        wanted = [port] if offset is None else [port, port + offset]
        taken = set(chosen) | ({p + offset for p in chosen} if offset else set())
        if any(p in taken for p in wanted) or not all(_bindable(p) for p in wanted):
            continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise LLMAdapterError(f"No {count} free loopback ports in {_PORT_RANGE[0]}-{_PORT_RANGE[1] - 1}.")


@dataclass
class Service:
    """A server child process. `attached` ones die with this process (however it dies); detached ones
    (the stack script's) outlive it and are stopped by pid."""

    name: str
    argv: Sequence[str]
    log: Path
    ready: Callable[[], bool]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    # The signal that stops it cleanly: PostgreSQL's fast shutdown is SIGINT (SIGTERM waits for clients).
    stop_signal: int = signal.SIGTERM
    attached: bool = True
    grace_s: float = 20.0  # how long stop() waits before it signals harder
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start it (from the thread that will outlive it: see die_with_parent); returns at once."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # Its own session: stop() signals the server and whatever it started (flow runs, workers).
            self.proc = subprocess.Popen(
                list(self.argv),
                cwd=self.cwd,
                env=dict(self.env) if self.env is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(self.stop_signal) if self.attached else None,
            )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until its readiness check passes; LLMAdapterError quoting its log if it exits or hangs."""
        if self.proc is None:
            raise LLMAdapterError(f"{self.name} was not started.")
        try:
            wait_until(self.proc, self.ready, what=self.name, timeout_s=timeout_s, interval_s=0.25)
        except LLMAdapterError as exc:
            raise LLMAdapterError(f"{exc} Its log ({self.log}) ends:\n{self.log_tail()}") from None

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Its stop signal to its process group, then SIGTERM, then SIGKILL, each given half the grace."""
        if self.proc is None:
            return
        stop_group(self.proc.pid, self.stop_signal, self.grace_s, wait=self.proc.wait)
        self.proc = None


def stop_group(
    pid: int,
    first_signal: int,
    grace_s: float,
    *,
    wait: Callable[[float], object] | None = None,
) -> bool:
    """Stop the process group led by `pid`; True when it was running. `wait(timeout)` waits for the
    leader (Popen.wait for a child of ours, psutil's for another's)."""
    import psutil

    if wait is None:
        try:
            wait = psutil.Process(pid).wait
        except psutil.NoSuchProcess:
            return False
    was_running = False
    for sig in (first_signal, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return was_running
        was_running = True
        try:
            wait(grace_s / 2)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            continue
        # The leader is gone; what it started in its group goes too (a worker's flow runs).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return True
    return was_running
