"""Observability cost: `llmadapter serve` with request metrics off, on (the default), and on with MLflow
tracing of every request (sample rate 1.0), at 32 concurrent clients.

    python bench/observability.py [--model tiny|smollm2|both] [--clients 32] [--tokens 32]
                                  [--requests 128] [--rounds 3]

The three configurations are three server processes on the same logged model, up together; rounds
drive them in turn (closed loops of `--clients` clients sending the same greedy chat request, whole and
streamed), so that drift on a shared machine reaches all three alike, and each ratio is taken within a
round before the median over rounds. Traces go where `llmadapter serve` sends them by default: the
project's SQLite tracking store, written by the server's exporter process. Before the next configuration
runs, that exporter is waited for, so that its backlog never runs during another's measurement (its CPU
counts for its own configuration); the traces it had written by the end of each run are printed. Printed:
tokens/s and the server's CPU per generated token (its exporter process included), as medians, with
their ratios to "metrics off" (targets: tracing costs <= 3% tok/s, metrics nothing measurable).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import drive, model_folder, ours_send  # noqa: E402

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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system) of a process and of all its descendants (the trace exporter), from
    /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    own, descendants, todo = 0.0, 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        if current == pid:
            own += seconds
        else:
            descendants += seconds
    return own, descendants


@dataclass
class Run:
    tokens_per_s: float
    cpu_ms_per_token: float  # the server's CPU (exporter process included) per generated token
    exporter_cpu_s: float  # of that, the exporter process's
    requests: int


def per_request_costs(folder: Path, tokens: int, repeats: int = 2000) -> tuple[float, float]:
    """CPU seconds, per request of `tokens` new tokens answered by a real engine, of the observer's
    work: recording its per-request metrics; building its trace."""
    import transformers

    from bench.serving import MESSAGES
    from llmadapter.catalog import get_task
    from llmadapter.config import ModelConfig
    from llmadapter.engine.generation import GenerationEngine
    from llmadapter.protocol import ChatCompletionRequest, parse_request
    from llmadapter.request_context import RequestContext, bind, unbind
    from llmadapter.server.metrics import ServerMetrics
    from llmadapter.server.tracing import served_trace

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    config = ModelConfig(temperature=0, max_tokens=tokens)
    engine = GenerationEngine(model, tokenizer, spec=get_task("llm/v1/chat"), config=config, model_name="m")
    request = parse_request(ChatCompletionRequest, {"messages": MESSAGES, "logit_bias": {"0": -100}})

    async def answer() -> RequestContext:
        context = RequestContext("bench")
        token = bind(context)
        try:
            await engine.arun(request)
        finally:
            unbind(token)
        context.end = time.perf_counter()
        return context

    context = asyncio.run(answer())
    engine.close()
    metrics = ServerMetrics(lambda: {})
    (seq,) = context.work[0][1].seqs
    start = time.process_time()
    for _ in range(repeats):
        metrics.observe_sequence(engine, seq, time.perf_counter())
    metrics_s = (time.process_time() - start) / repeats
    start = time.process_time()
    for _ in range(repeats):
        served_trace(context, include_text=True)
    trace_s = (time.process_time() - start) / repeats
    return metrics_s, trace_s


def bench(
    kind: str, clients: int, tokens: int, requests: int, rounds: int, threads: int, data_dir: Path
) -> None:
    from llmadapter.processes import free_port, running

    folder = model_folder(kind, data_dir)
    with tempfile.TemporaryDirectory(prefix="observability-bench-") as tmp_name, ExitStack() as servers:
        tmp = Path(tmp_name)
        model_uri, tracking_uri = log_model(folder, tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": str(threads)}
        urls, pids = {}, {}
        for i, (name, flags) in enumerate(CONFIGS.items()):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "llmadapter.cli", "serve", model_uri, "--port", str(port)]
            argv += ["--torch-threads", str(threads), "--log-level", "warning", *flags]
            proc = servers.enter_context(
                running(argv, f"{urls[name]}/ready", log=tmp / f"server-{i}.log", env=env)
            )
            pids[name] = proc.pid
        runs: dict[tuple[str, bool], list[Run]] = {}
        written: list[str] = []  # traces written by the end of a tracing run / requests it sent
        # The exporter process starts with the first trace (MLflow's import, the store's set-up): a
        # one-time cost, paid here before anything is measured.
        asyncio.run(drive("warm-up", ours_send(urls["metrics + tracing"], tokens, False), 1, 1))
        sent = 2
        settle(urls["metrics + tracing"], sent)
        for _ in range(rounds):
            for name, url in urls.items():
                for stream in (False, True):
                    before = cpu_seconds(pids[name])
                    result = asyncio.run(drive(name, ours_send(url, tokens, stream), clients, requests))
                    if name == "metrics + tracing":
                        sent += requests + 1  # and drive's warm-up request
                        written.append(f"{int(metric(url, 'llmadapter_traces_exported_total'))}/{sent}")
                        settle(url, sent)  # its backlog is its own cost, never another's run
                    own, exporter = (a - b for a, b in zip(cpu_seconds(pids[name]), before, strict=True))
                    cpu_ms = (own + exporter) * 1000 / result.tokens
                    run = Run(result.tokens_per_s, cpu_ms, exporter, requests + 1)
                    runs.setdefault((name, stream), []).append(run)
        dropped = metric(urls["metrics + tracing"], "llmadapter_traces_dropped_total")
    print(
        f"\n== {kind}: {clients} clients, {tokens} new tokens, {requests} requests per run, {rounds} rounds"
    )
    print(f"{'configuration':<20}{'':>4}{'tok/s':>9}{'ratio':>8}{'cpu ms/token':>14}{'ratio':>8}")
    for stream in (False, True):
        base = runs[("metrics off", stream)]
        for name in CONFIGS:
            these = runs[(name, stream)]
            # Ratios are paired within a round (the same minutes of a shared machine), then the median.
            speed = statistics.median(
                r.tokens_per_s / b.tokens_per_s for r, b in zip(these, base, strict=True)
            )
            cost = statistics.median(
                r.cpu_ms_per_token / b.cpu_ms_per_token for r, b in zip(these, base, strict=True)
            )
            tok_s = statistics.median(r.tokens_per_s for r in these)
            cpu_ms = statistics.median(r.cpu_ms_per_token for r in these)
            mode = "sse" if stream else ""
            print(f"{name:<20}{mode:>4}{tok_s:>9.1f}{speed:>8.3f}{cpu_ms:>14.2f}{cost:>8.3f}")
    print(f"traces written by the end of each tracing run: {', '.join(written)}; dropped {int(dropped)}")
    traced = [r for stream in (False, True) for r in runs[("metrics + tracing", stream)]]
    exporter_ms = 1000 * sum(r.exporter_cpu_s for r in traced) / sum(r.requests for r in traced)
    metrics_s, trace_s = per_request_costs(folder, tokens)
    # What the server spends on one request at this concurrency, observability off.
    server_ms = statistics.median(r.cpu_ms_per_token for r in runs[("metrics off", False)]) * tokens
    print(
        f"CPU per request ({tokens} tokens, {clients} clients): the server {server_ms:.1f} ms; recording "
        f"its metrics {metrics_s * 1e6:.0f} us ({metrics_s * 1000 / server_ms:.2%}); building its trace "
        f"{trace_s * 1e6:.0f} us ({trace_s * 1000 / server_ms:.2%}); writing the trace (exporter "
        f"process, niced) {exporter_ms:.1f} ms ({exporter_ms / server_ms:.1%})"
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
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter", help="where models are built")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch threads {args.torch_threads}, python {sys.version[:7]}")
    for kind in ["tiny", "smollm2"] if args.model == "both" else [args.model]:
        bench(kind, args.clients, args.tokens, args.requests, args.rounds, args.torch_threads, args.data_dir)


if __name__ == "__main__":
    main()
