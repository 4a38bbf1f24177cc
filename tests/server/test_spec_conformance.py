"""The OpenAI API specification's rules, one test per rule, against the real server.

Each rule is first checked against the spec itself (tests/spec: the schemas cut from OpenAI's
openapi.yaml), so a test cannot state a rule the spec does not have. Valid edge cases go through the
official `openai` client; invalid ones through raw HTTP, expecting a 400 OpenAI error naming `param`.
Every answer these tests receive is checked against the spec's response schemas (tests/spec says where
they are widened to what OpenAI's own API sends).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from tests.server.conftest import CHAT_ID, COMPLETIONS_ID, RunningServer
from tests.spec import assert_conforms, violations

HELLO = [{"role": "user", "content": TRAINED_PROMPT}]
CHAT_ROUTE, COMPLETIONS_ROUTE = "/v1/chat/completions", "/v1/completions"
# (request schema, whole-answer schema, stream-chunk schema) per route; completions streams its answer's
# own object, as the spec says.
SCHEMAS = {
    CHAT_ROUTE: (
        "CreateChatCompletionRequest",
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
    ),
    COMPLETIONS_ROUTE: ("CreateCompletionRequest", "CreateCompletionResponse", "x-CompletionStreamChunk"),
}


def _name(route: str) -> str:
    return "chat" if route == CHAT_ROUTE else "completions"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": CHAT_ID, "messages": HELLO, "temperature": 0, "max_tokens": 60, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": COMPLETIONS_ID, "prompt": "The quick brown", "temperature": 0, "max_tokens": 4, **fields}


def post(server: RunningServer, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def answer(server: RunningServer, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """The whole answer as JSON, checked against the spec's response schema."""
    response = post(server, route, body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    assert_conforms(SCHEMAS[route][1], data)
    return data


def stream(server: RunningServer, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream's chunks as JSON, each checked against the spec's chunk schema."""
    with httpx.stream("POST", server.url + route, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        assert_conforms(SCHEMAS[route][2], chunk)
    return chunks


def refused(server: RunningServer, route: str, body: dict[str, Any], param: str) -> dict[str, Any]:
    """The 400 OpenAI error for `body`, naming `param` (checked against the spec's error schema)."""
    response = post(server, route, body)
    assert response.status_code == 400, response.text
    data = response.json()
    assert_conforms("ErrorResponse", data)
    error: dict[str, Any] = data["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error


# --- accepted by the spec: accepted here -------------------------------------------------------------


def test_top_p_zero_keeps_only_the_most_likely_token(server: RunningServer) -> None:
    body = chat(temperature=1.0, top_p=0, seed=3)
    assert violations(SCHEMAS[CHAT_ROUTE][0], body) == []  # the spec's range is [0, 1]
    response = server.client().chat.completions.create(**body)
    assert response.choices[0].message.content == TRAINED_ANSWER  # sampling from the top token alone


def test_completions_prompt_as_token_ids_and_as_lists_of_token_ids(server: RunningServer) -> None:
    client = server.client()
    text = client.completions.create(**completion())
    tokens = post(server, "/tokenize", {"model": COMPLETIONS_ID, "prompt": "The quick brown"}).json()[
        "tokens"
    ]
    for prompt in (tokens, [tokens, tokens[:2]]):
        body = completion(prompt=prompt)
        assert violations(SCHEMAS[COMPLETIONS_ROUTE][0], body) == []
        response = client.completions.create(**body)
        assert response.choices[0].text == text.choices[0].text
        assert response.usage is not None
        assert response.usage.prompt_tokens == sum(
            len(p) for p in (prompt if isinstance(prompt[0], list) else [prompt])
        )
    several = client.completions.create(**completion(prompt=[tokens, tokens[:2]], echo=True))
    as_text = client.completions.create(**completion(prompt=["The quick brown", "The quick"], echo=True))
    assert [c.text for c in several.choices] == [c.text for c in as_text.choices]  # echo: decoded ids


def test_completions_max_tokens_zero_generates_nothing(server: RunningServer) -> None:
    body = completion(max_tokens=0)
    assert violations(SCHEMAS[COMPLETIONS_ROUTE][0], body) == []  # the spec's minimum is 0
    client = server.client()
    response = client.completions.create(**body)
    assert response.choices[0].text == ""
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 0
    echoed = client.completions.create(**completion(max_tokens=0, echo=True, logprobs=1))
    assert echoed.choices[0].text == "The quick brown"  # echo alone: the prompt, scored
    assert echoed.choices[0].logprobs is not None
    assert "".join(echoed.choices[0].logprobs.tokens or []) == "The quick brown"


# Every optional field of the current spec at a value that asks for nothing this server lacks: each is
# accepted and changes nothing in the answer.
CHAT_NO_OPS: dict[str, Any] = {
    "store": False,
    "metadata": {"team": "search", "ticket": "T-1"},
    "service_tier": "auto",
    "response_format": {"type": "text"},
    "safety_identifier": "user-4f2a",
    "prompt_cache_key": "greeting",
    "prompt_cache_retention": "in_memory",
    "prompt_cache_options": {"mode": "implicit"},
    "modalities": ["text"],
    "user": "someone",
    "parallel_tool_calls": True,
    "stream_options": {"include_usage": True},  # on a request that does not stream
    "verbosity": "medium",
    "reasoning_effort": "none",
    "prediction": {"type": "content", "content": "The quick brown fox"},
    "audio": None,
    "moderation": None,
    "function_call": "none",
    "logprobs": False,
    "n": 1,
    "seed": 7,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
}
COMPLETIONS_NO_OPS: dict[str, Any] = {
    "best_of": 1,
    "suffix": "",
    "user": "someone",
    "echo": False,
    "stream_options": {"include_usage": True},
    "n": 1,
    "seed": 7,
}


NO_OPS = [(CHAT_ROUTE, f, v) for f, v in CHAT_NO_OPS.items()] + [
    (COMPLETIONS_ROUTE, f, v) for f, v in COMPLETIONS_NO_OPS.items()
]


@pytest.mark.parametrize(("route", "field", "value"), NO_OPS, ids=[f"{_name(r)}-{f}" for r, f, _ in NO_OPS])
def test_every_optional_field_of_the_spec_is_accepted(
    server: RunningServer, route: str, field: str, value: Any
) -> None:
    body = (chat if route == CHAT_ROUTE else completion)(**{field: value})
    assert violations(SCHEMAS[route][0], body) == []
    client = server.client()
    create: Any = client.chat.completions.create if route == CHAT_ROUTE else client.completions.create
    got, plain = create(**body), create(**(chat() if route == CHAT_ROUTE else completion()))
    assert (got.choices, got.usage) == (plain.choices, plain.usage)  # it asks for nothing


def test_service_tier_is_answered_with_the_tier_that_served(server: RunningServer) -> None:
    # The spec: "When the service_tier parameter is set, the response body will include the service_tier
    # value based on the processing mode actually used"; there is one mode here.
    for tier in ("auto", "default", "flex", "priority"):
        assert answer(server, CHAT_ROUTE, chat(max_tokens=2, service_tier=tier))["service_tier"] == "default"
    assert all(
        c["service_tier"] == "default"
        for c in stream(server, CHAT_ROUTE, chat(max_tokens=2, service_tier="flex"))
    )
    assert "service_tier" not in answer(server, CHAT_ROUTE, chat(max_tokens=2))


def test_deprecated_functions_are_tools(server: RunningServer) -> None:
    """`functions` / `function_call` (deprecated, still in the spec) reach the template as tools would."""
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    body = chat(functions=[weather], function_call="auto", max_tokens=2)
    assert violations(SCHEMAS[CHAT_ROUTE][0], body) == []
    # The test's ChatML template renders no tools: the generic prompt describes them.
    assert (
        answer(server, CHAT_ROUTE, body)["usage"]["prompt_tokens"]
        > answer(server, CHAT_ROUTE, chat(functions=[weather], function_call="none", max_tokens=2))["usage"][
            "prompt_tokens"
        ]
    )


def test_assistant_messages_need_no_content_and_function_messages_are_read(server: RunningServer) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "refusal": "I cannot check."},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello", "prompt_cache_breakpoint": {"mode": "explicit"}}],
        },
    ]
    body = chat(messages=messages, max_tokens=2)
    assert violations(SCHEMAS[CHAT_ROUTE][0], body) == []
    assert answer(server, CHAT_ROUTE, body)["usage"]["prompt_tokens"] > 0


# --- refused by the spec: refused here, naming the parameter ---------------------------------------

SPEC_REFUSALS = [
    ("stop-empty-list", CHAT_ROUTE, chat(stop=[]), "stop"),
    ("stop-five", CHAT_ROUTE, chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("completions-stop-five", COMPLETIONS_ROUTE, completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("completions-logprobs-6", COMPLETIONS_ROUTE, completion(logprobs=6), "logprobs"),
    (
        "tool-message-without-tool-call-id",
        CHAT_ROUTE,
        chat(messages=[*HELLO, {"role": "tool", "content": "42"}]),
        "messages[1].tool_call_id",
    ),
    (
        "content-empty-list",
        CHAT_ROUTE,
        chat(messages=[{"role": "user", "content": []}]),
        "messages[0].content",
    ),
    (
        "assistant-content-empty-list",
        CHAT_ROUTE,
        chat(messages=[*HELLO, {"role": "assistant", "content": []}]),
        "messages[1].content",
    ),
    (
        "user-content-null",
        CHAT_ROUTE,
        chat(messages=[{"role": "user", "content": None}]),
        "messages[0].content",
    ),
    (
        "function-message-without-name",
        CHAT_ROUTE,
        chat(messages=[{"role": "function", "content": "x"}]),
        "messages[0].name",
    ),
    ("top-p-above-1", CHAT_ROUTE, chat(top_p=1.01), "top_p"),
    ("n-129", CHAT_ROUTE, chat(n=129), "n"),
    ("safety-identifier-65", CHAT_ROUTE, chat(safety_identifier="x" * 65), "safety_identifier"),
    ("service-tier-unknown", CHAT_ROUTE, chat(service_tier="gold"), "service_tier"),
    ("modalities-unknown", CHAT_ROUTE, chat(modalities=["video"]), "modalities[0]"),
    ("completions-best-of-21", COMPLETIONS_ROUTE, completion(best_of=21), "best_of"),
    ("completions-prompt-empty-token-list", COMPLETIONS_ROUTE, completion(prompt=[[]]), "prompt"),
]


@pytest.mark.parametrize(
    ("route", "body", "param"), [c[1:] for c in SPEC_REFUSALS], ids=[c[0] for c in SPEC_REFUSALS]
)
def test_what_the_spec_refuses_is_refused(
    server: RunningServer, route: str, body: dict[str, Any], param: str
) -> None:
    assert violations(SCHEMAS[route][0], body), "the spec accepts this body: not a spec rule"
    refused(server, route, body, param)


@pytest.mark.parametrize(
    ("metadata", "param"),
    [
        ({str(i): "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata." + "k" * 65),
        ({"k": "v" * 513}, "metadata.k"),
    ],
    ids=["17-pairs", "key-65", "value-513"],
)
def test_metadata_bounds_of_the_spec(server: RunningServer, metadata: dict[str, str], param: str) -> None:
    # "Set of 16 key-value pairs ... keys ... 64 characters ... values ... 512 characters": the spec says
    # it in the field's description (its schema holds only the types).
    error = refused(server, CHAT_ROUTE, chat(metadata=metadata), param)
    assert "metadata" in error["message"]


# Spec-valid values that ask for behaviour this server does not have: a 400 that says so.
UNSUPPORTED = [
    ("store-true", CHAT_ROUTE, chat(store=True), "store"),
    ("audio-output", CHAT_ROUTE, chat(modalities=["text", "audio"]), "modalities"),
    ("audio-parameters", CHAT_ROUTE, chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (
        "json-schema-unenforceable",
        CHAT_ROUTE,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
        "response_format",
    ),
    ("verbosity-low", CHAT_ROUTE, chat(verbosity="low"), "verbosity"),
    ("reasoning-effort-high", CHAT_ROUTE, chat(reasoning_effort="high"), "reasoning_effort"),
    ("web-search", CHAT_ROUTE, chat(web_search_options={}), "web_search_options"),
    ("moderation", CHAT_ROUTE, chat(moderation={"model": "omni-moderation-latest"}), "moderation"),
    ("best-of-3", COMPLETIONS_ROUTE, completion(best_of=3), "best_of"),
    ("suffix", COMPLETIONS_ROUTE, completion(suffix=" and the end."), "suffix"),
]


@pytest.mark.parametrize(
    ("route", "body", "param"), [c[1:] for c in UNSUPPORTED], ids=[c[0] for c in UNSUPPORTED]
)
def test_values_asking_for_missing_behaviour_are_refused_saying_so(
    server: RunningServer, route: str, body: dict[str, Any], param: str
) -> None:
    assert violations(SCHEMAS[route][0], body) == []  # the spec allows them: the server lacks them
    error = refused(server, route, body, param)
    assert error["code"] == "unsupported_value" or "not" in error["message"], error
    assert param in error["message"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (CHAT_ROUTE, chat(temprature=0.5), "temprature"),
        (CHAT_ROUTE, chat(max_token=5), "max_token"),
        (COMPLETIONS_ROUTE, completion(logprob=2), "logprob"),
        (CHAT_ROUTE, chat(stream_option={"include_usage": True}), "stream_option"),
    ],
    ids=["temprature", "max_token", "logprob", "stream_option"],
)
def test_fields_not_in_the_spec_still_fail(
    server: RunningServer, route: str, body: dict[str, Any], param: str
) -> None:
    error = refused(server, route, body, param)
    assert error["code"] == "unsupported_parameter"
    assert "Unsupported parameter" in error["message"]


# --- the answers' shape ------------------------------------------------------------------------------


def test_every_chat_choice_carries_logprobs_and_refusal_null(server: RunningServer) -> None:
    data = answer(server, CHAT_ROUTE, chat(n=2, temperature=0.8, seed=1, max_tokens=3))
    for choice in data["choices"]:
        assert "logprobs" in choice and choice["logprobs"] is None
        assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    asked = answer(server, CHAT_ROUTE, chat(max_tokens=3, logprobs=True))
    assert asked["choices"][0]["logprobs"]["content"] and asked["choices"][0]["logprobs"]["refusal"] is None


def test_every_completions_choice_carries_logprobs_null(server: RunningServer) -> None:
    data = answer(server, COMPLETIONS_ROUTE, completion(prompt=["a", "b"], n=2))
    assert all("logprobs" in c and c["logprobs"] is None for c in data["choices"])
    assert all("logprobs" in c["choices"][0] for c in stream(server, COMPLETIONS_ROUTE, completion()))


# Requests across the features; each whole answer and each stream chunk must match the spec's schemas.
SWEEP = [
    (CHAT_ROUTE, chat()),
    (CHAT_ROUTE, chat(max_tokens=5, logprobs=True, top_logprobs=3)),
    (CHAT_ROUTE, chat(n=3, temperature=1.0, seed=5, max_tokens=4)),
    (CHAT_ROUTE, chat(stop=["fox", "dog"], stream_options={"include_usage": True})),
    (CHAT_ROUTE, chat(max_tokens=None, max_completion_tokens=3, service_tier="default")),
    (COMPLETIONS_ROUTE, completion()),
    (COMPLETIONS_ROUTE, completion(echo=True, logprobs=2)),
    (COMPLETIONS_ROUTE, completion(prompt=["The quick", "Café"], n=2, stop=[" over"])),
    (COMPLETIONS_ROUTE, completion(max_tokens=0, echo=True, logprobs=0)),
    (COMPLETIONS_ROUTE, completion(stream_options={"include_usage": True}, logprobs=1)),
]


@pytest.mark.parametrize(("route", "body"), SWEEP, ids=[f"{_name(r)}-{i}" for i, (r, _) in enumerate(SWEEP)])
def test_answers_and_chunks_match_the_spec_schemas(
    server: RunningServer, route: str, body: dict[str, Any]
) -> None:
    assert violations(SCHEMAS[route][0], body) == []
    whole = answer(server, route, body)
    chunks = stream(server, route, body)
    assert chunks and chunks[0]["id"] and all(c["id"] == chunks[0]["id"] for c in chunks)
    if body.get("stream_options"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
