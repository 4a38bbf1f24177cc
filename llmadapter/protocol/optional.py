"""The spec's optional request fields that ask for behaviour this server lacks: their types, and the one
table of the values that ask for nothing (accepted) against what every other value would ask for (400).

A field a client sends at its no-op value (`store: false`, `modalities: ["text"]`) is accepted; a value
that asks for storage, audio or web search is refused with `unsupported_value`, naming the field.
`response_format` (its types are here) is enforced by constrained decoding (llmadapter.engine.grammar).
Fields that are only hints about OpenAI's own infrastructure (`service_tier`, `prompt_cache_key`,
`metadata`, `prediction`, ...) change nothing in an answer and are accepted with their spec types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from llmadapter.protocol.base import WireRequest, unsupported
from llmadapter.protocol.messages import TextContentPart


class StreamOptions(WireRequest):
    include_usage: bool = False
    # Random padding on each chunk against a network side channel; the text is the same without it.
    include_obfuscation: bool | None = None


class JsonSchemaFormat(WireRequest):
    """`response_format.json_schema`: the spec's fields; the schema is checked by the engine (its grammar
    engine says which keywords it enforces)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireRequest):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (a value of the given schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema', and only with it")
        return self

    def schema_of(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.json_schema if self.json_schema is not None else None


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
