"""Continuous batching: one thread owns the model and decodes every running sequence together.

Sequences join the running batch between decode steps (their prompts are prefilled as a group and
their KV cache is merged in, left-padded) and leave it the step they finish, so a short request never
waits for a long one and a new request never waits for the batch to drain.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmadapter.config import GenerationParams
from llmadapter.engine.base import EngineStats, WorkerThread
from llmadapter.engine.kv_cache import cache_layers, left_pad, mergeable, new_cache, returned_cache
from llmadapter.engine.logprobs import PromptToken, score_prompt
from llmadapter.engine.prefix_cache import Hit, PrefixCache
from llmadapter.engine.sampling import RowSampler, choose_tokens
from llmadapter.engine.stops import IncrementalDecoder, StopMatcher
from llmadapter.engine.timing import SequenceTimes
from llmadapter.engine.weights import model_device
from llmadapter.errors import GenerationError, LLMAdapterError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class TokenInfo:
    """One generated token with its log probability and the text offset where it starts."""

    text: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int


@dataclass
class Sequence:
    """One choice being generated: a prompt, its params and everything produced so far."""

    prompt_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    choice_index: int
    sink: Callable[[Sequence, str, bool], None]
    sampler: RowSampler
    decoder: IncrementalDecoder
    matcher: StopMatcher
    generated: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: LLMAdapterError | None = None
    cancelled: bool = False
    prompt_logprobs: list[PromptToken] | None = None  # when params.prompt_logprobs asks for them
    times: SequenceTimes = field(default_factory=SequenceTimes)
    request_id: str = "-"  # the server's X-Request-Id ("-": none), for the engine's own log lines
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def text(self) -> str:
        return self.matcher.final_text

    def emitted_tokens(self) -> list[TokenInfo]:
        """Tokens that start before the cut point (a stop string removes the tokens after it)."""
        end = len(self.text)
        return [t for t in self.tokens if t.offset < end or (t.offset == end and not t.text)]


class _Batch:
    """The running batch: left-padded KV cache, attention mask and the sequences in row order."""

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.last_tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Owns the model; a background thread admits, prefills and decodes sequences until closed."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_ids: set[int],
        max_batch_size: int,
        max_queue: int,
        stats: EngineStats,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        # Where the model's weights are (llmadapter.engine.weights put them there): inputs, masks and
        # the KV cache are made on it.
        self.device = model_device(model)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = stats
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0})
        )
        # transformers renamed `past_key_values` to `cache` (5.x); pass whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Cached prefixes are spliced into a fresh DynamicCache: only for models whose every layer is a
        # plain DynamicLayer (not sliding-window or hybrid layers, whose cache keeps only part).
        plain = mergeable(new_cache(model.config))
        self.prefix_cache = PrefixCache(prefix_cache_bytes if plain else 0)
        self.prefix_cache_unsupported = prefix_cache_bytes > 0 and not plain
        self._waiting: deque[Sequence] = deque()
        self._batch = _Batch()
        self._cv = threading.Condition()
        self._worker = WorkerThread(self._loop, "llmadapter-scheduler")
        self._closed = False

    # -- public -------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if self._closed:
                raise LLMAdapterError("The engine is shut down.")
            if len(self._waiting) + len(self._batch) + len(seqs) > self.max_queue:
                raise OverloadedError(
                    f"The server is busy: {len(self._waiting) + len(self._batch)} sequences queued or "
                    f"running (limit {self.max_queue}). Retry shortly."
                )
            now = time.perf_counter()
            for seq in seqs:
                seq.times.queued = now
            self._waiting.extend(seqs)
            self.stats.queue_depth = len(self._waiting)
            self._worker.start_once()
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        with self._cv:
            for seq in seqs:
                seq.cancelled = True
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join()
        self.prefix_cache.clear()

    # -- loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._batch.seqs:
                    self._cv.wait()
                if self._closed:
                    self._fail_all(LLMAdapterError("The engine shut down before the request finished."))
                    return
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    self._drop_finished()
                    if self._batch.seqs:
                        self._decode_step()
                        self._drop_finished()
            except Exception as exc:  # one failing step must not kill the worker for later requests
                failed = [*self._batch.seqs, *admitted]
                ids = ", ".join(sorted({seq.request_id for seq in failed}))
                log.exception("generation step failed (requests: %s)", ids)
                err = exc if isinstance(exc, LLMAdapterError) else GenerationError(exc)
                for seq in failed:
                    if seq.finish_reason is None:
                        self._finish(seq, None, err)
                self._batch = _Batch()
            self.stats.running = len(self._batch)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        if self._batch.seqs and self._batch.cache is not None and not mergeable(self._batch.cache):
            return admitted  # cache layout we cannot merge into: static batches only
        room = self.max_batch_size - len(self._batch)
        now = time.perf_counter()
        while self._waiting and room > 0:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, None, None)
                continue
            seq.times.scheduled = now
            admitted.append(seq)
            room -= 1
        self.stats.queue_depth = len(self._waiting)
        return admitted

    def _fail_all(self, err: LLMAdapterError) -> None:
        for seq in [*self._waiting, *self._batch.seqs]:
            if seq.finish_reason is None:
                self._finish(seq, None, err)
        self._waiting.clear()
        self._batch = _Batch()

    # -- model calls --------------------------------------------------------------------------

    def _prefill(self, seqs: list[Sequence]) -> None:
        # Scoring the prompt needs the logits of every prompt position, not only the last: only the
        # sequences that ask for it pay for them, in a group of their own.
        plain = [s for s in seqs if s.params.prompt_logprobs is None]
        scored = [s for s in seqs if s.params.prompt_logprobs is not None]
        for group, score in ((plain, False), (scored, True)):
            if group:
                self._prefill_group(group, score)

    def _prefill_group(self, seqs: list[Sequence], score: bool) -> None:
        """Prefill `seqs` as one left-padded batch. Each distinct prompt is computed once (n > 1 copies
        its rows) and, but when its prompt is scored, starts from the longest prefix the prefix cache
        holds: that prefix's KV goes in as the past, right-aligned so every row's prompt ends in the last
        column, and only the rest of the prompt is run. A row's mask may then have a hole (padding between
        its cached prefix and its suffix); position ids count only the row's own tokens."""
        rows: dict[tuple[int, ...], int] = {}
        row_of = [rows.setdefault(tuple(s.prompt_ids), len(rows)) for s in seqs]
        prompts = [list(key) for key in rows]
        cache_hits = [None if score else self.prefix_cache.lookup(p) for p in prompts]
        hits = [h.tokens if h is not None else 0 for h in cache_hits]
        past = max(hits)
        width = max(len(p) - h for p, h in zip(prompts, hits, strict=True))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), past + width), dtype=torch.long)
        positions = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, (prompt, hit) in enumerate(zip(prompts, hits, strict=True)):
            rest = len(prompt) - hit
            ids[row, width - rest :] = torch.tensor(prompt[hit:], dtype=torch.long)
            mask[row, past - hit : past] = 1
            mask[row, past + width - rest :] = 1
            positions[row, width - rest :] = torch.arange(hit, len(prompt))
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = new_cache(self.model.config)
        if past:
            self._splice_prefixes(cache, cache_hits, past)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if score else 1,
            **{self._cache_kw: cache},
        )
        self.stats.record_batch(len(prompts))
        self.stats.prompt_tokens += sum(len(s.prompt_ids) for s in seqs)
        cache = returned_cache(out)
        self._remember(prompts, cache, mask)
        for seq, row in zip(seqs, row_of, strict=True):
            seq.cached_tokens = hits[row]
        if score:
            for seq, row in zip(seqs, row_of, strict=True):
                k = seq.params.prompt_logprobs or 0
                logits_rows = out.logits[row, width - len(seq.prompt_ids) :]
                seq.prompt_logprobs = score_prompt(
                    logits_rows, seq.prompt_ids, k, self.tokenizer, self._piece
                )
        logits = out.logits[:, -1, :].float()
        if len(prompts) < len(seqs):  # copies for n > 1 (and for equal prompts sent together)
            index = torch.tensor(row_of, dtype=torch.long, device=self.device)
            for layer in cache_layers(cache):
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            logits, mask = logits[index], mask[index]
        self._merge(seqs, cache, mask)
        self._advance(seqs, logits, offset=len(self._batch.seqs) - len(seqs))

    def _splice_prefixes(self, cache: Any, hits: list[Hit | None], past: int) -> None:
        """Put each row's cached prefix into `cache` as its past: [rows, kv_heads, past, head_dim] per
        layer, zeros left of a shorter prefix (masked out)."""
        first = next(h for h in hits if h is not None)
        for i in range(len(first.entry.layers)):
            k0, v0 = first.entry.layers[i]
            keys = k0.new_zeros((len(hits), k0.shape[0], past, k0.shape[2]))
            values = v0.new_zeros((len(hits), v0.shape[0], past, v0.shape[2]))
            for row, hit in enumerate(hits):
                if hit is not None:
                    k, v = hit.layer(i)
                    keys[row, :, past - hit.tokens :] = k
                    values[row, :, past - hit.tokens :] = v
            cache.update(keys, values, i)

    def _remember(self, prompts: list[list[int]], cache: Any, mask: torch.Tensor) -> None:
        """Keep each prompt's KV (its own columns, padding left out) for later prompts that share it."""
        prefix_cache = self.prefix_cache
        if not prefix_cache.enabled:
            return
        layers = cache_layers(cache)
        for row, prompt in enumerate(prompts):
            if prefix_cache.covers(prompt):
                continue
            columns = mask[row].nonzero().squeeze(1)
            kv = [
                (layer.keys[row].index_select(1, columns), layer.values[row].index_select(1, columns))
                for layer in layers
            ]
            prefix_cache.store(prompt, kv)
        self.stats.prefix_cache_bytes = prefix_cache.bytes
        self.stats.prefix_cache_queries = prefix_cache.queried_tokens
        self.stats.prefix_cache_hits = prefix_cache.hit_tokens

    def _merge(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor) -> None:
        batch = self._batch
        if not batch.seqs:
            batch.cache, batch.mask = cache, mask
        else:
            assert batch.mask is not None
            old_len, new_len = batch.mask.shape[1], mask.shape[1]
            width = max(old_len, new_len)
            for old_layer, new_layer in zip(cache_layers(batch.cache), cache_layers(cache), strict=True):
                old_layer.keys = torch.cat(
                    [
                        left_pad(old_layer.keys, width - old_len, 2),
                        left_pad(new_layer.keys, width - new_len, 2),
                    ]
                )
                old_layer.values = torch.cat(
                    [
                        left_pad(old_layer.values, width - old_len, 2),
                        left_pad(new_layer.values, width - new_len, 2),
                    ]
                )
            batch.mask = torch.cat(
                [left_pad(batch.mask, width - old_len, 1), left_pad(mask, width - new_len, 1)]
            )
        batch.seqs.extend(seqs)
        batch.last_tokens.extend([self.pad_id] * len(seqs))

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch.mask is not None
        positions = batch.mask.sum(dim=1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        ids = torch.tensor(batch.last_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        out = self.model(
            input_ids=ids,
            attention_mask=batch.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: batch.cache},
        )
        self.stats.record_batch(len(batch))
        batch.cache = returned_cache(out)
        self._advance(batch.seqs, out.logits[:, -1, :].float(), offset=0)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, offset: int) -> None:
        """Choose and record the next token of each of `seqs` (rows offset.. of the batch)."""
        want_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs]
        logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
        tokens = choose_tokens(logits, [s.sampler for s in seqs])
        now = time.perf_counter()  # one stamp for the whole step, as every row's token is ready now
        for i, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            self._batch.last_tokens[offset + i] = tok
            info = None
            if logprobs is not None and i in want_logprobs:
                row = logprobs[want_logprobs.index(i)]
                top: list[tuple[str, float]] = []
                if seq.params.top_logprobs:
                    values, idx = torch.topk(row, seq.params.top_logprobs)
                    top = [(self._piece(int(t)), float(v)) for v, t in zip(values, idx, strict=True)]
                info = TokenInfo(self._piece(tok), float(row[tok]), top, len(seq.matcher.text))
            self._record(seq, tok, info, now)

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    # -- bookkeeping --------------------------------------------------------------------------

    def _record(self, seq: Sequence, tok: int, info: TokenInfo | None, now: float) -> None:
        if seq.finish_reason is not None:
            return
        if seq.cancelled:
            self._finish(seq, None, None)
            return
        p = seq.params
        if seq.max_new_tokens == 0:  # completions' max_tokens 0: the prefill only scored the prompt
            self._finish(seq, "length", None)
            return
        seq.times.token(now)
        grammar = seq.sampler.grammar
        if grammar is not None:
            grammar.accept(tok)
            if grammar.terminated:  # the value is complete and a stop token drawn: it ends here
                tail = seq.matcher.feed(seq.decoder.flush()) + seq.matcher.finish()
                self._finish(seq, "stop", None, tail)
                return
        if tok in self.eos_ids and not p.ignore_eos:
            self._finish(seq, "stop", None, seq.matcher.feed(seq.decoder.flush()) + seq.matcher.finish())
            return
        seq.generated.append(tok)
        seq.sampler.observe(tok)
        self.stats.completion_tokens += 1
        # vLLM: stop strings are looked for only in the text after the first min_tokens tokens, and a
        # stop token id counts as generated but shows in the text only with include_stop_str_in_output.
        searchable = len(seq.generated) > p.min_tokens
        stop_token = tok in p.stop_token_ids
        if info is not None and (p.include_stop_str or not stop_token):
            seq.tokens.append(info)
        if stop_token:
            text = seq.decoder.push(tok) if p.include_stop_str else ""
            out = seq.matcher.feed(text + seq.decoder.flush(), searchable=searchable)
            self._finish(seq, "stop", None, out + seq.matcher.finish())
            return
        out = seq.matcher.feed(seq.decoder.push(tok), searchable=searchable)
        if seq.matcher.stopped_at is not None:
            self._finish(seq, "stop", None, out)
        elif len(seq.generated) >= seq.max_new_tokens:
            out += seq.matcher.feed(seq.decoder.flush(), searchable=searchable)
            reason = "stop" if seq.matcher.stopped_at is not None else "length"
            self._finish(seq, reason, None, out + seq.matcher.finish())
        elif out or info is not None:
            seq.sink(seq, out, False)

    def _finish(
        self, seq: Sequence, reason: str | None, error: LLMAdapterError | None, out: str = ""
    ) -> None:
        seq.times.finished = time.perf_counter()  # before the reason: a reader that sees one sees both
        seq.finish_reason = reason or ("error" if error else "cancelled")
        seq.error = error
        seq.sink(seq, out, True)

    def _drop_finished(self) -> None:
        batch = self._batch
        keep = [i for i, s in enumerate(batch.seqs) if s.finish_reason is None and not s.cancelled]
        for seq in batch.seqs:
            if seq.cancelled and seq.finish_reason is None:
                self._finish(seq, None, None)
        if len(keep) == len(batch.seqs):
            return
        if not keep:
            self._batch = _Batch()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert batch.mask is not None
        mask = batch.mask[index]
        # Columns that are padding for every remaining row are dead weight in every later step.
        first = int((mask.sum(dim=0) > 0).nonzero()[0])
        for layer in cache_layers(batch.cache):
            layer.keys = layer.keys[index, :, first:, :]
            layer.values = layer.values[index, :, first:, :]
        batch.mask = mask[:, first:]
        batch.seqs = [batch.seqs[i] for i in keep]
        batch.last_tokens = [batch.last_tokens[i] for i in keep]
