"""How each generation task speaks OpenAI: its prompt, its answer, its stream chunks and their logprobs.

One format per task (`FORMATS`, keyed by the llm/v1 task), chosen once by the engine; the envelope
models (response, chunk) come from the task's TaskSpec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from pydantic import BaseModel

from llmadapter.catalog import CHAT, COMPLETIONS, TaskSpec
from llmadapter.config import GenerationParams, ModelConfig
from llmadapter.engine.chat_template import ChatTemplate
from llmadapter.engine.grammar import Constraint, check_schema
from llmadapter.engine.logprobs import PromptToken
from llmadapter.engine.scheduler import Sequence, TokenInfo
from llmadapter.engine.sink import Event
from llmadapter.engine.tool_calls import (
    JsonParser,
    ParsedCall,
    ToolParser,
    new_call_id,
    parser_for_template,
    valid,
)
from llmadapter.errors import InvalidRequestError
from llmadapter.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

GenRequest = ChatCompletionRequest | CompletionRequest


@dataclass
class Cursor:
    """How much of one choice a stream has sent: its role chunk, its text, its tokens' logprobs; with
    tools, the text so far, the content sent and each call's id and argument characters sent."""

    started: bool = False
    chars: int = 0
    tokens: int = 0
    text: str = ""
    content: int = 0
    calls: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Structure:
    """What a request asks of the output's shape: a constraint (and the field that asked for it, as its
    errors name it) and, with tools, the parser that reads calls out of the text."""

    constraint: Constraint | None = None
    param: str = "response_format"
    parser: ToolParser | None = None


def response_format(req: GenRequest, config: ModelConfig) -> ResponseFormat | None:
    """The request's response_format, else model_config's default."""
    if req.response_format is not None:
        return req.response_format
    return ResponseFormat.model_validate(config.response_format) if config.response_format else None


def format_constraint(req: GenRequest, config: ModelConfig) -> Structure:
    """The constraint of `response_format` (none for text); its schema checked before any compute."""
    fmt = response_format(req, config)
    schema = fmt.schema_of() if fmt is not None else None
    if schema is None:
        return Structure()
    check_schema(schema, "response_format")
    return Structure(Constraint.json(schema))


@dataclass
class Job:
    """One request in flight: its prompts, its sequences (prompt x n), and how far its stream got."""

    request: GenRequest
    params: GenerationParams
    prompts: list[list[int]]
    prompt_texts: list[str]
    id: str
    created: int
    seqs: list[Sequence] = field(default_factory=list)
    cursors: dict[int, Cursor] = field(default_factory=dict)
    grammar: Any = None  # the compiled constraint every sequence is held to (None: free)
    parser: ToolParser | None = None  # tools asked for: how calls are read from the text

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    cache_prefixes: bool = False  # the engine has a prefix cache: usage reports cached_tokens

    def usage(self) -> Usage:
        completion = sum(len(s.generated) for s in self.seqs)
        details = None
        if self.cache_prefixes:
            # Per prompt, as prompt_tokens counts each prompt once: its first choice's reuse (the n > 1
            # copies share that prefill).
            n = self.params.n
            cached = sum(s.cached_tokens for s in self.seqs if s.choice_index % n == 0)
            details = PromptTokensDetails(cached_tokens=cached)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=details,
        )

    def raise_error(self) -> None:
        for seq in self.seqs:
            if seq.error is not None:
                raise seq.error


