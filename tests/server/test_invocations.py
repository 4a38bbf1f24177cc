"""POST /invocations: the request formats `mlflow models serve` accepts, answered by our batched engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmadapter.engine.base import Engine
from llmadapter.server.app import build_app
from llmadapter.testing import TRAINED_ANSWER
from tests.server.conftest import (
    CHAT_ID,
    COMPLETIONS_ID,
    EMBEDDINGS_ID,
    RunningServer,
    long_request,
    serve,
    settings,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def chat_only(chat_engine: Engine) -> Iterator[RunningServer]:
    """One model, as `mlflow models serve` has."""
    with serve(build_app({CHAT_ID: chat_engine}, settings())) as running:
        yield running


def _post(server: RunningServer, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/invocations", json=body, timeout=60)


def _texts(predictions: list[dict]) -> list[str]:
    return [p["choices"][0]["message"]["content"] for p in predictions]


def test_plain_openai_body_is_answered_unwrapped(chat_only: RunningServer) -> None:
    response = _post(chat_only, {"messages": HELLO, "temperature": 0, "max_tokens": 100})
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == TRAINED_ANSWER
    assert answer["model"] == CHAT_ID


@pytest.mark.parametrize(
    "body",
    [
        {
            "dataframe_split": {
                "columns": ["messages", "max_tokens", "temperature"],
                "data": [[HELLO, 4, 0], [HELLO, 100, 0]],
            }
        },
        {"dataframe_records": [{"messages": HELLO, "max_tokens": 4}, {"messages": HELLO, "max_tokens": 100}]},
        {"instances": [{"messages": HELLO, "max_tokens": 4}, {"messages": HELLO}]},
        {"inputs": {"messages": [HELLO, HELLO], "max_tokens": [4, 100]}},
        {"inputs": [{"messages": HELLO, "max_tokens": 4}, {"messages": HELLO, "max_tokens": None}]},
    ],
    ids=["dataframe_split", "dataframe_records", "instances", "inputs-columns", "inputs-records"],
)
def test_mlflow_formats_give_one_prediction_per_row(chat_only: RunningServer, body: dict) -> None:
    # `params` fills what a row leaves out (temperature 0 here, max_tokens for the short rows).
    response = _post(chat_only, {**body, "params": {"temperature": 0, "max_tokens": 100}})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert _texts(predictions) == [TRAINED_ANSWER[: len(_texts(predictions)[0])], TRAINED_ANSWER]
    assert [p["choices"][0]["finish_reason"] for p in predictions] == ["length", "stop"]
    assert predictions[0]["usage"]["completion_tokens"] == 4


def test_a_single_row_is_one_prediction_object(chat_only: RunningServer) -> None:
    # As our pyfunc's predict (and so `mlflow models serve`) returns one dict for one request.
    response = _post(
        chat_only, {"dataframe_records": [{"messages": HELLO, "temperature": 0, "max_tokens": 100}]}
    )
    assert response.json()["predictions"]["choices"][0]["message"]["content"] == TRAINED_ANSWER


def _events(response: httpx.Response) -> list[Any]:
    """The SSE events of an answer, without what differs run for run (ids, timestamps)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [{k: v for k, v in json.loads(e).items() if k not in ("id", "created")} for e in events[:-1]]


@pytest.mark.parametrize(
    "body",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"dataframe_records": [{}], "params": {"stream": True}},
        {"dataframe_records": [{}], "params": {"stream": True, "stream_options": {"include_usage": True}}},
    ],
    ids=["stream", "stream-with-usage", "params-stream", "params-stream-with-usage"],
)
def test_a_streamed_invocation_is_the_v1_stream(chat_only: RunningServer, body: dict) -> None:
    """`mlflow models serve` cannot stream; our /invocations gives the /v1 route's SSE chunks."""
    request = {"messages": HELLO, "temperature": 0, "max_tokens": 100}
    if "dataframe_records" in body:
        invocation = {**body, "dataframe_records": [request]}
    else:
        invocation = {**request, **body}
    flags = {k: v for k, v in {**body, **body.get("params", {})}.items() if k in ("stream", "stream_options")}
    v1 = httpx.post(f"{chat_only.url}/v1/chat/completions", json={**request, **flags}, timeout=60)
    streamed = _events(_post(chat_only, invocation))
    assert streamed == _events(v1)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed if e["choices"]) == (
        TRAINED_ANSWER
    )
    assert bool(streamed[-1].get("usage")) == bool(flags.get("stream_options"))


