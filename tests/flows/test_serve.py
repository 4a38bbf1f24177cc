"""The serve flow: a real server on models:/name@champion, asked by the openai client, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import mlflow
import pytest

import llmadapter
from llmadapter import registry
from llmadapter.processes import free_port, running
from llmadapter.settings import configure_mlflow
from llmadapter.validation import CheckResult, ValidationReport

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[2]


def _register_champion(tiny_gpt2: Path) -> None:
    # The configured experiment keeps artifacts under the test's data dir (not ./mlruns in the repo).
    mlflow.set_experiment(experiment_id=configure_mlflow())
    with mlflow.start_run():
        uri = llmadapter.log_model(str(tiny_gpt2), name="model", task="llm/v1/chat").model_uri
    passed = ValidationReport(
        model_uri=uri,
        task="llm/v1/chat",
        status="passed",
        checks=[CheckResult(name="signature", passed=True)],
    )
    version, _ = registry.register_version(
        uri,
        "tiny-serve",
        source=str(tiny_gpt2),
        revision="r1",
        task="llm/v1/chat",
        config_hash="h",
        report=passed,
    )
    registry.move_alias("tiny-serve", version.version)


def test_serve_flow_serves_the_champion_until_terminated(store: str, tiny_gpt2: Path) -> None:
    from openai import OpenAI
    from prefect.settings import PREFECT_API_URL

    _register_champion(tiny_gpt2)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),  # the harness' API: the run is recorded there
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    code = f"from flows.serve import serve; serve(model_name='tiny-serve', port={port})"
    with running([sys.executable, "-c", code], f"http://127.0.0.1:{port}/ready", env=env) as proc:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answer = client.chat.completions.create(
            model="tiny-serve", messages=[{"role": "user", "content": "Hello"}], max_tokens=3
        )
        assert answer.usage is not None and answer.usage.completion_tokens <= 3
        assert [m.id for m in client.models.list().data] == ["tiny-serve"]

        # Cancelling the long-running deployment terminates its process: the server goes with it.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    with socket.socket() as sock, pytest.raises(OSError):
        sock.connect(("127.0.0.1", port))


def test_a_server_that_crashes_while_serving_fails_the_run(store: str, tiny_gpt2: Path) -> None:
    import re
    import threading

    from prefect.artifacts import Artifact
    from prefect.client.schemas.objects import State

    from flows.serve import serve
    from tasks.validate import artifact_key

    _register_champion(tiny_gpt2)
    port = free_port()
    states: list[State] = []
    runner = threading.Thread(
        target=lambda: states.append(serve(model_name="tiny-serve", port=port, return_state=True))
    )
    runner.start()
    # The task publishes the server's pid in its link artifact once /ready answers.
    deadline = time.monotonic() + 300
    link = None
    while link is None and runner.is_alive() and time.monotonic() < deadline:
        link = Artifact.get(artifact_key("server", "127.0.0.1", str(port)))
        time.sleep(0.5)
    assert link is not None, "the server never became ready"
    match = re.search(r"pid (\d+)", link.description or "")
    assert match is not None

    os.kill(int(match.group(1)), signal.SIGKILL)  # the server dies on its own, not through the flow
    runner.join(timeout=60)

    assert not runner.is_alive()
    (state,) = states
    assert state.is_failed()
    assert "exited with code -9" in (state.message or "")
