"""The stack on one machine, embedded backends: `prefect server`, `mlflow server`, a process pool, a worker.

Used by the end-to-end test and by hand:

    python scripts/e2e.py --model-dir /path/to/model/folder [--keep]

starts (with llmadapter.stack, on SQLite and local files; scripts/stack.py runs the same on PostgreSQL
and S3) an MLflow tracking server (proxied artifacts) and a Prefect server on free loopback ports,
creates the `llmadapter` process work pool, runs `prefect --no-prompt deploy --all` from the project
root, starts a worker, runs `log-and-validate/default` on the model with `--watch`,
prints the registered version and stops every process it started (unless --keep, then Ctrl-C stops).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmadapter.processes import free_port
from llmadapter.stack import LocalStack

__all__ = ["PROJECT_ROOT", "Stack", "free_port", "running_stack"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The stack of llmadapter.stack on the embedded backends (SQLite, local artifacts behind the server).
Stack = LocalStack


@contextmanager
def running_stack(root: Path | None = None, *, ui: bool = False) -> Iterator[LocalStack]:
    """A stack that is up inside the block and fully stopped after it, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="llmadapter-e2e-") as tmp:
        stack = LocalStack(
            root=Path(root) if root is not None else Path(tmp),
            platform=False,
            project_dir=PROJECT_ROOT,
            ui=ui,
            extra_env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        try:
            stack.up()
            yield stack
        finally:
            stack.down()


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
