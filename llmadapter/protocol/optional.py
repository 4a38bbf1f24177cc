"""The spec's optional request fields that ask for behaviour this server lacks: their types, and the one
table of the values that ask for nothing (accepted) against what every other value would ask for (400).

A field a client sends at its no-op value (`store: false`, `modalities: ["text"]`,
`response_format: {"type": "text"}`) is accepted; a value that asks for storage, audio, structured output
or web search is refused with `unsupported_value`, naming the field. Fields that are only hints about
OpenAI's own infrastructure (`service_tier`, `prompt_cache_key`, `metadata`, `prediction`, ...) change
nothing in an answer and are accepted with their spec types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from llmadapter.protocol.base import WireRequest, unsupported
from llmadapter.protocol.messages import TextContentPart


class StreamOptions(WireRequest):
    include_usage: bool = False
    # Random padding on each chunk against a network side channel; the text is the same without it.
    include_obfuscation: bool | None = None


class ResponseFormat(WireRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Prediction(WireRequest):
    """Predicted output: a latency hint for text the answer is expected to repeat; the answer is the
    same with or without it."""

    type: Literal["content"]
    content: str | Annotated[list[TextContentPart], Field(min_length=1)]


class PromptCacheOptions(WireRequest):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


# "Set of 16 key-value pairs ... keys ... 64 characters ... values ... 512 characters" (the spec).
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]],
    Field(max_length=16),
]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority", "fast"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
SafetyIdentifier = Annotated[str, StringConstraints(max_length=64)]


def _never(value: Any) -> bool:
    return False


# field -> (is this value a no-op here?, what every other value asks for)
NO_OP_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (lambda v: v is False, "storing the completion for distillation or evals"),
    "modalities": (lambda v: v == ["text"], "output modalities other than text"),
    "response_format": (lambda v: v.type == "text", "structured output (json_object / json_schema)"),
    "verbosity": (lambda v: v == "medium", "a verbosity other than the default 'medium'"),
    "audio": (_never, "audio output"),
    "moderation": (_never, "moderation of the input and output"),
    "web_search_options": (_never, "web search"),
    "suffix": (lambda v: v == "", "text after the completion (insertion)"),
}


def check_no_op(field: str, value: Any) -> Any:
    """`value` if it asks for nothing this server lacks (None always does); else unsupported_value."""
    is_no_op, asks_for = NO_OP_VALUES[field]
    if value is not None and not is_no_op(value):
        raise unsupported(field, asks_for)
    return value
