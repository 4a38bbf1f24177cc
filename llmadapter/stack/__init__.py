"""The grown-up stack on one machine: PostgreSQL, an S3 store, `mlflow server`, `prefect server`, a worker.

`LocalStack(root).up()` starts, in order: a PostgreSQL cluster (databases `mlflow` and `prefect`) and
SeaweedFS's S3 gateway (bucket `mlflow`), then `mlflow server` on PostgreSQL with its artifacts in the
bucket (proxied, or direct: clients then need the store's credentials) beside `prefect server` on
PostgreSQL, then the `llmadapter` process work pool, `prefect deploy --all` of the project and a worker.
With `platform=False` the same stack runs on the embedded backends (SQLite, local files). `client_env()`
is what a client exports to use it; `down()` stops everything, whatever state it is in.

Used by the platform tests, scripts/stack.py (start/stop by hand), scripts/e2e.py and bench/platform.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmadapter.errors import LLMAdapterError
from llmadapter.stack._service import Service, console_script, free_ports, stop_group
from llmadapter.stack.database import Database
from llmadapter.stack.objectstore import ObjectStore
from llmadapter.stack.servers import (
    ArtifactMode,
    mlflow_server,
    prefect_server,
    prefect_worker,
    pythonpath,
    without,
)

__all__ = [
    "ArtifactMode",
    "Database",
    "LocalStack",
    "ObjectStore",
    "Service",
    "console_script",
    "running_stack",
    "stop_detached",
]

POOL = "llmadapter"
ARTIFACT_PREFIX = "mlartifacts"
# Variables that would hand a client the object store's credentials behind the stack's back.
_STORE_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "MLFLOW_S3_ENDPOINT_URL",
)


@dataclass
class LocalStack:
    """The processes of one stack under `root` (logs, data) and how to reach them."""

    root: Path
    platform: bool = True
    artifacts: ArtifactMode = "proxied"
    project_dir: Path = field(default_factory=Path.cwd)
    prefect: bool = True
    worker: bool = True
    ui: bool = False
    attached: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)
    prefect_port: int = field(default_factory=lambda: free_ports(1)[0])
    database: Database | None = None
    objectstore: ObjectStore | None = None
    services: list[Service] = field(default_factory=list)
    mlflow_uri: str = ""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.project_dir = Path(self.project_dir)
        if self.platform and self.artifacts == "local":
            raise LLMAdapterError("artifacts='local' is the embedded stack's; use platform=False.")
        if not self.platform and self.artifacts != "local":
            self.artifacts = "local"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        return [(s.name, s.proc) for s in self.services if s.proc is not None]

    def client_env(self) -> dict[str, str]:
        """The variables a client (a shell, a flow run, `llmadapter serve`) exports to use this stack."""
        env = {"MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_REGISTRY_URI": self.mlflow_uri}
        if self.prefect:
            env["PREFECT_API_URL"] = self.prefect_api
        if self.artifacts == "direct" and self.objectstore is not None:
            env |= self.objectstore.client_env()
        return env

    def env(self) -> dict[str, str]:
        """The environment of the processes it runs (worker, CLI calls): this one's, pointed at the stack.

        The object store's credentials are dropped unless clients need them (direct mode): in proxied
        mode only the tracking server holds them.
        """
        env = without(os.environ, _STORE_CREDENTIALS)
        env.pop("MLFLOW_EXPERIMENT_ID", None)
        env |= {
            "PREFECT_HOME": str(self.root / "prefect-home"),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.prefect_port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true" if self.ui else "false",
            # The 10 s defaults dominate the latency of a short run; 2 s is plenty on one machine.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "DO_NOT_TRACK": "1",
            "LLMADAPTER_DATA_DIR": str(self.root / "data"),
            # prefect.yaml's pull step works in {{ $PWD }}: the directory deploy runs in.
            "PWD": str(self.project_dir),
            "PYTHONPATH": pythonpath(self.project_dir),
            **self.client_env(),
            **self.extra_env,
        }
        return env

    # --- start -----------------------------------------------------------------------------------------

    def _start(self, service: Service) -> Service:
        self.services.append(service)
        service.start()
        return service

    def _start_stores(self) -> tuple[str, str | None]:
        """PostgreSQL and the S3 store (platform) or nothing (embedded); the MLflow backend store URI and
        Prefect's database URL."""
        if not self.platform:
            return f"sqlite:///{self.root / 'mlflow.db'}", None
        self.database = Database(self.root, attached=self.attached)
        self.objectstore = ObjectStore(self.root, attached=self.attached)
        for part in (self.database, self.objectstore):
            part.start()
            self.services.append(part.service)
        self.database.wait_ready()
        for name in ("mlflow", "prefect"):
            self.database.create_database(name)
        self.objectstore.wait_ready()
        return self.database.url("mlflow"), self.database.url("prefect", driver="asyncpg")

    def add_mlflow_server(self, name: str, backend_store_uri: str, mode: ArtifactMode) -> tuple[Service, str]:
        """Start one more `mlflow server` on this stack's stores (another artifact mode, say); returns it
        and its URL once it answers."""
        service, uri = self._mlflow(name, backend_store_uri, mode)
        self._start(service).wait_ready()
        return service, uri

    def _mlflow(self, name: str, backend_store_uri: str, mode: ArtifactMode) -> tuple[Service, str]:
        env = without(os.environ, _STORE_CREDENTIALS)
        if mode == "local":
            artifacts = str(self.root / ARTIFACT_PREFIX)
        else:
            if self.objectstore is None:
                raise LLMAdapterError(f"artifacts={mode!r} needs the platform stack's object store.")
            artifacts = self.objectstore.artifact_uri(f"{ARTIFACT_PREFIX}/{name}")
            env |= self.objectstore.client_env()
        return mlflow_server(
            self.root,
            name=name,
            backend_store_uri=backend_store_uri,
            artifacts=artifacts,
            mode=mode,
            env=env,
            attached=self.attached,
        )

    def up(self) -> None:
        """Start everything, each part once the one it needs answers; on failure, stop what started."""
        (self.root / "prefect-home").mkdir(parents=True, exist_ok=True)
        try:
            backend, prefect_db = self._start_stores()
            mlflow, self.mlflow_uri = self._mlflow("mlflow", backend, self.artifacts)
            self._start(mlflow)
            if self.prefect:
                env = self.env()
                self._start(
                    prefect_server(
                        self.root,
                        env=env,
                        port=self.prefect_port,
                        database_url=prefect_db,
                        ui=self.ui,
                        attached=self.attached,
                    )
                )
            for service in list(self.services):
                service.wait_ready()
            if self.prefect and self.worker:
                self.run([console_script("prefect"), "work-pool", "create", POOL, "--type", "process"])
                self.run([console_script("prefect"), "--no-prompt", "deploy", "--all"])
                worker = prefect_worker(
                    self.root, pool=POOL, env=self.env(), cwd=self.project_dir, attached=self.attached
                )
                self._start(worker).wait_ready()
        except BaseException:
            self.down()
            raise

    # --- use -------------------------------------------------------------------------------------------

    def run(self, command: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command (`prefect ...`) in the project dir with the stack's environment; raises on failure."""
        result = subprocess.run(
            list(command),
            cwd=self.project_dir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            raise LLMAdapterError(f"{' '.join(command)} exited {result.returncode}:\n{output}")
        return result

    def run_deployment(self, name: str, params: Mapping[str, Any], timeout: float = 900) -> str:
        """`prefect deployment run NAME --params ... --watch`; its output (raises when the run fails)."""
        command = [console_script("prefect"), "deployment", "run", name, "--params", json.dumps(params)]
        return self.run([*command, "--watch"], timeout=timeout).stdout

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # --- stop ------------------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop every process, the worker first (it would start new runs), the stores last."""
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def state(self) -> dict[str, Any]:
        """What `stop_detached` needs to stop a detached stack from another process, and its URIs."""
        import psutil

        return {
            "root": str(self.root),
            "env": self.client_env(),
            "processes": [
                {
                    "name": s.name,
                    "pid": s.pid,
                    "started": psutil.Process(s.pid).create_time(),
                    "signal": int(s.stop_signal),
                    "grace_s": s.grace_s,
                }
                for s in self.services
                if s.pid is not None
            ],
        }


def stop_detached(state: Mapping[str, Any]) -> list[str]:
    """Stop the processes of a detached stack (in reverse start order); the names of those that ran."""
    import psutil

    stopped = []
    for entry in reversed(state["processes"]):
        try:
            same = abs(psutil.Process(entry["pid"]).create_time() - entry["started"]) < 1.0
        except psutil.NoSuchProcess:
            continue
        if same and stop_group(entry["pid"], entry["signal"], entry["grace_s"]):
            stopped.append(entry["name"])
    return stopped


@contextmanager
def running_stack(root: Path, **options: Any) -> Iterator[LocalStack]:
    """A LocalStack that is up inside the block and stopped after it, whatever happens (a throwaway: a
    cluster it had to keep outside `root` is removed; `root` is the caller's)."""
    stack = LocalStack(root=root, **options)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        database = stack.database
        if database is not None and not database.cluster_dir.is_relative_to(stack.root):
            database.remove()  # the cluster was kept in a temp dir (a root `nobody` cannot enter)
