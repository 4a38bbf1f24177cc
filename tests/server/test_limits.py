"""Errors, API key, timeouts, the bounded queue and client disconnects, against the real server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import openai
import pytest

from llmadapter.catalog import CHAT
from llmadapter.engine.base import Engine
from llmadapter.server.app import build_app
from llmadapter.testing import TRAINED_ANSWER
from tests.server.conftest import (
    CHAT_ID,
    COMPLETIONS_ID,
    EMBEDDINGS_ID,
    LONG_ID,
    RunningServer,
    generation_engine,
    long_request,
    serve,
    settings,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello"}]


def _error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": HELLO, "extra_body": {"frobnicate": True}}, 400, "frobnicate"),
        ({"messages": HELLO, "temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
        ({"messages": HELLO, "max_tokens": 250}, 400, "max_tokens"),
        ({"messages": HELLO, "model": EMBEDDINGS_ID}, 400, "model"),
        ({"messages": HELLO, "model": "no-such-model"}, 404, "model"),
        ({"messages": []}, 400, "messages"),
    ],
    ids=[
        "bad-role",
        "negative-max-tokens",
        "unknown-field",
        "temperature-out-of-range",
        "prompt-too-long",
        "prompt-plus-max-tokens-too-long",
        "wrong-task",
        "unknown-model",
        "empty-messages",
    ],
)
def test_chat_errors_name_the_parameter(server: RunningServer, kwargs: dict, status: int, param: str) -> None:
    kwargs = {"model": CHAT_ID, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(**kwargs)
    assert info.value.status_code == status
    error = _error_of(info.value)
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_too_long_prompt_reports_both_numbers(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model=CHAT_ID, messages=[{"role": "user", "content": "word " * 400}]
        )
    error = _error_of(info.value)
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"]


def test_wrong_task_errors_on_every_route(server: RunningServer) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=CHAT_ID, input="Hello")
    assert _error_of(info.value)["code"] == "wrong_task"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=CHAT_ID, prompt="Hello")
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="gpt-4", input="Hello")
    assert _error_of(missing.value)["code"] == "model_not_found"


def test_route_whose_task_no_model_has_is_404(chat_engine: Engine) -> None:
    with serve(build_app({CHAT_ID: chat_engine}, settings())) as running:
        client = running.client()
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model=EMBEDDINGS_ID, input="Hello")
        missing = httpx.post(f"{running.base_url}/embeddings", json={"input": "Hello"}, timeout=30)
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "model"


def test_api_key_is_required_on_v1_and_never_logged(
    engines: Mapping[str, Engine], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-test-5f0c1d2e3a4b"
    monkeypatch.setenv("LLMADAPTER_TEST_SERVER_KEY", key)
    caplog.set_level(logging.DEBUG)
    app = build_app(engines, settings(api_key_env="LLMADAPTER_TEST_SERVER_KEY"))
    with serve(app, log_level="debug") as running:
        answer = running.client(api_key=key).chat.completions.create(
            model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100
        )
        assert answer.choices[0].message.content == TRAINED_ANSWER
        for wrong in ("sk-wrong", key + "x", key[:-1]):
            with pytest.raises(openai.AuthenticationError) as info:
                running.client(api_key=wrong).chat.completions.create(model=CHAT_ID, messages=HELLO)
            assert _error_of(info.value)["type"] == "authentication_error"
        missing = httpx.post(f"{running.base_url}/chat/completions", json={"messages": HELLO}, timeout=30)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "missing_api_key"
        for path in ("/v1/models", "/v1/embeddings", "/invocations"):
            assert (
                httpx.request("POST" if path != "/v1/models" else "GET", running.url + path).status_code
                == 401
            )
        # Probes and scrapes stay open.
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(running.url + path).status_code == 200
    server_logs = [r.getMessage() for r in caplog.records if r.name.startswith(("llmadapter", "uvicorn"))]
    assert server_logs, "the server logged nothing: the check below would prove nothing"
    assert not any(key in line for line in server_logs)


def _running(engine: Engine) -> int:
    return engine.stats.running + engine.stats.queue_depth


def test_closing_a_stream_cancels_its_generation(server: RunningServer, long_engine: Engine) -> None:
    generated_before = long_engine.stats.completion_tokens
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=long_request(stream=True), timeout=60
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_until(lambda: long_engine.stats.running == 1, message="the stream to be generating")
    # The client hung up: the sequence leaves the batch long before its 3000 tokens.
    wait_until(lambda: server.metric("llmadapter_running", model=LONG_ID) == 0, message="cancellation")
    assert _running(long_engine) == 0
    assert long_engine.stats.completion_tokens - generated_before < 3000


def test_disconnect_cancels_a_non_streamed_request(server: RunningServer, long_engine: Engine) -> None:
    generated_before = long_engine.stats.completion_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/chat/completions", json=long_request(), timeout=httpx.Timeout(30, read=1.0)
        )
    wait_until(lambda: server.metric("llmadapter_running", model=LONG_ID) == 0, message="cancellation")
    assert long_engine.stats.completion_tokens - generated_before < 3000
    # The server still answers.
    assert server.client().chat.completions.create(model=CHAT_ID, messages=HELLO, max_tokens=3).choices


def test_async_client_closing_a_stream_cancels_it(server: RunningServer, long_engine: Engine) -> None:
    async def main() -> None:
        async with server.aclient() as client:
            body = long_request()
            stream = await client.chat.completions.create(**body, stream=True)
            async for _ in stream:
                break
            await stream.close()

    asyncio.run(main())
    wait_until(lambda: _running(long_engine) == 0, message="cancellation")


def test_timeout_gives_504_and_stops_the_generation(
    engines: Mapping[str, Engine], long_engine: Engine
) -> None:
    with serve(build_app(engines, settings(request_timeout_s=1.0))) as running:
        generated_before = long_engine.stats.completion_tokens
        response = httpx.post(f"{running.base_url}/chat/completions", json=long_request(), timeout=60)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        wait_until(lambda: _running(long_engine) == 0, message="cancellation")
        assert long_engine.stats.completion_tokens - generated_before < 3000
        # Mid-stream, the timeout is an error event that the openai client raises.
        with pytest.raises(openai.APIError, match="did not finish within 1 s"):
            for _ in running.client().chat.completions.create(**long_request(), stream=True):
                pass
        wait_until(lambda: _running(long_engine) == 0, message="cancellation")
        assert running.metric("llmadapter_errors_total", type="server_error") >= 2


def test_full_queue_gives_429_with_retry_after(engines: Mapping[str, Engine], long_engine: Engine) -> None:
    with serve(build_app(engines, settings(max_queue=1, retry_after_s=3))) as running:
        url = f"{running.base_url}/chat/completions"
        with httpx.stream("POST", url, json=long_request(stream=True), timeout=60) as held:
            lines = held.iter_lines()
            next(lines)
            refused = httpx.post(url, json={"model": CHAT_ID, "messages": HELLO}, timeout=30)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                running.client().chat.completions.create(model=CHAT_ID, messages=HELLO)
        # The slot comes back when the held stream ends.
        wait_until(lambda: _running(long_engine) == 0, message="cancellation")
        answer = None
        for _ in range(100):
            try:
                answer = running.client().chat.completions.create(
                    model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100
                )
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        assert answer is not None and answer.choices[0].message.content == TRAINED_ANSWER


def test_engine_queue_limit_is_a_429_too(long_model: Path, completions_engine: Engine) -> None:
    # The engine's own bound (sequences queued or running): full for now is a 429 to retry; a request
    # that could never fit (n=3 over a limit of 2) is a 400 naming `n`, not a 429 retried forever.
    small = generation_engine(long_model, CHAT, LONG_ID, max_queue=2)
    try:
        with serve(build_app({LONG_ID: small, COMPLETIONS_ID: completions_engine}, settings())) as running:
            with pytest.raises(openai.BadRequestError) as too_big:
                running.client().chat.completions.create(model=LONG_ID, messages=HELLO, n=3)
            assert _error_of(too_big.value)["param"] == "n"
            url = f"{running.base_url}/chat/completions"
            with httpx.stream("POST", url, json=long_request(stream=True), timeout=60) as held:
                lines = held.iter_lines()  # kept: a dropped line iterator closes the stream
                next(lines)
                with pytest.raises(openai.RateLimitError) as info:
                    running.client().chat.completions.create(model=LONG_ID, messages=HELLO, n=2)
                assert info.value.response.headers["retry-after"] == "1"
    finally:
        small.close()
