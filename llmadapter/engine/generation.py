"""Chat and completions engine: request checks, sequences for the scheduler, and the four ways to answer.

What differs between chat and completions (prompt, response, chunks, logprobs) is the task's Format.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel

from llmadapter.catalog import TaskSpec
from llmadapter.config import GenerationParams, ModelConfig
from llmadapter.engine.base import Engine, EngineStats
from llmadapter.engine.chat_template import ChatTemplate
from llmadapter.engine.formats import FORMATS, Job
from llmadapter.engine.grammar import GrammarCompiler, Matcher
from llmadapter.engine.sampling import RowSampler
from llmadapter.engine.scheduler import Scheduler
from llmadapter.engine.scheduler import Sequence as Seq
from llmadapter.engine.sink import LoopSink, Sink, ThreadSink
from llmadapter.engine.stops import IncrementalDecoder, StopMatcher
from llmadapter.engine.timing import SequenceTimes
from llmadapter.errors import ContextLengthError, InvalidRequestError
from llmadapter.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    new_id,
    now,
)
from llmadapter.request_context import add_work, current_id

log = logging.getLogger(__name__)

_GEN_REQUESTS = tuple(f.request_model for f in FORMATS.values())


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
        self._format = FORMATS[spec.inference_task](spec, tokenizer, model_name)
        self._template = ChatTemplate(tokenizer)
        self._window = _context_window(model, config)
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        eos_ids = _eos_ids(model, tokenizer)
        self.grammars = GrammarCompiler(tokenizer, self._vocab, eos_ids)
        self.scheduler = Scheduler(
            model,
            tokenizer,
            eos_ids=eos_ids,
            max_batch_size=config.max_batch_size,
            max_queue=max_queue,
            stats=self.stats,
            prefix_cache_bytes=config.prefix_cache_mb * 2**20,
        )
        if self.scheduler.prefix_cache_unsupported:
            log.info(
                "prefix caching is off for %s: its cache layers (sliding window or hybrid) cannot take a "
                "cached prefix",
                model_name,
            )

    @property
    def context_window(self) -> int:
        return self._window

    def close(self) -> None:
        self.scheduler.close()

    # -- preparation (all checks happen here, before any compute) ------------------------------

    def _prepare(self, req: BaseModel) -> Job:
        if not isinstance(req, _GEN_REQUESTS):
            raise InvalidRequestError(f"Expected a {self.spec.request_model.__name__}.", param=None)
        if not isinstance(req, self._format.request_model):
            raise InvalidRequestError(
                f"This model answers {self.spec.inference_task} requests.", param="messages"
            )
        params = req.to_generation(self.config)
        self._check_token_ids("logit_bias", params.logit_bias)
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        structure = self._format.structure(req, self.config)
        prompts, texts = self._format.prompts(req)
        what = self._format.prompt_param
        for prompt in prompts:
            self._check_token_ids(what, prompt)
        prompts, texts = self._truncate(req, params, prompts, texts)
        longest = max(len(p) for p in prompts)
        window = self._window
        if longest >= window:
            raise ContextLengthError(
                f"This model's maximum context length is {window} tokens, but your {what} "
                f"resulted in {longest} tokens. Please shorten the {what}.",
                param=what,
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
                param="n" if params.n > 1 else what,
            )
        job = Job(req, params, prompts, texts, new_id(self._format.id_prefix), now(), parser=structure.parser)
        job.cache_prefixes = self.scheduler.prefix_cache.enabled
        if structure.constraint is not None:
            job.grammar = self.grammars.compile(structure.constraint, structure.param)
        return job

    def _check_token_ids(self, param: str, ids: Iterable[int]) -> None:
        outside = [token_id for token_id in ids if not 0 <= token_id < self._vocab]
        if outside:
            raise InvalidRequestError(
                f"Invalid value for '{param}': token id {outside[0]} is outside the vocabulary "
                f"(0..{self._vocab - 1}).",
                param=param,
            )

    def _truncate(
        self, req: Any, params: GenerationParams, prompts: list[list[int]], texts: list[str]
    ) -> tuple[list[list[int]], list[str]]:
        """vLLM's truncate_prompt_tokens: keep each prompt's last k tokens (-1: as many as leave room
        for the completion); a cut prompt's text is its decoded tokens."""
        keep = req.truncate_prompt_tokens
        if keep is None:
            return prompts, texts
        if keep == -1:
            keep = max(1, self._window - (params.max_tokens if req.max_tokens_given() else 1))
        cut = [
            (p[-keep:], t if len(p) <= keep else self.decode(p[-keep:]))
            for p, t in zip(prompts, texts, strict=True)
        ]
        return [p for p, _ in cut], [t for _, t in cut]

    def decode(self, ids: list[int]) -> str:
        """Token ids as answer text (special tokens left out, as in every answer)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _sequences(self, job: Job, sink: Sink) -> list[Seq]:
        """The job's sequences (prompt x n), reporting to `sink`; the job is the current request's work."""
        arrival = add_work(self, job)
        request_id = current_id()
        for p_index, prompt in enumerate(job.prompts):
            limit = min(job.params.max_tokens, self._window - len(prompt))
            for j in range(job.params.n):
                choice = p_index * job.params.n + j
                job.seqs.append(
                    Seq(
                        prompt_ids=prompt,
                        params=job.params,
                        max_new_tokens=limit,
                        choice_index=choice,
                        sink=sink,
                        sampler=RowSampler.create(
                            job.params,
                            choice,
                            prompt_ids=prompt,
                            eos_ids=self.scheduler.eos_ids,
                            grammar=Matcher(job.grammar) if job.grammar is not None else None,
                        ),
                        decoder=IncrementalDecoder(self.tokenizer),
                        matcher=StopMatcher(job.params.stop, include=job.params.include_stop_str),
                        times=SequenceTimes(arrival),
                        request_id=request_id,
                    )
                )
        sink.expect(job.seqs)
        return job.seqs

    @contextmanager
    def _generating(self, seqs: list[Seq], sink: Sink) -> Iterator[None]:
        """Submit `seqs`; on the way out stop those not finished (an error, a cancelled caller, a closed
        stream)."""
        try:
            self.scheduler.submit(seqs)
            yield
        finally:
            if sink.unfinished:
                self.scheduler.cancel(seqs)

    def _answer(self, job: Job) -> BaseModel:
        job.raise_error()
        return self._format.response(job)

    # -- tokenizer routes (vLLM's /tokenize and /detokenize) -------------------------------------

    def tokenize(self, request: BaseModel) -> TokenizeResponse:
        if isinstance(request, TokenizeChatRequest):
            tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
            text = self._template.render(
                request.messages,
                generation_prompt=request.generation_prompt(),
                continue_final=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs,
                tools=tools,
            )
            ids = self._template.encode(text, add_special_tokens=request.add_special_tokens)
        elif isinstance(request, TokenizeCompletionRequest):
            ids = list(
                self.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
            )
        else:
            raise InvalidRequestError("Expected a tokenize request.", param=None)
        strs = (
            [str(s) for s in self.tokenizer.convert_ids_to_tokens(ids)] if request.return_token_strs else None
        )
        return TokenizeResponse(count=len(ids), max_model_len=self._window, tokens=ids, token_strs=strs)

    def detokenize(self, request: BaseModel) -> DetokenizeResponse:
        if not isinstance(request, DetokenizeRequest):
            raise InvalidRequestError("Expected a detokenize request.", param=None)
        self._check_token_ids("tokens", request.tokens)
        return DetokenizeResponse(prompt=str(self.tokenizer.decode(request.tokens)))

    # -- sync API (pyfunc) ---------------------------------------------------------------------

    def run(self, requests: Sequence[BaseModel]) -> list[BaseModel]:
        jobs = [self._prepare(r) for r in requests]  # every request is checked before any compute
        sink = ThreadSink(every_event=False)
        # One submission: the whole predict call starts as one batch (up to max_batch_size).
        with self._generating([seq for job in jobs for seq in self._sequences(job, sink)], sink):
            sink.wait()
        return [self._answer(job) for job in jobs]

    def stream(self, request: BaseModel, *, include_usage: bool | None = None) -> Iterator[BaseModel]:
        job = self._prepare(request)
        sink = ThreadSink(every_event=True)
        with self._generating(self._sequences(job, sink), sink):
            for event in sink.events():
                yield from self._format.stream_chunks(job, event)
        if include_usage if include_usage is not None else job.request.include_usage:
            yield self._format.usage_chunk(job)

    # -- async API (server) --------------------------------------------------------------------

    async def arun(self, request: BaseModel) -> BaseModel:
        job = self._prepare(request)
        sink = LoopSink(asyncio.get_running_loop(), every_event=False)
        with self._generating(self._sequences(job, sink), sink):
            await sink.wait()
        return self._answer(job)

    async def astream(self, request: BaseModel) -> AsyncIterator[BaseModel]:  # type: ignore[override]
        job = self._prepare(request)
        sink = LoopSink(asyncio.get_running_loop(), every_event=True)
        # Closing this generator (the client went away) leaves the block: generation stops.
        with self._generating(self._sequences(job, sink), sink):
            async for event in sink.events():
                for chunk in self._format.stream_chunks(job, event):
                    yield chunk
        if job.request.include_usage:
            yield self._format.usage_chunk(job)
