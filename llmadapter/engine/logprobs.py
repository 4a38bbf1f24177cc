"""Log probabilities of prompt tokens (vLLM's `prompt_logprobs`, completions' `echo` with `logprobs`),
scored from the prefill's logits at every prompt position."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmadapter.engine.stops import IncrementalDecoder


@dataclass(frozen=True)
class PromptToken:
    """One prompt token: its log probability given the tokens before it, its 1-based rank in that
    distribution, the most likely alternatives (best first) and where its text starts in the decoded
    prompt. The first token has no score (logprob and rank None), as in vLLM and OpenAI's echo."""

    token_id: int
    text: str
    logprob: float | None
    rank: int | None
    top: list[tuple[int, str, float]]  # (token id, text, logprob)
    offset: int


def score_prompt(
    logits: torch.Tensor, prompt_ids: list[int], k: int, tokenizer: Any, piece: Callable[[int], str]
) -> list[PromptToken]:
    """Every prompt token scored, from the model's outputs at the prompt's positions
    (`logits`: [len(prompt_ids), vocab]), with its k most likely alternatives."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_values, top_ids = torch.topk(logprobs, k, dim=-1) if k else (None, None)
    decoder = IncrementalDecoder(tokenizer)
    out = [PromptToken(prompt_ids[0], piece(prompt_ids[0]), None, None, [], 0)]
    offset = len(decoder.push(prompt_ids[0]))
    for i, token_id in enumerate(prompt_ids[1:]):
        top: list[tuple[int, str, float]] = []
        if top_ids is not None and top_values is not None:
            top = [(int(t), piece(int(t)), float(v)) for t, v in zip(top_ids[i], top_values[i], strict=True)]
        out.append(PromptToken(token_id, piece(token_id), float(chosen[i]), int(ranks[i]), top, offset))
        offset += len(decoder.push(token_id))
    return out
