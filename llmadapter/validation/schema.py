"""The OpenAI schema check: an answer becomes the task's typed response only with OpenAI's fields, types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS, TaskSpec
from llmadapter.errors import first_error
from llmadapter.protocol import ChatCompletionResponse, CompletionResponse, EmbeddingResponse
from llmadapter.validation.worker import Outcome

Response = ChatCompletionResponse | CompletionResponse | EmbeddingResponse

# Fields OpenAI always sends, by path ("[]" walks a list). The response models fill some of them with
# defaults (id, object, created, role) for building responses; a checked answer must carry them itself.
_REQUIRED_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    CHAT: {
        "": ("id", "object", "created", "model", "choices", "usage"),
        "choices[]": ("index", "message", "finish_reason"),
        "choices[].message": ("role",),
    },
    COMPLETIONS: {
        "": ("id", "object", "created", "model", "choices", "usage"),
        "choices[]": ("index", "text", "finish_reason"),
    },
    EMBEDDINGS: {
        "": ("object", "data", "model", "usage"),
        "data[]": ("object", "index", "embedding"),
    },
}


@dataclass(frozen=True)
class Answer:
    """One prediction as the checks read it: the typed response, or the problem that left it without one."""

    outcome: Outcome
    response: Response | None = None
    problem: str | None = None  # the model's error, or how the answer breaks the schema


def _at(response: Mapping[str, Any], path: str) -> list[tuple[str, Any]]:
    """The objects at `path` ("choices[].message") with their concrete locations ("choices.0.message")."""
    found: list[tuple[str, Any]] = [("", response)]
    for step in path.split(".") if path else []:
        key, many = step.removesuffix("[]"), step.endswith("[]")
        nxt: list[tuple[str, Any]] = []
        for where, obj in found:
            value = obj.get(key) if isinstance(obj, Mapping) else None
            loc = f"{where}.{key}" if where else key
            if many and isinstance(value, list):
                nxt += [(f"{loc}.{i}", item) for i, item in enumerate(value)]
            elif not many and value is not None:
                nxt.append((loc, value))
        found = nxt
    return found


def _missing_fields(task: str, response: Mapping[str, Any]) -> str | None:
    for path, fields in _REQUIRED_FIELDS[task].items():
        for where, obj in _at(response, path):
            missing = [f for f in fields if not isinstance(obj, Mapping) or f not in obj]
            if missing:
                return f"{where or 'response'} lacks {', '.join(missing)}"
    return None


def read_answer(spec: TaskSpec, outcome: Outcome) -> Answer:
    """The answer validated once, strictly, into the task's response model (required fields present,
    JSON types exact), or the first problem found."""
    if not outcome.ok:
        return Answer(outcome, problem=outcome.error)
    model = spec.response_model
    raw = outcome.response
    if not isinstance(raw, Mapping):
        return Answer(outcome, problem=f"response is a {type(raw).__name__}, not an OpenAI object")
    missing = _missing_fields(spec.inference_task, raw)
    if missing is not None:
        return Answer(outcome, problem=f"not a valid {model.__name__}: {missing}")
    try:
        # Strict: "prompt_tokens": "3" or "index": true is a wrong answer, not something to coerce.
        typed = model.model_validate(raw, strict=True)
    except ValidationError as exc:
        first = first_error(exc)
        return Answer(outcome, problem=f"not a valid {model.__name__}: {first.where}: {first.message}")
    return Answer(outcome, response=typed)
