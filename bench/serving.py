"""Serving speed: `llmadapter serve` vs `mlflow models serve` (MLflow's native pyfunc) vs padded generate.

    python bench/serving.py [--quick] [--model tiny|smollm2|both] [--concurrency 1,8,32,64] [--tokens 32]

For each model (a tiny Llama-shaped model and SmolLM2-135M-Instruct) and each number of concurrent
clients, every contender answers the same greedy chat request (`--tokens` new tokens):

- ours:             `llmadapter serve` of the model logged with llmadapter.log_model, /v1/chat/completions
- ours (stream):    the same server, streamed; time to first token is the first content chunk
- mlflow Nw:        `mlflow models serve --workers N` of the model logged with mlflow.transformers.log_model
                    (task="llm/v1/chat"), POST /invocations, N = 1 and 2
- generate:         one left-padded `model.generate` batch of that many prompts in this process (the ceiling)

Clients run closed loops (each sends its next request when the last one is answered) until
max(concurrency, --min-requests) requests are done. Printed: tokens/s (completion tokens over wall
time), p50/p99 latency, p50 time to first token, and the ratios the issue sets targets for. Servers
run one at a time, as separate processes, with torch using every core. All numbers come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long story about a fox who travels the world."
MESSAGES = [{"role": "user", "content": PROMPT}]
# MLflow's default Transformers requirements pull in torchvision, which has no CPU build here.
NATIVE_REQUIREMENTS = ["mlflow", "transformers", "torch", "accelerate", "tokenizers", "safetensors"]

Send = Callable[[Any], Awaitable[tuple[float, float, int]]]  # client -> (latency s, ttft s, tokens)


@dataclass
class Result:
    target: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    latencies: list[float]
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttfts)


# -- models -----------------------------------------------------------------------------------------


def model_folder(kind: str, data_dir: Path) -> Path:
    if kind == "tiny":
        from llmadapter.testing import build_tiny_model

        return build_tiny_model(data_dir / "bench-tiny-llama", "llama", size=128, n_positions=1024)
    from llmadapter.demo_models import smollm2_folder

    return smollm2_folder(data_dir)


def log_models(folder: Path, store: Path) -> tuple[str, str]:
    """(our model URI, MLflow-native model URI), both logged from the same pipeline into a fresh store."""
    import mlflow
    import transformers

    import llmadapter

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.create_experiment("serving-bench", artifact_location=(store / "artifacts").as_uri())
    pipe = transformers.pipeline("text-generation", model=str(folder))
    with mlflow.start_run(experiment_id=experiment):
        ours = llmadapter.log_model(pipe, name="ours", task="llm/v1/chat")
        # transformers 5 pipelines sample by default; greedy needs do_sample=False (MLflow's native
        # pyfunc refuses temperature=0 in a request).
        native = mlflow.transformers.log_model(
            pipe,
            name="native",
            task="llm/v1/chat",
            pip_requirements=NATIVE_REQUIREMENTS,
            model_config={"do_sample": False},
        )
    return ours.model_uri, native.model_uri


# -- servers ----------------------------------------------------------------------------------------


@contextmanager
def running(argv: list[str], ready_url: str, log: Path, threads: int) -> Iterator[None]:
    from llmadapter.processes import running as running_process

    # `mlflow models serve` has no thread setting; torch reads OMP_NUM_THREADS when it starts.
    # `mlflow models serve` execs `uvicorn` by name: put this interpreter's scripts first on PATH,
    # as an activated virtualenv would.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PATH": path}
    with running_process(argv, ready_url, log=log, env=env):
        yield


def ours_send(url: str, tokens: int, stream: bool) -> Send:
    body: dict[str, Any] = {"messages": MESSAGES, "temperature": 0, "max_tokens": tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}

    async def send(client: Any) -> tuple[float, float, int]:
        start = time.perf_counter()
        if not stream:
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            elapsed = time.perf_counter() - start
            return elapsed, elapsed, int(response.json()["usage"]["completion_tokens"])
        first, used = 0.0, 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not first and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    used = int(chunk["usage"]["completion_tokens"])
        return time.perf_counter() - start, first, used

    return send


def mlflow_send(url: str, tokens: int) -> Send:
    body = {"messages": MESSAGES, "max_tokens": tokens}

    async def send(client: Any) -> tuple[float, float, int]:
        start = time.perf_counter()
        response = await client.post(f"{url}/invocations", json=body)
        response.raise_for_status()
        elapsed = time.perf_counter() - start
        answer = response.json()
        answer = answer[0] if isinstance(answer, list) else answer
        return elapsed, elapsed, int(answer["usage"]["completion_tokens"])

    return send


async def drive(target: str, send: Send, concurrency: int, total: int) -> Result:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        await send(client)  # warm-up: first-call costs are not what is measured
        remaining = total
        latencies: list[float] = []
        ttfts: list[float] = []
        tokens = 0

        async def worker() -> None:
            nonlocal remaining, tokens
            while remaining > 0:
                remaining -= 1
                latency, ttft, used = await send(client)
                latencies.append(latency)
                ttfts.append(ttft)
                tokens += used

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Result(target, concurrency, total, tokens, wall, latencies, ttfts)


# -- the ceiling ------------------------------------------------------------------------------------


def padded_generate(
    folder: Path, levels: list[int], tokens: int, threads: int
) -> tuple[list[Result], float, float]:
    """One left-padded generate batch per level; also (prefill s, one decode step s) at batch 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)

    def run(batch: int, new: int) -> float:
        inputs = tokenizer([text] * batch, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **inputs,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return time.perf_counter() - start

    run(1, 2)  # warm-up
    results = []
    for batch in levels:
        wall = run(batch, tokens)
        first = run(batch, 1)
        results.append(Result("generate (padded)", batch, batch, batch * tokens, wall, [wall], [first]))
    prefill = statistics.median(run(1, 1) for _ in range(3))
    full = statistics.median(run(1, tokens) for _ in range(3))
    return results, prefill, (full - prefill) / max(1, tokens - 1)


# -- report -----------------------------------------------------------------------------------------


def print_table(kind: str, results: list[Result], tokens: int) -> None:
    print(f"\n== {kind}: {tokens} new tokens per request, greedy, {os.cpu_count()} cores")
    header = ("target", "clients", "requests", "tok/s", "p50 ms", "p99 ms", "ttft p50 ms")
    print(
        f"{header[0]:<20}"
        + "".join(f"{h:>{w}}" for h, w in zip(header[1:], (8, 9, 9, 10, 10, 13), strict=True))
    )
    for r in results:
        print(
            f"{r.target:<20}{r.concurrency:>8}{r.requests:>9}{r.tokens_per_s:>9.1f}"
            f"{r.p50 * 1000:>10.0f}{r.p99 * 1000:>10.0f}{r.ttft * 1000:>13.0f}"
        )


def _find(results: list[Result], target: str, concurrency: int) -> Result | None:
    return next((r for r in results if r.target == target and r.concurrency == concurrency), None)


def print_ratios(results: list[Result], prefill_s: float, step_s: float, levels: list[int]) -> None:
    print(
        f"bare generate, batch 1: prefill {prefill_s * 1000:.0f} ms, one decode step {step_s * 1000:.1f} ms"
    )
    for c in levels:
        ours, native = _find(results, "ours", c), _find(results, "mlflow 1w", c)
        native2, ceiling = _find(results, "mlflow 2w", c), _find(results, "generate (padded)", c)
        parts = []
        if ours and native:
            parts.append(f"ours/mlflow-1w {ours.tokens_per_s / native.tokens_per_s:.1f}x")
        if ours and native2:
            parts.append(f"ours/mlflow-2w {ours.tokens_per_s / native2.tokens_per_s:.1f}x")
        if ours and ceiling:
            parts.append(f"ours/generate {ours.tokens_per_s / ceiling.tokens_per_s:.2f}")
        print(
            f"{c:>3} clients: " + ", ".join(parts) + ("  (targets at 32: >= 5x, >= 0.70)" if c == 32 else "")
        )
    ours1, bare1 = _find(results, "ours", 1), _find(results, "generate (padded)", 1)
    if ours1 and bare1:
        print(f"  1 client: ours latency / bare generate {ours1.p50 / bare1.p50:.2f} (target <= 1.10)")
    stream1 = _find(results, "ours (stream)", 1)
    if stream1:
        budget = prefill_s + step_s
        print(
            f"  1 client: ttft {stream1.ttft * 1000:.0f} ms / (prefill + one step) {budget * 1000:.0f} ms = "
            f"{stream1.ttft / budget:.2f} (target <= 2)"
        )


def bench(
    kind: str,
    levels: list[int],
    tokens: int,
    min_requests: int,
    data_dir: Path,
    workers: list[int],
    threads: int,
) -> None:
    from llmadapter.processes import free_port

    folder = model_folder(kind, data_dir)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ours_uri, native_uri = log_models(folder, tmp)
        results: list[Result] = []
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ours_argv = [sys.executable, "-m", "llmadapter.cli", "serve", ours_uri, "--port", str(port)]
        ours_argv += ["--torch-threads", str(threads)]
        with running([*ours_argv, "--log-level", "warning"], f"{url}/ready", tmp / "ours.log", threads):
            for c in levels:
                total = max(c, min_requests)
                results.append(asyncio.run(drive("ours", ours_send(url, tokens, False), c, total)))
                results.append(asyncio.run(drive("ours (stream)", ours_send(url, tokens, True), c, total)))
        for n in workers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                native_uri,
                "--env-manager",
                "local",
            ]
            argv += ["-h", "127.0.0.1", "-p", str(port), "-w", str(n), "-t", "3600"]
            with running(argv, f"{url}/ping", tmp / f"mlflow-{n}.log", threads):
                for c in levels:
                    total = max(c, min_requests)
                    results.append(asyncio.run(drive(f"mlflow {n}w", mlflow_send(url, tokens), c, total)))
        ceiling, prefill, step = padded_generate(folder, levels, tokens, threads)
        results.extend(ceiling)
    order = {"ours": 0, "ours (stream)": 1, "mlflow 1w": 2, "mlflow 2w": 3, "generate (padded)": 4}
    results.sort(key=lambda r: (r.concurrency, order[r.target]))
    print_table(kind, results, tokens)
    print_ratios(results, prefill, step, levels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated numbers of clients")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least")
    parser.add_argument("--workers", default="1,2", help="`mlflow models serve` worker counts")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads of every contender (per process: `mlflow models serve -w 2` uses twice as many)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 1 and 8 clients, 4 requests, 1 worker"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.concurrency, args.min_requests, args.workers = "tiny", "1,8", 4, "1"
    levels = [int(c) for c in args.concurrency.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    print(f"machine: {os.cpu_count()} cores, torch threads {args.torch_threads}, python {sys.version[:7]}")
    for kind in ["tiny", "smollm2"] if args.model == "both" else [args.model]:
        bench(kind, levels, args.tokens, args.min_requests, args.data_dir, workers, args.torch_threads)


if __name__ == "__main__":
    main()
