"""OpenAI request models: errors that name the parameter, and the merge defaults < model_config < request."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmadapter.config import OPENAI_DEFAULTS, ModelConfig
from llmadapter.errors import ContextLengthError, InvalidRequestError, LLMAdapterError
from llmadapter.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    EmbeddingRequest,
    parse_request,
)
from llmadapter.server.errors import to_error_answer

HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"messages": HELLO, **fields})


def error_of(cls: type, body: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(cls, body)
    return info.value


# (request class, body, the parameter the error must name)
BAD_REQUESTS = [
    (ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (ChatCompletionRequest, {"messages": []}, "messages"),
    (ChatCompletionRequest, {}, "messages"),
    (ChatCompletionRequest, {"messages": "Hello"}, "messages"),
    (ChatCompletionRequest, {"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    (ChatCompletionRequest, {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    (ChatCompletionRequest, {"messages": HELLO, "max_completion_tokens": 0}, "max_completion_tokens"),
    (ChatCompletionRequest, {"messages": HELLO, "frobnicate": 1}, "frobnicate"),
    (ChatCompletionRequest, {"messages": HELLO, "stop": [1, 2]}, "stop"),
    (ChatCompletionRequest, {"messages": HELLO, "stop": 7}, "stop"),
    (ChatCompletionRequest, {"messages": HELLO, "stop": ""}, "stop"),
    (ChatCompletionRequest, {"messages": HELLO, "stop": [str(i) for i in range(5)]}, "stop"),
    (ChatCompletionRequest, {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (ChatCompletionRequest, {"messages": HELLO, "temperature": 2.5}, "temperature"),
    (ChatCompletionRequest, {"messages": HELLO, "temperature": -0.1}, "temperature"),
    (ChatCompletionRequest, {"messages": HELLO, "top_p": -0.1}, "top_p"),
    (ChatCompletionRequest, {"messages": HELLO, "top_k": -2}, "top_k"),
    (ChatCompletionRequest, {"messages": HELLO, "n": 0}, "n"),
    (ChatCompletionRequest, {"messages": HELLO, "n": 129}, "n"),
    (ChatCompletionRequest, {"messages": HELLO, "presence_penalty": 2.5}, "presence_penalty"),
    (ChatCompletionRequest, {"messages": HELLO, "frequency_penalty": -3}, "frequency_penalty"),
    (ChatCompletionRequest, {"messages": HELLO, "logit_bias": {"5": 101}}, "logit_bias"),
    (
        ChatCompletionRequest,
        {"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6},
        "max_completion_tokens",
    ),
    (ChatCompletionRequest, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (ChatCompletionRequest, {"messages": HELLO, "tools": [{"type": "function"}]}, "tools[0].function"),
    (CompletionRequest, {}, "prompt"),
    (CompletionRequest, {"prompt": []}, "prompt"),
    (CompletionRequest, {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    (CompletionRequest, {"prompt": "Hi", "messages": HELLO}, "messages"),
    (CompletionRequest, {"prompt": "Hi", "suffix": "!"}, "suffix"),
    (CompletionRequest, {"prompt": [[]]}, "prompt"),
    (CompletionRequest, {"prompt": [1, "a"]}, "prompt"),
    (CompletionRequest, {"prompt": [-1]}, "prompt"),
    # vLLM's fields keep vLLM's bounds
    (CompletionRequest, {"prompt": "Hi", "min_p": 1.5}, "min_p"),
    (CompletionRequest, {"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty"),
    (CompletionRequest, {"prompt": "Hi", "min_tokens": -1}, "min_tokens"),
    (CompletionRequest, {"prompt": "Hi", "stop_token_ids": [-1]}, "stop_token_ids[0]"),
    (CompletionRequest, {"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    (CompletionRequest, {"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (CompletionRequest, {"prompt": "Hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    (CompletionRequest, {"prompt": "Hi", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    (
        ChatCompletionRequest,
        {"messages": HELLO, "add_generation_prompt": True, "continue_final_message": True},
        "continue_final_message",
    ),
    (ChatCompletionRequest, {"messages": HELLO, "chat_template_kwargs": []}, "chat_template_kwargs"),
    (EmbeddingRequest, {}, "input"),
    (EmbeddingRequest, {"input": "Hi", "encoding_format": "hex"}, "encoding_format"),
    (EmbeddingRequest, {"input": "Hi", "dimensions": 0}, "dimensions"),
]


@pytest.mark.parametrize(
    ("cls", "body", "param"),
    BAD_REQUESTS,
    ids=[f"{cls.__name__}-{param}-{i}" for i, (cls, _, param) in enumerate(BAD_REQUESTS)],
)
def test_every_user_error_names_the_parameter(cls: type, body: dict[str, Any], param: str) -> None:
    err = error_of(cls, body)
    assert err.param == param, err.message
    assert err.status_code == 400
    answer = to_error_answer(err)
    assert answer.status_code == 400
    body_json = json.loads(answer.json())["error"]
    assert body_json["type"] == "invalid_request_error"
    assert body_json["param"] == param
    # The message quotes the parameter's top-level name, so a user reading only the message knows it too.
    assert param.split("[")[0].split(".")[0] in err.message


def test_unknown_field_message_says_unsupported() -> None:
    err = error_of(ChatCompletionRequest, {"messages": HELLO, "frobnicate": 1})
    assert "Unsupported parameter" in err.message
    assert "frobnicate" in err.message


def test_body_that_is_not_an_object_is_refused() -> None:
    err = error_of(ChatCompletionRequest, ["not", "a", "dict"])
    assert "JSON object" in err.message


def test_logit_bias_key_that_is_not_a_token_id_names_logit_bias() -> None:
    request = chat(logit_bias={"hello": 5})
    with pytest.raises(InvalidRequestError) as info:
        request.to_generation(ModelConfig())
    assert info.value.param == "logit_bias"
    assert "hello" in info.value.message


def test_error_tree() -> None:
    assert issubclass(ContextLengthError, InvalidRequestError)
    assert issubclass(InvalidRequestError, LLMAdapterError)
    err = ContextLengthError("too long")
    assert json.loads(to_error_answer(err).json())["error"] == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


# --- merge order: OpenAI defaults < model_config < request --------------------------------------------


def test_openai_defaults_apply_when_nothing_is_given() -> None:
    params = chat().to_generation(ModelConfig())
    for key, value in OPENAI_DEFAULTS.items():
        assert getattr(params, key) == value, key
    assert params.temperature == 1.0  # not the 0.7 of transformers' text-generation pipeline
    assert params.top_k == 0  # not transformers' top_k=50
    assert not params.greedy
    assert params.stop == ()
    assert params.seed is None
    assert params.logit_bias == {}
    assert (params.logprobs, params.top_logprobs) == (False, 0)


@pytest.mark.parametrize(
    ("field", "config_value", "request_value"),
    [
        ("temperature", 0.0, 0.3),
        ("top_p", 0.5, 0.9),
        ("top_k", 5, 7),
        ("max_tokens", 12, 3),
        ("n", 2, 3),
        ("seed", 1, 2),
        ("presence_penalty", 0.5, -0.5),
        ("frequency_penalty", 1.0, 0.0),
    ],
    ids=lambda v: str(v),
)
def test_model_config_overrides_defaults_and_request_overrides_model_config(
    field: str, config_value: Any, request_value: Any
) -> None:
    config = ModelConfig(**{field: config_value})
    assert getattr(chat().to_generation(config), field) == config_value
    assert getattr(chat(**{field: request_value}).to_generation(config), field) == request_value


def test_request_value_zero_is_not_mistaken_for_missing() -> None:
    config = ModelConfig(temperature=0.8, presence_penalty=1.0)
    params = chat(temperature=0, presence_penalty=0).to_generation(config)
    assert params.temperature == 0.0
    assert params.greedy
    assert params.presence_penalty == 0.0


def test_stop_merge_and_normalisation() -> None:
    config = ModelConfig(stop=["###"])
    assert chat().to_generation(config).stop == ("###",)
    assert chat(stop="END").to_generation(config).stop == ("END",)
    assert chat(stop=["a", "b"]).to_generation(config).stop == ("a", "b")


def test_max_completion_tokens_is_the_limit() -> None:
    assert chat(max_completion_tokens=7).to_generation(ModelConfig(max_tokens=100)).max_tokens == 7
    assert chat(max_completion_tokens=7, max_tokens=7).to_generation(ModelConfig()).max_tokens == 7
    assert chat(max_completion_tokens=7).max_tokens_given()
    assert not chat().max_tokens_given()


def test_chat_logprobs_fields() -> None:
    params = chat(logprobs=True, top_logprobs=3).to_generation(ModelConfig())
    assert (params.logprobs, params.top_logprobs) == (True, 3)


def test_completions_logprobs_is_an_integer_count() -> None:
    request = parse_request(CompletionRequest, {"prompt": ["a", "b"], "logprobs": 2, "echo": True})
    params = request.to_generation(ModelConfig())
    assert (params.logprobs, params.top_logprobs) == (True, 2)
    assert request.prompts() == ["a", "b"]
    zero = parse_request(CompletionRequest, {"prompt": "a", "logprobs": 0}).to_generation(ModelConfig())
    assert (zero.logprobs, zero.top_logprobs) == (True, 0)


def test_logit_bias_keys_become_token_ids() -> None:
    params = chat(logit_bias={"5": 100, "7": -100.0}).to_generation(ModelConfig())
    assert params.logit_bias == {5: 100.0, 7: -100.0}


def test_message_content_parts_and_tool_calls_render_for_the_template() -> None:
    request = chat(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    )
    rendered = [m.to_template() for m in request.messages]
    assert rendered[0] == {"role": "user", "content": "Hello"}
    assert rendered[1]["tool_calls"][0]["function"]["name"] == "f"
    assert rendered[2]["tool_call_id"] == "c1"


def test_stream_options_with_stream() -> None:
    request = chat(stream=True, stream_options={"include_usage": True})
    assert request.include_usage
    assert not chat(stream=True).include_usage


def test_response_serialises_without_none_fields_but_the_spec_required_nulls() -> None:
    response = ChatCompletionResponse.model_validate(
        {
            "model": "m",
            "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )
    data = response.model_dump(exclude_none=True)
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    # The spec requires `refusal` and `logprobs`, null when empty; other None fields are left out.
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    assert data["choices"][0]["logprobs"] is None
    assert "system_fingerprint" not in data
