"""What a promotion costs a running server: `llmadapter serve models:/NAME@champion` under closed-loop load.

    python bench/swap.py [--model smollm2|tiny] [--clients 8] [--tokens 16] [--poll-s 5]

Two versions of the model are registered (v2's model_config differs: it stops at the first period) in
a real `mlflow server` (SQLite, local artifacts) with a webhook to the llmadapter server. For each way
the server learns of the move (an MLflow webhook, with polling off; polling every --poll-s seconds,
with no webhook), the alias moves v1 -> v2 -> v1 while `--clients` closed-loop clients ask throughout.
Printed, all from one run:

- failed requests (target 0);
- p50 / p99 latency in the 10 s around each move vs the 10 s before it (target: p99 <= 2x steady);
- time from the alias move to the switch (the server's /v1/models card names the new version) and to
  the first answer by the new version (X-LLMAdapter-Model-Version; it includes that request's own
  latency), against the version's load + warm time from the server's log (target with webhooks: switch
  <= load + 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
NAME = "swap-bench"
SECRET = uuid.uuid4().hex
WINDOW_S = 10.0


def _folder(kind: str, data: Path) -> Path:
    if kind == "smollm2":
        from llmadapter.demo_models import smollm2_folder

        return smollm2_folder(data)
    from llmadapter.testing import build_tiny_model

    return build_tiny_model(data / "tiny", "llama", trained=True)


def _register_versions(store: str, art: Path, folder: Path) -> tuple[str, str]:
    import mlflow

    import llmadapter

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("swap", art.as_uri()))
    versions = []
    for config in (None, {"stop": ["."]}):
        with mlflow.start_run():
            info = llmadapter.log_model(str(folder), name="model", task="llm/v1/chat", model_config=config)
        version = mlflow.register_model(info.model_uri, NAME).version
        mlflow.MlflowClient().set_model_version_tag(NAME, str(version), "validation_status", "passed")
        versions.append(str(version))
    return versions[0], versions[1]


@contextmanager
def _mlflow_server(root: Path) -> Any:
    from llmadapter.processes import free_port, running

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "https,http",
    }
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "a"),
    ]
    with running(argv, f"{url}/health", log=root / "mlflow.log", env=env, timeout_s=180):
        yield url


@contextmanager
def _llmadapter_serve(root: Path, tracking: str, port: int, poll_s: float, tag: str) -> Any:
    from llmadapter.processes import running

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_REGISTRY_URI": tracking,
        "LLMADAPTER_BENCH_WEBHOOK_SECRET": SECRET,
    }
    argv = [str(BIN / "llmadapter"), "serve", f"models:/{NAME}@champion", "--port", str(port)]
    argv += ["--alias-poll-s", str(poll_s), "--webhook-secret-env", "LLMADAPTER_BENCH_WEBHOOK_SECRET"]
    log = root / f"serve-{tag}.log"
    with running(argv, f"http://127.0.0.1:{port}/ready", log=log, env=env, timeout_s=600):
        yield log


@dataclass
class Answers:
    records: list[tuple[float, float, str]] = field(default_factory=list)  # (end, latency, version)
    failures: list[str] = field(default_factory=list)
    switches: list[tuple[float, str]] = field(default_factory=list)  # (when /v1/models changed, version)


async def _client(url: str, tokens: int, answers: Answers, stop: asyncio.Event) -> None:
    import httpx

    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    async with httpx.AsyncClient(timeout=120) as http:
        while not stop.is_set():
            start = time.monotonic()
            try:
                answer = await http.post(f"{url}/v1/chat/completions", json=body)
                answer.raise_for_status()
                end = time.monotonic()
                answers.records.append((end, end - start, answer.headers["x-llmadapter-model-version"]))
            except Exception as exc:
                answers.failures.append(f"{type(exc).__name__}: {exc}")


async def _watch(url: str, answers: Answers, stop: asyncio.Event) -> None:
    """When the server switches: its /v1/models card, read every 50 ms."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        seen = None
        while not stop.is_set():
            try:
                version = (await http.get(f"{url}/v1/models/{NAME}")).json().get("version")
            except Exception:
                version = None
            if version is not None and version != seen:
                answers.switches.append((time.monotonic(), version))
                seen = version
            await asyncio.sleep(0.05)


