"""OpenAI request models that validate themselves (the spec's rules, plus vLLM's extra sampling fields) and
convert themselves into engine parameters; parse_request turns every failure into a 400 naming the param.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from llmadapter.config import GenerationParams, ModelConfig
from llmadapter.errors import InvalidRequestError, first_error
from llmadapter.protocol.base import WireRequest, unsupported
from llmadapter.protocol.messages import ChatMessage, FunctionCallChoice, FunctionDefinition, Tool, ToolChoice
from llmadapter.protocol.optional import (
    Metadata,
    Prediction,
    PromptCacheOptions,
    ReasoningEffort,
    ResponseFormat,
    SafetyIdentifier,
    ServiceTier,
    StreamOptions,
    check_no_op,
)

# The spec: "Up to 4 sequences where the API will stop generating further tokens" (1 to 4 in a list).
MAX_STOP_SEQUENCES = 4
MAX_N = 128  # the spec's bound on `n`; the engine's queue bound refuses what it could never hold
MAX_LOGPROBS = 20  # chat `top_logprobs` (the spec) and vLLM's default bound on `prompt_logprobs`
MAX_COMPLETION_LOGPROBS = 5  # completions' legacy `logprobs` (the spec)

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0)]


class _SamplingFields(WireRequest):
    """Fields shared by chat and completions. None means "not given": model_config decides.

    The second group are vLLM's extensions (`extra_body` for OpenAI clients), with vLLM's meaning.
    """

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM: -1 (its old default) also disables
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
    # -- vLLM -----------------------------------------------------------------------------------
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # vLLM: keep the last k prompt tokens; -1 keeps as many as fit the context window.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    # The spec's structured output on chat; vLLM's field of the same shape on completions.
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if not 1 <= len(stops) <= MAX_STOP_SEQUENCES:
            raise ValueError(f"give 1 to {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("prompt_logprobs")
    @classmethod
    def _check_prompt_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("'prompt_logprobs' are not available when 'stream' is true")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncate(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("keep at least 1 prompt token (or -1: as many as fit)")
        return value

    def _requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> tuple[bool, int]:
        return False, 0

    def _prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

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
        requested = self._requested_max_tokens()
        max_tokens = config.max_tokens if requested is None else requested
        if (self.min_tokens or 0) > max_tokens:
            raise InvalidRequestError(
                f"Invalid value for 'min_tokens': {self.min_tokens} is more than the {max_tokens} "
                "tokens the completion may have (max_tokens).",
                param="min_tokens",
            )
        logprobs, top_logprobs = self._logprobs()
        stop = self.stop if self.stop is not None else config.stop
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=max(0, pick("top_k")),
            stop=tuple(stop),
            n=pick("n"),
            seed=pick("seed"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            logit_bias=bias,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids or ())),
            include_stop_str=bool(self.include_stop_str_in_output),
            prompt_logprobs=self._prompt_logprobs(),
        )

    @property
    def include_usage(self) -> bool:
        # stream_options on a request that does not stream asks for nothing (there is no stream).
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per answer (constrained calls)
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128)] | None = None
    function_call: FunctionCallChoice | None = None
    # -- the spec's optional fields (llmadapter.protocol.optional says which values are accepted) --
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: ServiceTier | None = None  # one tier here; the answer says "default"
    modalities: list[Literal["text", "audio"]] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: ReasoningEffort | None = None  # the chat template decides (engine.formats)
    audio: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prediction: Prediction | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: SafetyIdentifier | None = None
    # -- vLLM's chat template fields ----------------------------------------------------------
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None

    @field_validator("store", "modalities", "verbosity", "audio", "moderation")
    @classmethod
    def _no_op_only(cls, value: Any, info: ValidationInfo) -> Any:
        return check_no_op(str(info.field_name), value)

    @field_validator("web_search_options")
    @classmethod
    def _no_web_search(cls, value: Any) -> Any:
        return check_no_op("web_search_options", value)

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        if value in (None, "none", "auto"):
            return value
        if not info.data.get("tools"):
            raise ValueError("'tool_choice' asks for a tool call and the request gives no 'tools'")
        if not isinstance(value, dict):
            return value
        named = value.get("function") if value.get("type") == "function" else None
        if (
            not isinstance(named, dict)
            or not isinstance(named.get("name"), str)
            or set(value) - {"type", "function"}
        ):
            raise ValueError(
                'give "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        defined = [tool.function.name for tool in info.data.get("tools") or []]
        if named["name"] not in defined:
            raise ValueError(f"function '{named['name']}' is not one of the request's tools ({defined})")
        return value

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

    @field_validator("functions")
    @classmethod
    def _check_functions(cls, value: list[FunctionDefinition] | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("tools"):
            raise ValueError("give 'tools' or the deprecated 'functions', not both")
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _check_continue(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("cannot continue the final message and add a generation prompt after it")
        return value

    def _requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    def template_tools(self) -> tuple[list[dict[str, Any]] | None, Any, str]:
        """(tools, tool choice, the field that chose) for the chat template, from `tools` or the
        deprecated `functions` / `function_call` (a named function is a forced call)."""
        if self.functions is not None:
            tools = [
                {"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.functions
            ]
            choice = self.function_call
            return tools, choice if isinstance(choice, str | None) else choice.model_dump(), "function_call"
        given = [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None
        return given, self.tool_choice, "tool_choice"

    def generation_prompt(self) -> bool:
        """vLLM's rule: the generation prompt is added unless turned off or the final message continues."""
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[Annotated[list[TokenId], Field(min_length=1)]]
    max_tokens: NonNegativeInt | None = None  # the spec allows 0: nothing generated (with echo: the prompt)
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("'prompt' must not be an empty list")
        return value

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if value is not None and value < n:
            raise ValueError(f"'best_of' must be at least n ({n})")
        if value is not None and value > n:
            raise unsupported("best_of", f"the best {n} of {value} candidates (leave it out, or set it to n)")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return check_no_op("suffix", value)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as given: texts, or token-id lists."""
        prompt: Any = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def _logprobs(self) -> tuple[bool, int]:
        # Completions' legacy `logprobs` is an integer: the number of alternatives per token.
        return self.logprobs is not None, self.logprobs or 0

    def _prompt_logprobs(self) -> int | None:
        # vLLM: echo with logprobs scores the echoed prompt too, with the same number of alternatives.
        echoed = self.logprobs if self.echo and self.logprobs is not None else None
        given = [k for k in (self.prompt_logprobs, echoed) if k is not None]
        return max(given) if given else None


EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(WireRequest):
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
        why = "" if first.message == "Field required" else f" ({first.message})"
        # (message, OpenAI error code) by pydantic error kind; codes as OpenAI sends them.
        by_kind = {
            "extra_forbidden": (
                f"Unsupported parameter: '{param}' is not accepted by this endpoint.",
                "unsupported_parameter",
            ),
            "missing": (f"Missing required parameter: '{param}'{why}.", None),
            "unsupported_value": (f"Unsupported value: {first.message}.", "unsupported_value"),
        }
        other = (
            f"Invalid value for '{param}': {first.message}."
            if param
            else f"Invalid request: {first.message}."
        )
        message, code = by_kind.get(first.kind, (other, None))
        raise InvalidRequestError(message, param=param or None, code=code) from None
