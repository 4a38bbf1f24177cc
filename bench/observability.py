"""Observability cost: `llmadapter serve` with request metrics off, on (the default), and on with MLflow
tracing of every request (sample rate 1.0), at 32 concurrent clients.

    python bench/observability.py [--model tiny|smollm2|both] [--clients 32] [--tokens 32]
                                  [--requests 128] [--rounds 3]

The three configurations are three server processes on the same logged model, up together; rounds
drive them in turn (closed loops of `--clients` clients sending the same greedy chat request, whole and
streamed), so that drift on a shared machine reaches all three alike. Traces go where `llmadapter serve`
sends them by default: the project's SQLite tracking store, written by the server process itself. Before
the next configuration runs, the tracing server's exporter is waited for, so that its backlog never
runs during another's measurement; the traces it had written by the end of a run are printed. Printed:
tokens/s per configuration (median of the rounds) and the ratios to "metrics off" (targets: tracing
costs <= 3%, metrics nothing measurable).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import drive, model_folder, ours_send, running  # noqa: E402

# name -> extra `llmadapter serve` flags
CONFIGS = {
    "metrics off": ["--request-metrics", "false"],
    "metrics on": [],
    "metrics + tracing": ["--tracing", "true", "--tracing-sample-rate", "1.0"],
}


def log_model(folder: Path, store: Path) -> tuple[str, str]:
    """(model URI, tracking URI): our model logged into a fresh SQLite store."""
    import mlflow

    import llmadapter

    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("observability-bench", artifact_location=(store / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = llmadapter.log_model(
            str(folder), name="model", task="llm/v1/chat", registered_model_name="bench"
        )
    return info.model_uri, uri


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples over all its labels (0 when absent)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return sum(float(s.value) for f in families for s in f.samples if s.name == name)


def settle(url: str, sent: int, timeout_s: float = 600) -> None:
    """Until the tracing server has written (or dropped) a trace for each of `sent` requests."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = metric(url, "llmadapter_traces_exported_total") + metric(
            url, "llmadapter_traces_dropped_total"
        )
        if done >= sent:
            return
        time.sleep(0.5)


def bench(kind: str, clients: int, tokens: int, requests: int, rounds: int, threads: int) -> None:
    from llmadapter.processes import free_port

    folder = model_folder(kind, ROOT / ".llmadapter")
    with tempfile.TemporaryDirectory(prefix="observability-bench-") as tmp_name, ExitStack() as servers:
        tmp = Path(tmp_name)
        model_uri, tracking_uri = log_model(folder, tmp)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the servers' store
        urls = {}
        for i, (name, flags) in enumerate(CONFIGS.items()):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "llmadapter.cli", "serve", model_uri, "--port", str(port)]
            argv += ["--torch-threads", str(threads), "--log-level", "warning", *flags]
            servers.enter_context(running(argv, f"{urls[name]}/ready", tmp / f"server-{i}.log", threads))
        results: dict[tuple[str, bool], list[float]] = {}
        written: list[tuple[float, float]] = []  # (traces written by the end of a run, requests sent)
        sent = 0
        for _ in range(rounds):
            for name, url in urls.items():
                for stream in (False, True):
                    result = asyncio.run(drive(name, ours_send(url, tokens, stream), clients, requests))
                    results.setdefault((name, stream), []).append(result.tokens_per_s)
                    if name == "metrics + tracing":
                        sent += requests + 1  # and drive's warm-up request
                        written.append((metric(url, "llmadapter_traces_exported_total"), sent))
                        settle(url, sent)
        dropped = metric(urls["metrics + tracing"], "llmadapter_traces_dropped_total")
    print(
        f"\n== {kind}: {clients} clients, {tokens} new tokens, {requests} requests per run, {rounds} rounds"
    )
    print(f"{'configuration':<20}{'whole tok/s':>14}{'ratio':>8}{'streamed tok/s':>17}{'ratio':>8}")
    base = {s: statistics.median(results[("metrics off", s)]) for s in (False, True)}
    for name in CONFIGS:
        whole, streamed = (statistics.median(results[(name, s)]) for s in (False, True))
        ratios = whole / base[False], streamed / base[True]
        print(f"{name:<20}{whole:>14.1f}{ratios[0]:>8.3f}{streamed:>17.1f}{ratios[1]:>8.3f}")
    spread = {
        name: max(max(v) / min(v) - 1 for (n, _), v in results.items() if n == name) for name in CONFIGS
    }
    print("round-to-round spread (max/min - 1): " + ", ".join(f"{n} {s:.1%}" for n, s in spread.items()))
    print(
        "traces written by the end of each tracing run: "
        + ", ".join(f"{int(w)}/{int(s)}" for w, s in written)
        + f"; dropped {int(dropped)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="tiny")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128, help="requests per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch threads {args.torch_threads}, python {sys.version[:7]}")
    for kind in ["tiny", "smollm2"] if args.model == "both" else [args.model]:
        bench(kind, args.clients, args.tokens, args.requests, args.rounds, args.torch_threads)


if __name__ == "__main__":
    main()
