"""Stop strings and incremental detokenization: unit tests, properties, and the real engine on known text.

The engine property test runs the trained tiny model greedily: its unstopped answer is known real text
(TRAINED_ANSWER, with "Café crème, naïve façade: 日本語"), so for any stop string s the answer with
stop s must be that text cut before the first occurrence of s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmadapter.catalog import CHAT, get_task
from llmadapter.config import ModelConfig
from llmadapter.engine.generation import GenerationEngine
from llmadapter.engine.stops import IncrementalDecoder, StopMatcher
from llmadapter.protocol import ChatCompletionChunk, ChatCompletionResponse
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT

# Deterministic, bounded property runs: same examples every run, no example database.
PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------------------------
# StopMatcher
# ---------------------------------------------------------------------------------------------


def feed_all(stops: tuple[str, ...], deltas: list[str]) -> tuple[list[str], StopMatcher]:
    matcher = StopMatcher(stops)
    outs = [matcher.feed(delta) for delta in deltas]
    outs.append(matcher.finish())
    return outs, matcher


def expected_cut(text: str, stops: tuple[str, ...]) -> str:
    hits = [i for s in stops if (i := text.find(s)) != -1]
    return text[: min(hits)] if hits else text


def longest_held_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop (brute force)."""
    best = 0
    for stop in stops:
        for k in range(1, len(stop)):
            if text.endswith(stop[:k]):
                best = max(best, k)
    return best


@pytest.mark.parametrize(
    ("stops", "deltas", "outs", "final"),
    [
        (("END",), ["abc E"], ["abc ", "E"], "abc E"),
        (("END",), ["abc E", "X"], ["abc ", "EX", ""], "abc EX"),
        (("END",), ["abc E", "N", "D and more"], ["abc ", "", "", ""], "abc "),
        (("END",), ["abc", " def"], ["abc", " def", ""], "abc def"),
        (("END",), ["EN", "D"], ["", "", ""], ""),
        (("aab",), ["aa", "a", "b"], ["", "a", "", ""], "a"),
        (("b", "abc"), ["xa", "b"], ["x", "a", ""], "xa"),
        (("world", "o"), ["hello world"], ["hell", ""], "hell"),
        (("lo w", "wor"), ["hel", "lo", " wo", "rld"], ["he", "l", "", "", ""], "hel"),
        (("lo world", "wo"), ["hel", "lo wo", "rld"], ["he", "llo ", "", ""], "hello "),
        ((), ["any", " text"], ["any", " text", ""], "any text"),
        (("日本",), ["naïve 日", "本語"], ["naïve ", "", ""], "naïve "),
        (("日本",), ["naïve 日", "語"], ["naïve ", "日語", ""], "naïve 日語"),
    ],
    ids=[
        "holds-prefix-then-finish-releases",
        "releases-when-prefix-breaks",
        "stop-across-three-deltas",
        "no-prefix-no-holding",
        "stop-at-start",
        "overlapping-self-prefix",
        "earliest-of-two-wins",
        "earliest-in-one-delta",
        "held-prefix-of-one-stop-released-when-another-matches",
        "first-completed-wins-over-longer-pending",
        "no-stops",
        "multibyte-stop-across-deltas",
        "multibyte-prefix-released",
    ],
)
def test_stop_matcher(stops: tuple[str, ...], deltas: list[str], outs: list[str], final: str) -> None:
    got, matcher = feed_all(stops, deltas)
    assert got == outs
    assert "".join(got) == final == matcher.final_text


def test_stop_matcher_ignores_text_after_a_match() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("go STOP") == "go "
    assert matcher.feed(" more") == ""
    assert matcher.finish() == ""
    assert matcher.stopped_at == 3
    assert matcher.final_text == "go "


def test_stop_matcher_include_keeps_the_earliest_stop_string() -> None:
    """vLLM's include_stop_str_in_output: the text ends after the stop string instead of before it."""
    matcher = StopMatcher(("lazy", "dog"), include=True)
    assert matcher.feed("the la") + matcher.feed("zy dog") == "the lazy"
    assert matcher.final_text == "the lazy" and matcher.finish() == ""


def test_stop_matcher_does_not_search_unsearchable_text() -> None:
    """vLLM's min_tokens: text fed before the minimum is emitted whole, and never matched later either."""
    matcher = StopMatcher(("fox",))
    assert matcher.feed("The fo", searchable=False) == "The fo"  # nothing held back
    assert matcher.feed("x jumps") == "x jumps"  # "fo" + "x" straddles the boundary: not a match
    assert matcher.feed(", the fox") == ", the "
    assert matcher.final_text == "The fox jumps, the "


_ALPHABET = "abAB é日"