class Format(ABC):
    """One task's OpenAI shapes; subclasses build the prompt, a choice and a choice's stream chunks."""

    request_model: ClassVar[type[GenRequest]]
    prompt_param: ClassVar[str]  # the request field that holds the prompt, as errors name it
    id_prefix: ClassVar[str]

    def __init__(self, spec: TaskSpec, tokenizer: Any, model_name: str) -> None:
        assert spec.chunk_model is not None, "generation tasks stream"
        self.spec = spec
        self._chunk_model: type[Any] = spec.chunk_model
        self.tokenizer = tokenizer
        self.model_name = model_name

    @abstractmethod
    def prompts(self, req: Any) -> tuple[list[list[int]], list[str]]:
        """The token ids and texts of the request's prompts (raises InvalidRequestError)."""

    def structure(self, req: Any, config: ModelConfig) -> Structure:
        """The shape the request asks of the output (raises InvalidRequestError)."""
        return format_constraint(req, config)

    @abstractmethod
    def choice(self, job: Job, seq: Sequence) -> BaseModel:
        """One finished sequence as a choice of the whole answer."""

    @abstractmethod
    def chunks(
        self, job: Job, seq: Sequence, out: str, finished: bool, first: bool, tokens: list[TokenInfo]
    ) -> list[BaseModel]:
        """The chunks that carry `out` (and its tokens' logprobs) of one choice."""

    def envelope(self, job: Job) -> dict[str, Any]:
        """Fields of the answer and of every chunk beyond id, created and model (none by default)."""
        return {}

    def response(self, job: Job) -> BaseModel:
        seqs = sorted(job.seqs, key=lambda s: s.choice_index)
        return self.spec.response_model(
            id=job.id,
            created=job.created,
            model=self.model_name,
            choices=[self.choice(job, s) for s in seqs],
            usage=job.usage(),
            **self.envelope(job),
            **self.response_extras(job),
        )

    def response_extras(self, job: Job) -> dict[str, Any]:
        """Fields of the whole answer only (chat's prompt_logprobs)."""
        return {}

    def chunk(self, job: Job, choice: BaseModel) -> BaseModel:
        return self._chunk_model(
            id=job.id, created=job.created, model=self.model_name, choices=[choice], **self.envelope(job)
        )

    def usage_chunk(self, job: Job) -> BaseModel:
        return self._chunk_model(
            id=job.id,
            created=job.created,
            model=self.model_name,
            choices=[],
            usage=job.usage(),
            **self.envelope(job),
        )

    def stream_chunks(self, job: Job, event: Event) -> list[BaseModel]:
        """The chunks one scheduler event adds to a stream (raises the sequence's error, if any)."""
        seq, out, finished, n_tokens = event
        if seq.error is not None:
            raise seq.error
        cursor = job.cursors.setdefault(seq.choice_index, Cursor())
        first = not cursor.started
        cursor.started = True
        cursor.chars += len(out)
        tokens: list[TokenInfo] = []
        if job.params.logprobs:
            # A token's logprob goes out with the text it starts: not while a stop string holds that text
            # back, never for text a stop string cut (as in the whole answer, Sequence.emitted_tokens).
            end = len(seq.text) if finished else cursor.chars
            for token in seq.tokens[cursor.tokens : n_tokens]:
                if not (token.offset < end or (finished and token.offset == end and not token.text)):
                    break
                tokens.append(token)
            cursor.tokens += len(tokens)
        return self.chunks(job, seq, out, finished, first, tokens)


def _reason(seq: Sequence) -> Any:
    return cast(Any, seq.finish_reason)