def test_a_streamed_invocation_holds_one_request(chat_only: RunningServer) -> None:
    response = _post(chat_only, {"dataframe_records": [{"messages": HELLO}] * 2, "params": {"stream": True}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


def test_a_failing_row_cancels_the_rows_already_generating(
    server: RunningServer, long_engine: Engine
) -> None:
    good = long_request(max_tokens=4000)  # seconds of generation if nothing stops it
    too_long = {**good, "max_tokens": 5000}  # over the 4096-token window: refused when its turn comes
    before = long_engine.stats.completion_tokens
    response = _post(server, {"dataframe_records": [good, too_long]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    # The first row was already submitted; with nobody left to answer, it stops instead of running on.
    stats = long_engine.stats
    wait_until(lambda: stats.running == 0 and stats.queue_depth == 0, timeout=10, message="cancellation")
    settled = stats.completion_tokens
    time.sleep(0.5)
    assert stats.completion_tokens == settled  # nothing generates any more
    assert settled - before < 1000


def test_row_errors_name_the_parameter(chat_only: RunningServer) -> None:
    response = _post(chat_only, {"dataframe_records": [{"messages": HELLO}, {"messages": HELLO, "n": 0}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"


def test_several_models_need_a_model_field(server: RunningServer) -> None:
    missing = _post(server, {"messages": HELLO})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "model"
    response = _post(server, {"model": EMBEDDINGS_ID, "input": ["Hello", "Hello, how are you?"]})
    assert response.status_code == 200
    assert [d["index"] for d in response.json()["data"]] == [0, 1]
    split = _post(
        server, {"dataframe_split": {"columns": ["model", "input"], "data": [[EMBEDDINGS_ID, "Hello"]]}}
    )
    assert len(split.json()["predictions"]["data"][0]["embedding"]) == 384


def _post_csv(server: RunningServer, text: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/invocations", content=text.encode(), headers={"content-type": "text/csv"}, timeout=60
    )


def test_csv_bodies_are_one_request_per_row(server: RunningServer) -> None:
    """`mlflow models serve` reads text/csv with pandas; so do we (empty cells are "not given")."""
    csv = "model,prompt,max_tokens,temperature\n"
    csv += f"{COMPLETIONS_ID},The quick brown,4,0\n{COMPLETIONS_ID},The quick,,0\n"
    response = _post_csv(server, csv)
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    plain = _post(
        server, {"model": COMPLETIONS_ID, "prompt": "The quick brown", "max_tokens": 4, "temperature": 0}
    )
    assert first["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 4
    # max_tokens left empty: the model's default limit, so it runs past the first answer's 4 tokens.
    assert second["choices"][0]["text"].startswith(" brown fox jumps")
    texts = f'model,input\n{EMBEDDINGS_ID},Hello\n{EMBEDDINGS_ID},"Hello, how are you?"\n'
    embedded = _post_csv(server, texts)
    assert embedded.status_code == 200, embedded.text
    assert [d["index"] for d in embedded.json()["predictions"]["data"]] == [0, 1]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("", "invalid_csv"),
        ("prompt,max_tokens\n", "invalid_csv"),
        ('prompt\n"unterminated\n', "invalid_csv"),
    ],
    ids=["empty", "header-only", "unterminated-quote"],
)
def test_bad_csv_is_a_400(chat_only: RunningServer, body: str, code: str) -> None:
    response = _post_csv(chat_only, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code


def test_csv_text_columns_stay_text(server: RunningServer) -> None:
    response = _post_csv(server, f"model,prompt,max_tokens,temperature\n{COMPLETIONS_ID},42,3,0\n")
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]["usage"]["completion_tokens"] <= 3
