"""What each request leaves behind: its X-Request-Id (answers, log lines) and the per-request SLO metrics
under vLLM's names, observed from the engine's own timestamps off the request path."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmadapter.catalog import CHAT
from llmadapter.engine.base import Engine
from llmadapter.engine.timing import SequenceTimes
from llmadapter.request_context import RequestIdFilter
from llmadapter.server.app import build_app
from llmadapter.server.metrics import latencies
from llmadapter.server.observe import log_config
from tests.server import conftest
from tests.server.conftest import CHAT_ID, RunningServer, generation_engine, serve, settings, wait_until
from tests.server.test_glue import FakeEngine

SLO_ID = "slo-chat"
HELLO = [{"role": "user", "content": "Hello"}]
# Every per-request histogram, by its vLLM name.
PER_REQUEST = (
    "vllm:time_to_first_token_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
)
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def slo_engine(trained_model: Path) -> Iterator[Engine]:
    """Its own engine (so its token counters count only this module's requests), with the registry
    version its loader would set."""
    engine = generation_engine(trained_model, CHAT, SLO_ID)
    engine.model_version = "7"
    yield engine
    engine.close()


def _stream(client: openai.OpenAI, max_tokens: int) -> tuple[float, tuple[int, int, str]]:
    """Seconds to the first chunk and (prompt tokens, completion tokens, finish reason) of a streamed
    chat request, as the official client sees them."""
    start = time.perf_counter()
    chunks = client.chat.completions.create(
        model=SLO_ID,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    first, reason, usage = 0.0, "", None
    for chunk in chunks:
        first = first or time.perf_counter() - start
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    assert usage is not None
    return first, (usage.prompt_tokens, usage.completion_tokens, reason)


# -- X-Request-Id ------------------------------------------------------------------------------


def test_every_answer_carries_the_request_id_it_was_sent_or_a_new_one(server: RunningServer) -> None:
    chat = {"model": CHAT_ID, "messages": HELLO, "max_tokens": 3}
    calls = [
        ("POST", "/v1/chat/completions", chat),  # whole
        ("POST", "/v1/chat/completions", {**chat, "stream": True}),  # streamed
        ("POST", "/invocations", {**chat, "stream": True}),
        ("POST", "/v1/chat/completions", {**chat, "n": 0}),  # 400
        ("GET", "/no/such/route", None),  # 404
        ("GET", "/metrics", None),
    ]
    for method, path, body in calls:
        sent = httpx.request(method, f"{server.url}{path}", json=body, headers={"X-Request-Id": "abc-1"})
        assert sent.headers["x-request-id"] == "abc-1", path
        made = [httpx.request(method, f"{server.url}{path}", json=body).headers["x-request-id"] for _ in "ab"]
        assert all(GENERATED_ID.match(i) for i in made) and made[0] != made[1], path
    # The official client reads it as OpenAI's own API sends it.
    answer = server.client().chat.completions.create(model=CHAT_ID, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert GENERATED_ID.match(answer._request_id or "")
    # An id that is unsafe in a header or a log line is replaced, not echoed.
    for unusable in ("has space", "x" * 201):
        answer = httpx.get(f"{server.url}/health", headers={"X-Request-Id": unusable})
        assert GENERATED_ID.match(answer.headers["x-request-id"])


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.lines: list[tuple[str, str]] = []  # (request id, logger)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.request_id, record.name))  # type: ignore[attr-defined]


def test_every_log_line_of_a_request_carries_its_id() -> None:
    handler = _Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        app = build_app({"fake": FakeEngine(fail=RuntimeError("boom"))}, settings())
        with serve(app, log_level="info") as running:
            body = {"model": "fake", "messages": HELLO}
            answer = httpx.post(
                f"{running.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "r-9"}
            )
            assert answer.status_code == 500
            wait_until(lambda: ("r-9", "uvicorn.access") in handler.lines, message="the access line")
    finally:
        root.removeHandler(handler)
    # The error's own line (with its stack trace) and uvicorn's access line.
    assert {name for rid, name in handler.lines if rid == "r-9"} == {"llmadapter.server", "uvicorn.access"}
    assert ("-", "uvicorn.error") in handler.lines  # start-up lines belong to no request


def test_the_log_config_puts_the_id_on_every_line() -> None:
    config = log_config("info")
    record = logging.LogRecord("llmadapter.engine", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    RequestIdFilter().filter(record)
    formatter = logging.Formatter(
        config["formatters"]["app"]["fmt"].replace("%(levelprefix)s", "%(levelname)s")
    )
    assert formatter.format(record) == "INFO [-] llmadapter.engine: hello you"
    assert all(handler["filters"] == ["request_id"] for handler in config["handlers"].values())
    assert all("%(request_id)s" in f["fmt"] for f in config["formatters"].values())


# -- SLO metrics -------------------------------------------------------------------------------


def test_each_request_histogram_counts_every_request(slo_engine: Engine) -> None:
    with serve(build_app({SLO_ID: slo_engine}, settings())) as running:
        client = running.client()
        usage: list[tuple[int, int, str]] = []  # (prompt, completion, finish reason)
        for max_tokens in (100, 3):
            answer = client.chat.completions.create(
                model=SLO_ID,
                messages=HELLO,
                temperature=0,
                max_tokens=max_tokens,  # type: ignore[arg-type]
            )
            assert answer.usage is not None
            usage.append(
                (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.choices[0].finish_reason)
            )
        usage += [_stream(client, max_tokens)[1] for max_tokens in (100, 4)]
        n = len(usage)
        labels = {"model_name": SLO_ID, "version": "7"}
        wait_until(lambda: running.metric("vllm:e2e_request_latency_seconds_count", **labels) == n)
        for name in PER_REQUEST:
            assert running.metric(f"{name}_count", **labels) == n, name
        # One gap between consecutive tokens the model produced: EOS ends a "stop" answer, not a "length" one.
        gaps = sum(completion - (reason == "length") for _, completion, reason in usage)
        assert running.metric("vllm:inter_token_latency_seconds_count", **labels) == gaps
        for reason in ("stop", "length"):
            expected = sum(r == reason for *_, r in usage)
            assert running.metric("vllm:request_success_total", finished_reason=reason, **labels) == expected
        assert running.metric("vllm:request_success_total", finished_reason="abort", **labels) == 0
        prompt, completion = sum(u[0] for u in usage), sum(u[1] for u in usage)
        assert running.metric("vllm:request_prompt_tokens_sum", **labels) == prompt
        assert running.metric("vllm:request_generation_tokens_sum", **labels) == completion
        # The engine's own counters (this engine served only these requests).
        assert running.metric("vllm:prompt_tokens_total", **labels) == prompt
        assert running.metric("vllm:generation_tokens_total", **labels) == completion
        assert running.metric("vllm:num_requests_running", **labels) == 0
        assert running.metric("vllm:num_requests_waiting", **labels) == 0
        # vLLM's phases add up: inference = prefill + decode, within the end-to-end latency.
        phase = {
            k: running.metric(f"vllm:request_{k}_time_seconds_sum", **labels)
            for k in ("prefill", "decode", "inference")
        }
        assert phase["inference"] == pytest.approx(phase["prefill"] + phase["decode"])
        assert phase["inference"] <= running.metric("vllm:e2e_request_latency_seconds_sum", **labels)


def test_time_to_first_token_sums_what_streaming_clients_measure(slo_engine: Engine) -> None:
    with serve(build_app({SLO_ID: slo_engine}, settings())) as running:
        client = running.client()
        measured = [_stream(client, 20)[0] for _ in range(6)]
        labels = {"model_name": SLO_ID, "version": "7"}
        wait_until(
            lambda: running.metric("vllm:time_to_first_token_seconds_count", **labels) == len(measured)
        )
        server = running.metric("vllm:time_to_first_token_seconds_sum", **labels)
    # The server's interval (arrival to first token) lies inside the client's (send to first chunk):
    # what is left is the client's own work and loopback HTTP, about 10 ms per request here.
    client = sum(measured)
    assert server <= client
    assert client - server < 0.05 * len(measured), (server, client)


def test_a_cancelled_stream_is_counted_as_abort(long_engine: Engine) -> None:
    with serve(build_app({conftest.LONG_ID: long_engine}, settings())) as running:
        url = f"{running.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=conftest.long_request(stream=True), timeout=60) as answer:
            next(answer.iter_lines())  # generating: now the client goes away
        labels = {"model_name": conftest.LONG_ID, "version": ""}
        wait_until(
            lambda: running.metric("vllm:request_success_total", finished_reason="abort", **labels) == 1
        )
        assert running.metric("vllm:e2e_request_latency_seconds_count", **labels) == 1


def test_request_metrics_can_be_turned_off(slo_engine: Engine) -> None:
    with serve(build_app({SLO_ID: slo_engine}, settings(request_metrics=False))) as running:
        running.client().chat.completions.create(model=SLO_ID, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
        with pytest.raises(KeyError):
            running.metric("vllm:e2e_request_latency_seconds_count", model_name=SLO_ID)
        assert running.metric("vllm:generation_tokens_total", model_name=SLO_ID) > 0  # the engine's own


# Stamps after an arrival at 0: queued, scheduled, first token, last token, finished (None: not yet).
@pytest.mark.parametrize(
    ("stamps", "gaps", "expected"),
    [
        (
            (1, 3, 4, 10, 10.5),
            [2, 4],
            {"e2e": 10.5, "queue": 2, "ttft": 4, "prefill": 1, "decode": 6, "inference": 7, "tpot": 3},
        ),
        ((1, None, None, None, None), [], {"e2e": 20}),  # cancelled while queued, finish not yet stamped
        (
            (1, 2, 3, 3, 3),
            [],
            {"e2e": 3, "queue": 1, "ttft": 3, "prefill": 1, "decode": 0, "inference": 1},
        ),
    ],
    ids=["full", "never-scheduled", "one-token"],
)
def test_latencies_follow_vllm_definitions(
    stamps: tuple[float | None, ...], gaps: list[float], expected: dict[str, float]
) -> None:
    times = SequenceTimes(0.0, *stamps, gaps=gaps)
    assert latencies(times, end=20.0) == expected