def prompt_logprobs(tokens: list[PromptToken] | None, k: int | None) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt token, its own entry and the k most likely alternatives
    (None for the first token, which nothing predicts)."""
    if tokens is None or k is None:
        return None
    out: PromptLogprobs = []
    for token in tokens:
        if token.logprob is None:
            out.append(None)
            continue
        entry = {
            token.token_id: PromptLogprob(logprob=token.logprob, rank=token.rank, decoded_token=token.text)
        }
        for rank, (token_id, text, logprob) in enumerate(token.top[:k], start=1):
            entry.setdefault(token_id, PromptLogprob(logprob=logprob, rank=rank, decoded_token=text))
        out.append(entry)
    return out


class ChatFormat(Format):
    """llm/v1/chat: the chat template renders the messages; deltas carry the role, then the content."""

    request_model = ChatCompletionRequest
    prompt_param = "messages"
    id_prefix = "chatcmpl"

    def __init__(self, spec: TaskSpec, tokenizer: Any, model_name: str) -> None:
        super().__init__(spec, tokenizer, model_name)
        self.template = ChatTemplate(tokenizer)

    def prompts(self, req: ChatCompletionRequest) -> tuple[list[list[int]], list[str]]:
        tools, tool_choice, _ = req.template_tools()
        text = self.template.render(
            req.messages,
            generation_prompt=req.generation_prompt(),
            continue_final=bool(req.continue_final_message),
            template_kwargs=req.chat_template_kwargs,
            tools=tools,
            tool_choice=tool_choice,
            reasoning_effort=req.reasoning_effort,
        )
        return [self.template.encode(text)], [text]

    def structure(self, req: ChatCompletionRequest, config: ModelConfig) -> Structure:
        """With tools (and tool_choice not "none"): the parser of the template's call format, and a
        constraint to a valid call for "required" or a named function; a template without tools gets
        the generic JSON format, constrained to a call or (with "auto") a text answer."""
        tools, choice, choice_param = req.template_tools()
        if not tools or choice == "none":
            return format_constraint(req, config)
        tools_param = "functions" if req.functions is not None else "tools"
        for i, tool in enumerate(tools):
            params = tool["function"].get("parameters")
            if params is not None:
                where = (
                    f"functions[{i}].parameters"
                    if req.functions is not None
                    else f"tools[{i}].function.parameters"
                )
                check_schema(params, where)
        forced = choice == "required" or isinstance(choice, dict)
        # The request's own response_format only: model_config's default yields to tools.
        if not forced and req.response_format not in (None, ResponseFormat(type="text")):
            raise InvalidRequestError(
                f"Unsupported value: 'response_format' with {tools_param} and {choice_param} 'auto' (a text "
                "answer of the schema or a tool call) is not supported; give one of them, or force the call.",
                param="response_format",
                code="unsupported_value",
            )
        generic = not self.template.renders_tools
        parser = (
            JsonParser() if generic else parser_for_template(self.template.source, config.tool_call_parser)
        )
        named = (choice.get("function") or choice).get("name") if isinstance(choice, dict) else None
        calls = {
            t["function"]["name"]: parser.call_schema(t)
            for t in tools
            if named in (None, t["function"]["name"])
        }
        if not (forced or generic):
            return Structure(parser=parser)
        parallel = bool(req.parallel_tool_calls)  # as llama.cpp: one call unless several are asked for
        constraint = parser.constraint(calls, parallel, allow_text=not forced)
        return Structure(constraint, choice_param if forced else tools_param, parser)

    def envelope(self, job: Job) -> dict[str, Any]:
        # The spec: when service_tier is set, the answer names the tier that served it; there is one.
        return {"service_tier": "default"} if cast(ChatCompletionRequest, job.request).service_tier else {}

    def response_extras(self, job: Job) -> dict[str, Any]:
        k = job.request.prompt_logprobs
        return {"prompt_logprobs": prompt_logprobs(job.seqs[0].prompt_logprobs, k)} if job.seqs else {}

    @staticmethod
    def _logprobs(tokens: list[TokenInfo]) -> ChoiceLogprobs:
        return ChoiceLogprobs(
            content=[
                TokenLogprob(
                    token=t.text,
                    logprob=t.logprob,
                    bytes=list(t.text.encode()),
                    top_logprobs=[TopLogprob(token=s, logprob=v, bytes=list(s.encode())) for s, v in t.top],
                )
                for t in tokens
            ]
        )

    def choice(self, job: Job, seq: Sequence) -> BaseModel:
        message = AssistantMessage(content=seq.text)
        reason = _reason(seq)
        if job.parser is not None:
            parsed = job.parser.parse(seq.text, final=True)
            calls = [c for c in parsed.calls if valid(c)]
            if calls:
                message = AssistantMessage(
                    content=parsed.content.strip() or None,
                    tool_calls=[
                        ToolCall(
                            id=new_call_id(), function=FunctionCall(name=str(c.name), arguments=c.arguments)
                        )
                        for c in calls
                    ],
                )
                reason = "tool_calls" if reason == "stop" else reason
            else:
                message = AssistantMessage(content=parsed.content)
        return ChatChoice(
            index=seq.choice_index,
            message=message,
            finish_reason=reason,
            logprobs=self._logprobs(seq.emitted_tokens()) if job.params.logprobs else None,
        )

    @staticmethod
    def _call_deltas(job: Job, seq: Sequence, out: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """The new content and tool-call pieces of one choice's stream (the text read by the parser so
        far: a call's id, type and name once its name is complete, then its argument fragments)."""
        assert job.parser is not None
        cursor = job.cursors[seq.choice_index]
        cursor.text += out
        parsed = job.parser.parse(cursor.text, final=finished)
        content = parsed.content[cursor.content :] if not cursor.calls else ""
        cursor.content += len(content)
        pieces: list[DeltaToolCall] = []
        calls: list[ParsedCall] = [c for c in parsed.calls if valid(c)] if finished else parsed.calls
        for index, call in enumerate(calls):
            if index == len(cursor.calls):
                if call.name is None:
                    break
                cursor.calls.append((new_call_id(), 0))
                pieces.append(
                    DeltaToolCall(
                        index=index,
                        id=cursor.calls[index][0],
                        type="function",
                        function=DeltaFunction(name=call.name, arguments=""),
                    )
                )
            call_id, sent = cursor.calls[index]
            if len(call.arguments) > sent and call.arguments.startswith(call.arguments[:sent]):
                pieces.append(
                    DeltaToolCall(index=index, function=DeltaFunction(arguments=call.arguments[sent:]))
                )
                cursor.calls[index] = (call_id, len(call.arguments))
        return content, pieces

    def chunks(
        self, job: Job, seq: Sequence, out: str, finished: bool, first: bool, tokens: list[TokenInfo]
    ) -> list[BaseModel]:
        deltas: list[tuple[DeltaMessage, Any, ChoiceLogprobs | None]] = []
        if first:
            deltas.append((DeltaMessage(role="assistant", content=""), None, None))
        reason = _reason(seq) if finished else None
        if job.parser is not None:
            # Text that may be a tool call is held back until the parser knows; calls go out as pieces.
            content, pieces = self._call_deltas(job, seq, out, finished)
            if content:
                deltas.append((DeltaMessage(content=content), None, None))
            if pieces:
                deltas.append((DeltaMessage(tool_calls=pieces), None, None))
            if finished and job.cursors[seq.choice_index].calls and reason == "stop":
                reason = "tool_calls"
        elif out or tokens:
            deltas.append((DeltaMessage(content=out), None, self._logprobs(tokens) if tokens else None))
        if finished:
            deltas.append((DeltaMessage(), reason, None))
        return [
            self.chunk(
                job,
                ChatChunkChoice(index=seq.choice_index, delta=delta, finish_reason=reason, logprobs=logprobs),
            )
            for delta, reason, logprobs in deltas
        ]


