"""llmadapter.validation.schema: answers read once, strictly, into the task's typed OpenAI response."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS, get_task
from llmadapter.protocol import ChatCompletionResponse, CompletionResponse, EmbeddingResponse
from llmadapter.validation.schema import read_answer
from llmadapter.validation.worker import Outcome

CHAT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    # `refusal` and `logprobs` as our answers carry them: the spec requires them, null when empty.
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
COMPLETION_ANSWER: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "text": " Paris", "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
EMBEDDING_ANSWER: dict[str, Any] = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
    "model": "m",
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
}


@pytest.mark.parametrize(
    ("task", "raw", "model"),
    [
        (CHAT, CHAT_ANSWER, ChatCompletionResponse),
        (COMPLETIONS, COMPLETION_ANSWER, CompletionResponse),
        (EMBEDDINGS, EMBEDDING_ANSWER, EmbeddingResponse),
    ],
    ids=["chat", "completions", "embeddings"],
)
def test_a_valid_answer_becomes_the_tasks_typed_response(task: str, raw: dict[str, Any], model: type) -> None:
    answer = read_answer(get_task(task), Outcome(ok=True, response=raw, latency_s=0.1))

    assert isinstance(answer.response, model) and answer.problem is None
    assert answer.response.model_dump(exclude_none=True) == raw


def _without(*path: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(raw: dict[str, Any]) -> Any:
        obj = raw
        for step in path[:-1]:
            obj = obj[step]
        del obj[path[-1]]
        return raw

    return edit


def _set(value: Any, *path: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(raw: dict[str, Any]) -> Any:
        obj = raw
        for step in path[:-1]:
            obj = obj[step]
        obj[path[-1]] = value
        return raw

    return edit


@pytest.mark.parametrize(
    ("task", "raw", "edit", "problem"),
    [
        (CHAT, CHAT_ANSWER, _without("id"), "not a valid ChatCompletionResponse: response lacks id"),
        (CHAT, CHAT_ANSWER, _without("choices", 0, "message", "role"), "choices.0.message lacks role"),
        (
            COMPLETIONS,
            COMPLETION_ANSWER,
            _without("choices", 0, "finish_reason"),
            "choices.0 lacks finish_reason",
        ),
        (EMBEDDINGS, EMBEDDING_ANSWER, _without("data", 0, "index"), "data.0 lacks index"),
        (
            CHAT,
            CHAT_ANSWER,
            _set("3", "usage", "prompt_tokens"),
            "usage.prompt_tokens: Input should be a valid integer",
        ),
        (
            CHAT,
            CHAT_ANSWER,
            _set(True, "choices", 0, "index"),
            "choices.0.index: Input should be a valid integer",
        ),
        (CHAT, CHAT_ANSWER, lambda raw: [raw], "response is a list, not an OpenAI object"),
    ],
    ids=[
        "missing-id",
        "missing-role",
        "missing-finish-reason",
        "missing-index",
        "string-for-integer",
        "bool-for-integer",
        "not-an-object",
    ],
)
def test_an_answer_off_the_schema_has_no_typed_response_and_names_the_problem(
    task: str, raw: dict[str, Any], edit: Callable[[dict[str, Any]], Any], problem: str
) -> None:
    answer = read_answer(get_task(task), Outcome(ok=True, response=edit(copy.deepcopy(raw))))

    assert answer.response is None
    assert answer.problem is not None and problem in answer.problem


def test_an_error_is_the_answers_problem() -> None:
    outcome = Outcome(ok=False, error_type="ContextLengthError", message="too long", status_code=400)

    answer = read_answer(get_task(CHAT), outcome)

    assert (answer.response, answer.problem) == (None, "ContextLengthError: too long")
