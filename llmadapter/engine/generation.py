"""Chat and completions engine: prompt preparation, context checks, and OpenAI responses and chunks."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import BaseModel

from llmadapter.catalog import CHAT, TaskSpec
from llmadapter.config import GenerationParams, ModelConfig
from llmadapter.engine.base import Engine, EngineStats
from llmadapter.engine.sampling import RowSampler
from llmadapter.engine.scheduler import Scheduler, TokenInfo
from llmadapter.engine.scheduler import Sequence as Seq
from llmadapter.engine.stops import IncrementalDecoder, StopMatcher
from llmadapter.errors import ContextLengthError, InvalidRequestError
from llmadapter.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
    now,
)

GenRequest = ChatCompletionRequest | CompletionRequest


@dataclass
class _Job:
    """One request in flight: its prompts, its sequences (prompt x n), and how to report progress."""

    request: GenRequest
    params: GenerationParams
    prompts: list[list[int]]
    prompt_texts: list[str]
    id: str
    created: int
    seqs: list[Seq] = field(default_factory=list)
    remaining: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> Usage:
        completion = sum(len(s.generated) for s in self.seqs)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def raise_error(self) -> None:
        for seq in self.seqs:
            if seq.error is not None:
                raise seq.error


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _context_window(model: Any, config: ModelConfig) -> int:
    if config.context_window:
        return config.context_window
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise InvalidRequestError(
        "The model's context window is unknown; set model_config['context_window'].", param="context_window"
    )


@dataclass
class _Cursor:
    """How much of one choice a stream has sent: its role chunk, its text, its tokens' logprobs."""

    started: bool = False
    chars: int = 0
    tokens: int = 0


# A scheduler event as a stream receives it: the sequence, its newly released text, whether it finished,
# and how many tokens it had when the event was raised (the scheduler thread keeps appending).
_Event = tuple[Seq, str, bool, int]


