"""Flows against processes that stop: a tracking server killed mid-run, a serve flow stopped by SIGTERM.

MLflow's HTTP client retries each request for about four minutes with its own defaults; the
`mlflow_http_*` settings must reach it (in this process and in the validation worker) so that a dead
server fails a task attempt fast, naming the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

import llmadapter.settings as project_settings
from llmadapter.errors import LLMAdapterError
from llmadapter.processes import free_port, wait_until_ready
from llmadapter.settings import LLMAdapterSettings, apply_mlflow_http_settings

ROOT = Path(__file__).resolve().parents[2]
MLFLOW_HTTP = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


@pytest.fixture()
def mlflow_http_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """MLflow's HTTP variables as a fresh process has them (unset), restored after the test."""
    for name in MLFLOW_HTTP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(project_settings, "_WRITTEN", {})
    return monkeypatch


def test_our_limits_fill_mlflows_variables_and_a_users_own_value_wins(
    mlflow_http_env: pytest.MonkeyPatch,
) -> None:
    mlflow_http_env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's own MLflow setting

    applied = apply_mlflow_http_settings()

    assert applied == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    }
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    # Our own setting changes what we set before, never what the user set.
    mlflow_http_env.setenv("LLMADAPTER_MLFLOW_HTTP_MAX_RETRIES", "0")
    mlflow_http_env.setenv("LLMADAPTER_MLFLOW_HTTP_TIMEOUT_S", "5")
    apply_mlflow_http_settings()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LLMADAPTER_MLFLOW_HTTP_MAX_RETRIES", "11"), ("LLMADAPTER_MLFLOW_HTTP_TIMEOUT_S", "0")],
    ids=["retries-over-mlflows-limit", "zero-timeout"],
)
def test_out_of_bounds_limits_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable.removeprefix("LLMADAPTER_").lower()):
        LLMAdapterSettings()


def test_a_call_to_a_dead_tracking_server_fails_in_seconds_naming_it(
    mlflow_http_env: pytest.MonkeyPatch,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    apply_mlflow_http_settings()  # the defaults: 2 retries, after 0 s and 4 s (+ up to 1 s)

    start = time.monotonic()
    with pytest.raises(MlflowException, match=url):
        mlflow.MlflowClient(tracking_uri=url).search_experiments()

    # MLflow's own defaults (7 retries) would keep trying for about four minutes.
    assert time.monotonic() - start < 30


class TrackingServer:
    """A real `mlflow server` (SQLite store, proxied artifacts) that can be killed -9 and started again."""

    def __init__(self, root: Path, db_template: Path) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{free_port()}"
        shutil.copyfile(db_template, root / "mlflow.db")  # migrated already: no 10 s of migrations
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
        argv += ["--port", self.url.rsplit(":", 1)[1], "--workers", "1"]
        argv += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        argv += ["--artifacts-destination", str(self.root / "artifacts")]
        # MLflow's server starts its own children (uvicorn): its own session, so a kill takes them all.
        path = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env={**os.environ, "PATH": path}, stdout=log, stderr=log, start_new_session=True
            )
        try:
            wait_until_ready(self.proc, f"{self.url}/health", what="mlflow server", timeout_s=120)
        except LLMAdapterError as exc:
            raise AssertionError(f"{exc}\n{(self.root / 'server.log').read_text()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture()
def tracking_server(tmp_path: Path, _mlflow_db_template: Path) -> Iterator[TrackingServer]:
    server = TrackingServer(tmp_path, _mlflow_db_template)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect API for this module's flow runs (about 12 s to start)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield str(PREFECT_API_URL.value())


@pytest.mark.slow
def test_a_tracking_server_killed_during_validation_fails_the_run_fast_and_a_rerun_succeeds(
    prefect_api: str,
    tracking_server: TrackingServer,
    tiny_gpt2: Path,
    mlflow_http_env: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import tasks.validate
    from flows.log_and_validate import log_and_validate
    from tasks.validate import ValidationOptions

    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow_http_env.setenv(variable, tracking_server.url)
    mlflow_http_env.setenv("LLMADAPTER_DATA_DIR", str(tmp_path / "data"))
    # Our settings, small so the test is fast; MLflow's defaults would take minutes per call.
    mlflow_http_env.setenv("LLMADAPTER_MLFLOW_HTTP_MAX_RETRIES", "1")
    mlflow_http_env.setenv("LLMADAPTER_MLFLOW_HTTP_BACKOFF_FACTOR", "0")
    killed_at: list[float] = []
    validate = tasks.validate.validate_model

    def kill_then_validate(*args: object, **kwargs: object) -> object:
        if not killed_at:  # the first run only: validation begins on a dead tracking server
            tracking_server.kill()
            killed_at.append(time.monotonic())
        return validate(*args, **kwargs)  # type: ignore[arg-type]

    mlflow_http_env.setattr(tasks.validate, "validate_model", kill_then_validate)

    state = log_and_validate(source=str(tiny_gpt2), model_name="tracking-chat", return_state=True)

    assert state.is_failed()
    # Validation's first MLflow request (the model's info) gives up after one quick retry; with MLflow's
    # defaults it alone would take about four minutes.
    assert time.monotonic() - killed_at[0] < 60
    assert tracking_server.url in (state.message or "")
    tracking_server.start()
    assert mlflow.MlflowClient().search_model_versions("name='tracking-chat'") == []

    # Validating in this process saves a model load (the worker's own limits: tests/validation).
    in_process = ValidationOptions(fresh_process=False)
    result = log_and_validate(source=str(tiny_gpt2), model_name="tracking-chat", validation=in_process)

    assert (result.version, result.created, result.aliases) == (1, True, ["challenger"])
    assert result.validation.startswith("passed")


@pytest.mark.slow
def test_sigterm_to_a_serve_flow_stops_its_server_cleanly_and_completes_the_run(
    prefect_api: str, tiny_gpt2: Path, tmp_path: Path
) -> None:
    import httpx

    import llmadapter

    model = tmp_path / "tiny-chat"
    llmadapter.save_model(str(tiny_gpt2), model, task="llm/v1/chat")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "LLMADAPTER_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    code = (
        "from flows.serve import serve\n"
        f"state = serve(model_uri={str(model)!r}, port={port}, return_state=True)\n"
        "print('final state:', state.type.value, flush=True)\n"
    )
    log = tmp_path / "flow.log"
    with log.open("wb") as out:
        flow = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(flow, f"http://127.0.0.1:{port}/ready", what="the serve flow", timeout_s=300)
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).is_success

        flow.send_signal(signal.SIGTERM)  # what Kubernetes, systemd and Prefect's cancellation send

        assert flow.wait(timeout=120) == 0
    finally:
        flow.kill()
        flow.wait()
    output = log.read_text(errors="replace")
    assert "SIGTERM: refusing new requests" in output  # the server's own log: the flow forwarded it
    assert "closed 1 engine(s): tiny-chat" in output
    assert "final state: COMPLETED" in output
