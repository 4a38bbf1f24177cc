"""Prefix caching: a prompt that starts like an earlier one reuses its KV, and answers exactly as without."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmadapter.engine.generation import GenerationEngine
from llmadapter.engine.prefix_cache import BLOCK, PrefixCache
from llmadapter.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from tests.engine.conftest import make_engine

SYSTEM = "You are a careful assistant. " * 8  # about 150 tokens of the test tokenizer
USERS = ["What is the capital of France?", "Name a color.", "Count to five.", "Say hello.", "Why not?"]
NO_EOS = {"0": -100, "2": -100}  # every answer runs to max_tokens: more tokens compared


def _chat(user: str, **extra: Any) -> ChatCompletionRequest:
    body = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 16,
        "logit_bias": NO_EOS,
        **extra,
    }
    return parse_request(ChatCompletionRequest, body)


def _texts(answers: list[Any]) -> list[list[str | None]]:
    return [[c.message.content for c in a.choices] for a in answers]


# -- the cache itself ---------------------------------------------------------------------------


def _kv(tokens: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(2, tokens, 4), torch.randn(2, tokens, 4)) for _ in range(layers)]


def _bytes(tokens: int, layers: int = 2) -> int:
    return layers * 2 * 2 * tokens * 4 * 4  # layers x (k, v) x heads x tokens x dim x float32


def test_a_hit_is_the_longest_shared_prefix_and_leaves_the_last_token() -> None:
    cache = PrefixCache(10**6)
    prompt = list(range(40))
    layers = _kv(40)
    cache.store(prompt, layers)
    hit = cache.lookup([*range(35), 99, 98])  # shares 35 tokens: two full blocks, then 3 more
    assert hit is not None and hit.tokens == 35
    assert torch.equal(hit.layer(1)[0], layers[1][0][:, :35])
    same = cache.lookup(prompt)  # the whole prompt cached: its last token is still prefilled
    assert same is not None and same.tokens == 39
    assert cache.lookup([*range(BLOCK - 1), 7, 7]) is None  # less than one full block in common
    assert cache.lookup([5, *range(1, 40)]) is None  # differs at the first token
    assert cache.hit_tokens == 35 + 39 and cache.queried_tokens == 37 + 40 + 17 + 40


def test_least_recently_used_entries_leave_within_the_budget() -> None:
    cache = PrefixCache(3 * _bytes(32))
    prompts = [[i, *range(100, 131)] for i in range(4)]  # four prompts of 32 tokens, none a prefix
    for p in prompts[:3]:
        cache.store(p, _kv(32))
    assert cache.lookup(prompts[0]) is not None  # used: the second one is now the oldest
    cache.store(prompts[3], _kv(32))
    assert len(cache) == 3 and cache.bytes == 3 * _bytes(32)
    assert cache.lookup(prompts[1]) is None
    assert all(cache.lookup(p) is not None for p in (prompts[0], prompts[2], prompts[3]))
    cache.store(list(range(500)), _kv(500))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 3


def test_a_growing_prompt_replaces_the_entry_it_extends() -> None:
    cache = PrefixCache(10**6)
    turn1 = list(range(40))
    turn2 = [*turn1, *range(200, 230)]  # the next turn of the same chat
    cache.store(turn1, _kv(40))
    cache.store(turn2, _kv(70))
    assert len(cache) == 1 and cache.bytes == _bytes(70)
    hit = cache.lookup([*turn1, 1])
    assert hit is not None and hit.tokens == 40
    other = [*range(32), 999, 998]  # shares two blocks with both, then differs
    cache.store([*range(32), *range(300, 320)], _kv(52))
    hit = cache.lookup(other)
    assert hit is not None and hit.tokens == 32


def test_budget_zero_turns_it_off() -> None:
    cache = PrefixCache(0)
    cache.store(list(range(40)), _kv(40))
    assert not cache.enabled and len(cache) == 0 and cache.lookup(list(range(40))) is None


# -- in the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["trained_model", "tiny_llama"])
def engines(request: pytest.FixtureRequest) -> Iterator[tuple[GenerationEngine, GenerationEngine]]:
    folder: Path = request.getfixturevalue(request.param)
    on, off = make_engine(folder, temperature=0.0), make_engine(folder, temperature=0.0, prefix_cache_mb=0)
    yield on, off
    on.close()
    off.close()


def test_answers_with_the_cache_equal_those_without(
    engines: tuple[GenerationEngine, GenerationEngine],
) -> None:
    on, off = engines
    on.scheduler.prefix_cache.clear()
    without = [off.run([_chat(u)])[0] for u in USERS]
    one_by_one = [on.run([_chat(u)])[0] for u in USERS]
    together = on.run([_chat(u) for u in USERS])  # one prefill group: every row has a hit, of its own length
    assert _texts(one_by_one) == _texts(without) == _texts(together)
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in one_by_one]
    assert cached[0] == 0 and all(c >= len(SYSTEM) // 8 for c in cached[1:])  # the system prompt, reused
    assert all(
        a.usage.prompt_tokens == b.usage.prompt_tokens for a, b in zip(one_by_one, without, strict=True)
    )
    assert off.run([_chat(USERS[0])])[0].usage.prompt_tokens_details is None  # no cache, no field


def test_n_choices_share_one_prefill_and_equal_the_single_answer(
    engines: tuple[GenerationEngine, GenerationEngine],
) -> None:
    on, off = engines
    single = off.run([_chat(USERS[2])])[0].choices[0].message.content
    many = on.run([_chat(USERS[2], n=3)])[0]
    assert [c.message.content for c in many.choices] == [single] * 3
    assert many.usage.completion_tokens == 3 * 16


def test_prompt_logprobs_are_computed_in_full(engines: tuple[GenerationEngine, GenerationEngine]) -> None:
    on, off = engines
    on.run([_chat(USERS[3])])  # cached now
    scored = on.run([_chat(USERS[3], prompt_logprobs=1, max_tokens=2)])[0]
    reference = off.run([_chat(USERS[3], prompt_logprobs=1, max_tokens=2)])[0]
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    ours = [next(iter(p.values())).logprob for p in scored.prompt_logprobs if p]
    theirs = [next(iter(p.values())).logprob for p in reference.prompt_logprobs if p]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_requests_joining_a_running_batch_with_cached_prefixes(
    engines: tuple[GenerationEngine, GenerationEngine],
) -> None:
    """Continuous batching: requests arrive while others decode, some with hits, some cancelled."""
    on, off = engines
    on.scheduler.prefix_cache.clear()
    expected = _texts([off.run([_chat(u)])[0] for u in USERS])

    async def main() -> list[list[str | None]]:
        async def one(i: int) -> list[str | None]:
            await asyncio.sleep(0.02 * i)
            return [c.message.content for c in (await on.arun(_chat(USERS[i]))).choices]

        async def cancelled() -> None:
            stream = on.astream(_chat(USERS[0], max_tokens=60))
            async for _ in stream:
                break
            await stream.aclose()  # the client went away after its first chunk

        results = await asyncio.gather(*(one(i) for i in range(len(USERS))), cancelled())
        return list(results[: len(USERS)])  # type: ignore[arg-type]

    assert asyncio.run(main()) == expected
    assert _texts([on.run([_chat(USERS[0])])[0]]) == [expected[0]]  # and after the cancellation


def test_completions_prompts_hit_too(trained_model: Path) -> None:
    engine = make_engine(trained_model, "llm/v1/completions", temperature=0.0)
    try:
        prompt = "Once upon a time " * 10
        reqs = [
            parse_request(CompletionRequest, {"prompt": prompt + tail, "max_tokens": 8})
            for tail in ("a", "b")
        ]
        first, second = (engine.run([r])[0] for r in reqs)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens >= BLOCK
        stats = engine.stats
        assert stats.prefix_cache_hits == second.usage.prompt_tokens_details.cached_tokens
        assert stats.prefix_cache_queries == first.usage.prompt_tokens + second.usage.prompt_tokens
        assert 0 < stats.prefix_cache_bytes <= 256 * 2**20
    finally:
        engine.close()


def test_the_budget_bounds_the_memory(trained_model: Path) -> None:
    engine = make_engine(trained_model, temperature=0.0, prefix_cache_mb=1)
    try:
        for i in range(40):  # distinct prompts: each adds an entry until the oldest must go
            engine.run([_chat(f"{i} " * 20, max_tokens=1)])
        cache = engine.scheduler.prefix_cache
        assert 0 < cache.bytes <= 2**20 and len(cache) < 40
    finally:
        engine.close()
