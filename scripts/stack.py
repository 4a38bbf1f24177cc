"""Start and stop the platform stack on this machine: PostgreSQL, SeaweedFS S3, mlflow server, prefect server,
a worker.

    eval "$(python scripts/stack.py start)"   # starts it in the background, prints the exports
    python scripts/stack.py status
    python scripts/stack.py stop

`start` makes a new, empty stack under --root (default ./.llmadapter/stack; an old one there is removed):
a PostgreSQL cluster (databases mlflow, prefect) and SeaweedFS's S3 gateway (bucket mlflow) on free
loopback ports, `mlflow server` on PostgreSQL with its artifacts in the bucket (--artifacts proxied: the
server holds the S3 keys; direct: clients get them too), `prefect server` on PostgreSQL, the `llmadapter`
process work pool with this project's deployments and a worker. The exports go to stdout, the rest to
stderr; the processes keep running after the script exits, until `stop`. Needs PostgreSQL installed
(`apt-get install postgresql`) and the platform extra (`pip install 'llmadapter[platform]'`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from llmadapter.stack import LocalStack, stop_detached

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATE = "stack.json"


def _state(root: Path) -> dict[str, object] | None:
    path = root / STATE
    return json.loads(path.read_text()) if path.exists() else None


def _alive(state: dict[str, object]) -> list[str]:
    import psutil

    alive = []
    for entry in state["processes"]:  # type: ignore[attr-defined]
        try:
            if abs(psutil.Process(entry["pid"]).create_time() - entry["started"]) < 1.0:
                alive.append(entry["name"])
        except psutil.NoSuchProcess:
            continue
    return alive


def start(args: argparse.Namespace) -> int:
    root: Path = args.root.resolve()
    old = _state(root)
    if old is not None and _alive(old):
        print(
            f"A stack is already running under {root}: `python scripts/stack.py stop` first.", file=sys.stderr
        )
        return 1
    if root.exists():
        shutil.rmtree(root)
    began = time.monotonic()
    stack = LocalStack(root, artifacts=args.artifacts, project_dir=PROJECT_ROOT, ui=args.ui, attached=False)
    stack.up()
    state = stack.state()
    assert stack.database is not None and stack.objectstore is not None
    state["info"] = {
        "mlflow backend store": stack.database.url("mlflow"),
        "prefect database": stack.database.url("prefect", driver="asyncpg"),
        "s3 endpoint": stack.objectstore.endpoint_url,
        "s3 bucket": stack.objectstore.bucket,
        "s3 access key": stack.objectstore.access_key,
    }
    (root / STATE).write_text(json.dumps(state, indent=2))
    (root / STATE).chmod(0o600)  # it holds the database password
    print(
        f"# Stack up in {time.monotonic() - began:.0f} s under {root} (logs: {root}/*.log):", file=sys.stderr
    )
    for key, value in state["info"].items():
        print(f"#   {key}: {value}", file=sys.stderr)
    for key, value in stack.client_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def status(args: argparse.Namespace) -> int:
    state = _state(args.root.resolve())
    if state is None:
        print("No stack.", file=sys.stderr)
        return 1
    alive = set(_alive(state))
    for entry in state["processes"]:  # type: ignore[attr-defined]
        mark = "running" if entry["name"] in alive else "stopped"
        print(f"{mark:8} pid {entry['pid']:>7}  {entry['name']}")
    for key, value in state["env"].items():  # type: ignore[attr-defined]
        print(f"export {key}={shlex.quote(value)}")
    return 0 if alive else 1


def stop(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    state = _state(root)
    if state is None:
        print(f"No stack under {root}.", file=sys.stderr)
        return 0
    for name in stop_detached(state):
        print(f"stopped {name}", file=sys.stderr)
    (root / STATE).unlink()
    elsewhere = root / "postgres-dir"  # a cluster kept outside a root that `nobody` cannot enter
    if elsewhere.is_file():
        shutil.rmtree(elsewhere.read_text().strip(), ignore_errors=True)
        elsewhere.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / ".llmadapter" / "stack")
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start a new stack in the background")
    start_parser.add_argument("--artifacts", choices=["proxied", "direct"], default="proxied")
    start_parser.add_argument("--ui", action="store_true", help="serve Prefect's UI too")
    commands.add_parser("status", help="which processes run, and the exports")
    commands.add_parser("stop", help="stop every process of the stack")
    args = parser.parse_args(argv)
    return {"start": start, "status": status, "stop": stop}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
