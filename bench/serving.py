"""Serving speed: `llmadapter serve` vs llama.cpp's `llama-server` vs `mlflow models serve` vs generate.

    python bench/serving.py [--quick] [--model tiny|smollm2|both] [--concurrency 1,8,32,64] [--tokens 32]
        [--ours-format float32,bfloat16,int4] [--llama-server PATH | --no-llama] [--workers 1,2|none]

For each model (a tiny Llama-shaped model and SmolLM2-135M-Instruct) and each number of concurrent
clients, every contender answers the same greedy chat request (`--tokens` new tokens):

- ours FORMAT:      `llmadapter serve` of the model logged with llmadapter.log_model, /v1/chat/completions,
                    one server per `--ours-format` (LLMADAPTER_DTYPE / LLMADAPTER_QUANTIZATION set for it)
- ... (stream):     the same server, streamed; time to first token is the first content chunk
- llama.cpp:        `llama-server` (built by bench/build_llama_cpp.sh) on the GGUF file SmolLM2's folder
                    was converted from (SmolLM2 only), /v1/chat/completions, whole and streamed
- mlflow Nw:        `mlflow models serve --workers N` of the model logged with mlflow.transformers.log_model
                    (task="llm/v1/chat"), POST /invocations, N = 1 and 2
- generate:         one left-padded `model.generate` batch of that many prompts in this process (the ceiling)

Clients run closed loops (each sends its next request when the last one is answered) until
max(concurrency, --min-requests) requests are done. Servers run one at a time, as separate processes,
each with --torch-threads threads. Also measured per server: its memory (RSS once loaded and its peak),
the greedy answer to a held-out question, and the time to first token of one client whose requests share
a ~300-token system prompt (the first request warms the prompt cache; the median of the later ones is
reported, with the prompt tokens the server says it reused). In this process: one client's request
through our engine alone (no server), per format. Printed: tokens/s (completion tokens over wall time),
p50/p99 latency, p50 time to first token, and the ratios the issue sets targets for. All numbers come
from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
QUESTION_TOKENS = 50
ANSWER = "Paris"
# The seen-system-prompt scenario: one system prompt of about SYSTEM_TOKENS tokens, short user messages.
SYSTEM_TOKENS = 300
SEEN_TOKENS = 8  # answer tokens of the seen-system-prompt requests: it measures the first one
SYSTEM_TOPICS = [
    ("train tickets", "timetable"),
    ("hotel rooms", "partner list"),
    ("museum hours", "city guide"),
    ("visa rules", "embassy notes"),
    ("local food", "restaurant reviews"),
    ("weather", "seasonal charts"),
    ("luggage", "airline policies"),
    ("car rental", "insurance terms"),
    ("festivals", "event calendar"),
    ("hiking trails", "park maps"),
    ("currency", "exchange tables"),
    ("safety", "travel advisories"),
    ("night life", "district notes"),
    ("beaches", "coastal guide"),
    ("shopping", "market list"),
    ("language", "phrase book"),
]
USER_QUESTIONS = [
    "Hello!",
    "Which city should I visit in spring?",
    "Is the train faster than the bus?",
    "What should I pack for a week?",
    "Can you suggest a museum?",
    "How early should I book a hotel?",
    "What is a good local dish?",
    "Do I need travel insurance?",
    "Where can I hike near the coast?",
]
# MLflow's default Transformers requirements pull in torchvision, which has no CPU build here.
NATIVE_REQUIREMENTS = ["mlflow", "transformers", "torch", "accelerate", "tokenizers", "safetensors"]
# Where bench/build_llama_cpp.sh puts llama-server when it is given no OUT_DIR.
LLAMA_DEFAULT = Path.home() / ".cache" / "llmadapter" / "llama.cpp" / "build" / "bin" / "llama-server"
LLAMA = "llama.cpp"
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")

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


@dataclass(frozen=True)
class OursFormat:
    """One weight format of our server: `float32`, `int4`, `bfloat16+int8`, or `default` (nothing set)."""

    name: str
    dtype: str | None = None
    quantization: str | None = None

    @classmethod
    def parse(cls, text: str) -> OursFormat:
        if text == "default":
            return cls(text)
        dtype = quantization = None
        for part in text.split("+"):
            if part in DTYPES and dtype is None:
                dtype = part
            elif part in QUANTIZATIONS and quantization is None:
                quantization = part
            else:
                raise argparse.ArgumentTypeError(
                    f"--ours-format {text!r}: {part!r} is not a dtype {DTYPES} or a quantization "
                    f"{QUANTIZATIONS} (join one of each with '+', or say 'default')"
                )
        return cls(text, dtype, quantization or ("none" if dtype else None))

    @property
    def target(self) -> str:
        return f"ours {self.name}"

    @property
    def settings(self) -> dict[str, str]:
        """The format as llmadapter settings (model_config keys; LLMADAPTER_<KEY> for the server)."""
        return {
            key: value
            for key, value in (("dtype", self.dtype), ("quantization", self.quantization))
            if value is not None
        }

    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("LLMADAPTER_DTYPE", "LLMADAPTER_QUANTIZATION")
        }
        return env | {f"LLMADAPTER_{key.upper()}": value for key, value in self.settings.items()}


@dataclass
class Answer:
    """One chat answer as the bench reads it (whole or streamed)."""

    latency: float
    ttft: float
    content: str
    prompt_tokens: int | None
    completion_tokens: int
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens (llama.cpp: timings.cache_n)


@dataclass
class Alone:
    """One client's latency through the server vs through the engine alone, measured in turns."""

    server_s: float
    engine_s: float
    note: str


