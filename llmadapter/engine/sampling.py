"""Per-row logits processing and token choice for a batch whose rows each have their own parameters.

Order, as vLLM's sampler: penalties, logit_bias and the min_tokens ban on the raw logits; then temperature;
then min_p, top_k and top_p on the scaled distribution; then the draw (or argmax when greedy).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from llmadapter.config import GenerationParams
from llmadapter.engine.grammar import Matcher, apply_masks


@dataclass
class RowSampler:
    """One sequence's sampling state: its params, its own generator, counts of generated tokens."""

    params: GenerationParams
    generator: torch.Generator | None
    counts: dict[int, int]
    # Tokens a repetition_penalty applies to: the prompt's and every generated one (vLLM's rule).
    seen: set[int] = field(default_factory=set)
    # Tokens that may not be drawn before min_tokens are generated: EOS and stop_token_ids.
    stop_ids: frozenset[int] = frozenset()
    generated: int = 0
    # Constrained decoding: only tokens that keep the output valid may be drawn (None: free).
    grammar: Matcher | None = None

    @classmethod
    def create(
        cls,
        params: GenerationParams,
        choice_index: int,
        *,
        prompt_ids: Iterable[int] = (),
        eos_ids: Iterable[int] = (),
        grammar: Matcher | None = None,
    ) -> RowSampler:
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            # A per-request generator: seeded runs are reproducible and never touch the global RNG.
            seed = params.seed + choice_index if params.seed is not None else secrets.randbits(63)
            # Seeds are signed 64-bit (protocol and config bound them); torch takes -2**63 .. 2**64 - 1.
            generator.manual_seed(seed)
        seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        stop_ids = frozenset((*eos_ids, *params.stop_token_ids)) if params.min_tokens else frozenset()
        # A grammar decides when the output may end: min_tokens' ban on stop tokens would leave a
        # complete value nothing to draw.
        if grammar is not None:
            stop_ids = frozenset()
        return cls(params, generator, {}, seen, stop_ids, grammar=grammar)

    def observe(self, token_id: int) -> None:
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        self.generated += 1
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token_id)


def _penalize(logits: torch.Tensor, rows: list[RowSampler]) -> None:
    """OpenAI's penalties on generated tokens (logit -= count*frequency + (count>0)*presence), vLLM's
    repetition_penalty on prompt and generated tokens (positive logits divided, negative multiplied),
    logit_bias, and the min_tokens ban on stop tokens."""
    device = logits.device
    for i, row in enumerate(rows):
        p = row.params
        if row.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(row.counts.keys()), dtype=torch.long, device=device)
            counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=device)
            logits[i, ids] -= counts * p.frequency_penalty + p.presence_penalty
        if row.seen:
            ids = torch.tensor(sorted(row.seen), dtype=torch.long, device=device)
            values = logits[i, ids]
            penalty = p.repetition_penalty
            logits[i, ids] = torch.where(values > 0, values / penalty, values * penalty)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=device)
        if row.stop_ids and row.generated < p.min_tokens:
            logits[i, torch.tensor(sorted(row.stop_ids), dtype=torch.long, device=device)] = float("-inf")


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    if min_p > 0.0:
        # Keep tokens at least min_p times as likely as the most likely one.
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always
        # stays, so top_p 0 (the spec's lower bound) keeps exactly that one.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def choose_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Pick the next token of every row. `logits` is [rows, vocab], float32, modified in place."""
    _penalize(logits, rows)
    apply_masks(logits, [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None])
    greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
    out: list[int] = [0] * len(rows)
    if greedy_rows:
        picked = torch.argmax(logits[greedy_rows], dim=-1).tolist()
        for i, tok in zip(greedy_rows, picked, strict=True):
            out[i] = int(tok)
    for i, row in enumerate(rows):
        if row.params.greedy:
            continue
        p = row.params
        scaled = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(scaled, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # Only non-finite logits get here (a model that overflowed in float16, say): multinomial would
            # raise and fail every sequence of the batch; the largest logit is the answer that is left.
            out[i] = int(torch.argmax(logits[i]))
            continue
        # Each row's generator lives on the CPU (seeded answers are the same on every device).
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=row.generator).item())
    return out
