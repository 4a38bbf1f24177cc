"""A real `llmadapter serve` stopped under load: SIGTERM / SIGINT drain, the grace ends, a second signal.

Each test starts the CLI on a tiny model with a 4096-token window whose end-of-text tokens are forbidden,
so every request generates exactly `max_tokens` tokens and is still running when the signal comes.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmadapter.processes import free_port, running
from llmadapter.server.shutdown import SAME_STOP_S
from llmadapter.testing import build_tiny_model

pytestmark = pytest.mark.slow

NAME = "long-chat"


@pytest.fixture(scope="module")
def long_chat(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 4096-token GPT-2 saved as an llm/v1/chat MLflow model folder (no store needed)."""
    import llmadapter

    folder = build_tiny_model(model_cache / "tiny-gpt2-4k", "gpt2", n_positions=4096)
    path = tmp_path_factory.mktemp("served") / NAME
    llmadapter.save_model(str(folder), path, task="llm/v1/chat")
    return path


def _request(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": NAME,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logit_bias": {"0": -100, "2": -100},  # <|endoftext|> and <|im_end|>: never stop early
        **extra,
    }


class Served:
    """A running `llmadapter serve` process, its URL and its log."""

    def __init__(self, proc: Any, url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    def in_flight(self) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("llmadapter_in_flight_requests "):
                return float(line.split()[1])
        raise AssertionError("no llmadapter_in_flight_requests in /metrics")

    def logged(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")


@contextmanager
def _serve(model: Path, tmp_path: Path, *flags: str) -> Iterator[Served]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", str(model), "--name", NAME, "--port", str(port)]
    argv += ["--torch-threads", "1", *flags]
    log = tmp_path / "serve.log"
    with running(argv, f"{url}/ready", log=log) as proc:
        yield Served(proc, url, log)


def _wait_until(check: Callable[[], bool], message: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.05)


def _stream(client: openai.OpenAI, started: threading.Event, max_tokens: int) -> tuple[int, str | None]:
    """Read a whole stream: (completion tokens from its usage chunk, its finish_reason)."""
    finish, tokens = None, 0
    stream = client.chat.completions.create(
        **_request(max_tokens), stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        started.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, finish


def _late_request(url: str) -> str:
    """What a request sent while the server drains gets: refused, or a 503 if it still reached the app."""
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=_request(5), timeout=30)
    except httpx.ConnectError:
        return "refused"
    return f"{response.status_code} {response.json()['error']['code']}"


def test_sigterm_lets_every_request_in_flight_finish_then_exits_0(long_chat: Path, tmp_path: Path) -> None:
    whole_n, streams_n, max_tokens = 4, 4, 600
    with (
        _serve(long_chat, tmp_path, "--shutdown-grace-s", "120") as served,
        ThreadPoolExecutor(whole_n + streams_n) as pool,
    ):
        started = [threading.Event() for _ in range(streams_n)]
        streams = [pool.submit(_stream, served.client, event, max_tokens) for event in started]
        wholes = [
            pool.submit(served.client.chat.completions.create, **_request(max_tokens)) for _ in range(whole_n)
        ]
        _wait_until(
            lambda: all(e.is_set() for e in started) and served.in_flight() == whole_n + streams_n,
            "every request to be generating",
        )

        served.proc.send_signal(signal.SIGTERM)

        _wait_until(lambda: served.logged("SIGTERM: refusing new requests"), "the drain to start")
        assert served.logged(f"{whole_n + streams_n} in flight")  # the signal came while all were running
        assert _late_request(served.url) in ("refused", "503 shutting_down")
        for answer in (f.result(timeout=300) for f in wholes):
            assert answer.choices[0].finish_reason == "length"
            assert answer.usage is not None and answer.usage.completion_tokens == max_tokens
        assert [f.result(timeout=300) for f in streams] == [(max_tokens, "length")] * streams_n
        assert served.proc.wait(timeout=60) == 0
    assert served.logged(f"closed 1 engine(s): {NAME}")


def test_requests_still_running_when_the_grace_ends_are_cancelled_and_answered(
    long_chat: Path, tmp_path: Path
) -> None:
    with _serve(long_chat, tmp_path, "--shutdown-grace-s", "1") as served, ThreadPoolExecutor(2) as pool:
        started = threading.Event()
        stream = pool.submit(_stream, served.client, started, 3500)
        whole: Future[Any] = pool.submit(served.client.chat.completions.create, **_request(3500))
        _wait_until(lambda: started.is_set() and served.in_flight() == 2, "both requests to be generating")

        served.proc.send_signal(signal.SIGINT)  # Ctrl-C drains the same way

        with pytest.raises(openai.InternalServerError) as cut:
            whole.result(timeout=120)
        assert cut.value.status_code == 503
        assert cut.value.code == "shutting_down" and "shutdown grace 1 s" in cut.value.message
        # Mid-stream: the error event, which the openai client raises.
        with pytest.raises(openai.APIError, match="shut down before the request finished"):
            stream.result(timeout=120)
        assert served.proc.wait(timeout=60) == 0
    assert served.logged("shutdown grace of 1 s is over: cancelled 2 request(s)")
    assert served.logged(f"closed 1 engine(s): {NAME}")


def test_a_second_signal_during_the_grace_exits_at_once(long_chat: Path, tmp_path: Path) -> None:
    with _serve(long_chat, tmp_path, "--shutdown-grace-s", "600") as served, ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        stream = pool.submit(_stream, served.client, started, 3500)
        _wait_until(started.is_set, "the stream to start")

        served.proc.send_signal(signal.SIGTERM)
        _wait_until(lambda: served.logged("SIGTERM: refusing new requests"), "the drain to start")
        # Closer to the first one, a signal is the same stop delivered twice (a group kill + a forward).
        time.sleep(SAME_STOP_S)
        served.proc.send_signal(signal.SIGTERM)

        assert served.proc.wait(timeout=15) == 128 + signal.SIGTERM  # not after the 600 s grace
        with pytest.raises(openai.APIConnectionError):
            stream.result(timeout=60)
    assert served.logged("second SIGTERM: exiting now with 1 request(s) in flight")
