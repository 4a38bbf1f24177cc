"""`mlflow server` (its backend store and artifact modes), `prefect server` and a Prefect process worker.

Run as programs, never imported: llmadapter does not import Prefect.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal

from llmadapter.processes import answers
from llmadapter.stack._service import Service, console_script, free_ports

__all__ = ["ArtifactMode", "mlflow_server", "prefect_server", "prefect_worker"]

# proxied: the server reads and writes the artifact store itself (--artifacts-destination); clients need
# only its URL. direct: clients get s3:// URIs (--default-artifact-root) and need the store's credentials.
ArtifactMode = Literal["proxied", "direct", "local"]


def mlflow_server(
    root: Path,
    *,
    name: str,
    backend_store_uri: str,
    artifacts: str,
    mode: ArtifactMode,
    env: Mapping[str, str],
    port: int | None = None,
    attached: bool = True,
) -> tuple[Service, str]:
    """The Service of one `mlflow server` and its URL. `artifacts` is the destination (proxied, local)
    or the default artifact root (direct)."""
    port = port if port is not None else free_ports(1)[0]
    argv = [console_script("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", backend_store_uri]
    if mode == "direct":
        argv += ["--default-artifact-root", artifacts, "--no-serve-artifacts"]
    else:
        argv += ["--artifacts-destination", artifacts]
    uri = f"http://127.0.0.1:{port}"
    service = Service(
        name=f"{name} at {uri}",
        argv=argv,
        log=root / f"{name}.log",
        ready=lambda: answers(f"{uri}/health"),
        # MLflow's job runner (huey consumers) is for GenAI jobs; here it only slows the start.
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        attached=attached,
    )
    return service, uri


def prefect_server(
    root: Path,
    *,
    env: Mapping[str, str],
    port: int,
    database_url: str | None,
    ui: bool = False,
    attached: bool = True,
) -> Service:
    """`prefect server start` with its services (the scheduler makes the nightly runs); on PostgreSQL
    when `database_url` (postgresql+asyncpg://...) is given, else SQLite in PREFECT_HOME."""
    argv = [console_script("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--analytics-off", "--ui" if ui else "--no-ui"]
    server_env = dict(env)
    if database_url is not None:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    return Service(
        name=f"prefect server at 127.0.0.1:{port}",
        argv=argv,
        log=root / "prefect-server.log",
        ready=lambda: answers(f"http://127.0.0.1:{port}/api/health"),
        env=server_env,
        attached=attached,
    )


def prefect_worker(
    root: Path, *, pool: str, env: Mapping[str, str], cwd: Path, attached: bool = True
) -> Service:
    """`prefect worker start --pool POOL` with its health server (ready once it polls the API)."""
    port = free_ports(1)[0]
    worker_env = {
        **env,
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "PREFECT_WORKER_WEBSERVER_PORT": str(port),
    }
    return Service(
        name=f"prefect worker of pool {pool}",
        argv=[console_script("prefect"), "worker", "start", "--pool", pool, "--with-healthcheck"],
        log=root / "worker.log",
        ready=lambda: answers(f"http://127.0.0.1:{port}/health"),
        env=worker_env,
        cwd=cwd,
        attached=attached,
    )


def without(env: Mapping[str, str], names: Collection[str]) -> dict[str, str]:
    """`env` without the variables `names`."""
    return {k: v for k, v in env.items() if k not in names}


def pythonpath(first: Path) -> str:
    return os.pathsep.join(p for p in (str(first), os.environ.get("PYTHONPATH")) if p)
