"""MLflow webhooks end to end: a real `mlflow server` delivers alias moves to a real `llmadapter serve`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import llmadapter
from llmadapter.processes import free_port, running
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from tests.server.test_follow import SECRET, SECRET_ENV, V2_ANSWER

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _log_and_register(folder: Path, **config: Any) -> str:
    with mlflow.start_run():
        uri = llmadapter.log_model(
            str(folder), name="model", task="llm/v1/chat", model_config=config or None
        ).model_uri
    return str(mlflow.register_model(uri, "hooked").version)


def test_a_real_mlflow_server_delivers_alias_moves_to_a_real_llmadapter_serve(
    tmp_path: Path, trained_model: Path, _mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from openai import OpenAI

    shutil.copyfile(_mlflow_db_template, tmp_path / "mlflow.db")
    mlflow_port, serve_port = free_port(), free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    mlflow_env = {
        **os.environ,
        "PATH": path,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",  # MLflow refuses loopback targets otherwise
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "https,http",  # and plain-http ones
    }
    mlflow_argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
    mlflow_argv += ["--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    mlflow_argv += ["--artifacts-destination", str(tmp_path / "artifacts")]
    # The versions are logged straight into the server's store (local artifacts: fast to read back);
    # the alias moves go through the server, which is what delivers webhooks.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("hooked", (tmp_path / "art").as_uri()))
    v1 = _log_and_register(trained_model)
    v2 = _log_and_register(trained_model, stop=["fox"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    with running(
        mlflow_argv, f"{tracking}/health", log=tmp_path / "mlflow.log", env=mlflow_env, timeout_s=180
    ):
        client = MlflowClient()
        serve_url = f"http://127.0.0.1:{serve_port}"
        # Before the first alias event: the server caches each event's webhook list for
        # MLFLOW_WEBHOOK_CACHE_TTL (60 s), so a webhook created after an event may wait that long.
        client.create_webhook(
            name="llmadapter-serve",
            url=f"{serve_url}/webhooks/mlflow",
            events=["model_version_alias.created", "model_version_alias.deleted"],
            secret=SECRET,
        )
        client.set_registered_model_alias("hooked", "champion", v1)
        serve_env = {**os.environ, "PATH": path, SECRET_ENV: SECRET, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        serve_argv = [str(BIN / "llmadapter"), "serve", "models:/hooked@champion", "--port", str(serve_port)]
        serve_argv += ["--alias-poll-s", "3600", "--webhook-secret-env", SECRET_ENV]
        log = tmp_path / "serve.log"
        with running(serve_argv, f"{serve_url}/ready", log=log, env=serve_env, timeout_s=180):
            openai_client = OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)

            def ask() -> tuple[str, str]:
                raw = openai_client.chat.completions.with_raw_response.create(
                    model="hooked", messages=[{"role": "user", "content": TRAINED_PROMPT}], temperature=0
                )
                return raw.headers["x-llmadapter-model-version"], raw.parse().choices[0].message.content or ""

            assert ask() == (v1, TRAINED_ANSWER)
            moved = time.monotonic()
            client.set_registered_model_alias("hooked", "champion", v2)
            deadline = moved + 60
            while ask()[0] != v2:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            print(f"webhook: alias move -> first answer by v{v2} in {time.monotonic() - moved:.2f} s")
            assert ask() == (v2, V2_ANSWER)
        text = log.read_text()
        assert "webhook model_version_alias.created for hooked@champion" in text
        assert SECRET not in text
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
