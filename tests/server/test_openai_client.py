"""The real server, real tiny models, the official openai client (sync and async): what a user calls."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmadapter.engine.base import Engine
from llmadapter.server.app import build_app
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from tests.server.conftest import (
    CHAT_ID,
    COMPLETIONS_ID,
    EMBEDDINGS_ID,
    LONG_ID,
    RunningServer,
    serve,
    settings,
)

HELLO = [{"role": "user", "content": TRAINED_PROMPT}]


def _joined(chunks: list) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts


def test_models_are_listed_with_their_task(server: RunningServer) -> None:
    client = server.client()
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {CHAT_ID, COMPLETIONS_ID, EMBEDDINGS_ID, LONG_ID}
    assert listed[CHAT_ID].model_extra == {"task": "llm/v1/chat"}
    assert client.models.retrieve(EMBEDDINGS_ID).id == EMBEDDINGS_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_answers_the_trained_text_with_exact_usage(server: RunningServer, chat_engine: Engine) -> None:
    response = server.client().chat.completions.create(
        model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100
    )
    choice = response.choices[0]
    assert choice.message.content == TRAINED_ANSWER
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert response.model == CHAT_ID
    assert response.object == "chat.completion"
    tokenizer = chat_engine.tokenizer  # type: ignore[attr-defined]
    template = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tokenizer(template, add_special_tokens=False)["input_ids"])
    assert response.usage.completion_tokens == len(
        tokenizer(TRAINED_ANSWER, add_special_tokens=False)["input_ids"]
    )
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_length_limit_gives_finish_reason_length(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=5
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5
    assert TRAINED_ANSWER.startswith(response.choices[0].message.content or "")


def test_stream_joins_to_the_non_streamed_answer_with_usage_last(server: RunningServer) -> None:
    client = server.client()
    full = client.chat.completions.create(model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100)
    chunks = list(
        client.chat.completions.create(
            model=CHAT_ID,
            messages=HELLO,
            temperature=0,
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert _joined(chunks) == {0: full.choices[0].message.content}
    assert all(c.object == "chat.completion.chunk" and c.model == CHAT_ID for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    final = chunks[-1]
    assert final.choices == []
    assert final.usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["stop"]


def test_stream_without_include_usage_has_no_usage_chunk(server: RunningServer) -> None:
    chunks = list(
        server.client().chat.completions.create(
            model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100, stream=True
        )
    )
    assert _joined(chunks) == {0: TRAINED_ANSWER}
    assert all(c.usage is None and c.choices for c in chunks)


def test_raw_sse_lines_end_with_done(server: RunningServer) -> None:
    body = {"model": CHAT_ID, "messages": HELLO, "temperature": 0, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in lines[-2]
    # As OpenAI sends them: every choice carries finish_reason, null until it ends.
    choices = [json.loads(line.removeprefix("data: "))["choices"][0] for line in lines[:-1]]
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)


def test_streamed_logprobs_equal_the_whole_answers(server: RunningServer) -> None:
    """Every token's logprob arrives once, in order, with its text; none for text a stop string cut."""
    client = server.client()
    for extra in ({}, {"stop": ["lazy"]}):
        kwargs: dict[str, Any] = dict(
            model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=20, logprobs=True, top_logprobs=2
        )
        whole = client.chat.completions.create(**kwargs, **extra)
        expected = [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]  # type: ignore[union-attr]
        streamed = list(client.chat.completions.create(**kwargs, **extra, stream=True))
        got = [
            (t.token, t.logprob)
            for chunk in streamed
            for choice in chunk.choices
            if choice.logprobs and choice.logprobs.content
            for t in choice.logprobs.content
        ]
        assert got == expected, extra
        assert _joined(streamed) == {0: whole.choices[0].message.content}
    echo = dict(model=COMPLETIONS_ID, prompt="The quick", temperature=0, max_tokens=5, logprobs=1, echo=True)
    plain = client.completions.create(**echo)  # type: ignore[call-overload]
    offsets = [
        offset
        for chunk in client.completions.create(**echo, stream=True)  # type: ignore[call-overload]
        for choice in chunk.choices
        if choice.logprobs
        for offset in choice.logprobs.text_offset
    ]
    assert offsets == plain.choices[0].logprobs.text_offset


