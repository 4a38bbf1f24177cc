"""Prefect task that runs llmadapter's OpenAI-compatible server as a child process until it exits."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact

from llmadapter.errors import LLMAdapterError
from llmadapter.processes import stop, wait_until_ready
from tasks.validate import artifact_key

_PR_SET_PDEATHSIG = 1


def server_command(model_uri: str, host: str, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """`llmadapter serve ...` through this interpreter (the console script may not be on PATH)."""
    return [
        sys.executable,
        "-m",
        "llmadapter.cli",
        "serve",
        model_uri,
        "--host",
        host,
        "--port",
        str(port),
        *extra_args,
    ]


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when the thread that started it dies, however it dies (a worker
    # that cancels a run may kill the process; no finally block runs then).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@task(name="serve", task_run_name="serve {model_uri} on {host}:{port}")
def run_server(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    extra_args: list[str] | None = None,
    startup_timeout_s: float = 600.0,
) -> int:
    """Start `llmadapter serve MODEL_URI`, wait until /ready answers, then run until the server exits.

    Returns 0 after a clean shutdown and raises LLMAdapterError when the server dies with another code.
    SIGTERM to this process stops the server first, so cancelling the flow run never leaves an orphan
    listening on the port.
    """
    logger = get_run_logger()
    command = server_command(model_uri, host, port, extra_args or [])
    logger.info("Starting: llmadapter serve %s --host %s --port %d", model_uri, host, port)
    # Not prefect's run_process: anyio's open_process under it takes no preexec_fn, and the server must
    # die with this process (_die_with_parent) even when no finally block gets to run.
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        # Only signal here: waiting for the child inside the handler would deadlock on the Popen lock
        # that the interrupted proc.wait() holds. The finally block below waits for it.
        proc.terminate()
        raise SystemExit(128 + signum)

    in_main_thread = hasattr(signal, "pthread_kill") and _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, on_term)
    try:
        base = f"http://{host}:{port}"
        wait_until_ready(
            proc, f"{base}/ready", what=f"The server for {model_uri}", timeout_s=startup_timeout_s
        )
        logger.info("Serving %s at %s/v1", model_uri, base)
        create_link_artifact(
            link=f"{base}/v1",
            link_text=f"OpenAI-compatible API for {model_uri}",
            key=artifact_key("server", host, str(port)),
            description=f"`{model_uri}` served by llmadapter (pid {proc.pid}).",
        )
        code = proc.wait()
        # A stop we asked for (SIGTERM to this process) leaves through on_term's SystemExit and never
        # gets here: any other non-zero exit is a crash and must fail the run, not complete it.
        if code != 0:
            raise LLMAdapterError(f"The server for {model_uri} exited with code {code} while serving.")
        return code
    finally:
        stop(proc)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
