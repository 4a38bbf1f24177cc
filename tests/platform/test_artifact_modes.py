"""Direct artifacts (clients hold the S3 credentials) and faults of the store, on the platform stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmadapter
from llmadapter.artifact_store import UNAVAILABLE
from llmadapter.processes import free_port
from llmadapter.stack import LocalStack

pytestmark = pytest.mark.slow


def _relative_keys(stack: LocalStack, location: str) -> set[str]:
    assert stack.objectstore is not None
    prefix = location.removeprefix(f"s3://{stack.objectstore.bucket}/").rstrip("/") + "/"
    return {key.removeprefix(prefix) for key in stack.objectstore.keys(prefix)}


def test_direct_mode_clients_upload_and_download_s3_themselves(
    use_stack: LocalStack, trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from llmadapter.validation import validate_model

    stack = use_stack
    assert stack.database is not None and stack.objectstore is not None
    stack.database.create_database("mlflow_direct")
    _, uri = stack.add_mlflow_server("mlflow-direct", stack.database.url("mlflow_direct"), "direct")
    for key, value in {**stack.objectstore.client_env(), "MLFLOW_TRACKING_URI": uri}.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("direct")

    with mlflow.start_run():
        info = llmadapter.log_model(str(trained_model), name="model", task="llm/v1/chat")
    location = MlflowClient(uri).get_logged_model(info.model_id).artifact_location
    assert location.startswith("s3://mlflow/mlartifacts/mlflow-direct/"), location
    keys = _relative_keys(stack, location)
    assert {"MLmodel", "model/model.safetensors", "model/config.json", "llmadapter/engine.json"} <= keys

    # Validation's fresh process downloads from the bucket with the same credentials.
    report = validate_model(info.model_uri)
    assert report.passed, report.summary()

    # Wrong credentials (a server started with them): the store is named, and a retry would not help.
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", info.model_uri, "--port", str(free_port())]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    refused = f"the S3 store at {stack.objectstore.endpoint_url} refused this process's credentials"
    assert refused in result.stderr
    assert "SignatureDoesNotMatch" in result.stderr


def test_s3_down_during_log_fails_naming_it_registers_nothing_and_a_rerun_works(
    use_stack: LocalStack, trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.log_and_validate import log_and_validate

    stack = use_stack
    store = stack.objectstore
    assert store is not None
    name = "platform-s3-fault"
    client = MlflowClient(stack.mlflow_uri, stack.mlflow_uri)
    mlflow.set_experiment("s3-fault")
    # One quick client-side retry of the tracking server's 500s (MLflow's default waits minutes).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    store.stop()
    try:
        with pytest.raises(llmadapter.ArtifactStoreError) as down, mlflow.start_run() as run:
            llmadapter.log_model(
                str(trained_model), name="model", task="llm/v1/chat", registered_model_name=name
            )
    finally:
        store.start()
        store.wait_ready()
    assert down.value.code == UNAVAILABLE
    assert f"the tracking server {stack.mlflow_uri} could not move" in down.value.message
    assert "artifact store" in down.value.message
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.search_registered_models(f"name = '{name}'") == []

    result = log_and_validate(source=str(trained_model), task="llm/v1/chat", model_name=name)
    assert (result.version, result.created, result.aliases) == (1, True, ["challenger"])
