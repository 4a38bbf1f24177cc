"""vLLM's request fields on the real tiny models, each with the meaning vLLM documents for it
(vllm/sampling_params.py and the OpenAI server's protocol): min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, min_p, repetition_penalty, prompt_logprobs, echo with logprobs,
truncate_prompt_tokens, chat_template_kwargs, add_generation_prompt, continue_final_message."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers

from llmadapter.engine.generation import GenerationEngine
from llmadapter.errors import ContextLengthError, InvalidRequestError
from llmadapter.protocol import TokenizeChatRequest
from llmadapter.testing import CHATML_TEMPLATE, TRAINED_ANSWER, TRAINED_PROMPT
from tests.engine.conftest import make_engine
from tests.engine.test_generation import HELLO, run

# A template that reads a variable of its own and a reasoning switch, as reasoning models' templates do.
NOTE_TEMPLATE = (
    "{% if note %}<|im_start|>system\n{{ note }}<|im_end|>\n{% endif %}"
    "{% if enable_thinking %}<|im_start|>system\nThink first.<|im_end|>\n{% endif %}" + CHATML_TEMPLATE
)


@pytest.fixture(scope="module")
def noted(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationEngine]:
    """The trained model with NOTE_TEMPLATE as its chat template."""
    folder = tmp_path_factory.mktemp("noted") / "model"
    shutil.copytree(trained_model, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = NOTE_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    engine = make_engine(folder, temperature=0.0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def answer_ids(chat: GenerationEngine) -> list[int]:
    return list(chat.tokenizer(TRAINED_ANSWER, add_special_tokens=False)["input_ids"])


def content(response: Any) -> str:
    return str(response.choices[0].message.content)


# --- min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output --------------------------------


def test_min_tokens_holds_back_eos(chat: GenerationEngine, answer_ids: list[int]) -> None:
    n = len(answer_ids)
    response = run(chat, min_tokens=n + 3, max_tokens=n + 3)
    assert response.usage.completion_tokens == n + 3  # EOS could not end it before min_tokens
    assert response.choices[0].finish_reason == "length"
    assert content(response).startswith(TRAINED_ANSWER)
    assert run(chat, min_tokens=n - 5).usage.completion_tokens == n  # past min_tokens, EOS ends it


def test_min_tokens_leaves_stop_strings_unmatched_in_the_first_tokens(
    chat: GenerationEngine, answer_ids: list[int]
) -> None:
    # "fox" is in the 4th token and again near the end: with min_tokens=4 the first one is never looked at.
    first_fox = next(k for k in range(1, 10) if "fox" in chat.decode(answer_ids[:k]))
    assert content(run(chat, stop=["fox"])) == TRAINED_ANSWER[: TRAINED_ANSWER.find("fox")]
    later = run(chat, stop=["fox"], min_tokens=first_fox)
    assert content(later) == TRAINED_ANSWER[: TRAINED_ANSWER.rfind("fox")]
    assert later.choices[0].finish_reason == "stop"


def test_min_tokens_above_max_tokens_is_refused(chat: GenerationEngine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        run(chat, min_tokens=10, max_tokens=5)
    assert info.value.param == "min_tokens"


def test_ignore_eos_generates_to_max_tokens(chat: GenerationEngine, answer_ids: list[int]) -> None:
    n = len(answer_ids)
    assert run(chat, max_tokens=n + 6).usage.completion_tokens == n
    response = run(chat, max_tokens=n + 6, ignore_eos=True)
    assert response.usage.completion_tokens == n + 6
    assert response.choices[0].finish_reason == "length"
    assert content(response).startswith(TRAINED_ANSWER)


def test_stop_token_ids_stop_on_a_token(chat: GenerationEngine, answer_ids: list[int]) -> None:
    fox = answer_ids[3]
    assert fox not in answer_ids[:3]
    response = run(chat, stop_token_ids=[fox])
    assert content(response) == chat.decode(answer_ids[:3])  # "The quick brown"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == 4  # the stop token counts as generated (vLLM)
    kept = run(chat, stop_token_ids=[fox], include_stop_str_in_output=True)
    assert content(kept) == chat.decode(answer_ids[:4])  # "The quick brown fox"
    with pytest.raises(InvalidRequestError) as info:
        run(chat, stop_token_ids=[10**6])
    assert info.value.param == "stop_token_ids"


def test_include_stop_str_in_output_keeps_the_stop_string(chat: GenerationEngine) -> None:
    cut = TRAINED_ANSWER.find("lazy")
    assert content(run(chat, stop=["lazy"])) == TRAINED_ANSWER[:cut]
    kept = run(chat, stop=["lazy", "dog"], include_stop_str_in_output=True)
    assert content(kept) == TRAINED_ANSWER[: cut + len("lazy")]
    request = chat.parse({"messages": HELLO, "stop": ["lazy"], "include_stop_str_in_output": True})
    pieces = [c.choices[0].delta.content or "" for c in chat.stream(request) if c.choices]  # type: ignore[attr-defined]
    assert "".join(pieces) == TRAINED_ANSWER[: cut + len("lazy")]


# --- min_p, repetition_penalty -------------------------------------------------------------------------


def test_min_p_one_keeps_only_the_most_likely_token(sampled: GenerationEngine) -> None:
    """On the untrained model (near-uniform next tokens), where sampling wanders."""
    greedy = content(run(sampled, temperature=0, max_tokens=12))
    wandering = [content(run(sampled, temperature=1.5, seed=s, max_tokens=12)) for s in range(3)]
    assert any(text != greedy for text in wandering)  # without min_p, sampling wanders
    assert all(
        content(run(sampled, temperature=1.5, seed=s, max_tokens=12, min_p=1.0)) == greedy for s in range(3)
    )


def _generated_ids(response: Any, engine: GenerationEngine) -> list[int]:
    return [engine.tokenizer.convert_tokens_to_ids(t.token) for t in response.choices[0].logprobs.content]


def test_repetition_penalty_above_one_repeats_less(sampled: GenerationEngine) -> None:
    plain = run(sampled, temperature=0, max_tokens=40, logprobs=True)
    penalized = run(sampled, temperature=0, max_tokens=40, logprobs=True, repetition_penalty=3.0)
    assert len(set(_generated_ids(penalized, sampled))) > len(set(_generated_ids(plain, sampled)))
    assert content(run(sampled, temperature=0, max_tokens=40, repetition_penalty=1.0)) == content(plain)


# --- prompt_logprobs, echo with logprobs ------------------------------------------------------------------


def test_prompt_logprobs_score_every_prompt_token(completions: GenerationEngine) -> None:
    prompt = "The quick brown fox"
    ids = list(completions.tokenizer(prompt)["input_ids"])
    choice = run(completions, prompt=prompt, max_tokens=2, prompt_logprobs=2).choices[0]
    scored = choice.prompt_logprobs
    assert len(scored) == len(ids) and scored[0] is None  # nothing predicts the first token
    echoed = run(completions, prompt=prompt, max_tokens=2, echo=True, logprobs=2).choices[0].logprobs
    for position, (token_id, entry) in enumerate(zip(ids[1:], scored[1:], strict=True), start=1):
        own = entry[token_id]
        assert own.decoded_token == completions.tokenizer.decode([token_id])
        assert own.rank >= 1 and own.logprob <= 0
        assert len(entry) <= 3  # the prompt's own token and the 2 most likely (vLLM: up to k + 1)
        assert min(e.rank for e in entry.values()) == 1
        assert own.logprob == pytest.approx(echoed.token_logprobs[position])  # echo reports the same
    # The trained model knows this text: every prompt token after the first is its most likely one.
    assert [entry[t].rank for t, entry in zip(ids[1:], scored[1:], strict=True)] == [1] * (len(ids) - 1)
    assert run(completions, prompt=prompt, max_tokens=2).choices[0].prompt_logprobs is None


def test_chat_prompt_logprobs_cover_the_rendered_prompt(chat: GenerationEngine) -> None:
    response = run(chat, max_tokens=2, prompt_logprobs=0)
    assert len(response.prompt_logprobs) == response.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in response.prompt_logprobs[1:])  # 0: the prompt's own tokens


def test_echo_logprobs_stream_like_the_whole_answer(completions: GenerationEngine) -> None:
    body = {"prompt": "The quick brown", "max_tokens": 4, "echo": True, "logprobs": 1}
    whole = run(completions, **body).choices[0].logprobs
    chunks = list(completions.stream(completions.parse({**body, "stream": True})))
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk.choices:  # type: ignore[attr-defined]
            for key, values in streamed.items():
                values.extend(getattr(choice.logprobs, key) if choice.logprobs else [])
    assert streamed == {k: getattr(whole, k) for k in streamed}


# --- truncate_prompt_tokens -------------------------------------------------------------------------------


def test_truncate_prompt_tokens_keeps_the_last_tokens(completions: GenerationEngine) -> None:
    prompt = "Once upon a time, the quick brown"
    ids = list(completions.tokenizer(prompt)["input_ids"])
    cut = run(completions, prompt=prompt, max_tokens=3, echo=True, truncate_prompt_tokens=2)
    assert cut.usage.prompt_tokens == 2
    tail = completions.decode(ids[-2:])
    assert cut.choices[0].text == tail + run(completions, prompt=ids[-2:], max_tokens=3).choices[0].text


def test_truncate_prompt_tokens_minus_one_fits_the_window(
    completions: GenerationEngine, chat: GenerationEngine
) -> None:
    long_prompt = "The quick brown fox " * 200
    with pytest.raises(ContextLengthError):
        run(completions, prompt=long_prompt, max_tokens=5)
    response = run(completions, prompt=long_prompt, max_tokens=5, truncate_prompt_tokens=-1)
    assert response.usage.prompt_tokens == completions.context_window - 5
    chat_cut = run(chat, max_tokens=2, truncate_prompt_tokens=3)
    assert chat_cut.usage.prompt_tokens == 3


# --- chat template fields ---------------------------------------------------------------------------------


def test_chat_template_kwargs_reach_the_template(noted: GenerationEngine) -> None:
    plain = run(noted, max_tokens=1)
    with_note = run(noted, max_tokens=1, chat_template_kwargs={"note": "Answer in English."})
    note_tokens = len(noted.tokenizer("<|im_start|>system\nAnswer in English.<|im_end|>\n")["input_ids"])
    assert with_note.usage.prompt_tokens == plain.usage.prompt_tokens + note_tokens
    with pytest.raises(InvalidRequestError) as info:
        run(noted, chat_template_kwargs={"add_generation_prompt": False})  # a field of its own
    assert info.value.param == "chat_template_kwargs"


def test_reasoning_effort_switches_a_template_that_reads_it(
    noted: GenerationEngine, chat: GenerationEngine
) -> None:
    off = run(noted, max_tokens=1, reasoning_effort="none")
    on = run(noted, max_tokens=1, reasoning_effort="high")
    assert on.usage.prompt_tokens > off.usage.prompt_tokens == run(noted, max_tokens=1).usage.prompt_tokens
    with pytest.raises(InvalidRequestError) as info:
        run(chat, reasoning_effort="high")  # ChatML reads no reasoning switch
    assert (info.value.param, info.value.code) == ("reasoning_effort", "unsupported_value")


def test_add_generation_prompt_false_leaves_the_assistant_header_out(chat: GenerationEngine) -> None:
    with_header = run(chat)
    without = run(chat, add_generation_prompt=False, max_tokens=40)
    header = len(chat.tokenizer("<|im_start|>assistant\n")["input_ids"])
    assert without.usage.prompt_tokens == with_header.usage.prompt_tokens - header
    assert content(without) != TRAINED_ANSWER  # the model now writes the header itself first
    assert content(without).startswith("assistant\n")


def test_continue_final_message_continues_the_assistant_text(chat: GenerationEngine) -> None:
    prefix = "The quick brown"
    messages = [*HELLO, {"role": "assistant", "content": prefix}]
    response = run(chat, messages=messages, continue_final_message=True)
    assert content(response) == TRAINED_ANSWER[len(prefix) :]
    counted = chat.tokenize(TokenizeChatRequest(messages=messages, continue_final_message=True))
    assert response.usage.prompt_tokens == counted.count  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError) as info:
        run(chat, messages=messages, continue_final_message=True, add_generation_prompt=True)
    assert info.value.param == "continue_final_message"


def test_deprecated_functions_render_like_tools(bos_model: Path) -> None:
    engine = make_engine(bos_model, temperature=0.0)
    try:
        weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
        as_tools = run(engine, max_tokens=1, tools=[{"type": "function", "function": weather}])
        as_functions = run(engine, max_tokens=1, functions=[weather])
        assert (
            as_functions.usage.prompt_tokens
            == as_tools.usage.prompt_tokens
            > run(engine, max_tokens=1).usage.prompt_tokens
        )
        # A named function_call is a forced call, as a named tool_choice is.
        forced = run(engine, functions=[weather], function_call={"name": "get_weather"}, max_tokens=80)
        assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
    finally:
        engine.close()


def test_tokenize_prompt_equals_the_prompt_usage(chat: GenerationEngine) -> None:
    ids = chat.tokenize(TokenizeChatRequest(messages=HELLO, return_token_strs=True))
    assert ids.count == run(chat, max_tokens=1).usage.prompt_tokens  # type: ignore[attr-defined]
    assert ids.token_strs == chat.tokenizer.convert_ids_to_tokens(ids.tokens)  # type: ignore[attr-defined]
    assert TRAINED_PROMPT in chat.decode(ids.tokens)  # type: ignore[attr-defined]
