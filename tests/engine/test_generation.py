"""GenerationEngine on real tiny models: prompts, limits, usage, parameters, streaming and batching."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import transformers

from llmadapter.catalog import CHAT
from llmadapter.engine.generation import GenerationEngine
from llmadapter.errors import ContextLengthError, InvalidRequestError, LLMAdapterError
from llmadapter.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
)
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from tests.engine.conftest import make_engine

HELLO = [{"role": "user", "content": TRAINED_PROMPT}]


def run(engine: GenerationEngine, **body: Any) -> Any:
    if engine.inference_task == CHAT:
        body.setdefault("messages", HELLO)
    (response,) = engine.run([engine.parse(body)])
    return response


def template_ids(engine: GenerationEngine, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    ids = out["input_ids"] if isinstance(out, dict | transformers.BatchEncoding) else out
    return list(ids)


# --- answers, finish reasons, usage ----------------------------------------------------------------


def test_greedy_chat_answer_and_exact_usage(chat: GenerationEngine) -> None:
    response = run(chat, max_tokens=100)
    assert isinstance(response, ChatCompletionResponse)
    choice = response.choices[0]
    assert choice.message.content == TRAINED_ANSWER
    assert choice.finish_reason == "stop"
    assert response.usage.prompt_tokens == len(template_ids(chat, HELLO))
    completion = len(chat.tokenizer(TRAINED_ANSWER, add_special_tokens=False)["input_ids"])
    assert response.usage.completion_tokens == completion
    assert response.usage.total_tokens == response.usage.prompt_tokens + completion
    assert response.model == chat.model_name
    assert response.id.startswith("chatcmpl-")


def test_length_limit_gives_finish_reason_length(chat: GenerationEngine) -> None:
    response = run(chat, max_tokens=4)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 4
    assert TRAINED_ANSWER.startswith(response.choices[0].message.content)


def test_max_completion_tokens_limits_like_max_tokens(chat: GenerationEngine) -> None:
    response = run(chat, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_model_config_max_tokens_is_the_default_limit(trained_model: Path) -> None:
    engine = make_engine(trained_model, temperature=0.0, max_tokens=5)
    try:
        assert run(engine).usage.completion_tokens == 5
        assert run(engine, max_tokens=7).usage.completion_tokens == 7
    finally:
        engine.close()


def test_bos_template_prompt_has_exactly_one_bos(bos: GenerationEngine) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    expected = template_ids(bos, messages)
    bos_id = bos.tokenizer.bos_token_id
    assert expected.count(bos_id) == 1 and expected[0] == bos_id
    # The trap: the tokenizer adds BOS on encode, and the template wrote one already.
    text = bos.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert bos.tokenizer(text)["input_ids"][:2] == [bos_id, bos_id]
    response = run(bos, messages=messages, max_tokens=3)
    assert response.usage.prompt_tokens == len(expected)
    assert response.usage.completion_tokens == 3
    assert response.choices[0].finish_reason == "length"


def test_no_chat_template_refuses_chat_requests(no_template_model: Path) -> None:
    engine = make_engine(no_template_model)
    try:
        with pytest.raises(InvalidRequestError) as info:
            run(engine)
        assert info.value.param == "messages"
    finally:
        engine.close()


def test_wrong_request_kind_is_refused(chat: GenerationEngine, completions: GenerationEngine) -> None:
    from llmadapter.protocol import ChatCompletionRequest, CompletionRequest, parse_request

    with pytest.raises(InvalidRequestError):
        chat.run([parse_request(CompletionRequest, {"prompt": "Hi"})])
    with pytest.raises(InvalidRequestError):
        completions.run([parse_request(ChatCompletionRequest, {"messages": HELLO})])


# --- context window: refused before any compute, with both numbers --------------------------------


def test_prompt_longer_than_the_window_is_refused_with_numbers(chat: GenerationEngine) -> None:
    before = chat.stats.prompt_tokens
    long = " ".join(["fox"] * 400)
    with pytest.raises(ContextLengthError) as info:
        run(chat, messages=[{"role": "user", "content": long}])
    err = info.value
    assert err.param == "messages"
    assert err.code == "context_length_exceeded"
    prompt_len = len(template_ids(chat, [{"role": "user", "content": long}]))
    assert str(chat.context_window) in err.message and str(prompt_len) in err.message
    assert chat.stats.prompt_tokens == before  # nothing was prefilled


def test_prompt_plus_max_tokens_over_the_window_is_refused_with_numbers(chat: GenerationEngine) -> None:
    prompt_len = len(template_ids(chat, HELLO))
    limit = chat.context_window - prompt_len
    with pytest.raises(ContextLengthError) as info:
        run(chat, max_tokens=limit + 1)
    err = info.value
    assert err.param == "max_tokens"
    for number in (chat.context_window, prompt_len, limit + 1, chat.context_window + 1):
        assert str(number) in err.message
    assert run(chat, max_tokens=limit).choices[0].finish_reason == "stop"  # exactly fits: allowed


def test_without_max_tokens_generation_stops_at_the_window(tiny_gpt2: Path) -> None:
    engine = make_engine(tiny_gpt2, temperature=0.0, max_tokens=1000, context_window=40)
    try:
        prompt_len = len(template_ids(engine, HELLO))
        response = run(engine, logit_bias={str(engine.tokenizer.eos_token_id): -100})
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == 40 - prompt_len
        assert response.usage.total_tokens == 40
    finally:
        engine.close()


def test_completions_prompt_context_check_names_prompt(completions: GenerationEngine) -> None:
    with pytest.raises(ContextLengthError) as info:
        run(completions, prompt="fox " * 400)
    assert info.value.param == "prompt"


def test_empty_completions_prompt_is_refused(completions: GenerationEngine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        run(completions, prompt="")
    assert info.value.param == "prompt"


# --- parameters -----------------------------------------------------------------------------------


def test_seed_reproduces_and_different_seeds_differ(sampled: GenerationEngine) -> None:
    def text(seed: int) -> str:
        return str(run(sampled, seed=seed, max_tokens=12).choices[0].message.content)

    assert text(1) == text(1)
    assert len({text(s) for s in (1, 2, 3)}) == 3


def test_unseeded_sampling_differs_between_calls(sampled: GenerationEngine) -> None:
    texts = {run(sampled, max_tokens=12).choices[0].message.content for _ in range(3)}
    assert len(texts) > 1


def test_n_choices_each_with_own_index_and_usage_sum(sampled: GenerationEngine) -> None:
    response = run(sampled, n=3, seed=5, max_tokens=6)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) == 3
    assert response.usage.completion_tokens == 18
    assert response.usage.prompt_tokens == len(template_ids(sampled, HELLO))  # counted once, as OpenAI does


def test_greedy_n_choices_are_identical(chat: GenerationEngine) -> None:
    response = run(chat, n=2, max_tokens=5)
    assert response.choices[0].message.content == response.choices[1].message.content


def test_chat_logprobs_shapes(chat: GenerationEngine) -> None:
    response = run(chat, max_tokens=5, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0.0
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the best one
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert token.bytes == list(token.token.encode())
    assert run(chat, max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_end_at_a_stop_string(chat: GenerationEngine) -> None:
    response = run(chat, max_tokens=50, logprobs=True, stop=["lazy"])
    text = response.choices[0].message.content
    assert text == "The quick brown fox jumps over the "
    tokens = [t.token for t in response.choices[0].logprobs.content]
    # The last token is the one the cut goes through (" lazy" starts with the kept space); no token
    # that lies wholly in the stop string or after it is reported.
    assert "".join(tokens).startswith(text)
    assert len("".join(tokens[:-1])) < len(text)


def test_completions_echo_and_logprobs(completions: GenerationEngine) -> None:
    prompt = "The quick brown"
    response = run(completions, prompt=prompt, max_tokens=4, echo=True, logprobs=2)
    assert isinstance(response, CompletionResponse)
    choice = response.choices[0]
    assert choice.text.startswith(prompt)
    generated = choice.text[len(prompt) :]
    assert generated == run(completions, prompt=prompt, max_tokens=4).choices[0].text
    assert generated.startswith(" fox")
    logprobs = choice.logprobs
    prompt_ids = completions.tokenizer(prompt)["input_ids"]
    # The echoed prompt's tokens come first (the first one unscored, as in OpenAI's echo), then the 4
    # generated ones, whose offsets count the echoed prompt.
    n = len(prompt_ids) + 4
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[: len(prompt_ids)] == [
        prompt.find(t) for t in logprobs.tokens[: len(prompt_ids)]
    ]
    assert logprobs.text_offset[len(prompt_ids)] == len(prompt)
    assert "".join(logprobs.tokens) == prompt + generated
    assert response.usage.prompt_tokens == len(prompt_ids)


def test_completions_several_prompts_and_n(completions: GenerationEngine) -> None:
    response = run(completions, prompt=["The quick", "Café"], n=2, max_tokens=3)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    one = run(completions, prompt="The quick", max_tokens=3).choices[0].text
    two = run(completions, prompt="Café", max_tokens=3).choices[0].text
    assert [c.text for c in response.choices] == [one, one, two, two]
    tokens = len(completions.tokenizer("The quick")["input_ids"]) + len(
        completions.tokenizer("Café")["input_ids"]
    )
    assert response.usage.prompt_tokens == tokens


def test_penalties_change_the_greedy_answer(sampled: GenerationEngine) -> None:
    def tokens(**body: Any) -> list[int]:
        text = run(sampled, temperature=0, max_tokens=30, **body).choices[0].message.content
        return list(sampled.tokenizer(text, add_special_tokens=False)["input_ids"])

    plain = tokens()
    assert len(set(plain)) < len(plain)  # the untrained model repeats itself greedily
    for field in ("presence_penalty", "frequency_penalty"):
        penalised = tokens(**{field: 2.0})
        assert penalised != plain, field
        # Penalties push away from repetition: fewer repeated tokens than without.
        assert len(penalised) - len(set(penalised)) < len(plain) - len(set(plain)), field
    encouraged = tokens(frequency_penalty=-2.0)
    assert len(encouraged) - len(set(encouraged)) >= len(plain) - len(set(plain))


def test_logit_bias_forces_a_token(chat: GenerationEngine) -> None:
    token_id = chat.tokenizer.convert_tokens_to_ids("Ġfox")
    response = run(chat, max_tokens=3, logit_bias={str(token_id): 100})
    assert response.choices[0].message.content == " fox fox fox"


def test_logit_bias_outside_the_vocabulary_is_refused(chat: GenerationEngine) -> None:
    vocab = chat.model.get_output_embeddings().weight.shape[0]
    for bad in (vocab, -1):
        with pytest.raises(InvalidRequestError) as info:
            run(chat, logit_bias={str(bad): 5})
        assert info.value.param == "logit_bias"
        assert str(vocab - 1) in info.value.message


def test_top_k_one_and_tiny_top_p_equal_greedy(sampled: GenerationEngine) -> None:
    greedy = run(sampled, temperature=0, max_tokens=10).choices[0].message.content
    assert run(sampled, top_k=1, max_tokens=10).choices[0].message.content == greedy
    assert run(sampled, top_p=1e-6, max_tokens=10).choices[0].message.content == greedy


def test_tools_are_rendered_by_the_template_or_the_generic_prompt(
    chat: GenerationEngine, bos: GenerationEngine
) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hello there"}]
    with_tools = run(bos, messages=messages, tools=tools, max_tokens=1)
    expected = template_ids(bos, messages, tools=tools)
    assert with_tools.usage.prompt_tokens == len(expected) > len(template_ids(bos, messages))
    # A template without tools gets them in a system message (llama.cpp's generic format).
    generic = run(chat, messages=messages, tools=tools, max_tokens=1)
    assert generic.usage.prompt_tokens > len(template_ids(chat, messages)) + 20
    # tool_choice "none" renders no tools.
    none = run(chat, messages=messages, tools=tools, tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens == len(template_ids(chat, messages))


# --- streaming ------------------------------------------------------------------------------------


def test_stream_joins_to_the_answer_with_usage_last(chat: GenerationEngine) -> None:
    request = chat.parse({"messages": HELLO, "max_tokens": 100})
    chunks = list(chat.stream(request, include_usage=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TRAINED_ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # really incremental
    assert chunks[-1].choices == []
    assert chunks[-1].usage == run(chat, max_tokens=100).usage
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    no_usage = list(chat.stream(request, include_usage=False))
    assert all(c.usage is None for c in no_usage)


def test_stream_with_n_and_length(sampled: GenerationEngine) -> None:
    request = sampled.parse({"messages": HELLO, "max_tokens": 5, "n": 2, "seed": 9})
    chunks = list(sampled.stream(request, include_usage=True))
    whole = sampled.run([request])[0]
    for index in (0, 1):
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(p.delta.content or "" for p in parts) == whole.choices[index].message.content
        assert parts[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_stream_with_echo(completions: GenerationEngine) -> None:
    request = completions.parse({"prompt": "The quick", "max_tokens": 6, "echo": True})
    chunks = list(completions.stream(request, include_usage=True))
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == completions.run([request])[0].choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


# --- batching and async ---------------------------------------------------------------------------

QUESTIONS = [
    "Hi",
    "Hello",
    "What is a fox?",
    "Café crème, naïve façade: 日本語 " * 3,
    "1 2 3 4 5 6 7 8 9 10",
    "🙂",
]


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_batch_larger_than_max_batch_size_equals_solo_answers(
    arch: str, request: pytest.FixtureRequest
) -> None:
    """Sequences join a running batch as others leave (merged left-padded cache): answers stay the same."""
    engine = make_engine(request.getfixturevalue(arch), temperature=0.0, max_batch_size=3)
    try:
        bodies = [
            {"messages": [{"role": "user", "content": q}], "max_tokens": 3 + 4 * i, "logit_bias": {"2": -100}}
            for i, q in enumerate(QUESTIONS * 2)
        ]
        solo = [run(engine, **b).choices[0].message.content for b in bodies]
        together = engine.run([engine.parse(b) for b in bodies])
        assert [r.choices[0].message.content for r in together] == solo
        assert [r.usage.completion_tokens for r in together] == [b["max_tokens"] for b in bodies]
        assert max(engine.stats.batch_sizes) == 3
    finally:
        engine.close()


def test_concurrent_async_requests_equal_sync_answers(chat: GenerationEngine) -> None:
    bodies = [{"messages": HELLO, "max_tokens": n} for n in (3, 9, 30, 100)]
    expected = [run(chat, **b).choices[0].message.content for b in bodies]

    async def main() -> list[str]:
        responses = await asyncio.gather(*(chat.arun(chat.parse(b)) for b in bodies))
        return [r.choices[0].message.content for r in responses]  # type: ignore[attr-defined]

    assert asyncio.run(main()) == expected


def test_async_stream_matches(chat: GenerationEngine) -> None:
    async def main() -> str:
        parts = []
        async for chunk in chat.astream(chat.parse({"messages": HELLO, "max_tokens": 100})):
            if chunk.choices:  # type: ignore[attr-defined]
                parts.append(chunk.choices[0].delta.content or "")  # type: ignore[attr-defined]
        return "".join(parts)

    assert asyncio.run(main()) == TRAINED_ANSWER


@pytest.mark.parametrize("temperature", [1e-40, 1e-6], ids=["underflow", "below-cutoff"])
def test_a_tiny_temperature_is_greedy_and_spares_its_batch(
    chat: GenerationEngine, temperature: float
) -> None:
    # logits / 1e-40 overflows to inf: sampling it would fail the whole running batch.
    greedy = chat.parse({"messages": HELLO, "max_tokens": 100, "temperature": 0})
    tiny = chat.parse({"messages": HELLO, "max_tokens": 100, "temperature": temperature})
    answers = chat.run([greedy, tiny])
    assert [a.choices[0].message.content for a in answers] == [TRAINED_ANSWER] * 2  # type: ignore[attr-defined]


def test_context_error_names_max_completion_tokens_when_given(chat: GenerationEngine) -> None:
    with pytest.raises(ContextLengthError) as info:
        run(chat, max_completion_tokens=10**6)
    assert info.value.param == "max_completion_tokens"
    assert "max_completion_tokens" in str(info.value)


def test_a_refused_request_does_not_break_the_engine(chat: GenerationEngine) -> None:
    good = chat.parse({"messages": HELLO, "max_tokens": 3})
    bad = chat.parse({"messages": HELLO, "max_tokens": 3, "logit_bias": {"999999": 1}})
    with pytest.raises(InvalidRequestError):
        chat.run([good, bad])  # checked before any compute: nothing of the batch runs
    assert chat.run([good])[0].choices[0].finish_reason == "length"


def test_closed_engine_refuses(trained_model: Path) -> None:
    engine = make_engine(trained_model, temperature=0.0)
    assert run(engine, max_tokens=2).choices
    engine.close()
    with pytest.raises(LLMAdapterError):
        run(engine, max_tokens=2)
