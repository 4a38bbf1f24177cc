"""The engine interface shared by generation (chat, completions) and embeddings.

Requests and responses are the typed models of llmadapter.protocol. Sync methods serve pyfunc
`predict`/`predict_stream`; async methods serve the HTTP server and go through the engine's
scheduler, which batches concurrent requests together.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from llmadapter.catalog import TaskSpec
from llmadapter.errors import InvalidRequestError
from llmadapter.protocol import parse_request


@dataclass
class EngineStats:
    """Counters the server exposes on /metrics. Engines update them; readers only read."""

    queue_depth: int = 0
    running: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens whose KV the cache held
    prefix_cache_bytes: int = 0  # keys and values the prefix cache holds now
    batch_sizes: list[int] = field(default_factory=list)  # one entry per forward step, trimmed

    def record_batch(self, size: int) -> None:
        self.batch_sizes.append(size)
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]


class WorkerThread:
    """The daemon thread behind a request queue: started by the first request, joined at close."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._name = name
        self._thread: threading.Thread | None = None

    def start_once(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)


class Engine(ABC):
    """One loaded model answering one llm/v1 task."""

    spec: TaskSpec
    model_name: str
    stats: EngineStats
    # The MLflow LoggedModel id of the artifact ("" when unknown) and its registry version ("" when
    # unknown; set by whoever resolved it): labels of the engine's metrics and traces.
    model_id: str = ""
    model_version: str = ""
    # The weight format it serves with ({"dtype", "quantization", "device"}; llmadapter.engine.weights).
    weight_format: Mapping[str, str] | None = None

    @property
    def inference_task(self) -> str:
        return self.spec.inference_task

    def parse(self, raw: Mapping[str, Any], *, strict: bool = False) -> BaseModel:
        """Validate a raw OpenAI request body for this task (InvalidRequestError names the param)."""
        return parse_request(self.spec.request_model, raw, strict=strict)

    @property
    @abstractmethod
    def context_window(self) -> int:
        """Most tokens one sequence may hold (prompt + completion)."""

    @abstractmethod
    def run(self, requests: Sequence[BaseModel]) -> list[BaseModel]:
        """Answer several requests together (one batch where possible), each with its own params."""

    def stream(self, request: BaseModel, *, include_usage: bool | None = None) -> Iterator[BaseModel]:
        """Yield stream chunks for one request (a final usage chunk when include_usage, default: the
        request's stream_options)."""
        raise InvalidRequestError(f"{self.inference_task} does not support streaming.", param="stream")

    @abstractmethod
    async def arun(self, request: BaseModel) -> BaseModel:
        """Answer one request from async code; concurrent calls are batched by the scheduler."""

    def astream(self, request: BaseModel) -> AsyncIterator[BaseModel]:
        """Async stream of chunks; closing the iterator cancels the request's generation."""
        raise InvalidRequestError(f"{self.inference_task} does not support streaming.", param="stream")

    def tokenize(self, request: BaseModel) -> BaseModel:
        """vLLM's /tokenize: a TokenizeCompletionRequest or TokenizeChatRequest -> TokenizeResponse."""
        raise InvalidRequestError(
            f"The model '{self.model_name}' ({self.inference_task}) has no /tokenize; name a chat or "
            "completions model.",
            param="model",
        )

    def detokenize(self, request: BaseModel) -> BaseModel:
        """vLLM's /detokenize: a DetokenizeRequest -> DetokenizeResponse."""
        raise InvalidRequestError(
            f"The model '{self.model_name}' ({self.inference_task}) has no /detokenize; name a chat or "
            "completions model.",
            param="model",
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background workers."""
