"""Unit tests of the server's glue with a fake engine: error mapping, SSE framing, model lookup, settings.

Every behaviour here is also exercised against real engines in the other test modules; these pin the
edge cases that a real tiny model cannot provoke on demand (an engine bug, a crash mid-stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from llmadapter.catalog import CHAT, EMBEDDINGS, get_task
from llmadapter.engine.base import Engine, EngineStats
from llmadapter.errors import (
    AuthenticationError,
    ContextLengthError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
)
from llmadapter.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    DeltaMessage,
)
from llmadapter.rows import request_rows
from llmadapter.server import sse
from llmadapter.server.app import build_app
from llmadapter.server.errors import (
    ModelLoadingError,
    PayloadTooLargeError,
    RequestTimeoutError,
    to_error_answer,
)
from llmadapter.server.invocations import split_invocation
from llmadapter.server.served import ServedModels
from llmadapter.server.settings import ServerSettings


class FakeEngine(Engine):
    """An engine whose answers and failures the test decides."""

    def __init__(
        self, task: str = CHAT, *, name: str = "fake", fail: Exception | None = None, chunks: int = 3
    ) -> None:
        self.spec = get_task(task)
        self.model_name = name
        self.stats = EngineStats()
        self.fail = fail
        self.chunks = chunks
        self.closed_streams = 0

    @property
    def context_window(self) -> int:
        return 100

    def run(self, requests: Sequence[BaseModel]) -> list[BaseModel]:
        raise NotImplementedError

    async def arun(self, request: BaseModel) -> BaseModel:
        if self.fail is not None:
            raise self.fail
        raise NotImplementedError

    async def astream(self, request: BaseModel) -> AsyncIterator[BaseModel]:  # type: ignore[override]
        try:
            for i in range(self.chunks):
                delta = DeltaMessage(content=f'say "{i}"')
                yield ChatCompletionChunk(
                    id="c", created=0, model="fake", choices=[ChatChunkChoice(index=0, delta=delta)]
                )
                await asyncio.sleep(0)
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed_streams += 1


def settings(**overrides: Any) -> ServerSettings:
    return ServerSettings(**{"api_key_env": "LLMADAPTER_TEST_NO_SUCH_KEY", **overrides})


def _pydantic_error() -> ValidationError:
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "x", "content": "hi"}]})
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a validation error")


def _json_error() -> json.JSONDecodeError:
    try:
        json.loads("{")
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError


@pytest.mark.parametrize(
    ("exc", "status", "error_type", "code", "headers"),
    [
        (InvalidRequestError("bad", param="n"), 400, "invalid_request_error", None, {}),
        (ContextLengthError("long"), 400, "invalid_request_error", "context_length_exceeded", {}),
        (AuthenticationError("no"), 401, "authentication_error", None, {"WWW-Authenticate": "Bearer"}),
        (NotFoundError("gone", param="model"), 404, "not_found_error", None, {}),
        (
            OverloadedError("busy", retry_after=2.2),
            429,
            "rate_limit_error",
            "queue_full",
            {"Retry-After": "3"},
        ),
        (ModelLoadingError("wait"), 503, "server_error", "model_loading", {"Retry-After": "1"}),
        (PayloadTooLargeError(1024), 413, "invalid_request_error", "payload_too_large", {}),
        (RequestTimeoutError(2.0), 504, "server_error", "timeout", {}),
        (_json_error(), 400, "invalid_request_error", "invalid_json", {}),
        (
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            400,
            "invalid_request_error",
            "invalid_json",
            {},
        ),
        (_pydantic_error(), 400, "invalid_request_error", None, {}),
        (HTTPException(405, "Method Not Allowed"), 405, "invalid_request_error", None, {}),
        (HTTPException(404, "Not Found"), 404, "not_found_error", None, {}),
    ],
    ids=[
        "invalid",
        "context",
        "auth",
        "not-found",
        "overloaded",
        "loading",
        "too-large",
        "timeout",
        "json",
        "utf8",
        "pydantic",
        "method",
        "route",
    ],
)
def test_every_error_maps_to_its_status_and_openai_body(
    exc: BaseException, status: int, error_type: str, code: str | None, headers: dict[str, str]
) -> None:
    answer = to_error_answer(exc)
    assert answer.status_code == status
    body = json.loads(answer.json())
    assert body["error"]["type"] == error_type
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert answer.headers == headers


def test_pydantic_errors_name_the_parameter() -> None:
    assert json.loads(to_error_answer(_pydantic_error()).json())["error"]["param"] == "messages.0.role"


def test_unexpected_exceptions_are_opaque_500s(caplog: pytest.LogCaptureFixture) -> None:
    answer = to_error_answer(RuntimeError("secret at /home/user/model.bin"))
    assert answer.status_code == 500
    assert "secret" not in answer.json() and "/home" not in answer.json()
    assert "secret at /home/user/model.bin" in caplog.text  # the operator still sees it


def test_sse_chunks_and_error_events_are_valid_json() -> None:
    chunk = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content='a "quote"'))],
    )
    line = sse.encode_chunk(chunk)
    assert line.startswith(b"data: ") and line.endswith(b"\n\n")
    assert json.loads(line[6:])["choices"][0]["delta"] == {"content": 'a "quote"'}  # None fields left out
    error = sse.encode_error(to_error_answer(InvalidRequestError('bad "value"\nhere', param="x")))
    assert json.loads(error[6:])["error"]["message"] == 'bad "value"\nhere'


def _client(engine: Engine, **overrides: Any) -> TestClient:
    return TestClient(build_app({"fake": engine}, settings(**overrides)))


HELLO = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def test_engine_crash_is_a_500_without_details() -> None:
    response = _client(FakeEngine(fail=RuntimeError("tensor at /secret"))).post(
        "/v1/chat/completions", json=HELLO
    )
    assert response.status_code == 500
    assert "/secret" not in response.text
    assert response.json()["error"]["type"] == "server_error"


def test_error_mid_stream_is_one_error_event_and_closes_the_engine_stream() -> None:
    engine = FakeEngine(fail=InvalidRequestError('broke "here"', param="x"))
    response = _client(engine).post("/v1/chat/completions", json={**HELLO, "stream": True})
    assert response.status_code == 200
    events = [line for line in response.text.split("\n\n") if line]
    assert len(events) == 4
    assert "[DONE]" not in response.text
    assert json.loads(events[-1].removeprefix("data: "))["error"]["message"] == 'broke "here"'
    assert engine.closed_streams == 1


def test_stream_ends_with_done() -> None:
    engine = FakeEngine()
    response = _client(engine).post("/v1/chat/completions", json={**HELLO, "stream": True})
    assert response.text.endswith("data: [DONE]\n\n")
    assert engine.closed_streams == 1


def test_models_loading_make_ready_503_until_added() -> None:
    app = build_app({}, settings(), loading=["later"])
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503
    early = client.post("/v1/chat/completions", json={**HELLO, "model": "later"})
    assert early.status_code == 503
    assert early.headers["retry-after"] == "1"
    app.state.models.add(FakeEngine(name="later"))
    assert client.get("/ready").json() == {
        "status": "ready",
        "models": ["later"],
        "serving": {"later": {"following": False}},
    }


def test_model_lookup_rules() -> None:
    chat, other_chat, embed = FakeEngine(name="a"), FakeEngine(name="b"), FakeEngine(EMBEDDINGS, name="e")
    models = ServedModels([chat, embed])
    assert models.for_task(None, CHAT) is chat
    assert models.for_task("e", EMBEDDINGS) is embed
    with pytest.raises(InvalidRequestError) as wrong:
        models.for_task("e", CHAT)
    assert wrong.value.param == "model" and wrong.value.code == "wrong_task"
    with pytest.raises(NotFoundError):
        models.for_task("zzz", CHAT)
    with pytest.raises(InvalidRequestError):
        models.for_task(5, CHAT)
    several = ServedModels([chat, other_chat])
    with pytest.raises(InvalidRequestError, match="name one"):
        several.for_task(None, CHAT)
    with pytest.raises(NotFoundError):
        several.for_task(None, EMBEDDINGS)


@pytest.mark.parametrize(
    ("body", "rows", "wrapped"),
    [
        ({"messages": []}, [{"messages": []}], False),
        ({"input": "x", "model": "m"}, [{"input": "x", "model": "m"}], False),
        (
            {"dataframe_split": {"columns": ["prompt", "n"], "data": [["a", 1], ["b", None]]}},
            [{"prompt": "a", "n": 1}, {"prompt": "b"}],
            True,
        ),
        (
            {"dataframe_split": {"index": [0], "columns": ["prompt"], "data": [["a"]]}},
            [{"prompt": "a"}],
            True,
        ),
        ({"dataframe_records": [{"prompt": "a"}], "params": {"n": 2}}, [{"n": 2, "prompt": "a"}], True),
        ({"instances": [{"prompt": "a", "n": 3}], "params": {"n": 2}}, [{"prompt": "a", "n": 3}], True),
        ({"inputs": {"prompt": "a"}}, [{"prompt": "a"}], True),
        (
            {"inputs": {"prompt": ["a", "b"], "n": [1, 2]}},
            [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 2}],
            True,
        ),
    ],
    ids=[
        "chat",
        "embeddings",
        "split",
        "split-index",
        "records-params",
        "instances",
        "inputs",
        "inputs-columns",
    ],
)
def test_invocation_formats(body: dict, rows: list, wrapped: bool) -> None:
    invocation = split_invocation(body)
    assert request_rows(invocation.rows, invocation.params, get_task(CHAT)) == rows
    assert invocation.wrapped is wrapped


def test_settings_come_from_the_environment_with_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMADAPTER_PORT", "9123")
    monkeypatch.setenv("LLMADAPTER_MAX_QUEUE", "7")
    assert (ServerSettings().port, ServerSettings().max_queue) == (9123, 7)
    assert ServerSettings(port=1).port == 1  # given values win over the environment
    monkeypatch.setenv("LLMADAPTER_PORT", "99999")
    with pytest.raises(ValidationError):
        ServerSettings()
    with pytest.raises(ValidationError):
        ServerSettings(api_key_env="not a name", port=1)
    monkeypatch.setenv("MY_KEY", "k")
    assert ServerSettings(api_key_env="MY_KEY", port=1).api_key() == "k"
    assert all(field.description for field in ServerSettings.model_fields.values())


def test_each_app_has_its_own_metrics() -> None:
    first, second = _client(FakeEngine()), _client(FakeEngine())
    first.post("/v1/chat/completions", json={**HELLO, "stream": True})
    assert 'route="/v1/chat/completions"' in first.get("/metrics").text
    assert 'route="/v1/chat/completions"' not in second.get("/metrics").text


def test_embedding_request_fields_are_left_to_the_engine() -> None:
    # The server peeks only at `model`; everything else is the request model's business.
    client = _client(FakeEngine(EMBEDDINGS))
    response = client.post("/v1/embeddings", json={"model": "fake", "input": "x", "colour": "red"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "colour"


def test_every_answer_is_counted_by_route_model_and_status() -> None:
    client = _client(FakeEngine(fail=RuntimeError("boom")))
    client.post("/v1/chat/completions", json={**HELLO, "stream": True})  # the stream's error event
    client.post("/v1/chat/completions", json=HELLO)  # the engine crash: a 500
    client.get("/v1/models/fake")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    for sample in (
        'llmadapter_requests_total{model="fake",route="/v1/chat/completions",status="200"} 1.0',
        'llmadapter_requests_total{model="fake",route="/v1/chat/completions",status="500"} 1.0',
        'llmadapter_requests_total{model="",route="other",status="200"} 1.0',  # a model id in the path
        'llmadapter_requests_total{model="",route="other",status="404"} 1.0',
        'llmadapter_errors_total{route="/v1/chat/completions",type="server_error"} 2.0',
        'llmadapter_errors_total{route="other",type="not_found_error"} 1.0',
    ):
        assert sample in text


def test_engines_are_served_under_their_own_name() -> None:
    with pytest.raises(ValueError, match="'alias' \\('fake'\\)"):
        build_app({"alias": FakeEngine()}, settings())
