"""The grown-up stack on one machine: `prefect server`, `mlflow server`, a process pool and a worker.

Used by the end-to-end test and by hand:

    python scripts/e2e.py --model-dir /path/to/model/folder [--keep]

starts an MLflow tracking server (SQLite backend, proxied artifacts) and a Prefect server on free
loopback ports, creates the `llmadapter` process work pool, runs `prefect --no-prompt deploy --all`
from the project root, starts a worker, runs `log-and-validate/default` on the model with `--watch`,
prints the registered version and stops every process it started (unless --keep, then Ctrl-C stops).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llmadapter.errors import LLMAdapterError
from llmadapter.processes import free_port, wait_until_ready

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POOL = "llmadapter"


def _bin(name: str) -> str:
    """A console script of this environment (the venv's bin next to this Python)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class Stack:
    """Processes and settings of one running stack; every process is stopped by `stop()`."""

    root: Path
    ui: bool = False
    prefect_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_HOME": str(self.root / "prefect-home"),
                "PREFECT_API_URL": self.prefect_api,
                "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(self.prefect_port),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "true" if self.ui else "false",
                # The 10 s defaults dominate the latency of a short run; 2 s is plenty here.
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                "DO_NOT_TRACK": "1",
                "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "MLFLOW_REGISTRY_URI": self.mlflow_uri,
                "LLMADAPTER_DATA_DIR": str(self.root / "data"),
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # prefect.yaml's pull step works in {{ $PWD }}: the directory deploy runs in.
                "PWD": str(PROJECT_ROOT),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p
                ),
            }
        )
        env.pop("MLFLOW_EXPERIMENT_ID", None)
        return env

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        # Its own session, so stop() can signal the process and the children it starts (flow runs).
        proc = subprocess.Popen(
            list(command),
            cwd=PROJECT_ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def run(self, command: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(command), cwd=PROJECT_ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{output}")
        return result

    def wait_http(self, url: str, name: str, timeout: float = 180) -> None:
        try:
            wait_until_ready(dict(self.procs)[name], url, what=f"{name} at {url}", timeout_s=timeout)
        except LLMAdapterError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail(name)}") from None

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def up(self) -> None:
        (self.root / "prefect-home").mkdir(parents=True, exist_ok=True)
        self.start(
            "mlflow",
            [
                _bin("mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "mlartifacts"),
            ],
        )
        self.start(
            "prefect-server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--analytics-off"]
        )
        self.wait_http(f"{self.mlflow_uri}/health", "mlflow")
        self.wait_http(f"{self.prefect_api}/health", "prefect-server")
        self.run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process"])
        self.run([_bin("prefect"), "--no-prompt", "deploy", "--all"])
        self.start("worker", [_bin("prefect"), "worker", "start", "--pool", POOL])

    def run_deployment(self, name: str, params: dict[str, Any], timeout: float = 900) -> str:
        """`prefect deployment run NAME --params ... --watch`; returns its output (raises on failure)."""
        command = [_bin("prefect"), "deployment", "run", name, "--params", json.dumps(params), "--watch"]
        return self.run(command, timeout=timeout).stdout

    def stop(self) -> None:
        # Worker first (it would start new runs), servers last; SIGTERM twice, then SIGKILL.
        for _name, proc in reversed(self.procs):
            _stop_group(proc)
        for log in self.logs:
            log.close()
        self.procs.clear()


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group this script created for the process
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s / 2)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_stack(root: Path | None = None, *, ui: bool = False) -> Iterator[Stack]:
    """A stack that is up inside the block and fully stopped after it, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="llmadapter-e2e-") as tmp:
        stack = Stack(root=Path(root) if root is not None else Path(tmp), ui=ui)
        try:
            stack.up()
            yield stack
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="A model folder (or hub id in the local cache).")
    parser.add_argument("--task", default="llm/v1/chat")
    parser.add_argument("--model-name", default="e2e-model")
    parser.add_argument("--keep", action="store_true", help="Keep the stack running until Ctrl-C.")
    args = parser.parse_args(argv)
    with running_stack() as stack:
        print(f"Prefect API {stack.prefect_api}   MLflow {stack.mlflow_uri}")
        print(
            stack.run_deployment(
                "log-and-validate/default",
                {"source": args.model_dir, "task": args.task, "model_name": args.model_name},
            )
        )
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
        version = client.get_model_version_by_alias(args.model_name, "challenger")
        print(f"{args.model_name} version {version.version} @challenger, tags {version.tags}")
        if args.keep:
            print("Running; Ctrl-C stops everything.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