def _quantiles(latencies: list[float]) -> tuple[float, float]:
    if len(latencies) < 2:
        return (latencies[0], latencies[0]) if latencies else (float("nan"), float("nan"))
    cuts = statistics.quantiles(latencies, n=100)
    return statistics.median(latencies), cuts[98]


def _load_times(log: Path) -> list[float]:
    return [float(s) for s in re.findall(r"loaded and warmed in ([0-9.]+) s", log.read_text())]


async def _phase(
    url: str, tracking: str, versions: tuple[str, str], clients: int, tokens: int, settle_s: float
) -> tuple[Answers, list[tuple[float, str]]]:
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    answers = Answers()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_client(url, tokens, answers, stop)) for _ in range(clients)]
    tasks.append(asyncio.create_task(_watch(url, answers, stop)))
    moves: list[tuple[float, str]] = []
    await asyncio.sleep(WINDOW_S)  # steady state before the first move
    for target in (versions[1], versions[0]):
        moved = time.monotonic()
        await asyncio.to_thread(registry.set_registered_model_alias, NAME, "champion", target)
        moves.append((moved, target))
        await asyncio.sleep(settle_s)
    stop.set()
    await asyncio.gather(*tasks)
    return answers, moves


def _report(how: str, answers: Answers, moves: list[tuple[float, str]], loads: list[float]) -> None:
    first_move = moves[0][0]
    steady = [lat for end, lat, _ in answers.records if first_move - WINDOW_S <= end < first_move]
    p50_s, p99_s = _quantiles(steady)
    print(f"\n{how}: {len(answers.records)} answers, {len(answers.failures)} failed")
    for failure in answers.failures[:5]:
        print(f"  failure: {failure}")
    print(f"  steady (10 s before the first move): p50 {p50_s * 1000:.0f} ms, p99 {p99_s * 1000:.0f} ms")
    for (moved, target), load in zip(moves, loads, strict=False):
        around = [
            lat for end, lat, _ in answers.records if moved - WINDOW_S / 2 <= end < moved + WINDOW_S / 2
        ]
        p50, p99 = _quantiles(around)
        firsts = [end for end, _, v in answers.records if v == target and end >= moved]
        first = (min(firsts) - moved) if firsts else float("nan")
        seen = [t for t, v in answers.switches if v == target and t >= moved]
        switch = (min(seen) - moved) if seen else float("nan")
        print(
            f"  -> v{target}: switched {switch:.2f} s after the move (load + warm {load:.2f} s), first "
            f"answer by it {first:.2f} s after; "
            f"10 s around it: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            f"({p99 / p99_s:.2f}x steady p99)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--poll-s", type=float, default=5.0)
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from llmadapter.processes import free_port

    root = Path(tempfile.mkdtemp(prefix="llmadapter-swap-"))
    try:
        folder = _folder(args.model, ROOT / ".llmadapter" / "bench")
        versions = _register_versions(f"sqlite:///{root / 'mlflow.db'}", root / "art", folder)
        print(f"{args.model}: versions {versions}, {args.clients} closed-loop clients, {args.tokens} tokens")
        with _mlflow_server(root) as tracking:
            registry = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
            port = free_port()
            registry.create_webhook(
                name="bench",
                url=f"http://127.0.0.1:{port}/webhooks/mlflow",
                events=["model_version_alias.created"],
                secret=SECRET,
            )
            for how, poll_s in (
                ("webhook (polling off)", 0.0),
                (f"polling every {args.poll_s:g} s", args.poll_s),
            ):
                registry.set_registered_model_alias(NAME, "champion", versions[0])
                # Polling 0 turns following off altogether: the webhook phase polls once an hour.
                poll = 3600.0 if poll_s == 0 else poll_s
                tag = "webhook" if poll_s == 0 else "poll"
                with _llmadapter_serve(root, tracking, port, poll, tag) as log:
                    settle = 15.0 + (poll_s if poll_s else 0.0)
                    answers, moves = asyncio.run(
                        _phase(
                            f"http://127.0.0.1:{port}", tracking, versions, args.clients, args.tokens, settle
                        )
                    )
                    _report(how, answers, moves, _load_times(log)[1:])
                if poll_s == 0:  # the polling phase has no webhook
                    for hook in registry.list_webhooks():
                        registry.delete_webhook(hook.webhook_id)
                    port = free_port()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
