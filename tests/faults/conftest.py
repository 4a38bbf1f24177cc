"""Fault-scenario fixtures: real `mlflow server` and `prefect server` processes on free loopback ports."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmadapter.processes import free_port, running

BIN = Path(sys.executable).parent


def server_env(**extra: str) -> dict[str, str]:
    """This environment, with the venv's bin first on PATH (`mlflow server` starts its workers by name)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _mlflow_server_env() -> dict[str, str]:
    # MLflow's job runner (five huey consumer processes) is for GenAI jobs; here it would only slow the start.
    return server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    db: Path  # its SQLite backend, for what the REST API does not show (deleted versions)


@pytest.fixture(scope="module")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, _mlflow_db_template: Path
) -> Iterator[MlflowServer]:
    """`mlflow server` (SQLite backend, proxied artifacts, two workers) in a temp dir, stopped after the
    module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(_mlflow_db_template, root / "mlflow.db")
    port = free_port()
    argv = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    uri = f"http://127.0.0.1:{port}"
    with running(argv, f"{uri}/health", log=root / "mlflow.log", env=_mlflow_server_env(), timeout_s=180):
        yield MlflowServer(uri=uri, db=root / "mlflow.db")


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    home: Path  # PREFECT_HOME of the processes that use it (result storage: the log step's cache)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` (API only, no background services), the API of this process meanwhile."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prefect-server")
    home = root / "home"
    home.mkdir()
    port = free_port()
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-services", "--no-ui", "--analytics-off"]
    api_url = f"http://127.0.0.1:{port}/api"
    env = server_env(PREFECT_HOME=str(home), PREFECT_API_URL=api_url)
    with (
        running(argv, f"{api_url}/health", log=root / "prefect.log", env=env, timeout_s=180),
        temporary_settings({PREFECT_API_URL: api_url}),
    ):
        yield PrefectServer(api_url=api_url, home=home)
