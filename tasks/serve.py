"""Prefect task that runs llmadapter's OpenAI-compatible server as a child process until it exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact

from llmadapter.errors import LLMAdapterError
from llmadapter.processes import die_with_parent, stop, wait_until_ready
from llmadapter.server.settings import ServerSettings
from llmadapter.server.shutdown import ANSWER_MARGIN_S, SIGNALS
from tasks.validate import artifact_key

_CLOSE_S = 10.0  # after the drain: closing the engines and leaving the interpreter


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


@task(name="serve", task_run_name="serve {model_uri} on {host}:{port}")
def run_server(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    extra_args: list[str] | None = None,
    startup_timeout_s: float = 600.0,
) -> int:
    """Start `llmadapter serve MODEL_URI`, wait until /ready answers, then run until the server exits.

    Returns 0 when the server stops cleanly, which is how it answers SIGTERM or SIGINT, sent to it or to
    this process (forwarded: the server drains its requests within its shutdown grace), so a plain stop
    completes the run. Raises LLMAdapterError when it exits with another code: a crash, or a second
    signal that cut the drain short.
    """
    logger = get_run_logger()
    command = server_command(model_uri, host, port, extra_args or [])
    # How long a server told to stop may drain (its settings come from this environment) before a kill.
    stop_within_s = ServerSettings().shutdown_grace_s + ANSWER_MARGIN_S + _CLOSE_S
    logger.info("Starting: llmadapter serve %s --host %s --port %d", model_uri, host, port)
    # Not prefect's run_process: anyio's open_process under it takes no preexec_fn, and the server must
    # die with this thread (it gets SIGTERM, and drains) even when no finally block gets to run (kill -9).
    proc = subprocess.Popen(command, preexec_fn=die_with_parent())
    stops: list[str] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        # Only signal here: waiting for the child inside the handler would deadlock on the Popen lock
        # that the interrupted proc.wait() holds; that wait resumes once this returns.
        stops.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS} if in_main_thread else {}
    try:
        base = f"http://{host}:{port}"
        try:
            wait_until_ready(
                proc, f"{base}/ready", what=f"The server for {model_uri}", timeout_s=startup_timeout_s
            )
        except LLMAdapterError:
            # A stop forwarded while it was starting (or before this poll saw it ready) is still a
            # stop: the exit code below says whether it was clean.
            if not stops or proc.poll() is None:
                raise
        else:
            logger.info("Serving %s at %s/v1", model_uri, base)
            create_link_artifact(
                link=f"{base}/v1",
                link_text=f"OpenAI-compatible API for {model_uri}",
                key=artifact_key("server", host, str(port)),
                description=f"`{model_uri}` served by llmadapter (pid {proc.pid}).",
            )
        code = proc.wait()
        why = f"after {' and '.join(stops)}" if stops else "while serving"
        if code != 0:
            raise LLMAdapterError(f"The server for {model_uri} exited with code {code} {why}.")
        logger.info("The server for %s stopped cleanly (%s).", model_uri, why)
        return code
    finally:
        # Only still running when this task failed first (not ready in time, an exception here).
        stop(proc, grace_s=stop_within_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
