"""OpenAI response models: whole answers, stream chunks, errors and model cards, shaped as the spec's
response schemas (keys the spec requires are sent, as null when empty) plus vLLM's `prompt_logprobs`."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from llmadapter.protocol.base import WireResponse, keep_null
from llmadapter.protocol.messages import ToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class PromptTokensDetails(WireResponse):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(WireResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # sent when the engine caches prefixes


class TopLogprob(WireResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(WireResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(WireResponse):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return keep_null(handler(self), "content", "refusal")


class PromptLogprob(WireResponse):
    """vLLM's per-token entry of `prompt_logprobs`: the token's log probability, its 1-based rank in the
    distribution and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's `prompt_logprobs`: one entry per prompt token, None for the first (nothing predicts it); each maps
# token id -> PromptLogprob for the prompt's own token and the most likely alternatives.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class AssistantMessage(WireResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return keep_null(handler(self), "content", "refusal")


class ChatChoice(WireResponse):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return keep_null(handler(self), "logprobs")


class ChatCompletionResponse(WireResponse):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None  # set when the request named one: the tier that answered
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunction(WireResponse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(WireResponse):
    """A streamed tool call's piece: the first carries id, type and name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(WireResponse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(WireResponse):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends `"finish_reason": null` until a choice ends, and clients index it directly.
        return keep_null(handler(self), "finish_reason")


class ChatCompletionChunk(WireResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    service_tier: str | None = None


class CompletionLogprobs(WireResponse):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(WireResponse):
    """A whole answer's choice and a stream chunk's alike (the spec streams the same object)."""

    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return keep_null(handler(self), "finish_reason", "logprobs")


class CompletionResponse(WireResponse):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(WireResponse):
    """Streamed completions reuse the `text_completion` object, as OpenAI does."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(WireResponse):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(WireResponse):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(WireResponse):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(WireResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "llmadapter"
    task: str | None = None
    # Our additions: the registry version answering now, the alias it follows, a version that failed to
    # replace it (and why), when it last switched (unix time).
    version: str | None = None
    alias: str | None = None
    swap_failure: str | None = None
    switched_at: int | None = None
    # The weight format it is served with (llmadapter.engine.weights): float32 / bfloat16 / float16,
    # none / int8 / int4, cpu / cuda:N.
    dtype: str | None = None
    quantization: str | None = None
    device: str | None = None


class ModelList(WireResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(WireResponse):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(WireResponse):
    error: ErrorBody