@dataclass
class ServerReport:
    """What one server process measured besides the load levels."""

    target: str
    alone: Alone | None = None
    rss_loaded_mib: float = 0.0
    rss_peak_mib: float = 0.0
    answer: Answer | None = None
    prefix_ttfts: list[float] = field(default_factory=list)
    prefix_cold_ttft: float = 0.0
    prefix_prompt_tokens: int | None = None
    prefix_cached: list[int | None] = field(default_factory=list)

    @property
    def prefix_ttft(self) -> float:
        return statistics.median(self.prefix_ttfts)


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


@dataclass(frozen=True)
class Prompts:
    """The seen system prompt, and how many tokens (prompt + answer) the bench's requests need."""

    system: str
    system_tokens: int  # the system prompt's own text
    longest: int  # the largest seen-system-prompt request, with its answer
    typical: int  # the load levels' and the held-out question's requests, with their answers


def prompts(folder: Path, tokens: int) -> Prompts:
    """A system prompt of about SYSTEM_TOKENS tokens of this model's tokenizer, and the requests' sizes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def chat(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lines = ["You are the assistant of a small travel agency. Follow these rules in every answer."]
    for i in range(1, 200):
        topic, source = SYSTEM_TOPICS[(i - 1) % len(SYSTEM_TOPICS)]
        lines.append(
            f"Rule {i}: when a traveller asks about {topic}, answer in two sentences, "
            f"cite the agency's {source}, and never invent prices."
        )
        count = len(tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"])
        if count >= SYSTEM_TOKENS:
            break
    system = "\n".join(lines)
    longest = max(chat(seen_messages(system, user)) for user in USER_QUESTIONS) + SEEN_TOKENS
    typical = max(chat(MESSAGES) + tokens, chat(QUESTION) + QUESTION_TOKENS)
    return Prompts(system, count, longest, typical)


def seen_messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# -- servers ----------------------------------------------------------------------------------------


@contextmanager
def running(
    argv: list[str], ready_url: str, log: Path, threads: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    from llmadapter.processes import running as running_process

    # `mlflow models serve` has no thread setting; torch reads OMP_NUM_THREADS when it starts.
    # `mlflow models serve` execs `uvicorn` by name: put this interpreter's scripts first on PATH,
    # as an activated virtualenv would.
    base = env if env is not None else dict(os.environ)
    path = os.pathsep.join((str(Path(sys.executable).parent), base.get("PATH", "")))
    with running_process(
        argv, ready_url, log=log, env=base | {"OMP_NUM_THREADS": str(threads), "PATH": path}
    ) as proc:
        yield proc


def rss_mib(pid: int) -> tuple[float, float]:
    """(resident memory now, peak resident memory) of a process and its children, in MiB."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    now = peak = 0.0
    for proc in procs:
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            continue
        now += rss
        hwm = rss
        status = Path(f"/proc/{proc.pid}/status")  # VmHWM: the kernel's own peak (Linux)
        if status.is_file():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(rss, int(line.split()[1]) * 1024)
        peak += hwm
    return now / 2**20, peak / 2**20