def test_n_choices_each_with_own_index(server: RunningServer) -> None:
    client = server.client()
    greedy = client.chat.completions.create(model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {TRAINED_ANSWER}
    chunks = list(
        client.chat.completions.create(
            model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100, n=3, stream=True
        )
    )
    assert _joined(chunks) == {0: TRAINED_ANSWER, 1: TRAINED_ANSWER, 2: TRAINED_ANSWER}


def test_seed_reproduces_sampled_answers_streamed_or_not(server: RunningServer) -> None:
    client = server.client()
    kwargs = {"model": CHAT_ID, "messages": [{"role": "user", "content": "Once"}], "max_tokens": 20}
    first = client.chat.completions.create(**kwargs, temperature=1.5, seed=1234, n=2)
    again = client.chat.completions.create(**kwargs, temperature=1.5, seed=1234, n=2)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    streamed = _joined(
        list(client.chat.completions.create(**kwargs, temperature=1.5, seed=1234, n=2, stream=True))
    )
    assert streamed == {c.index: c.message.content for c in first.choices}
    others = {
        client.chat.completions.create(**kwargs, temperature=1.5, seed=seed).choices[0].message.content
        for seed in range(5)
    }
    assert len(others) > 1, "different seeds should sample different answers"


def test_stop_cuts_before_the_stop_string_in_both_modes(server: RunningServer) -> None:
    client = server.client()
    cut = TRAINED_ANSWER.index("crème")
    response = client.chat.completions.create(
        model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100, stop=["crème", "never"]
    )
    assert response.choices[0].message.content == TRAINED_ANSWER[:cut]
    assert response.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100, stop="crème", stream=True
        )
    )
    assert _joined(chunks) == {0: TRAINED_ANSWER[:cut]}