class CompletionsFormat(Format):
    """llm/v1/completions: prompts as given (texts or token ids), one choice per prompt x n; `echo` puts
    the prompt first (with its tokens' logprobs when `logprobs` is set, as vLLM and OpenAI do)."""

    request_model = CompletionRequest
    prompt_param = "prompt"
    id_prefix = "cmpl"

    def prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        given = req.prompts()
        prompts = [list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else p for p in given]
        if any(not p for p in prompts):
            raise InvalidRequestError("'prompt' must not be empty.", param="prompt")
        texts = [
            p if isinstance(p, str) else str(self.tokenizer.decode(p, skip_special_tokens=True))
            for p in given
        ]
        return prompts, texts

    @staticmethod
    def _echo(job: Job, seq: Sequence) -> str:
        if cast(CompletionRequest, job.request).echo:
            return job.prompt_texts[seq.choice_index // job.params.n]
        return ""

    @staticmethod
    def _logprobs(
        job: Job, seq: Sequence, tokens: list[TokenInfo], base: int, echoed: bool
    ) -> CompletionLogprobs:
        """The generated `tokens` (their offsets after `base`), after the prompt's when it is `echoed`:
        its first token has no logprob (null), as in OpenAI's echo."""
        k = job.params.top_logprobs
        prompt = (seq.prompt_logprobs or []) if echoed else []
        return CompletionLogprobs(
            tokens=[t.text for t in prompt] + [t.text for t in tokens],
            token_logprobs=[t.logprob for t in prompt] + [t.logprob for t in tokens],
            top_logprobs=[None if t.logprob is None else {s: v for _, s, v in t.top[:k]} for t in prompt]
            + [dict(t.top) for t in tokens],
            text_offset=[t.offset for t in prompt] + [base + t.offset for t in tokens],
        )

    def _echoes_logprobs(self, job: Job) -> bool:
        return bool(cast(CompletionRequest, job.request).echo and job.params.logprobs)

    def choice(self, job: Job, seq: Sequence) -> BaseModel:
        echo = self._echo(job, seq)
        logprobs = None
        if job.params.logprobs:
            logprobs = self._logprobs(job, seq, seq.emitted_tokens(), len(echo), self._echoes_logprobs(job))
        return CompletionChoice(
            index=seq.choice_index,
            text=echo + seq.text,
            finish_reason=_reason(seq),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs(seq.prompt_logprobs, job.request.prompt_logprobs),
        )

    def chunks(
        self, job: Job, seq: Sequence, out: str, finished: bool, first: bool, tokens: list[TokenInfo]
    ) -> list[BaseModel]:
        echo = self._echo(job, seq)
        text = (echo if first else "") + out
        echoed = first and self._echoes_logprobs(job)
        if not (text or tokens or finished or echoed):
            return []
        logprobs = self._logprobs(job, seq, tokens, len(echo), echoed) if tokens or echoed else None
        reason = _reason(seq) if finished else None
        choice = CompletionChoice(index=seq.choice_index, text=text, finish_reason=reason, logprobs=logprobs)
        return [self.chunk(job, choice)]


FORMATS: dict[str, type[Format]] = {CHAT: ChatFormat, COMPLETIONS: CompletionsFormat}
