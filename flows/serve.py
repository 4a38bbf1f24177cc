"""Flow `serve`: run llmadapter's OpenAI-compatible server on models:/name@champion (long-running)."""

from __future__ import annotations

from prefect import flow

from llmadapter.errors import ConfigError
from llmadapter.registry import CHAMPION
from llmadapter.settings import configure_mlflow
from tasks.serve import run_server


@flow(name="serve", log_prints=True)
def serve(
    model_name: str | None = None,
    alias: str = CHAMPION,
    model_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key_env: str | None = None,
    alias_poll_s: float | None = None,
    webhook_secret_env: str | None = None,
) -> int:
    """Serve a registered model until the server stops (cancel the flow run to stop it).

    SIGTERM or SIGINT, to this flow's process (Kubernetes, systemd, Ctrl-C, Prefect's cancellation) or
    to the server, drains the server (LLMADAPTER_SHUTDOWN_GRACE_S) and completes the run (a run that
    Prefect is cancelling still ends Cancelled); a server that exits with a non-zero code (a crash, or a
    second signal that cut the drain short) fails it.

    Args:
        model_name: Registered model to serve at `alias` (models:/model_name@alias).
        alias: The alias to serve.
        model_uri: Any MLflow model URI instead of model_name/alias (models:/name/3, runs:/...).
        host: Interface to listen on (0.0.0.0 for other machines).
        port: TCP port.
        api_key_env: Name of an environment variable (on the worker) holding the bearer API key; the key
            itself never passes through Prefect.
        alias_poll_s: How often the server re-resolves the alias and swaps to the version it points at
            (default: the server's, 30 s; 0: never). A promotion reaches the server without a restart.
        webhook_secret_env: Name of an environment variable (on the worker) holding the MLflow webhook
            secret, for POST /webhooks/mlflow (an alias move then reaches the server at once).
    """
    configure_mlflow()
    if model_uri is None:
        if model_name is None:
            raise ConfigError("Give model_name (served at @alias) or model_uri.", param="model_name")
        model_uri = f"models:/{model_name}@{alias}"
    extra = ["--api-key-env", api_key_env] if api_key_env else []
    if alias_poll_s is not None:
        extra += ["--alias-poll-s", str(alias_poll_s)]
    if webhook_secret_env:
        extra += ["--webhook-secret-env", webhook_secret_env]
    return run_server(model_uri, host, port, extra)