@settings(PROPERTY, max_examples=300)
@given(
    text=st.text(alphabet=_ALPHABET, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
    stops=st.lists(st.text(alphabet=_ALPHABET, min_size=1, max_size=5), max_size=4),
)
def test_stop_matcher_property(text: str, cuts: list[int], stops: list[str]) -> None:
    """Any split of any text: output = text cut before the earliest stop; only stop prefixes held back."""
    stop_tuple = tuple(stops)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    matcher = StopMatcher(stop_tuple)
    emitted = ""
    for delta in deltas:
        emitted += matcher.feed(delta)
        if matcher.stopped_at is None:
            held = matcher.text[len(emitted) :]
            assert len(held) == longest_held_prefix(matcher.text, stop_tuple)
        else:
            assert emitted == expected_cut(matcher.text, stop_tuple)
    emitted += matcher.finish()
    assert emitted == expected_cut(text, stop_tuple) == matcher.final_text


# ---------------------------------------------------------------------------------------------
# IncrementalDecoder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(trained_model: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(trained_model))


def decode_stepwise(tokenizer: Any, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    return deltas


def test_decoder_never_splits_multibyte_characters(tokenizer: Any) -> None:
    text = "日本語 🙂 Café crème"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The test means something only if some character really is split across tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas = decode_stepwise(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text


def test_decoder_skips_special_tokens(tokenizer: Any) -> None:
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert "".join(decode_stepwise(tokenizer, ids)) == "Hi"


def test_decoder_flush_releases_an_incomplete_character(tokenizer: Any) -> None:
    ids = tokenizer("日", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == tokenizer.decode(ids[:-1])  # U+FFFD: the bytes really are incomplete


@settings(PROPERTY, max_examples=150)
@given(text=st.text(alphabet=st.sampled_from(list("ab .,\nCaféï日本語🙂ç")) | st.characters(), max_size=30))
@example(text="\ufffd")
@example(text="a\ufffdb")
def test_decoder_property(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = decode_stepwise(tokenizer, ids)
    # A U+FFFD of the text itself reads like a split character (held, then flushed): only then may a
    # delta show one. Hypothesis draws it when a loaded module holds the literal (its constants pool).
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# The engine on known text
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(trained_model: Path) -> Iterator[GenerationEngine]:
    tok = transformers.AutoTokenizer.from_pretrained(str(trained_model))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(trained_model))
    engine = GenerationEngine(
        model, tok, spec=get_task(CHAT), config=ModelConfig(temperature=0.0), model_name="trained"
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def unstopped_ids(engine: GenerationEngine) -> list[int]:
    """The greedy answer's token ids, from transformers' own generate (an independent reference)."""
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": TRAINED_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = engine.model.generate(ids, do_sample=False, max_new_tokens=80, pad_token_id=tok.pad_token_id)
    generated = out[0, ids.shape[1] :].tolist()
    assert generated[-1] == tok.eos_token_id
    assert tok.decode(generated, skip_special_tokens=True) == TRAINED_ANSWER
    return list(generated[:-1])


def ask(engine: GenerationEngine, stops_per_request: list[list[str]]) -> list[ChatCompletionResponse]:
    requests = [
        # No stops: the field left out (the spec allows 1 to 4 stop sequences, not an empty list).
        engine.parse(
            {"messages": [{"role": "user", "content": TRAINED_PROMPT}], "max_tokens": 80}
            | ({"stop": stops} if stops else {})
        )
        for stops in stops_per_request
    ]
    responses = engine.run(requests)
    assert all(isinstance(r, ChatCompletionResponse) for r in responses)
    return responses  # type: ignore[return-value]


def stop_reference(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[str, int]:
    """(answer, completion tokens) that stop strings must give, computed from the unstopped token ids.

    Generation stops at the first token after which the generated text (whole characters only) contains
    any stop string; the answer is that text cut before the earliest stop occurrence in it. For one stop
    string this is simply the unstopped text cut before its first occurrence. With several, a short stop
    that completes first wins over a longer one that would have started earlier but is not complete yet
    (as in llama.cpp and vLLM: nothing waits for a stop that may never come).
    """
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if text.endswith("\ufffd"):
            continue
        hits = [i for s in stops if (i := text.find(s)) != -1]
        if hits:
            return text[: min(hits)], k
    return tokenizer.decode(ids), len(ids)


def check_stopped(engine: GenerationEngine, ids: list[int], stops: list[str], response: Any) -> None:
    choice = response.choices[0]
    text, tokens = stop_reference(engine.tokenizer, ids, stops)
    assert choice.message.content == text, stops
    assert choice.finish_reason == "stop"
    # Generation ends at the token that completes the stop string, not later.
    assert response.usage.completion_tokens == tokens, stops


def test_unstopped_answer_is_the_trained_text(engine: GenerationEngine, unstopped_ids: list[int]) -> None:
    (response,) = ask(engine, [[]])
    assert response.choices[0].message.content == TRAINED_ANSWER
    assert response.usage.completion_tokens == len(unstopped_ids)


# Hand-picked stops, checked below to really cover each kind the property must handle.
NAMED_STOPS = {
    "crosses-token-boundary": "brown fox",
    "ends-mid-token": "Caf",
    "starts-mid-token": "afé cr",
    "multibyte-ends-mid-token": "日本",
    "multibyte-cross-boundary": "ïve fa",
    "whole-answer": TRAINED_ANSWER,
    "first-char": "T",
    "last-char": "s.",
    "not-in-text": "zebra",
    "shares-prefix-not-in-text": "日本人",
    "second-occurrence-ignored": "fox",
}


def test_named_stops_cover_the_hard_cases(engine: GenerationEngine, unstopped_ids: list[int]) -> None:
    tok = engine.tokenizer
    starts, offset = set(), 0
    for i in unstopped_ids:
        starts.add(offset)
        offset += len(tok.decode([i]))
    starts.add(offset)
    assert "".join(tok.decode([i]) for i in unstopped_ids) == TRAINED_ANSWER  # offsets are exact

    def span(stop: str) -> tuple[int, int]:
        begin = TRAINED_ANSWER.find(stop)
        return begin, begin + len(stop)

    assert not {span(NAMED_STOPS["ends-mid-token"])[1]} & starts
    assert not {span(NAMED_STOPS["starts-mid-token"])[0]} & starts
    begin, end = span(NAMED_STOPS["crosses-token-boundary"])
    assert any(begin < s < end for s in starts)
    assert not {span(NAMED_STOPS["multibyte-ends-mid-token"])[1]} & starts
    assert len(NAMED_STOPS["multibyte-ends-mid-token"].encode()) > len(
        NAMED_STOPS["multibyte-ends-mid-token"]
    )


@pytest.mark.parametrize("stop", NAMED_STOPS.values(), ids=NAMED_STOPS.keys())
def test_named_stop(engine: GenerationEngine, unstopped_ids: list[int], stop: str) -> None:
    (response,) = ask(engine, [[stop]])
    assert response.choices[0].message.content == expected_cut(TRAINED_ANSWER, (stop,))
    check_stopped(engine, unstopped_ids, [stop], response)


@pytest.mark.parametrize(
    ("stops", "answer"),
    [
        (["crème", "Café"], "The quick brown fox jumps over the lazy dog. "),
        (["lazy", "fox"], "The quick brown "),
        (["façade", "naïve", "日本語"], "The quick brown fox jumps over the lazy dog. Café crème, "),
        (["h", "The "], "T"),  # "h" is complete after the first token; "The " is not yet
    ],
    ids=["second-listed-is-earlier", "first-listed-is-earlier", "three-multibyte", "first-completed"],
)
def test_several_stops_earliest_wins(
    engine: GenerationEngine, unstopped_ids: list[int], stops: list[str], answer: str
) -> None:
    (response,) = ask(engine, [stops])
    assert response.choices[0].message.content == answer
    check_stopped(engine, unstopped_ids, stops, response)


def _substring(draw: st.DrawFn) -> str:
    start = draw(st.integers(min_value=0, max_value=len(TRAINED_ANSWER) - 1))
    length = draw(st.integers(min_value=1, max_value=14))
    return TRAINED_ANSWER[start : start + length]


@st.composite
def stop_lists(draw: st.DrawFn) -> list[str]:
    stops = [_substring(draw) for _ in range(draw(st.integers(min_value=1, max_value=3)))]
    if draw(st.booleans()):
        stops.append(draw(st.sampled_from(["zebra", "日本人", "foxes", "Café au lait", "STOPPED"])))
    return stops


@settings(
    PROPERTY,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(stop_lists(), min_size=1, max_size=6))
@example(batch=[["日本"], ["ïve"], ["façade: 日本語 t"], ["é"], ["naïve", "crème"], ["END", "STOP", "fox"]])
@example(batch=[["dog. Ca", "e laz"], [" ", "."], ["sleeps."], ["日本語", "jumps"]])
def test_stop_property_on_greedy_text(
    engine: GenerationEngine, unstopped_ids: list[int], batch: list[list[str]]
) -> None:
    """Output with stops == unstopped output cut before the earliest stop; several requests in one batch."""
    for stops, response in zip(batch, ask(engine, batch), strict=True):
        check_stopped(engine, unstopped_ids, stops, response)


@pytest.mark.parametrize(
    "stops",
    [["brown fox"], ["Caf"], ["日本"], ["日本人"], ["zebra"], ["END", "STOP"], ["."]],
    ids=lambda s: "|".join(s),
)
def test_streamed_stop_equals_whole_answer(engine: GenerationEngine, stops: list[str]) -> None:
    request = engine.parse(
        {"messages": [{"role": "user", "content": TRAINED_PROMPT}], "stop": stops, "max_tokens": 80}
    )
    chunks = list(engine.stream(request, include_usage=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]  # type: ignore[attr-defined]
    # A stream never shows text that a later token turns into a stop: chunks only ever append.
    assert "".join(pieces) == expected_cut(TRAINED_ANSWER, tuple(stops))
    assert all("\ufffd" not in p for p in pieces)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]  # type: ignore[attr-defined]
    assert reasons[-1] == "stop"
    assert all(r is None for r in reasons[:-1])
    (whole,) = ask(engine, [stops])
    assert chunks[-1].usage == whole.usage  # type: ignore[attr-defined]
