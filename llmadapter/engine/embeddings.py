"""The llm/v1/embeddings engine: validated inputs, length-sorted batches, the model's own pooling.

Requests are checked before any compute (empty or non-text items, token ids outside the vocabulary,
too many inputs, over-long inputs when truncation is off, `dimensions` above the model's size). Inputs of
all requests answered together are sorted by token length and run in batches of up to `max_batch_size`
texts of similar length, so a request with many texts costs a few forward passes with little padding,
and concurrent async requests share them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from llmadapter.catalog import EMBEDDINGS, get_task
from llmadapter.config import EmbeddingsConfig
from llmadapter.engine.base import Engine, EngineStats, WorkerThread
from llmadapter.engine.embedding_inputs import check_inputs, count_inputs
from llmadapter.engine.pooling import (
    PoolingSpec,
    load_pooling,
    pool,
    read_pooling,
    save_pooling,
    transformer_dir,
)
from llmadapter.errors import ConfigError, ContextLengthError, InvalidRequestError, LLMAdapterError
from llmadapter.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

if TYPE_CHECKING:
    import torch
    import transformers

__all__ = [
    "EmbeddingEngine",
    "PoolingSpec",
    "load_pooling",
    "prepare_embedding_model",
    "read_pooling",
    "save_pooling",
]

# Tokenizers report "no limit" as a huge sentinel (int(1e30)); anything above this is not a real limit.
_NO_LIMIT = 1_000_000
# Padding (tokens) a batch always tolerates, so that short texts still batch together.
_PADDING_SLACK = 16
# Sequences a batch takes before it may close early to save padding.
_MIN_SPLIT_BATCH = 16


@dataclass
class _Prepared:
    """One validated request: the token ids fed to the model and how to shape its vectors."""

    ids: list[list[int]]
    dimensions: int | None
    encoding_format: str

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.ids)


class _Job:
    __slots__ = ("future", "request")

    def __init__(self, request: EmbeddingRequest) -> None:
        self.request = request
        self.future: Future[EmbeddingResponse] = Future()


class EmbeddingEngine(Engine):
    """A Transformers encoder answering llm/v1/embeddings with the model's own pooling."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        pooling: PoolingSpec,
        *,
        config: EmbeddingsConfig | None = None,
        model_name: str,
    ) -> None:
        if tokenizer is None:
            raise ConfigError("An embeddings model needs a tokenizer.", param="model")
        self.spec = get_task(EMBEDDINGS)
        self.model_name = model_name
        self.config = config or EmbeddingsConfig()
        self.pooling = pooling
        self.stats = EngineStats()
        self.model = model.eval()
        # A *ForCausalLM / *ForMaskedLM head would return logits; pooling needs the encoder's states.
        self._backbone = getattr(model, "base_model", model)
        self.tokenizer = tokenizer
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._vocab_size = len(tokenizer)
        self.max_seq_length = self._max_seq_length()

        hidden = getattr(model.config, "hidden_size", None)
        if hidden is None:
            hidden = model.get_input_embeddings().embedding_dim
        if pooling.embedding_dimension is not None and pooling.embedding_dimension != hidden:
            raise ConfigError(
                f"The pooling spec expects token states of size {pooling.embedding_dimension}, "
                f"the model gives {hidden}.",
                param="model",
            )
        self.embedding_size = int(hidden) * len(pooling.modes)
        if self.config.dimensions is not None and self.config.dimensions > self.embedding_size:
            raise ConfigError(
                f"model_config 'dimensions' is {self.config.dimensions}, larger than this model's "
                f"embedding size {self.embedding_size}.",
                param="dimensions",
            )

        # Fast tokenizers refuse concurrent calls that change truncation ("Already borrowed"), and
        # forward passes share two CPU cores better one at a time: one lock each.
        self._tokenize_lock = threading.Lock()
        self._forward_lock = threading.Lock()
        self._jobs: deque[_Job] = deque()
        self._jobs_ready = threading.Condition()
        self._worker = WorkerThread(self._serve, "embeddings-batcher")
        self._closed = False

    @classmethod
    def from_pipeline(
        cls,
        pipe: transformers.Pipeline,
        pooling: PoolingSpec,
        *,
        config: EmbeddingsConfig | None = None,
        model_name: str,
    ) -> EmbeddingEngine:
        return cls(pipe.model, pipe.tokenizer, pooling, config=config, model_name=model_name)

    def _max_seq_length(self) -> int:
        positions = getattr(self.model.config, "max_position_embeddings", None)
        table = positions if isinstance(positions, int) and positions > 0 else _NO_LIMIT
        if self.pooling.max_seq_length is not None:
            # Never past the position table: that would be an index error in the forward pass.
            return min(self.pooling.max_seq_length, table)
        # As sentence-transformers does: the tokenizer's limit, capped by the position table.
        limit = min(int(self.tokenizer.model_max_length or _NO_LIMIT), table)
        if limit >= _NO_LIMIT:
            raise ConfigError(
                "The model declares no maximum sequence length; set max_seq_length in its pooling spec.",
                param="model",
            )
        return limit

    @property
    def context_window(self) -> int:
        return self.max_seq_length

    # -----------------------------------------------------------------------------------------
    # Validation and tokenization
    # -----------------------------------------------------------------------------------------

    def _coerce(self, request: BaseModel | Mapping[str, Any]) -> EmbeddingRequest:
        if isinstance(request, EmbeddingRequest):
            return request
        if isinstance(request, Mapping):
            return self.parse(request)  # type: ignore[return-value]
        raise InvalidRequestError(
            f"Expected an embeddings request, got {type(request).__name__}.", param=None
        )

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.pooling.prompt:
            texts = [self.pooling.prompt + text for text in texts]
        if self.pooling.lowercase:
            texts = [text.lower() for text in texts]
        truncate = self.config.truncate
        with self._tokenize_lock:
            encoded = self.tokenizer(
                texts,
                add_special_tokens=True,
                truncation=truncate,
                max_length=self.max_seq_length if truncate else None,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )
        return [list(ids) for ids in encoded["input_ids"]]

    def _prepare(self, request: BaseModel | Mapping[str, Any]) -> _Prepared:
        """Validate one request and tokenize its inputs (no model compute)."""
        req = self._coerce(request)
        items = check_inputs(req.input, max_inputs=self.config.max_inputs, vocab_size=self._vocab_size)
        dimensions = req.dimensions if req.dimensions is not None else self.config.dimensions
        if dimensions is not None and dimensions > self.embedding_size:
            raise InvalidRequestError(
                f"'dimensions' is {dimensions}; this model's embeddings have {self.embedding_size}.",
                param="dimensions",
            )
        if isinstance(items[0], str):
            ids = self._tokenize([str(item) for item in items])
        else:
            ids = [list(item) for item in items if not isinstance(item, str)]  # fed as given
            if self.config.truncate:
                ids = [seq[: self.max_seq_length] for seq in ids]
        if not self.config.truncate:
            for i, seq in enumerate(ids):
                if len(seq) > self.max_seq_length:
                    raise ContextLengthError(
                        f"input[{i}] has {len(seq)} tokens; this model embeds at most "
                        f"{self.max_seq_length} tokens and truncation is off.",
                        param="input",
                    )
        return _Prepared(
            ids=ids,
            dimensions=dimensions,
            encoding_format=req.encoding_format or self.config.encoding_format,
        )

    # -----------------------------------------------------------------------------------------
    # Compute
    # -----------------------------------------------------------------------------------------

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of each forward pass: longest first, at most max_batch_size, little padding.

        Once a batch holds 16 sequences, it closes where the next one would need more padding than a
        fifth of the batch's longest sequence (16 tokens at least). On 256 mixed-length texts this pads
        14% extra tokens where fixed batches of 64 pad 59%; the 16 keeps the passes few, because on a
        busy CPU each pass also has a fixed cost (OpenMP synchronisation) of hundreds of tokens' work.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        min_split = min(_MIN_SPLIT_BATCH, self.config.max_batch_size)
        batches: list[list[int]] = []
        for i in order:
            batch = batches[-1] if batches else None
            if batch is not None and len(batch) < self.config.max_batch_size:
                longest = lengths[batch[0]]
                if len(batch) < min_split or longest - lengths[i] <= max(longest // 5, _PADDING_SLACK):
                    batch.append(i)
                    continue
            batches.append([i])
        return batches

    def embed_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Pooled vectors (float32, one row per sequence, input order) for token-id sequences."""
        import torch

        out = torch.empty((len(sequences), self.embedding_size), dtype=torch.float32)
        device = self.model.device
        with self._forward_lock, torch.inference_mode():
            for rows in self.plan_batches([len(seq) for seq in sequences]):
                width = len(sequences[rows[0]])
                input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    seq = sequences[i]
                    input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[r, : len(seq)] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                hidden = self._backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
                out[torch.tensor(rows)] = pool(hidden, mask, self.pooling).cpu()
                self.stats.record_batch(len(rows))
        return out

    def _respond(self, prepared: _Prepared, vectors: torch.Tensor) -> EmbeddingResponse:
        import torch

        if prepared.dimensions is not None:
            # OpenAI's `dimensions` gives unit vectors of that size (Matryoshka truncation).
            vectors = torch.nn.functional.normalize(vectors[:, : prepared.dimensions], p=2, dim=1)
        array = vectors.numpy().astype("<f4", copy=False)
        data: list[EmbeddingData] = []
        for i, row in enumerate(array):
            embedding: list[float] | str = (
                base64.b64encode(row.tobytes()).decode("ascii")
                if prepared.encoding_format == "base64"
                else row.tolist()
            )
            # Built without re-validation: thousands of floats per row, already the right type.
            data.append(EmbeddingData.model_construct(object="embedding", index=i, embedding=embedding))
        tokens = prepared.prompt_tokens
        self.stats.prompt_tokens += tokens
        return EmbeddingResponse(
            data=data,
            model=self.model_name,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    def _answer(self, prepared: Sequence[_Prepared]) -> list[EmbeddingResponse]:
        sequences = [ids for p in prepared for ids in p.ids]
        vectors = self.embed_ids(sequences)
        responses, start = [], 0
        for p in prepared:
            responses.append(self._respond(p, vectors[start : start + len(p.ids)]))
            start += len(p.ids)
        return responses

    def run(self, requests: Sequence[BaseModel | Mapping[str, Any]]) -> list[BaseModel]:
        """Answer several requests; all their inputs share length-sorted batches."""
        prepared = [self._prepare(r) for r in requests]  # every request is checked before any compute
        self.stats.running = len(prepared)
        try:
            return list(self._answer(prepared))
        finally:
            self.stats.running = 0

    # -----------------------------------------------------------------------------------------
    # Async: one worker thread merges whatever requests are waiting into one batch
    # -----------------------------------------------------------------------------------------

    async def arun(self, request: BaseModel) -> BaseModel:
        """Answer one request off the event loop; requests waiting together share forward passes."""
        job = _Job(self._coerce(request))
        with self._jobs_ready:
            if self._closed:
                raise LLMAdapterError("The embeddings engine is closed.")
            self._jobs.append(job)
            self.stats.queue_depth = len(self._jobs)
            self._worker.start_once()
            self._jobs_ready.notify()
        return await asyncio.wrap_future(job.future)

    def _take_jobs(self) -> list[_Job] | None:
        with self._jobs_ready:
            while not self._jobs and not self._closed:
                self._jobs_ready.wait()
            if not self._jobs:
                return None
            jobs: list[_Job] = []
            inputs = 0
            # Cap a merged pass at max_inputs so one round stays bounded; at least one job always goes.
            while self._jobs and (not jobs or inputs < self.config.max_inputs):
                job = self._jobs.popleft()
                jobs.append(job)
                inputs += count_inputs(job.request.input)
            self.stats.queue_depth = len(self._jobs)
            return jobs

    def _serve(self) -> None:
        while (jobs := self._take_jobs()) is not None:
            # Cancelled callers (client went away) are dropped before any work is done for them.
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            ready: list[tuple[_Job, _Prepared]] = []
            for job in live:
                try:
                    ready.append((job, self._prepare(job.request)))
                except LLMAdapterError as exc:  # one bad request fails alone
                    job.future.set_exception(exc)
            if not ready:
                continue
            self.stats.running = len(ready)
            try:
                responses = self._answer([p for _, p in ready])
            except Exception as exc:  # the worker outlives a failed pass; every waiting caller gets the error
                for job, _ in ready:
                    job.future.set_exception(exc)
            else:
                for (job, _), response in zip(ready, responses, strict=True):
                    job.future.set_result(response)
            finally:
                self.stats.running = 0

    def close(self) -> None:
        with self._jobs_ready:
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._jobs_ready.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(LLMAdapterError("The embeddings engine was closed."))
        self._worker.join()


# ---------------------------------------------------------------------------------------------
# What log_model accepts: a feature-extraction pipeline, a SentenceTransformer, or a local folder
# ---------------------------------------------------------------------------------------------


def prepare_embedding_model(obj: Any) -> tuple[transformers.Pipeline, PoolingSpec]:
    """A feature-extraction pipeline and the model's pooling, from whatever the user logs.

    obj: a `feature-extraction` pipeline (pooling read from its model's local folder when there is
    one, else mean), a `sentence_transformers.SentenceTransformer` (its Transformer, Pooling and
    Normalize modules), or a local model folder (sentence-transformers or plain Transformers).
    """
    import transformers

    if isinstance(obj, transformers.Pipeline):
        if not isinstance(obj, transformers.FeatureExtractionPipeline):
            raise ConfigError(
                f"llm/v1/embeddings needs a feature-extraction pipeline, got '{obj.task}'.", param="task"
            )
        source = Path(str(obj.model.name_or_path or ""))
        pooling = read_pooling(source) if str(source) and source.is_dir() else PoolingSpec()
        return obj, pooling
    if isinstance(obj, str | os.PathLike):
        folder = Path(obj)
        if not folder.is_dir():
            raise ConfigError(f"'{folder}' is not a local model folder.", param="model")
        pooling = read_pooling(folder)
        pipe = transformers.pipeline("feature-extraction", model=str(transformer_dir(folder)))
        return pipe, pooling
    if _is_sentence_transformer(obj):
        return _from_sentence_transformer(obj)
    raise ConfigError(
        "An embeddings model must be a feature-extraction pipeline, a SentenceTransformer or a local "
        f"folder, got {type(obj).__name__}.",
        param="model",
    )


def _is_sentence_transformer(obj: Any) -> bool:
    return any(
        cls.__name__ == "SentenceTransformer" and cls.__module__.startswith("sentence_transformers")
        for cls in type(obj).__mro__
    )


def _from_sentence_transformer(st: Any) -> tuple[transformers.Pipeline, PoolingSpec]:
    import transformers

    modules = list(st)
    if not modules or type(modules[0]).__name__ != "Transformer":
        raise ConfigError("The SentenceTransformer's first module must be a Transformer.", param="model")
    first = modules[0]
    fields: dict[str, Any] = {
        "source": "sentence-transformers",
        "max_seq_length": first.max_seq_length,
        "lowercase": bool(getattr(first, "do_lower_case", False)),
    }
    include_prompt = True
    for module in modules[1:]:
        kind = type(module).__name__
        if kind == "Pooling":
            mode = module.pooling_mode
            fields["modes"] = (mode,) if isinstance(mode, str) else tuple(mode)
            fields["embedding_dimension"] = module.embedding_dimension
            include_prompt = bool(getattr(module, "include_prompt", True))
        elif kind == "Normalize":
            fields["normalize"] = True
        else:
            raise ConfigError(
                f"The SentenceTransformer module {kind} is not supported (only Transformer, Pooling and "
                "Normalize); its vectors would not match the model's.",
                param="model",
            )
    name = getattr(st, "default_prompt_name", None)
    prompt = (getattr(st, "prompts", None) or {}).get(name, "") if name else ""
    if prompt and not include_prompt:
        raise ConfigError("Pooling that excludes the prompt tokens is not supported.", param="model")
    fields["prompt"] = prompt
    pipe = transformers.pipeline("feature-extraction", model=first.auto_model, tokenizer=first.tokenizer)
    return pipe, PoolingSpec.model_validate(fields)
