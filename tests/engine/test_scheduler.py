"""Continuous batching: sequences that join and leave a running batch get their solo answers."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

from llmadapter.catalog import get_task
from llmadapter.config import ModelConfig
from llmadapter.engine.generation import GenerationEngine
from llmadapter.errors import GenerationError, InvalidRequestError, OverloadedError
from llmadapter.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from llmadapter.server.errors import to_error_answer


def _engine(folder: Path, task: str = "llm/v1/completions", **config: object) -> GenerationEngine:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return GenerationEngine(
        model, tokenizer, spec=get_task(task), config=ModelConfig(temperature=0, **config), model_name="t"
    )


def _wait_idle(engine: GenerationEngine) -> None:
    """The scheduler updates its gauges at the end of the step that finished the last sequence."""
    deadline = time.monotonic() + 5
    while engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)


PROMPTS = ["a", "Once upon a time", "The fox and the dog went to the café", "1 2 3", "🙂 emoji"]


# <|endoftext|> and <|im_end|> of the test tokenizer: every request runs to its max_tokens.
NO_EOS = {"0": -100, "2": -100}


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_staggered_arrivals_equal_solo_answers(arch: str, request: pytest.FixtureRequest) -> None:
    engine = _engine(request.getfixturevalue(arch))
    try:
        # Each request joins once the one before it is generating; later ones are shorter, so they also
        # leave while earlier ones still run.
        reqs = [
            parse_request(CompletionRequest, {"prompt": p, "max_tokens": 120 - 20 * i, "logit_bias": NO_EOS})
            for i, p in enumerate(PROMPTS)
        ]
        solo = [engine.run([r])[0].choices[0].text for r in reqs]  # type: ignore[attr-defined]

        async def staggered() -> list[str]:
            generating = [asyncio.Event() for _ in reqs]

            async def one(i: int) -> str:
                if i:
                    await generating[i - 1].wait()
                parts = []
                async for chunk in engine.astream(reqs[i]):
                    generating[i].set()
                    parts += [choice.text for choice in chunk.choices]  # type: ignore[attr-defined]
                return "".join(parts)

            return list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))

        assert asyncio.run(staggered()) == solo
        # The batch really ran with several sequences at once.
        assert max(engine.stats.batch_sizes) > 1
        _wait_idle(engine)
        assert engine.stats.running == 0
    finally:
        engine.close()


def test_cancelled_stream_leaves_the_batch(tiny_gpt2: Path) -> None:
    engine = _engine(tiny_gpt2, max_tokens=200)
    try:
        long = parse_request(CompletionRequest, {"prompt": "x", "max_tokens": 200, "stream": True})
        short = parse_request(CompletionRequest, {"prompt": "y", "max_tokens": 3})

        async def scenario() -> str:
            stream = engine.astream(long)
            first = await stream.__anext__()
            assert first.choices  # type: ignore[attr-defined]
            await stream.aclose()  # the client went away
            response = await engine.arun(short)
            return response.choices[0].finish_reason  # type: ignore[attr-defined]

        assert asyncio.run(scenario()) == "length"
        _wait_idle(engine)
        assert engine.stats.running == 0
        # The cancelled sequence stopped early: far fewer than 200 tokens were generated for it.
        assert engine.stats.completion_tokens < 100
    finally:
        engine.close()


def test_queue_limit_refuses_with_overloaded(tiny_gpt2: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    engine = GenerationEngine(
        model,
        tokenizer,
        spec=get_task("llm/v1/completions"),
        config=ModelConfig(temperature=0),
        model_name="t",
        max_queue=2,
    )
    try:
        # Never admissible: a 400 naming `n`, not a 429 that a client would retry forever.
        with pytest.raises(InvalidRequestError) as too_big:
            engine.run([parse_request(CompletionRequest, {"prompt": "x", "n": 3, "max_tokens": 2})])
        assert (too_big.value.status_code, too_big.value.param) == (400, "n")
        # Each request fits, but not all of them at once: overloaded, retry later.
        pair = parse_request(CompletionRequest, {"prompt": "x", "n": 2, "max_tokens": 2})
        with pytest.raises(OverloadedError) as err:
            engine.run([pair, pair])
        assert err.value.status_code == 429
        # Nothing was left behind: a request that fits still runs.
        out = engine.run([parse_request(CompletionRequest, {"prompt": "x", "max_tokens": 2})])
        assert out[0].usage.completion_tokens <= 2  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_a_failing_step_fails_its_requests_and_the_worker_lives_on(tiny_gpt2: Path) -> None:
    engine = _engine(tiny_gpt2, task="llm/v1/chat")
    req = parse_request(
        ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    original = engine.model.forward
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(*args: object, **kwargs: object) -> object:
        with lock:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
        return original(*args, **kwargs)

    engine.model.forward = flaky  # type: ignore[method-assign]
    try:
        # Library callers (predict, validation reports) see the cause; HTTP answers only a log ref.
        with pytest.raises(GenerationError, match="Generation failed: RuntimeError: boom") as failed:
            engine.run([req])
        answer = to_error_answer(failed.value)
        assert answer.status_code == 500 and answer.body.error.code == "generation_failed"
        assert "boom" not in answer.body.error.message and "ref " in answer.body.error.message
        answer = engine.run([req])[0]
        assert answer.choices[0].finish_reason in {"stop", "length"}  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_the_kv_cache_grows_in_place_between_steps(tiny_llama: Path) -> None:
    """A decode step writes its token into room the layer already has, instead of copying the cache."""
    from llmadapter.engine.kv_cache import new_cache

    config = transformers.AutoConfig.from_pretrained(tiny_llama)
    cache = new_cache(config)
    layer = cache.layers[0]
    prompt = torch.randn(2, 4, 30, 16)
    keys, _ = cache.update(prompt, prompt.clone(), 0)
    assert torch.equal(keys, prompt) and cache.get_seq_length() == 30
    buffer = layer._k.data_ptr()
    for step in range(16):  # within the room left after the prompt
        token = torch.full((2, 4, 1, 16), float(step))
        keys, values = cache.update(token, token, 0)
        assert layer._k.data_ptr() == buffer
    assert keys.shape == (2, 4, 46, 16) and torch.equal(keys[:, :, 30:], values[:, :, 30:])
    assert torch.equal(keys[:, :, :30], prompt) and keys[0, 0, -1, 0] == 15.0
    layer.keys, layer.values = keys[:1], values[:1]  # the scheduler drops a finished row
    keys, _ = cache.update(torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16), 0)
    assert keys.shape == (1, 4, 47, 16) and cache.get_seq_length() == 47