def test_chat_logprobs_cover_the_answer(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(token.top_logprobs[0].logprob, token.logprob, abs_tol=1e-5)


def test_completions_with_echo_logprobs_and_several_prompts(server: RunningServer) -> None:
    client = server.client()
    response = client.completions.create(
        model=COMPLETIONS_ID, prompt="The quick brown", temperature=0, max_tokens=4, logprobs=2, echo=True
    )
    choice = response.choices[0]
    assert choice.text.startswith("The quick brown fox")
    assert choice.finish_reason == "length"
    # The echoed prompt's tokens first (the first one unscored), then the 4 generated ones.
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 3 + 4
    assert (choice.logprobs.top_logprobs or [])[0] is None
    assert all(len(top) == 2 for top in (choice.logprobs.top_logprobs or [])[1:])
    several = client.completions.create(
        model=COMPLETIONS_ID, prompt=["The quick brown", "Café"], temperature=0, max_tokens=3
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == " fox jumps over"[: len(several.choices[0].text)]
    streamed = list(
        client.completions.create(
            model=COMPLETIONS_ID,
            prompt="The quick brown",
            temperature=0,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    plain = client.completions.create(
        model=COMPLETIONS_ID, prompt="The quick brown", temperature=0, max_tokens=4
    )
    assert _joined(streamed) == {0: plain.choices[0].text}
    assert streamed[-1].choices == [] and streamed[-1].usage == plain.usage


def _decode(vector: list[float] | str) -> list[float]:
    if isinstance(vector, str):
        raw = base64.b64decode(vector)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(vector)


def test_embeddings_match_sentence_transformers(server: RunningServer, minilm_folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["Hello", "Hello, how are you?"]
    client = server.client()
    as_float = client.embeddings.create(model=EMBEDDINGS_ID, input=texts, encoding_format="float")
    # The openai client asks for base64 when no format is given and decodes it itself.
    as_default = client.embeddings.create(model=EMBEDDINGS_ID, input=texts)
    expected = SentenceTransformer(str(minilm_folder), device="cpu").encode(texts)
    assert [d.index for d in as_float.data] == [0, 1]
    for got_float, got_default, want in zip(as_float.data, as_default.data, expected, strict=True):
        assert len(got_float.embedding) == 384
        assert got_float.embedding == pytest.approx(list(map(float, want)), abs=1e-4)
        assert _decode(got_default.embedding) == pytest.approx(got_float.embedding, abs=1e-6)
    assert as_float.data[0].embedding != pytest.approx(as_float.data[1].embedding, abs=1e-3)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > 0
    short = client.embeddings.create(
        model=EMBEDDINGS_ID, input="Hello", dimensions=8, encoding_format="float"
    )
    assert len(short.data[0].embedding) == 8


def test_async_client_chat_stream_and_embeddings(server: RunningServer) -> None:
    async def main() -> None:
        async with server.aclient() as client:
            full = await client.chat.completions.create(
                model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100
            )
            stream = await client.chat.completions.create(
                model=CHAT_ID, messages=HELLO, temperature=0, max_tokens=100, stream=True
            )
            chunks = [chunk async for chunk in stream]
            vectors = await client.embeddings.create(
                model=EMBEDDINGS_ID, input="Hello", encoding_format="float"
            )
            assert full.choices[0].message.content == TRAINED_ANSWER
            assert _joined(chunks) == {0: TRAINED_ANSWER}
            assert len(vectors.data[0].embedding) == 384

    asyncio.run(main())


def test_64_concurrent_streams_equal_their_non_streamed_answers(server: RunningServer) -> None:
    prompts = ["Hello", "Once", "The quick", "Numbers:", "Café", "日本語", "foxes", "emoji"]
    requests = [
        {
            "model": CHAT_ID,
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "temperature": 0,
            "max_tokens": 8 + i % 24,
            **({"stop": ["fox"]} if i % 5 == 0 else {}),
        }
        for i in range(64)
    ]
    steps_before = server.metric("llmadapter_batch_size_gcount", model=CHAT_ID)

    async def main() -> tuple[list[str], list[str]]:
        async with server.aclient(timeout=120) as client:

            async def streamed(body: dict) -> str:
                stream = await client.chat.completions.create(**body, stream=True)
                return _joined([chunk async for chunk in stream]).get(0, "")

            async def whole(body: dict) -> str:
                return (await client.chat.completions.create(**body)).choices[0].message.content or ""

            streams = await asyncio.gather(*(streamed(body) for body in requests))
            answers = await asyncio.gather(*(whole(body) for body in requests))
            return streams, answers

    streams, answers = asyncio.run(main())
    assert streams == answers
    assert len(set(answers)) > 8  # different prompts and lengths really gave different answers
    # The engine generated them together: some forward steps carried more than one sequence.
    batched = server.metric("llmadapter_batch_size_bucket", model=CHAT_ID, le="1")
    steps = server.metric("llmadapter_batch_size_gcount", model=CHAT_ID)
    assert steps > steps_before
    assert steps - batched > 0, "no forward step had more than one sequence"


def test_requests_without_model_go_to_the_only_model_of_the_task(
    embedding_engine: Engine, chat_engine: Engine
) -> None:
    with serve(build_app({EMBEDDINGS_ID: embedding_engine, CHAT_ID: chat_engine}, settings())) as running:
        response = httpx.post(f"{running.base_url}/embeddings", json={"input": "Hello"}, timeout=30)
        assert response.status_code == 200
        assert response.json()["model"] == EMBEDDINGS_ID
        missing = httpx.post(f"{running.base_url}/completions", json={"prompt": "Hello"}, timeout=30)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


def test_long_and_short_requests_share_the_engine(server: RunningServer) -> None:
    # A short request is answered while a long one is still generating (continuous batching).
    async def main() -> None:
        async with server.aclient(timeout=120) as client:
            stream = await client.chat.completions.create(
                model=LONG_ID,
                messages=[{"role": "user", "content": "go"}],
                temperature=0,
                max_tokens=2000,
                stream=True,
                extra_body={"logit_bias": {"2": -100}},
            )
            first = await anext(aiter(stream))
            short = await client.chat.completions.create(
                model=LONG_ID, messages=HELLO, max_tokens=3, temperature=0
            )
            assert short.choices[0].finish_reason == "length"
            assert first.choices[0].delta.role == "assistant"
            # The short one finished while the long one is still being generated.
            assert server.metric("llmadapter_running", model=LONG_ID) == 1
            await stream.close()

    asyncio.run(main())


def test_a_shared_system_prompt_is_reported_as_cached_tokens(server: RunningServer) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens, whole and streamed, and vLLM's counters."""
    client = server.client()
    system = {"role": "system", "content": "Answer in one word, and mind the spelling. " * 6}
    hits_before = server.metric("vllm:prefix_cache_hits_total", model_name=CHAT_ID)

    def ask(user: str, **extra: Any) -> Any:
        messages = [system, {"role": "user", "content": user}]
        return client.chat.completions.create(
            model=CHAT_ID, messages=messages, temperature=0, max_tokens=8, **extra
        )

    first = ask("Hello there?")
    second = ask("Hello again?")
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 16 <= cached < second.usage.prompt_tokens
    chunks = list(ask("Hello again?", stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1  # all but the last
    assert _joined(chunks) == {0: second.choices[0].message.content}
    hits = server.metric("vllm:prefix_cache_hits_total", model_name=CHAT_ID) - hits_before
    assert hits >= cached + usage.prompt_tokens_details.cached_tokens
