"""MLflow tracing of served requests: traces in a real tracking store, linked to the served LoggedModel,
written off the request path (a slow or stopped store never fails a request; dropped traces are counted)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmadapter.engine.base import Engine
from llmadapter.processes import free_port, running, stop
from llmadapter.server.app import build_app
from llmadapter.server.tracing import DEFAULT_EXPERIMENT
from llmadapter.testing import TRAINED_ANSWER
from tests.server.conftest import CHAT_ID, RunningServer, serve, settings, wait_until

HELLO = [{"role": "user", "content": "Hello"}]
SECRET = "my secret prompt"


def _chat(server: RunningServer, model: str, request_id: str, *, stream: bool = False) -> dict[str, Any]:
    """The usage of one chat request with its id (streamed: from its last chunk)."""
    body: dict[str, Any] = {"model": model, "messages": HELLO, "temperature": 0, "max_tokens": 100}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    url = f"{server.url}/v1/chat/completions"
    answer = httpx.post(url, json=body, headers={"X-Request-Id": request_id}, timeout=60)
    assert answer.status_code == 200, answer.text
    if not stream:
        return dict(answer.json()["usage"])
    events = [
        json.loads(e.removeprefix("data: ")) for e in answer.text.split("\n\n") if e.startswith("data: {")
    ]
    return dict(events[-1]["usage"])


@pytest.fixture()
def logged_engine(mlflow_store: str, trained_model: Path) -> Iterator[tuple[Engine, str]]:
    """The trained model logged and registered in a real store, loaded by URI as `llmadapter serve` does;
    with the model's LoggedModel id."""
    import llmadapter
    from llmadapter.mlflow_model import load_engine

    info = llmadapter.log_model(
        str(trained_model), name="model", task="llm/v1/chat", registered_model_name="traced-chat"
    )
    engine = load_engine("models:/traced-chat/1")
    engine.model_version = "1"  # what a loader that resolved the registry version sets
    yield engine, info.model_id
    engine.close()


@pytest.mark.slow
def test_requests_become_traces_of_their_logged_model_and_survive_a_stopped_server(
    logged_engine: tuple[Engine, str], mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    engine, model_id = logged_engine
    assert engine.model_id == model_id  # read from the artifact's MLmodel
    experiment_id = mlflow.get_logged_model(model_id).experiment_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # `mlflow server` starts its workers by name: the virtualenv's bin goes on PATH. Without its job
    # runner (nothing here needs it) it starts twice as fast and stops in seconds, not 20.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))
    env = {**os.environ, "PATH": path, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    argv += [
        "--workers",
        "1",
        "--backend-store-uri",
        mlflow_store,
        "--artifacts-destination",
        str(tmp_path / "a"),
    ]
    # The exporter process inherits this: once the server is gone, a write fails at once instead of
    # retrying for minutes (MLflow's default).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with running(argv, f"{url}/health", log=tmp_path / "mlflow.log", env=env) as tracking:
        mlflow.set_tracking_uri(url)  # the server's store, as `llmadapter serve` points MLflow at it
        app = build_app({"traced-chat": engine}, settings(tracing=True, tracing_sample_rate=1.0))
        with serve(app) as server:
            usage = {f"t-{i}": _chat(server, "traced-chat", f"t-{i}") for i in range(3)}
            usage |= {f"t-{i}": _chat(server, "traced-chat", f"t-{i}", stream=True) for i in (3, 4)}
            wait_until(lambda: server.metric("llmadapter_traces_exported_total") == 5, message="5 traces")
            traces = mlflow.search_traces(locations=[experiment_id], model_id=model_id, return_type="list")
            assert sorted(t.info.client_request_id for t in traces) == sorted(usage)
            for trace in traces:
                request_id = trace.info.client_request_id
                expected = usage[request_id]
                assert trace.info.token_usage == {
                    "input_tokens": expected["prompt_tokens"],
                    "output_tokens": expected["completion_tokens"],
                    "total_tokens": expected["total_tokens"],
                }
                (span,) = trace.data.spans
                attributes = span.attributes
                assert attributes["llmadapter.request_id"] == request_id
                assert (attributes["llmadapter.model"], attributes["llmadapter.model_version"]) == (
                    "traced-chat",
                    "1",
                )
                assert attributes["llmadapter.stream"] is (request_id in ("t-3", "t-4"))
                assert attributes["llmadapter.finish_reasons"] == ["stop"]
                assert 0 < attributes["llmadapter.ttft_s"] < attributes["llmadapter.latency_s"]
                assert span.outputs["choices"][0]["message"]["content"] == TRAINED_ANSWER
                assert span.inputs["messages"] == HELLO
            stop(tracking)  # the tracking server goes away; serving goes on
            for i in range(3):
                _chat(server, "traced-chat", f"after-{i}", stream=i == 0)
            wait_until(
                lambda: server.metric("llmadapter_traces_dropped_total", reason="export_failed") == 3,
                message="3 dropped traces",
            )
            assert server.metric("llmadapter_traces_exported_total") == 5


def test_traces_can_leave_prompts_and_completions_out(mlflow_store: str, chat_engine: Engine) -> None:
    import mlflow

    app = build_app({CHAT_ID: chat_engine}, settings(tracing=True, tracing_include_text=False))
    with serve(app) as server:
        body = {"model": CHAT_ID, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 5}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
        wait_until(lambda: server.metric("llmadapter_traces_exported_total") == 1, message="the trace")
    # A model loaded without a LoggedModel id: its traces go to the default experiment, unlinked.
    experiment = mlflow.get_experiment_by_name(DEFAULT_EXPERIMENT)
    (trace,) = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
    assert SECRET not in json.dumps(trace.to_dict())
    (span,) = trace.data.spans
    assert span.inputs == {"model": CHAT_ID, "max_tokens": 5}
    assert span.outputs["choices"] == [{"index": 0, "finish_reason": answer["choices"][0]["finish_reason"]}]
    assert trace.info.token_usage["output_tokens"] == answer["usage"]["completion_tokens"]
    assert "mlflow.modelId" not in trace.info.trace_metadata


@contextmanager
def _silent_tracking_server() -> Iterator[tuple[str, socket.socket]]:
    """A tracking server that takes connections and never answers: a store too slow to wait for."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def test_a_slow_store_never_holds_requests_and_drops_are_counted(
    chat_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with _silent_tracking_server() as (url, sock):
        mlflow.set_tracking_uri(url)
        try:
            app = build_app({CHAT_ID: chat_engine}, settings(tracing=True, tracing_queue_size=1))
        finally:
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        with serve(app) as server:
            client = server.client()
            for _ in range(5):  # every one answered while the exporter waits on the store
                client.chat.completions.create(model=CHAT_ID, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
            full = server.metric("llmadapter_traces_dropped_total", reason="queue_full")
            assert full >= 3  # one trace with the exporter, at most one queued: the rest dropped at once
            sock.close()  # the store goes away: what the exporter held fails
            wait_until(
                lambda: full + server.metric("llmadapter_traces_dropped_total", reason="export_failed") == 5,
                message="every trace dropped and counted",
            )
            assert server.metric("llmadapter_traces_exported_total") == 0


def test_the_tracking_uri_is_logged_without_its_password(
    chat_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    mlflow.set_tracking_uri("http://ops:s3cret@127.0.0.1:5999")
    try:
        with caplog.at_level(logging.INFO, logger="llmadapter.server"):
            build_app({CHAT_ID: chat_engine}, settings(tracing=True))
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    assert "tracing 100% of requests to http://127.0.0.1:5999" in caplog.text
    assert "s3cret" not in caplog.text
