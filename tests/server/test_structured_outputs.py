"""Structured outputs and tool calls through the real server with the official openai client: parsed
pydantic answers, forced calls, streamed call deltas, completions' response_format, 400s naming the field."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import COMPLETIONS_ID, LONG_ID, RunningServer

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": PARAMETERS}}]


class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    degrees: int = Field(ge=-20, le=40)
    sunny: bool


def test_openai_client_parses_a_pydantic_answer(server: RunningServer) -> None:
    client = server.client()
    for seed in range(3):
        done = client.chat.completions.parse(
            model=LONG_ID, messages=HELLO, response_format=Forecast, max_tokens=60, seed=seed
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Forecast)


def test_forced_tool_call_and_its_stream(server: RunningServer) -> None:
    client = server.client()
    whole = client.chat.completions.create(
        model=LONG_ID, messages=HELLO, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "forecast" and call.id
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)

    stream = client.chat.completions.create(
        model=LONG_ID,
        messages=HELLO,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "forecast"}},
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    pieces = [p for c in chunks for p in c.choices[0].delta.tool_calls or []]
    assert not any(c.choices[0].delta.content for c in chunks)
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "forecast"
    assert "".join((p.function.arguments or "") for p in pieces if p.function) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_completions_take_response_format(server: RunningServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": PARAMETERS}}
    done = server.client().completions.create(
        model=COMPLETIONS_ID, prompt="Forecast:", max_tokens=40, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(done.choices[0].text), PARAMETERS)


def test_invocations_honour_response_format(server: RunningServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": PARAMETERS}}
    body = {"model": LONG_ID, "messages": HELLO, "max_tokens": 60, "response_format": fmt}
    answer = httpx.post(f"{server.url}/invocations", json=body, timeout=60).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), PARAMETERS)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools[0].function.parameters",
        ),
    ],
    ids=["unenforceable-schema", "undefined-function", "bad-parameters"],
)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(
    server: RunningServer, extra: dict[str, object], param: str
) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=LONG_ID, messages=HELLO, max_tokens=5, **extra)  # type: ignore[call-overload]
    assert info.value.param == param
    assert client.chat.completions.create(model=LONG_ID, messages=HELLO, max_tokens=2).choices