def _event(seq: Seq, out: str, finished: bool) -> _Event:
    return seq, out, finished, len(seq.tokens)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class GenerationEngine(Engine):
    """Answers llm/v1/chat or llm/v1/completions requests with a continuously batched model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: TaskSpec,
        config: ModelConfig,
        model_name: str,
        max_queue: int = 1024,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.config = config
        self.model_name = model_name
        self.stats = EngineStats()
        self._window = _context_window(model, config)
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self._template_has_tools = "tools" in (template or "")
        self.scheduler = Scheduler(
            model,
            tokenizer,
            eos_ids=_eos_ids(model, tokenizer),
            max_batch_size=config.max_batch_size,
            max_queue=max_queue,
            stats=self.stats,
        )

    @property
    def context_window(self) -> int:
        return self._window

    def close(self) -> None:
        self.scheduler.close()

    # -- preparation (all checks happen here, before any compute) ------------------------------

    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], str]:
        if not self.tokenizer.chat_template:
            raise InvalidRequestError(
                "This model's tokenizer has no chat template; use the completions task.", param="messages"
            )
        kwargs: dict[str, Any] = {}
        if req.tools and req.tool_choice != "none":
            if not self._template_has_tools:
                raise InvalidRequestError("This model's chat template does not support tools.", param="tools")
            if req.tool_choice not in (None, "auto"):
                raise InvalidRequestError(
                    "Only tool_choice 'auto' or 'none' is supported: the engine cannot force a tool call.",
                    param="tool_choice",
                )
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
        try:
            text = self.tokenizer.apply_chat_template(
                [m.to_template() for m in req.messages], tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:  # jinja raises for conversations the template refuses
            raise InvalidRequestError(
                f"The chat template rejected the messages: {exc}", param="messages"
            ) from None
        # The template already wrote any BOS it wants: adding special tokens again would double it.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids), str(text)

    def _prepare(self, req: BaseModel) -> _Job:
        if not isinstance(req, ChatCompletionRequest | CompletionRequest):
            raise InvalidRequestError(f"Expected a {self.spec.request_model.__name__}.", param=None)
        if isinstance(req, ChatCompletionRequest) != (self.spec.inference_task == CHAT):
            raise InvalidRequestError(
                f"This model answers {self.spec.inference_task} requests.", param="messages"
            )
        params = req.to_generation(self.config)
        for token_id in params.logit_bias:
            if not 0 <= token_id < self._vocab:
                raise InvalidRequestError(
                    f"Invalid value for 'logit_bias': token id {token_id} is outside the vocabulary "
                    f"(0..{self._vocab - 1}).",
                    param="logit_bias",
                )
        if isinstance(req, ChatCompletionRequest):
            ids, text = self._chat_prompt(req)
            prompts, texts, param, what = [ids], [text], "messages", "messages"
        else:
            texts = req.prompts()
            prompts = [list(self.tokenizer(t)["input_ids"]) for t in texts]
            param, what = "prompt", "prompt"
            if any(not p for p in prompts):
                raise InvalidRequestError("'prompt' must not be empty.", param="prompt")
        longest = max(len(p) for p in prompts)
        window = self._window
        if longest >= window:
            raise ContextLengthError(
                f"This model's maximum context length is {window} tokens, but your {what} "
                f"resulted in {longest} tokens. Please shorten the {what}.",
                param=param,
            )
        if req.max_tokens_given() and longest + params.max_tokens > window:
            limit = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise ContextLengthError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{longest + params.max_tokens} tokens ({longest} in the {what}, {params.max_tokens} for the "
                f"completion). Please reduce the length of the {what} or {limit}.",
                param=limit,
            )
        sequences = len(prompts) * params.n
        if sequences > self.scheduler.max_queue:
            # Never admissible, so not a 429 to retry: the request itself is too large.
            raise InvalidRequestError(
                f"This request asks for {sequences} sequences ({len(prompts)} prompts x n={params.n}); this "
                f"server holds at most {self.scheduler.max_queue} queued or running.",
                param="n" if params.n > 1 else param,
            )
        prefix = "chatcmpl" if isinstance(req, ChatCompletionRequest) else "cmpl"
        return _Job(req, params, prompts, texts, new_id(prefix), now())

    def _launch(self, job: _Job, on_event: Any, *, submit: bool = True) -> None:
        max_new_cap = self._window
        for p_index, prompt in enumerate(job.prompts):
            limit = min(job.params.max_tokens, max_new_cap - len(prompt))
            for j in range(job.params.n):
                choice = p_index * job.params.n + j
                job.seqs.append(
                    Seq(
                        prompt_ids=prompt,
                        params=job.params,
                        max_new_tokens=limit,
                        choice_index=choice,
                        sink=on_event,
                        sampler=RowSampler.create(job.params, choice),
                        decoder=IncrementalDecoder(self.tokenizer),
                        matcher=StopMatcher(job.params.stop),
                    )
                )
        job.remaining = len(job.seqs)
        if submit:
            self.scheduler.submit(job.seqs)

    # -- responses -----------------------------------------------------------------------------

    def _echo(self, job: _Job, seq: Seq) -> str:
        req = job.request
        if isinstance(req, CompletionRequest) and req.echo:
            return job.prompt_texts[seq.choice_index // job.params.n]
        return ""

    @staticmethod
    def _chat_logprobs(tokens: list[TokenInfo]) -> ChoiceLogprobs:
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

    @staticmethod
    def _completion_logprobs(tokens: list[TokenInfo], base: int) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=[t.text for t in tokens],
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=[dict(t.top) for t in tokens],
            text_offset=[base + t.offset for t in tokens],
        )

    def _response(self, job: _Job) -> ChatCompletionResponse | CompletionResponse:
        job.raise_error()
        seqs = sorted(job.seqs, key=lambda s: s.choice_index)
        if isinstance(job.request, ChatCompletionRequest):
            chat_choices = [
                ChatChoice(
                    index=s.choice_index,
                    message=AssistantMessage(content=s.text),
                    finish_reason=cast(Any, s.finish_reason),
                    logprobs=self._chat_logprobs(s.emitted_tokens()) if job.params.logprobs else None,
                )
                for s in seqs
            ]
            return ChatCompletionResponse(
                id=job.id, created=job.created, model=self.model_name, choices=chat_choices, usage=job.usage()
            )
        choices = []
        for s in seqs:
            echo = self._echo(job, s)
            choices.append(
                CompletionChoice(
                    index=s.choice_index,
                    text=echo + s.text,
                    finish_reason=cast(Any, s.finish_reason),
                    logprobs=self._completion_logprobs(s.emitted_tokens(), len(echo))
                    if job.params.logprobs
                    else None,
                )
            )
        return CompletionResponse(
            id=job.id, created=job.created, model=self.model_name, choices=choices, usage=job.usage()
        )

    def _stream_event(self, job: _Job, cursors: dict[int, _Cursor], event: _Event) -> list[BaseModel]:
        """The chunks one scheduler event adds to a stream (raises the sequence's error, if any)."""
        seq, out, finished, n_tokens = event
        if seq.error is not None:
            raise seq.error
        cursor = cursors.setdefault(seq.choice_index, _Cursor())
        first = not cursor.started
        cursor.started = True
        cursor.chars += len(out)
        tokens: list[TokenInfo] = []
        if job.params.logprobs:
            # A token's logprob goes out with the text it starts: not while a stop string holds that text
            # back, never for text a stop string cut (as in the whole answer, Seq.emitted_tokens).
            end = len(seq.text) if finished else cursor.chars
            for token in seq.tokens[cursor.tokens : n_tokens]:
                if not (token.offset < end or (finished and token.offset == end and not token.text)):
                    break
                tokens.append(token)
            cursor.tokens += len(tokens)
        return self._chunks(job, seq, out, finished, first, tokens)

    def _chunks(
        self, job: _Job, seq: Seq, out: str, finished: bool, first: bool, tokens: list[TokenInfo]
    ) -> list[BaseModel]:
        reason = cast(Any, seq.finish_reason) if finished else None
        if isinstance(job.request, ChatCompletionRequest):
            chunks: list[BaseModel] = []
            if first:
                chunks.append(
                    self._chat_chunk(job, seq, DeltaMessage(role="assistant", content=""), None, None)
                )
            if out or tokens:
                chat_logprobs = self._chat_logprobs(tokens) if tokens else None
                chunks.append(self._chat_chunk(job, seq, DeltaMessage(content=out), None, chat_logprobs))
            if finished:
                chunks.append(self._chat_chunk(job, seq, DeltaMessage(), reason, None))
            return chunks
        echo = self._echo(job, seq)
        text = (echo if first else "") + out
        if not (text or tokens or finished):
            return []
        logprobs = self._completion_logprobs(tokens, len(echo)) if tokens else None
        choice = CompletionChoice(index=seq.choice_index, text=text, finish_reason=reason, logprobs=logprobs)
        return [CompletionChunk(id=job.id, created=job.created, model=self.model_name, choices=[choice])]

    def _chat_chunk(
        self, job: _Job, seq: Seq, delta: DeltaMessage, reason: Any, logprobs: ChoiceLogprobs | None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=seq.choice_index, delta=delta, finish_reason=reason, logprobs=logprobs)
        return ChatCompletionChunk(id=job.id, created=job.created, model=self.model_name, choices=[choice])

    def _usage_chunk(self, job: _Job) -> BaseModel:
        if isinstance(job.request, ChatCompletionRequest):
            return ChatCompletionChunk(
                id=job.id, created=job.created, model=self.model_name, choices=[], usage=job.usage()
            )
        return CompletionChunk(
            id=job.id, created=job.created, model=self.model_name, choices=[], usage=job.usage()
        )

    # -- sync API (pyfunc) ---------------------------------------------------------------------

    def run(self, requests: Sequence[BaseModel]) -> list[BaseModel]:
        jobs = [self._prepare(r) for r in requests]  # every request is checked before any compute

        def completion_counter(job: _Job) -> Any:
            def on_event(seq: Seq, out: str, finished: bool) -> None:
                if finished:
                    job.remaining -= 1
                    if job.remaining == 0:
                        job.done.set()

            return on_event

        try:
            for job in jobs:
                self._launch(job, completion_counter(job), submit=False)
            # One submission: the whole predict call starts as one batch (up to max_batch_size).
            self.scheduler.submit([seq for job in jobs for seq in job.seqs])
            for job in jobs:
                job.done.wait()
        except BaseException:
            for job in jobs:
                self.scheduler.cancel(job.seqs)
            raise
        return [self._response(job) for job in jobs]

    def stream(self, request: BaseModel, *, include_usage: bool | None = None) -> Iterator[BaseModel]:
        job = self._prepare(request)
        events: queue.Queue[_Event] = queue.Queue()
        self._launch(job, lambda seq, out, finished: events.put(_event(seq, out, finished)))
        usage = include_usage if include_usage is not None else cast(GenRequest, request).include_usage
        cursors: dict[int, _Cursor] = {}
        try:
            remaining = len(job.seqs)
            while remaining:
                event = events.get()
                yield from self._stream_event(job, cursors, event)
                remaining -= event[2]
            if usage:
                yield self._usage_chunk(job)
        finally:
            self.scheduler.cancel(job.seqs)

    # -- async API (server) --------------------------------------------------------------------

    async def arun(self, request: BaseModel) -> BaseModel:
        job = self._prepare(request)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_event(seq: Seq, out: str, finished: bool) -> None:
            if finished:
                job.remaining -= 1
                if job.remaining == 0:
                    loop.call_soon_threadsafe(_resolve, done)

        self._launch(job, on_event)
        try:
            await done
        finally:
            if not done.done() or job.remaining:
                self.scheduler.cancel(job.seqs)
        return self._response(job)

    async def astream(self, request: BaseModel) -> AsyncIterator[BaseModel]:  # type: ignore[override]
        job = self._prepare(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()
        # _event runs on the scheduler thread, so the token count is the one of this very event.
        self._launch(
            job, lambda seq, out, fin: loop.call_soon_threadsafe(events.put_nowait, _event(seq, out, fin))
        )
        cursors: dict[int, _Cursor] = {}
        try:
            remaining = len(job.seqs)
            while remaining:
                event = await events.get()
                for chunk in self._stream_event(job, cursors, event):
                    yield chunk
                remaining -= event[2]
            if cast(GenRequest, request).include_usage:
                yield self._usage_chunk(job)
        finally:
            # Runs when the client disconnects and the server closes this generator: stop generating.
            self.scheduler.cancel(job.seqs)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> GenerationEngine:
        return cls(pipe.model, pipe.tokenizer, **kwargs)
