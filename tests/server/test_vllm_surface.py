"""Code written against vLLM's OpenAI server ports with no edits: its extra fields through the official
`openai` client (`extra_body`), its response fields, and its /tokenize, /detokenize and /version routes.

What each field means is tested on the engine (tests/engine/test_vllm_fields.py); here each one goes
through HTTP and changes the answer the way the engine says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llmadapter.engine.base import Engine
from llmadapter.server.app import build_app
from llmadapter.server.settings import ServerSettings
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from tests.server.conftest import CHAT_ID, COMPLETIONS_ID, EMBEDDINGS_ID, LONG_ID, RunningServer, serve

HELLO = [{"role": "user", "content": TRAINED_PROMPT}]
PREFIX = "The quick brown"
FOX = 268  # " fox", the 4th token of the trained answer (test_fox_is_the_fourth_answer_token)

# (id, model, extra_body, what the answer shows given the model's greedy answer); chat unless completions.
CASES: list[tuple[str, str, dict[str, Any], Callable[[Any, str], bool]]] = [
    (
        "min_tokens",
        CHAT_ID,
        {"min_tokens": 40, "max_tokens": 40},
        lambda r, _: r.usage.completion_tokens == 40,
    ),
    (
        "ignore_eos",
        CHAT_ID,
        {"ignore_eos": True, "max_tokens": 40},
        lambda r, _: r.usage.completion_tokens == 40,
    ),
    (
        "stop_token_ids",
        CHAT_ID,
        {"stop_token_ids": [FOX]},
        lambda r, _: r.choices[0].message.content == PREFIX and r.choices[0].finish_reason == "stop",
    ),
    (
        "include_stop_str_in_output",
        CHAT_ID,
        {"stop": ["fox"], "include_stop_str_in_output": True},
        lambda r, _: r.choices[0].message.content == PREFIX + " fox",
    ),
    (
        "min_p",
        LONG_ID,
        {"temperature": 1.5, "seed": 2, "min_p": 1.0},
        lambda r, greedy: r.choices[0].message.content == greedy,
    ),
    (
        "repetition_penalty",
        LONG_ID,
        {"repetition_penalty": 3.0},
        lambda r, greedy: r.choices[0].message.content != greedy,
    ),
    (
        "prompt_logprobs",
        COMPLETIONS_ID,
        {"prompt_logprobs": 1},
        lambda r, _: len(r.choices[0].model_extra["prompt_logprobs"]) == r.usage.prompt_tokens,
    ),
    (
        "truncate_prompt_tokens",
        COMPLETIONS_ID,
        {"truncate_prompt_tokens": 2},
        lambda r, _: r.usage.prompt_tokens == 2,
    ),
    (
        "add_generation_prompt",
        CHAT_ID,
        {"add_generation_prompt": False},
        lambda r, _: r.choices[0].message.content.startswith("assistant\n"),
    ),
    (
        "continue_final_message",
        CHAT_ID,
        {
            "continue_final_message": True,
            "messages": [*HELLO, {"role": "assistant", "content": PREFIX}],
            "max_tokens": 60,
        },
        lambda r, _: r.choices[0].message.content == TRAINED_ANSWER[len(PREFIX) :],
    ),
]


def _ask(server: RunningServer, model: str, body: dict[str, Any]) -> Any:
    """One answer through the openai client; fields the client has no parameter for go in extra_body."""
    client = server.client()
    extra = dict(body)
    messages = extra.pop("messages", HELLO)
    common = {"temperature": extra.pop("temperature", 0), "max_tokens": extra.pop("max_tokens", 16)}
    if model == COMPLETIONS_ID:
        return client.completions.create(model=model, prompt=PREFIX, extra_body=extra, **common)
    return client.chat.completions.create(model=model, messages=messages, extra_body=extra, **common)


def test_fox_is_the_fourth_answer_token(chat_engine: Engine) -> None:
    answer = chat_engine.tokenizer(TRAINED_ANSWER, add_special_tokens=False)["input_ids"]  # type: ignore[attr-defined]
    assert answer[3] == FOX and FOX not in answer[:3]


@pytest.mark.parametrize(("model", "extra", "shows"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_vllm_fields_through_the_openai_client(
    server: RunningServer, model: str, extra: dict[str, Any], shows: Callable[[Any, str], bool]
) -> None:
    greedy = _ask(server, model, {"max_tokens": extra.get("max_tokens", 16)})
    greedy_text = greedy.choices[0].text if model == COMPLETIONS_ID else greedy.choices[0].message.content
    response = _ask(server, model, extra)
    assert shows(response, greedy_text), response


def test_vllm_fields_with_bad_values_are_400s_naming_them(server: RunningServer) -> None:
    bad = (
        ("min_p", 2),
        ("repetition_penalty", 0),
        ("stop_token_ids", [10**7]),
        ("min_tokens", -1),
        ("chat_template_kwargs", {"tokenize": True}),  # a renderer parameter: the template kwargs arrived
    )
    for field, value in bad:
        body = {"model": CHAT_ID, "messages": HELLO, field: value}
        response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
        assert response.status_code == 400, field
        assert response.json()["error"]["param"].startswith(field)


def test_completions_prompt_logprobs_in_vllms_shape(server: RunningServer) -> None:
    body = {
        "model": COMPLETIONS_ID,
        "prompt": PREFIX,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 2,
    }
    data = httpx.post(f"{server.base_url}/completions", json=body, timeout=30).json()
    scored = data["choices"][0]["prompt_logprobs"]
    assert scored[0] is None
    for entry in scored[1:]:
        # {"<token id>": {"logprob": float, "rank": int, "decoded_token": str}}, as vLLM answers
        assert 1 <= len(entry) <= 3
        assert all(k.isdigit() and set(v) == {"logprob", "rank", "decoded_token"} for k, v in entry.items())


# --- /tokenize, /detokenize, /version --------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(server: RunningServer, chat_engine: Engine) -> None:
    text = "Café crème, naïve façade: 日本語 text."
    tokenized = httpx.post(
        f"{server.url}/tokenize", json={"model": COMPLETIONS_ID, "prompt": text, "return_token_strs": True}
    ).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
    assert tokenized["max_model_len"] == chat_engine.context_window
    back = httpx.post(
        f"{server.url}/detokenize", json={"model": COMPLETIONS_ID, "tokens": tokenized["tokens"]}
    )
    assert back.json() == {"prompt": text}


def test_tokenize_chat_messages_counts_the_prompt(server: RunningServer) -> None:
    counted = httpx.post(f"{server.url}/tokenize", json={"model": CHAT_ID, "messages": HELLO}).json()
    usage = server.client().chat.completions.create(model=CHAT_ID, messages=HELLO, max_tokens=1).usage
    assert usage is not None and counted["count"] == usage.prompt_tokens
    assert "token_strs" not in counted
    continued = httpx.post(
        f"{server.url}/tokenize",
        json={
            "model": CHAT_ID,
            "messages": [*HELLO, {"role": "assistant", "content": PREFIX}],
            "continue_final_message": True,
        },
    ).json()
    assert continued["count"] > counted["count"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": CHAT_ID}, 400, "prompt"),
        ("/tokenize", {"model": CHAT_ID, "prompt": "x", "typo": 1}, 400, "typo"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": EMBEDDINGS_ID, "prompt": "x"}, 400, "model"),
        ("/tokenize", {"prompt": "x"}, 400, "model"),  # several models: name one
        ("/detokenize", {"model": CHAT_ID, "tokens": [10**7]}, 400, "tokens"),
        ("/detokenize", {"model": CHAT_ID, "tokens": "abc"}, 400, "tokens"),
    ],
    ids=[
        "no-prompt",
        "typo",
        "unknown-model",
        "embeddings-model",
        "no-model",
        "token-outside-vocab",
        "tokens-string",
    ],
)
def test_tokenizer_route_errors(
    server: RunningServer, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    response = httpx.post(server.url + path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_version_is_open_and_tokenize_is_behind_the_key(
    engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMADAPTER_TEST_VLLM_KEY", "sekret")
    with serve(build_app(engines, ServerSettings(api_key_env="LLMADAPTER_TEST_VLLM_KEY"))) as running:
        version = httpx.get(f"{running.url}/version")
        assert version.status_code == 200 and version.json()["version"]
        body = {"model": CHAT_ID, "prompt": "x"}
        assert httpx.post(f"{running.url}/tokenize", json=body).status_code == 401
        authorized = httpx.post(
            f"{running.url}/tokenize", json=body, headers={"Authorization": "Bearer sekret"}
        )
        assert authorized.status_code == 200
