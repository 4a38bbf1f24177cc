"""Prefect tasks around llmadapter's OpenAI-compatible server: run it as a child process until it exits,
and confirm that running servers answer with a promoted version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from llmadapter import registry
from llmadapter.errors import LLMAdapterError, ServingNotConfirmedError
from llmadapter.processes import die_with_parent, stop, wait_until_ready
from llmadapter.registry import TAG_SERVING_CONFIRMED, TAG_SERVING_MISSED
from llmadapter.server.settings import ServerSettings
from llmadapter.server.shutdown import ANSWER_MARGIN_S, SIGNALS
from llmadapter.serving_probe import ServingConfirmation, wait_until_serving
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


@task(name="confirm-serving", task_run_name="confirm {model_name} v{version} is served")
def confirm_serving(
    model_name: str, version: int, urls: Sequence[str], timeout_s: float, api_key_env: str
) -> list[ServingConfirmation]:
    """Wait until each server answers with `version` (bounded); record the outcome on the version's tags
    and as a table artifact; raise naming the servers that did not switch (the alias stays moved)."""
    logger = get_run_logger()
    results = wait_until_serving(
        urls, model_name, version, timeout_s=timeout_s, api_key=os.environ.get(api_key_env)
    )
    rows = [
        {
            "server": r.url,
            "switched": "yes" if r.confirmed else "no",
            "seconds": f"{r.seconds:.2f}" if r.seconds is not None else "-",
            "answering": r.version_seen or "-",
            "problem": r.problem or "",
        }
        for r in results
    ]
    missed = [r for r in results if not r.confirmed]
    note = f"@{model_name} moved to version {version}; " + (
        "every server answers with it." if not missed else "the alias stays moved; see the servers below."
    )
    create_table_artifact(
        table=rows,
        key=artifact_key("serving", model_name),
        description=f"{note} (waited up to {timeout_s:g} s)",
    )
    registry.tag_version(
        model_name,
        version,
        {
            TAG_SERVING_CONFIRMED: ", ".join(f"{r.url} ({r.seconds:.2f} s)" for r in results if r.confirmed),
            TAG_SERVING_MISSED: ", ".join(r.url for r in missed),
        },
    )
    for r in results:
        (logger.info if r.confirmed else logger.error)(r.line(str(version)))
    if missed:
        raise ServingNotConfirmedError(
            f"{len(missed)} of {len(results)} servers did not switch to {model_name} version {version}: "
            + "; ".join(r.line(str(version)) for r in missed)
            + f". @{model_name} stays moved to version {version}.",
            param="serving_urls",
        )
    return results