def chat_body(messages: list[dict[str, str]], tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, "temperature": 0, "max_tokens": tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _cached(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> int | None:
    details = (usage or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        return int(details["cached_tokens"])
    if timings and timings.get("cache_n") is not None:  # llama-server's own count of reused prompt tokens
        return int(timings["cache_n"])
    return None


async def ask(client: Any, url: str, body: dict[str, Any]) -> Answer:
    """One /v1/chat/completions request; streamed when the body says so (ttft: the first content chunk)."""
    import httpx

    try:
        return await _ask(client, url, body)
    except httpx.RemoteProtocolError:
        # llama-server closes a kept-alive connection after a few requests; the pool's next request on it
        # gets no answer at all. Sent again on a new connection, timed afresh.
        return await _ask(client, url, body)


async def _ask(client: Any, url: str, body: dict[str, Any]) -> Answer:
    start = time.perf_counter()
    if not body.get("stream"):
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        elapsed = time.perf_counter() - start
        data = response.json()
        usage = data["usage"]
        return Answer(
            elapsed,
            elapsed,
            data["choices"][0]["message"]["content"] or "",
            usage.get("prompt_tokens"),
            int(usage["completion_tokens"]),
            _cached(usage, data.get("timings")),
        )
    first, pieces, usage, timings = 0.0, [], None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - start
                    pieces.append(piece)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    # A server that sends no usage chunk: one content chunk per token.
    completion = int(usage["completion_tokens"]) if usage else len(pieces)
    prompt = usage.get("prompt_tokens") if usage else None
    return Answer(
        time.perf_counter() - start, first, "".join(pieces), prompt, completion, _cached(usage, timings)
    )


def chat_send(url: str, tokens: int, stream: bool) -> Send:
    body = chat_body(MESSAGES, tokens, stream)

    async def send(client: Any) -> tuple[float, float, int]:
        answer = await ask(client, url, body)
        return answer.latency, answer.ttft, answer.completion_tokens

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


async def _single(url: str, bodies: list[dict[str, Any]]) -> list[Answer]:
    import httpx

    async with httpx.AsyncClient(timeout=3600) as client:
        return [await ask(client, url, body) for body in bodies]


def measure_server(
    target: str,
    proc: subprocess.Popen[bytes],
    url: str,
    levels: list[int],
    tokens: int,
    min_requests: int,
    system: str,
    results: list[Result],
) -> ServerReport:
    """Every measurement of one running OpenAI-compatible server (ours or llama-server)."""
    report = ServerReport(target)
    (report.answer,) = asyncio.run(_single(url, [chat_body(QUESTION, QUESTION_TOKENS, False)]))
    report.rss_loaded_mib, _ = rss_mib(proc.pid)
    for c in levels:
        total = max(c, min_requests)
        results.append(asyncio.run(drive(target, chat_send(url, tokens, False), c, total)))
        results.append(asyncio.run(drive(f"{target} (stream)", chat_send(url, tokens, True), c, total)))
    bodies = [chat_body(seen_messages(system, user), SEEN_TOKENS, True) for user in USER_QUESTIONS]
    cold, *seen = asyncio.run(_single(url, bodies))
    report.prefix_cold_ttft = cold.ttft
    report.prefix_ttfts = [a.ttft for a in seen]
    report.prefix_prompt_tokens = seen[-1].prompt_tokens
    report.prefix_cached = [a.cached_tokens for a in seen]
    _, report.rss_peak_mib = rss_mib(proc.pid)
    return report


# -- llama.cpp --------------------------------------------------------------------------------------


def find_llama_server(given: Path | None) -> tuple[Path | None, str]:
    """(the llama-server binary, '') or (None, why it is missing)."""
    if given is not None:
        if given.is_file() and os.access(given, os.X_OK):
            return given, ""
        return None, f"--llama-server {given} is not an executable file"
    on_path = shutil.which("llama-server")
    for candidate in (LLAMA_DEFAULT, Path(on_path) if on_path else None):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate, ""
    return None, (
        f"no llama-server at {LLAMA_DEFAULT} (bench/build_llama_cpp.sh's default) nor on PATH: "
        "build it with bench/build_llama_cpp.sh (about 15 minutes on 2 cores) or pass --llama-server PATH"
    )


def llama_argv(binary: Path, gguf: Path, port: int, threads: int, slots: int, sizes: Prompts) -> list[str]:
    """llama-server's command line for this bench: every slot, and a context no bigger than the load needs.

    Its KV buffer is allocated (and touched) whole at start, so it counts in llama-server's RSS. Shared by
    the slots (--kv-unified), it must hold `slots` typical requests at once, or the longest one; split
    per slot, every slot must hold the longest.
    """
    help_text = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, check=False, timeout=60
    ).stdout
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--threads", str(threads), "--threads-batch", str(threads)]
    argv += ["--parallel", str(slots), "--cont-batching"]
    if "--kv-unified" in help_text:
        argv.append("--kv-unified")
        ctx = max(slots * sizes.typical, sizes.longest)
    else:
        ctx = slots * max(sizes.typical, sizes.longest)
    argv += ["--ctx-size", str(-(-ctx // 256) * 256)]
    if "--no-webui" in help_text:
        argv.append("--no-webui")
    return argv


# -- in process -------------------------------------------------------------------------------------


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


def format_config(fmt: OursFormat) -> tuple[dict[str, str], str]:
    """The format as model_config keys this llmadapter knows, and a note when it knows none of them."""
    from llmadapter import ModelConfig

    known = {k: v for k, v in fmt.settings.items() if k in ModelConfig.model_fields}
    note = "" if known == fmt.settings else "this llmadapter has no dtype/quantization keys: float32"
    return known, note


def server_vs_engine(url: str, uri: str, fmt: OursFormat, tokens: int, rounds: int, threads: int) -> Alone:
    """One client's request through the running server and through our engine in this process, in turns."""
    import httpx
    import torch

    from llmadapter import load_engine
    from llmadapter.protocol import ChatCompletionRequest

    torch.set_num_threads(threads)
    config, note = format_config(fmt)
    engine = load_engine(uri, model_config=config or None)
    body = chat_body(MESSAGES, tokens, False)
    request = ChatCompletionRequest.model_validate(body)
    server: list[float] = []
    alone: list[float] = []
    try:
        with httpx.Client(timeout=3600) as client:
            for i in range(rounds + 1):  # round 0 warms both up
                start = time.perf_counter()
                client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                middle = time.perf_counter()
                engine.run([request])
                if i:
                    server.append(middle - start)
                    alone.append(time.perf_counter() - middle)
    finally:
        engine.close()
        del engine
        gc.collect()
    return Alone(statistics.median(server), statistics.median(alone), note)


# -- report -----------------------------------------------------------------------------------------


def print_table(kind: str, results: list[Result], tokens: int, threads: int) -> None:
    print(f"\n== {kind}: {tokens} new tokens per request, greedy, {threads} threads per contender")
    header = ("target", "clients", "requests", "tok/s", "p50 ms", "p99 ms", "ttft p50 ms")
    print(
        f"{header[0]:<28}"
        + "".join(f"{h:>{w}}" for h, w in zip(header[1:], (8, 9, 9, 10, 10, 13), strict=True))
    )
    for r in results:
        print(
            f"{r.target:<28}{r.concurrency:>8}{r.requests:>9}{r.tokens_per_s:>9.1f}"
            f"{r.p50 * 1000:>10.0f}{r.p99 * 1000:>10.0f}{r.ttft * 1000:>13.0f}"
        )


def _find(results: list[Result], target: str, concurrency: int) -> Result | None:
    return next((r for r in results if r.target == target and r.concurrency == concurrency), None)


def print_servers(reports: list[ServerReport], system_tokens: int, checked: bool) -> None:
    print(f"\nper server: held-out answer ({QUESTION[0]['content']!r}, greedy), memory, seen system prompt")
    for r in reports:
        a = r.answer
        assert a is not None
        verdict = ("right" if ANSWER in a.content else "WRONG") if checked else "not checked (untrained)"
        print(f"  {r.target:<22} {verdict}: {a.content[:100]!r} (prompt {a.prompt_tokens} tokens)")
    for r in reports:
        print(f"  {r.target:<22} RSS loaded {r.rss_loaded_mib:7.1f} MiB, peak {r.rss_peak_mib:7.1f} MiB")
    for r in reports:
        cached = ", ".join("n/a" if c is None else str(c) for c in r.prefix_cached)
        print(
            f"  {r.target:<22} {system_tokens}-token system prompt (prompt {r.prefix_prompt_tokens} tokens): "
            f"first ttft {r.prefix_cold_ttft * 1000:.0f} ms, seen ttft p50 {r.prefix_ttft * 1000:.0f} ms "
            f"over {len(r.prefix_ttfts)}; cached tokens: {cached}"
        )


def print_ratios(
    results: list[Result],
    reports: list[ServerReport],
    formats: list[OursFormat],
    prefill_s: float,
    step_s: float,
    levels: list[int],
) -> None:
    by_target = {r.target: r for r in reports}
    print(
        f"\nbare generate, batch 1: prefill {prefill_s * 1000:.0f} ms, one decode step {step_s * 1000:.1f} ms"
    )
    for fmt in formats:
        ours = fmt.target
        for c in levels:
            mine, native = _find(results, ours, c), _find(results, "mlflow 1w", c)
            native2, ceiling = _find(results, "mlflow 2w", c), _find(results, "generate (padded)", c)
            parts = []
            if mine and native:
                parts.append(f"/mlflow-1w {mine.tokens_per_s / native.tokens_per_s:.1f}x")
            if mine and native2:
                parts.append(f"/mlflow-2w {mine.tokens_per_s / native2.tokens_per_s:.1f}x")
            if mine and ceiling:
                parts.append(f"/generate {mine.tokens_per_s / ceiling.tokens_per_s:.2f}")
            target = "  (targets at 32: >= 7x mlflow 1w, >= 0.70 generate)" if c == 32 else ""
            print(f"{ours:<22} {c:>3} clients: " + ", ".join(parts) + target)
        mine1, bare1 = _find(results, ours, 1), _find(results, "generate (padded)", 1)
        if mine1 and bare1:
            print(
                f"{ours:<22}   1 client: latency / bare generate {mine1.p50 / bare1.p50:.2f} (target <= 1.10)"
            )
        alone = by_target[ours].alone if ours in by_target else None
        if alone is not None:
            print(
                f"{ours:<22}   1 client, in turns: server {alone.server_s * 1000:.0f} ms / engine alone "
                f"{alone.engine_s * 1000:.0f} ms = {alone.server_s / alone.engine_s:.2f} (target <= 1.10)"
                + (f"  [{alone.note}]" if alone.note else "")
            )
        stream1 = _find(results, f"{ours} (stream)", 1)
        if stream1:
            budget = prefill_s + step_s
            print(
                f"{ours:<22}   1 client: ttft {stream1.ttft * 1000:.0f} ms / (prefill + one step) "
                f"{budget * 1000:.0f} ms = {stream1.ttft / budget:.2f} (target <= 2)"
            )
    llama = next((r for r in reports if r.target == LLAMA), None)
    if llama is None:
        return
    heads = [f"tok/s {c}" for c in levels] + [f"stream {c}" for c in levels]
    heads += ["seen-prompt ttft", "RSS peak", "RSS loaded"]
    print(
        "\nours / llama.cpp, measured in this run (targets: tok/s >= 1.0x, ttft <= 1.5x, 4-bit RSS <= 1.2x)"
    )
    print(f"{'format':<22}" + "".join(f"{h:>17}" for h in heads))
    for fmt in formats:
        mine = by_target.get(fmt.target)
        if mine is None:
            continue
        cells = []
        for suffix in ("", " (stream)"):
            for c in levels:
                a, b = _find(results, fmt.target + suffix, c), _find(results, LLAMA + suffix, c)
                cells.append(f"{a.tokens_per_s / b.tokens_per_s:.2f}x" if a and b else "-")
        cells.append(f"{mine.prefix_ttft / llama.prefix_ttft:.2f}x")
        cells.append(f"{mine.rss_peak_mib / llama.rss_peak_mib:.2f}x")
        cells.append(f"{mine.rss_loaded_mib / llama.rss_loaded_mib:.2f}x")
        print(f"{fmt.name:<22}" + "".join(f"{c:>17}" for c in cells))


def serve_ours(
    fmt: OursFormat,
    uri: str,
    tmp: Path,
    args: argparse.Namespace,
    levels: list[int],
    system: str,
    results: list[Result],
) -> ServerReport:
    from llmadapter.processes import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", uri, "--port", str(port)]
    argv += ["--torch-threads", str(args.torch_threads), "--log-level", "warning"]
    env = fmt.env()
    shown = " ".join(
        f"{k}={v}" for k, v in env.items() if k in ("LLMADAPTER_DTYPE", "LLMADAPTER_QUANTIZATION")
    )
    print(f"[{fmt.target}] {shown} {shlex.join(argv)}".replace("  ", " "), flush=True)
    log = tmp / f"ours-{fmt.name}.log"
    with running(argv, f"{url}/ready", log, args.torch_threads, env) as proc:
        report = measure_server(
            fmt.target, proc, url, levels, args.tokens, args.min_requests, system, results
        )
        report.alone = server_vs_engine(url, uri, fmt, args.tokens, args.min_requests, args.torch_threads)
    return report


def serve_llama(
    binary: Path,
    gguf: Path,
    tmp: Path,
    args: argparse.Namespace,
    levels: list[int],
    sizes: Prompts,
    results: list[Result],
) -> ServerReport:
    from llmadapter.processes import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = llama_argv(binary, gguf, port, args.torch_threads, max(levels), sizes)
    print(
        f"[{LLAMA}] {shlex.join(argv)}\n[{LLAMA}] requests need up to {sizes.typical} tokens "
        f"({sizes.longest} with the system prompt)",
        flush=True,
    )
    with running(argv, f"{url}/health", tmp / "llama-server.log", args.torch_threads) as proc:
        return measure_server(LLAMA, proc, url, levels, args.tokens, args.min_requests, sizes.system, results)


def bench(kind: str, args: argparse.Namespace, levels: list[int], llama: Path | None, why: str) -> None:
    import httpx

    from llmadapter.errors import LLMAdapterError
    from llmadapter.processes import free_port

    folder = model_folder(kind, args.data_dir)
    sizes = prompts(folder, args.tokens)
    results: list[Result] = []
    reports: list[ServerReport] = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ours_uri, native_uri = log_models(folder, tmp)
        for fmt in args.ours_format:
            reports.append(serve_ours(fmt, ours_uri, tmp, args, levels, sizes.system, results))
        if kind != "smollm2":
            print(f"[{LLAMA}] skipped: it serves SmolLM2's GGUF file; the {kind} model has none")
        elif llama is None:
            print(f"[{LLAMA}] skipped: {why}")
        else:
            from llmadapter.demo_models import smollm2_gguf

            gguf = smollm2_gguf(args.data_dir)
            measured: list[Result] = []
            try:
                reports.append(serve_llama(llama, gguf, tmp, args, levels, sizes, measured))
                results.extend(measured)
            except (LLMAdapterError, httpx.HTTPError) as exc:  # the other columns still count
                log = (tmp / "llama-server.log").read_text(errors="replace")[-2000:]
                print(f"[{LLAMA}] left out: it failed: {exc}\n{log}")
        for n in args.workers:
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
            with running(argv, f"{url}/ping", tmp / f"mlflow-{n}.log", args.torch_threads):
                for c in levels:
                    total = max(c, args.min_requests)
                    results.append(
                        asyncio.run(drive(f"mlflow {n}w", mlflow_send(url, args.tokens), c, total))
                    )
        ceiling, prefill, step = padded_generate(folder, levels, args.tokens, args.torch_threads)
        results.extend(ceiling)
    order = {r.target: i for i, r in enumerate(results)}
    results.sort(key=lambda r: (r.concurrency, order[r.target]))
    print_table(kind, results, args.tokens, args.torch_threads)
    print_servers(reports, sizes.system_tokens, checked=kind == "smollm2")
    print_ratios(results, reports, args.ours_format, prefill, step, levels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default=None, help="default: both")
    parser.add_argument("--concurrency", default=None, help="comma-separated numbers of clients (1,8,32,64)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least")
    parser.add_argument(
        "--workers", default=None, help="`mlflow models serve` worker counts (1,2), or 'none' to leave it out"
    )
    parser.add_argument(
        "--ours-format",
        default="default",
        help="comma-separated formats of our server, one server (and column) each: a dtype "
        f"{'/'.join(DTYPES)}, a quantization {'/'.join(QUANTIZATIONS)}, both joined by '+', or 'default' "
        "(neither LLMADAPTER_DTYPE nor LLMADAPTER_QUANTIZATION set)",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help=f"llama.cpp's llama-server binary (default: {LLAMA_DEFAULT}, else llama-server on PATH)",
    )
    parser.add_argument("--no-llama", action="store_true", help="leave llama-server out")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads of every contender (per process: `mlflow models serve -w 2` uses twice as many)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 and 8 clients, 4 requests, 1 mlflow worker, the tiny model, unless other flags say otherwise",
    )
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.min_requests = args.concurrency or "1,8", min(args.min_requests, 4)
        args.model, args.workers = args.model or "tiny", args.workers or "1"
    args.model, args.workers = args.model or "both", args.workers or "1,2"
    args.concurrency = args.concurrency or "1,8,32,64"
    levels = [int(c) for c in args.concurrency.split(",")]
    args.workers = [] if args.workers == "none" else [int(w) for w in args.workers.split(",")]
    try:
        args.ours_format = [OursFormat.parse(f) for f in args.ours_format.split(",")]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    llama, why = (None, "--no-llama") if args.no_llama else find_llama_server(args.llama_server)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} cores, load average {load}, threads per contender {args.torch_threads}, "
        f"python {sys.version.split()[0]}"
    )
    for kind in ["tiny", "smollm2"] if args.model == "both" else [args.model]:
        bench(kind, args, levels, llama, why)
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
