"""OpenAI wire models (pydantic v2): requests that validate themselves, responses, stream chunks, errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from llmadapter.config import GenerationParams, ModelConfig
from llmadapter.errors import InvalidRequestError, first_error

MAX_STOP_SEQUENCES = 16
MAX_N = 16

# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields are refused: a silently ignored parameter is a wrong answer nobody notices.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (content flattened to a string)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Request):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(_Request):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(ge=1)]


class _SamplingFields(_Request):
    """Sampling fields shared by chat and completions. None means "not given": model_config decides."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    max_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    # torch generators take 64-bit seeds; OpenAI's own bound is the same signed 64-bit range.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # A field validator (not a model validator) so the error names `stream_options`.
        if value is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return value

    def _requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> tuple[bool, int]:
        return False, 0

    def max_tokens_given(self) -> bool:
        return self._requested_max_tokens() is not None

    def to_generation(self, config: ModelConfig) -> GenerationParams:
        """Merge OpenAI defaults < model_config < this request into engine parameters."""

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return getattr(config, name) if value is None else value

        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise InvalidRequestError(
                    f"Invalid value for 'logit_bias': key '{key}' is not a token id.", param="logit_bias"
                ) from None
        logprobs, top_logprobs = self._logprobs()
        stop = self.stop if self.stop is not None else config.stop
        return GenerationParams(
            max_tokens=self._requested_max_tokens() or config.max_tokens,
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            stop=tuple(stop),
            n=pick("n"),
            seed=pick("seed"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            logit_bias=bias,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _check_max_completion_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        given = info.data.get("max_tokens")
        if value is not None and given is not None and value != given:
            raise ValueError("give either 'max_tokens' or 'max_completion_tokens', not two different values")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        return value

    def _requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(...)
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("'prompt' must not be an empty list")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def _logprobs(self) -> tuple[bool, int]:
        # Completions' legacy `logprobs` is an integer: the number of alternatives per token.
        return self.logprobs is not None, self.logprobs or 0


EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Request):
    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None


RequestT = TypeVar("RequestT", bound=BaseModel)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "literal"})


def _param_of(loc: tuple[Any, ...]) -> str:
    """OpenAI-style parameter path (messages[0].role), skipping pydantic's union-branch labels."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).isidentifier() and str(part) not in _UNION_TAGS:
            out += ("." if out else "") + str(part)
    return out


def parse_request(cls: type[RequestT], data: Any, *, strict: bool = False) -> RequestT:
    """Validate a raw request; every failure becomes an InvalidRequestError naming the parameter.

    `strict` refuses values of the wrong JSON type (`"max_tokens": "10"`, `"stream": "true"`), as OpenAI
    does; the HTTP routes use it. Pyfunc rows arrive through pandas (numpy scalars, floats for integer
    columns with gaps), so predict stays lax.
    """
    if not isinstance(data, Mapping):
        raise InvalidRequestError(
            f"The request body must be a JSON object, got {type(data).__name__}.", param=None
        )
    try:
        return cls.model_validate(dict(data), strict=strict)
    except ValidationError as exc:
        first = first_error(exc)
        param = _param_of(first.loc)
        by_kind = {
            "extra_forbidden": f"Unsupported parameter: '{param}' is not accepted by this endpoint.",
            "missing": f"Missing required parameter: '{param}'.",
        }
        other = (
            f"Invalid value for '{param}': {first.message}."
            if param
            else f"Invalid request: {first.message}."
        )
        raise InvalidRequestError(by_kind.get(first.kind, other), param=param or None) from None


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


def _with_finish_reason(data: dict[str, Any]) -> dict[str, Any]:
    # OpenAI sends `"finish_reason": null` until a choice ends, and clients index it directly: keep the
    # key even where responses are dumped with exclude_none.
    data.setdefault("finish_reason", None)
    return data


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _with_finish_reason(handler(self))


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _with_finish_reason(handler(self))


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(_Response):
    """Streamed completions reuse the `text_completion` object, as OpenAI does."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "llmadapter"
    task: str | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody
