"""Malformed requests: each gets a 4xx OpenAI error, and the server answers normally right after."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.server.conftest import CHAT_ID, COMPLETIONS_ID, EMBEDDINGS_ID, RunningServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
INVOCATIONS = "/invocations"
HI = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: bytes | None = None
    status: int = 400
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": CHAT_ID, "messages": HI, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": COMPLETIONS_ID, "prompt": "The quick", **fields}).encode()


def embedding(**fields: Any) -> bytes:
    return json.dumps({"model": EMBEDDINGS_ID, "input": "hi", **fields}).encode()


def without(body: bytes, key: str) -> bytes:
    data = json.loads(body)
    del data[key]
    return json.dumps(data).encode()


BIG = 4 * 1024 * 1024 + 1  # one byte over the default max_body_bytes

CORPUS = [
    # Not JSON, or not UTF-8
    Case("empty-body", CHAT, b""),
    Case("whitespace-body", CHAT, b"   \n"),
    Case("open-brace", CHAT, b"{"),
    Case("bare-word", CHAT, b"{bad"),
    Case("truncated-array", CHAT, b"[1,2"),
    Case("single-quotes", CHAT, b"{'messages': []}"),
    Case("trailing-comma", CHAT, b'{"model": "trained-chat",}'),
    Case("two-objects", CHAT, chat() + chat()),
    Case("nan", CHAT, chat().replace(b'"hi"}]', b'"hi"}], "temperature": NaN')),
    Case("infinity", CHAT, chat().replace(b'"hi"}]', b'"hi"}], "max_tokens": Infinity')),
    Case("invalid-utf8", CHAT, chat().replace(b"hi", b"\xff\xfe")),
    Case("latin1-text", CHAT, chat().replace(b"hi", b"caf\xe9")),
    Case("overlong-utf8", CHAT, chat().replace(b"hi", b"\xc0\xaf")),
    Case("utf8-bom", CHAT, b"\xef\xbb\xbf" + chat()),
    Case("lone-surrogate", CHAT, chat().replace(b"hi", b"\\ud800")),
    Case("deep-nesting", CHAT, b"[" * 100_000 + b"]" * 100_000),
    Case("huge-integer", CHAT, chat().replace(b'"hi"}]', b'"hi"}], "max_tokens": ' + b"9" * 5000)),
    # JSON, but not an object
    Case("null", CHAT, b"null"),
    Case("array", CHAT, b"[]"),
    Case("string", CHAT, b'"hello"'),
    Case("number", CHAT, b"42"),
    # Wrong types and values (chat)
    Case("messages-string", CHAT, chat(messages="hi")),
    Case("messages-object", CHAT, chat(messages={"role": "user"})),
    Case("messages-empty", CHAT, chat(messages=[])),
    Case("messages-missing", CHAT, without(chat(), "messages")),
    Case("message-empty-object", CHAT, chat(messages=[{}])),
    Case("message-no-content", CHAT, chat(messages=[{"role": "user"}])),
    Case("message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}])),
    Case("message-role-number", CHAT, chat(messages=[{"role": 1, "content": "hi"}])),
    Case("message-content-number", CHAT, chat(messages=[{"role": "user", "content": 5}])),
    Case("message-image-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
    Case("message-extra-key", CHAT, chat(messages=[{"role": "user", "content": "hi", "mood": "happy"}])),
    Case("unknown-field", CHAT, chat(frobnicate=True)),
    Case("model-number", CHAT, chat(model=123)),
    Case("model-unknown", CHAT, chat(model="gpt-4o"), status=404),
    Case("model-other-task", CHAT, chat(model=EMBEDDINGS_ID)),
    Case("temperature-string", CHAT, chat(temperature="hot")),
    Case("temperature-high", CHAT, chat(temperature=2.5)),
    Case("temperature-negative", CHAT, chat(temperature=-0.1)),
    Case("top-p-negative", CHAT, chat(top_p=-0.1)),
    Case("top-p-high", CHAT, chat(top_p=1.5)),
    Case("max-tokens-zero", CHAT, chat(max_tokens=0)),
    Case("max-tokens-negative", CHAT, chat(max_tokens=-5)),
    Case("max-tokens-float", CHAT, chat(max_tokens=1.5)),
    Case("max-tokens-huge", CHAT, chat(max_tokens=10**12)),
    Case("max-tokens-conflict", CHAT, chat(max_tokens=5, max_completion_tokens=6)),
    Case("n-zero", CHAT, chat(n=0)),
    Case("n-huge", CHAT, chat(n=1000)),
    Case("stop-empty-string", CHAT, chat(stop=[""])),
    Case("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(100)])),
    Case("stop-number", CHAT, chat(stop=5)),
    Case("presence-penalty-high", CHAT, chat(presence_penalty=5)),
    Case("seed-string", CHAT, chat(seed="abc")),
    Case("seed-over-64-bits", CHAT, chat(seed=2**64)),
    Case("max-tokens-numeric-string", CHAT, chat(max_tokens="10")),
    Case("stream-string-true", CHAT, chat(stream="true")),
    Case("n-boolean", CHAT, chat(n=True)),
    Case("temperature-numeric-string", CHAT, chat(temperature="0.5")),
    Case("logit-bias-key", CHAT, chat(logit_bias={"abc": 1})),
    Case("logit-bias-value", CHAT, chat(logit_bias={"1": 500})),
    Case("logit-bias-out-of-vocab", CHAT, chat(logit_bias={"99999999": 1})),
    Case("stream-options-not-object", CHAT, chat(stream=True, stream_options=True)),
    Case("stream-not-bool", CHAT, chat(stream={"on": True})),
    Case("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2)),
    Case("top-logprobs-high", CHAT, chat(logprobs=True, top_logprobs=50)),
    Case("tool-choice-bad", CHAT, chat(tool_choice="sometimes")),
    Case("tool-empty-name", CHAT, chat(tools=[{"type": "function", "function": {"name": ""}}])),
    Case("user-number", CHAT, chat(user=5)),
    Case("prompt-too-long", CHAT, chat(messages=[{"role": "user", "content": "word " * 2000}])),
    Case("content-one-megabyte", CHAT, chat(messages=[{"role": "user", "content": "a" * 1_000_000}])),
    Case(
        "streamed-prompt-too-long",
        CHAT,
        chat(stream=True, messages=[{"role": "user", "content": "x " * 900}]),
    ),
    # Completions
    Case("prompt-missing", COMPLETIONS, without(completion(), "prompt")),
    Case("prompt-empty-list", COMPLETIONS, completion(prompt=[])),
    Case("prompt-empty-string", COMPLETIONS, completion(prompt="")),
    Case("prompt-token-id-outside-vocab", COMPLETIONS, completion(prompt=[1, 2, 99_999_999])),
    Case("prompt-number", COMPLETIONS, completion(prompt=7)),
    Case("suffix", COMPLETIONS, completion(suffix="end")),
    Case("echo-not-bool", COMPLETIONS, completion(echo="maybe")),
    Case("completion-logprobs-high", COMPLETIONS, completion(logprobs=50)),
    Case("completion-with-messages", COMPLETIONS, completion(messages=HI)),
    # Embeddings
    Case("input-missing", EMBEDDINGS, without(embedding(), "input")),
    Case("input-number", EMBEDDINGS, embedding(input=5)),
    Case("input-empty-list", EMBEDDINGS, embedding(input=[])),
    Case("input-mixed", EMBEDDINGS, embedding(input=[[1, 2], "a"])),
    Case("input-token-out-of-vocab", EMBEDDINGS, embedding(input=[999_999_999])),
    Case("encoding-format-hex", EMBEDDINGS, embedding(encoding_format="hex")),
    Case("dimensions-zero", EMBEDDINGS, embedding(dimensions=0)),
    Case("dimensions-too-large", EMBEDDINGS, embedding(dimensions=100_000)),
    Case("embeddings-stream", EMBEDDINGS, embedding(stream=True)),
    # /invocations
    Case("invocations-no-format", INVOCATIONS, b'{"foo": 1}'),
    Case("invocations-two-formats", INVOCATIONS, b'{"inputs": [], "instances": []}'),
    Case(
        "invocations-split-data-string",
        INVOCATIONS,
        b'{"dataframe_split": {"columns": ["messages"], "data": "x"}}',
    ),
    Case(
        "invocations-split-ragged",
        INVOCATIONS,
        b'{"dataframe_split": {"columns": ["a", "b"], "data": [[1]]}}',
    ),
    Case("invocations-no-rows", INVOCATIONS, b'{"dataframe_records": []}'),
    Case("invocations-instances-number", INVOCATIONS, b'{"instances": 5}'),
    Case(
        "invocations-bad-row", INVOCATIONS, json.dumps({"dataframe_records": [{"messages": "hi"}]}).encode()
    ),
    Case("invocations-model-list", INVOCATIONS, json.dumps({"dataframe_records": [{"model": [1]}]}).encode()),
    Case(
        "invocations-params-list",
        INVOCATIONS,
        json.dumps({"inputs": [{"messages": HI}], "params": [1]}).encode(),
    ),
    # Size, method, route
    Case("oversized-declared", CHAT, chat(messages=[{"role": "user", "content": "a" * BIG}]), status=413),
    Case(
        "oversized-chunked",
        CHAT,
        chat(messages=[{"role": "user", "content": "a" * BIG}]),
        status=413,
        chunked=True,
    ),
    Case("wrong-method", CHAT, None, status=405, method="GET"),
    Case("unknown-route", "/v1/nothing", chat(), status=404),
    Case("unknown-model-retrieve", "/v1/models/nope", None, status=404, method="GET"),
]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 50
    assert len({case.id for case in CORPUS}) == len(CORPUS)


def _chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_malformed_request_gets_a_4xx_openai_error(server: RunningServer, case: Case) -> None:
    content: Any = _chunks(case.body) if case.chunked and case.body else case.body
    headers = {"content-type": "application/json", **case.headers}
    response = httpx.request(
        case.method, server.url + case.path, content=content, headers=headers, timeout=60
    )
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]
    # The server answers a normal request right after.
    normal = httpx.post(
        f"{server.base_url}/chat/completions",
        json={
            "model": CHAT_ID,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 2,
            "temperature": 0,
        },
        timeout=60,
    )
    assert normal.status_code == 200
    assert normal.json()["choices"][0]["finish_reason"] == "length"
