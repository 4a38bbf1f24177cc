"""llmadapter.validation.checks: each pure check on fixed typed answers, passing and failing."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS, get_task
from llmadapter.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    EmbeddingData,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCall,
    ToolCall,
    Usage,
)
from llmadapter.validation import CheckResult, ValidationSample
from llmadapter.validation.checks import (
    StopProbe,
    check_context_limit,
    check_determinism,
    check_embeddings_dimension,
    check_embeddings_norm,
    check_finish_reasons,
    check_latency,
    check_load,
    check_sample,
    check_stop,
    check_usage,
    context_probes,
    embedding_size,
    plan_stop,
    texts,
    vector,
)
from llmadapter.validation.schema import Answer, Response
from llmadapter.validation.worker import Loaded, Outcome


def chat(
    *contents: str, finish: str = "stop", tokens: int = 1, prompt: int = 3, total: int | None = None
) -> Any:
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=c), finish_reason=finish)  # type: ignore[arg-type]
        for i, c in enumerate(contents or ("Paris",))
    ]
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=tokens,
        total_tokens=prompt + tokens if total is None else total,
    )
    return ChatCompletionResponse(model="m", choices=choices, usage=usage)


def completion(text: str) -> CompletionResponse:
    usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    return CompletionResponse(
        model="m", choices=[CompletionChoice(index=0, text=text, finish_reason="stop")], usage=usage
    )


def embedding(*vectors: list[float] | str, prompt: int = 3, total: int = 3) -> EmbeddingResponse:
    data = [EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)]
    return EmbeddingResponse(
        model="m", data=data, usage=EmbeddingUsage(prompt_tokens=prompt, total_tokens=total)
    )


def typed(response: Response, latency_s: float = 0.1) -> Answer:
    return Answer(Outcome(ok=True, response=response.model_dump(), latency_s=latency_s), response=response)


def failed(
    error_type: str = "InvalidRequestError",
    message: str = "nope",
    status_code: int | None = 400,
    code: str | None = None,
) -> Answer:
    outcome = Outcome(
        ok=False, error_type=error_type, message=message, status_code=status_code, code=code, latency_s=0.2
    )
    return Answer(outcome, problem=outcome.error)


def sample(name: str = "s", **request: Any) -> ValidationSample:
    expect = request.pop("expect", None)
    return ValidationSample(
        name=name, request={"messages": [{"role": "user", "content": "Hi"}], **request}, expect=expect
    )


def _judged(result: CheckResult, problem: str | None) -> None:
    assert result.passed is (problem is None), result.detail
    if problem is not None:
        assert problem in result.detail


# --- reading answers ----------------------------------------------------------------------------------


def test_texts_of_chat_and_completion_choices_and_none_of_embeddings() -> None:
    assert texts(chat("a", "b")) == ["a", "b"]
    assert texts(completion(" Paris")) == [" Paris"]
    assert texts(embedding([1.0])) == [] and texts(None) == []


def test_a_base64_vector_is_decoded_as_little_endian_float32() -> None:
    encoded = base64.b64encode(struct.pack("<2f", 0.5, -1.0)).decode()

    assert vector(encoded) == [0.5, -1.0] and vector([1, 2]) == [1.0, 2.0]


# --- one check each ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loaded", "problem"),
    [
        (Loaded(load_s=1.5), None),
        (
            Loaded(error=Outcome(ok=False, error_type="OSError", message="weights gone")),
            "OSError: weights gone",
        ),
    ],
    ids=["loaded", "load-failed"],
)
def test_check_load(loaded: Loaded, problem: str | None) -> None:
    result = check_load(loaded, fresh_process=True)

    _judged(result, problem)
    assert result.name == "fresh-process-load"
    assert problem is not None or (result.detail, result.latency_s) == ("loaded in a fresh process", 1.5)


@pytest.mark.parametrize(
    ("given", "answer", "problem"),
    [
        (sample(expect="Par"), typed(chat("Paris")), None),
        (sample(n=2), typed(chat("Paris")), "1 choices for n=2"),
        (sample(expect="Rome"), typed(chat("Paris")), "answer does not contain 'Rome': ['Paris']"),
        (sample(), Answer(Outcome(ok=True), problem="not a valid ChatCompletionResponse: x"), "not a valid"),
        (sample(), failed("ContextLengthError", "too long"), "ContextLengthError: too long"),
        (sample(expect="Paris"), typed(embedding([0.6, 0.8])), "answer does not contain 'Paris'"),
    ],
    ids=["passes", "wrong-n", "expected-text-missing", "off-schema", "error", "embeddings-have-no-text"],
)
def test_check_sample(given: ValidationSample, answer: Answer, problem: str | None) -> None:
    result = check_sample(given, answer)

    _judged(result, problem)
    assert (result.name, result.latency_s) == ("sample:s", answer.outcome.latency_s)


def test_a_passing_sample_describes_its_answer() -> None:
    assert check_sample(sample(), typed(chat("Paris"))).detail == "'Paris' (stop, 1 tokens)"
    assert check_sample(sample(), typed(embedding([0.6, 0.8]))).detail == (
        "1 vectors, usage {'prompt_tokens': 3, 'total_tokens': 3}"
    )


@pytest.mark.parametrize(
    ("task", "answer", "problem"),
    [
        (CHAT, chat(tokens=2), None),
        (EMBEDDINGS, embedding([1.0]), None),
        (CHAT, chat(tokens=2, total=4), "a: total 4 != 3 + 2"),
        (CHAT, chat(prompt=0, tokens=2), "a: prompt_tokens 0"),
        (EMBEDDINGS, embedding([1.0], prompt=3, total=5), "a: total 5 != 3 + 0"),
    ],
    ids=["chat", "embeddings", "chat-total-wrong", "no-prompt-tokens", "embeddings-total-wrong"],
)
def test_check_usage(task: str, answer: Response, problem: str | None) -> None:
    _judged(check_usage(get_task(task), {"a": answer}), problem)


@pytest.mark.parametrize(
    ("request_", "answer", "default_stops", "problem"),
    [
        ({"max_tokens": 2}, chat(finish="length", tokens=2), False, None),
        ({"max_tokens": 4}, chat(finish="stop", tokens=1), False, None),
        (
            {"max_tokens": 2},
            chat(finish="length", tokens=1),
            False,
            "s: 'length' after 1 tokens, max_tokens 2",
        ),
        ({"max_tokens": 2}, chat(finish="stop", tokens=2), False, "s: 'stop' after all max_tokens=2 tokens"),
        (
            {"max_tokens": 2, "n": 2},
            chat("a", "b", tokens=4),
            False,
            "s: 'stop' after all max_tokens=2 tokens",
        ),
        ({"max_tokens": 2, "stop": ["."]}, chat(finish="stop", tokens=2), False, None),
        ({"max_tokens": 2}, chat(finish="stop", tokens=2), True, None),
        ({"max_tokens": 2}, chat(finish="length", tokens=3), False, "s: 3 completion tokens > max_tokens 2"),
        ({}, chat(finish="content_filter"), False, "s: finish_reason 'content_filter'"),
    ],
    ids=[
        "length-at-limit",
        "stop-early",
        "length-too-early",
        "stop-at-limit",
        "stop-at-limit-every-choice",
        "stop-at-limit-with-request-stop",
        "stop-at-limit-with-default-stops",
        "over-the-limit",
        "not-an-openai-reason",
    ],
)
def test_check_finish_reasons(
    request_: dict[str, Any], answer: ChatCompletionResponse, default_stops: bool, problem: str | None
) -> None:
    _judged(check_finish_reasons([sample(**request_)], {"s": answer}, default_stops), problem)


@pytest.mark.parametrize(
    ("text", "probe"),
    [
        ("Hello world", StopProbe(" w", "Hello")),
        ("  Paris is", StopProbe("s ", "  Pari")),
        (" x", StopProbe(" x", "")),
        ("x", StopProbe("\n\n", None)),
    ],
    ids=["middle", "middle-of-the-visible-part", "at-the-end", "nothing-to-cut"],
)
def test_plan_stop_takes_a_stop_string_from_the_middle_of_the_greedy_answer(
    text: str, probe: StopProbe
) -> None:
    assert plan_stop(chat(text)) == probe


@pytest.mark.parametrize(
    ("probe", "answer", "problem"),
    [
        (StopProbe(" w", "Hello"), typed(chat("Hello")), None),
        (StopProbe("\n\n", None), typed(chat("ab", finish="length")), None),
        (StopProbe(" w", "Hello"), typed(chat("Hello world")), "output contains the stop string ' w'"),
        (StopProbe(" w", "Hello"), typed(chat("Hell")), "with stop ' w' expected 'Hello', got 'Hell'"),
        (
            StopProbe(" w", "Hello"),
            typed(chat("Hello", finish="length")),
            "finish_reason 'length' after a stop",
        ),
        (StopProbe(" w", "Hello"), failed(), "InvalidRequestError: nope"),
    ],
    ids=["cut-exactly", "nothing-to-cut", "stop-returned", "cut-wrong", "wrong-finish-reason", "error"],
)
def test_check_stop(probe: StopProbe, answer: Answer, problem: str | None) -> None:
    _judged(check_stop(probe, answer), problem)


@pytest.mark.parametrize(
    ("task", "field"), [(CHAT, "messages"), (COMPLETIONS, "prompt")], ids=["chat", "completions"]
)
def test_context_probes_overflow_the_window_two_ways(task: str, field: str) -> None:
    greedy = ValidationSample(name="g", request={field: "Hi", "temperature": 0, "max_tokens": 4})

    (long_name, long_req), (max_name, max_req) = context_probes(get_task(task), greedy, window=8)

    assert (long_name, max_name) == ("over-long prompt", "max_tokens=9")
    assert str(long_req[field]).count("hello") == 8 + 64 and long_req["max_tokens"] == 4
    assert max_req == {**greedy.request, "max_tokens": 9}


CLEAR = failed("ContextLengthError", "prompt over the context window", code="context_length_exceeded")


@pytest.mark.parametrize(
    ("answers", "problem"),
    [
        ([("a", CLEAR), ("b", failed(message="needs more context than 8"))], None),
        ([("a", CLEAR), ("b", typed(chat()))], "b was answered instead of refused (window 8)"),
        (
            [("a", failed("GenerationError", "IndexError", status_code=500))],
            "a: unclear error GenerationError",
        ),
        ([("a", failed(message="bad temperature"))], "a: unclear error InvalidRequestError: bad temperature"),
    ],
    ids=["refused", "answered", "server-error", "refused-for-another-reason"],
)
def test_check_context_limit(answers: list[tuple[str, Answer]], problem: str | None) -> None:
    result = check_context_limit(8, answers)

    _judged(result, problem)
    assert problem is not None or "a refused (ContextLengthError: prompt over" in result.detail


@pytest.mark.parametrize(
    ("task", "base", "again", "problem"),
    [
        (CHAT, chat("Paris"), typed(chat("Paris")), None),
        (EMBEDDINGS, embedding([0.6, 0.8]), typed(embedding([0.6, 0.8])), None),
        (CHAT, chat("Paris"), typed(chat("Rome")), "two runs at temperature 0 differ"),
        (CHAT, chat("Paris"), typed(chat("Paris", finish="length")), "two runs at temperature 0 differ"),
        (EMBEDDINGS, embedding([0.6, 0.8]), typed(embedding([0.8, 0.6])), "two runs at temperature 0 differ"),
        (CHAT, None, typed(chat("Paris")), "no answer to compare: g"),
        (CHAT, chat("Paris"), failed(message="boom"), "no answer to compare: boom"),
    ],
    ids=[
        "same-text",
        "same-vectors",
        "other-text",
        "other-finish-reason",
        "other-vectors",
        "no-first",
        "no-second",
    ],
)
def test_check_determinism(task: str, base: Response | None, again: Answer, problem: str | None) -> None:
    _judged(check_determinism(get_task(task), "g", base, again), problem)


@pytest.mark.parametrize(
    ("answers", "problem"),
    [
        ({"embed-pair": embedding([1.0, 0.0], [0.6, 0.8]), "one": embedding([0.0, 1.0])}, None),
        ({"a": embedding([1.0, 0.0]), "b": embedding([1.0, 0.0, 0.0])}, "vectors of different sizes: [2, 3]"),
        ({"a": embedding([0.0, 0.0])}, "a[0]: zero vector"),
        ({"a": embedding([math.nan, 1.0])}, "a[0]: empty or non-finite vector"),
        ({"a": embedding([])}, "a[0]: empty or non-finite vector"),
        ({"embed-pair": embedding([0.6, 0.8], [0.6, 0.8])}, "got the same vector (no pooling?)"),
    ],
    ids=["distinct-unit-vectors", "sizes-differ", "zero", "nan", "empty", "no-pooling"],
)
def test_check_embeddings_dimension(answers: dict[str, EmbeddingResponse], problem: str | None) -> None:
    result = check_embeddings_dimension(answers)

    _judged(result, problem)
    assert problem is not None or result.detail == "2 dimensions, finite, distinct texts distinct"


def test_embedding_size_is_the_one_size_of_all_vectors() -> None:
    assert embedding_size({"a": embedding([1.0, 0.0]), "b": embedding([0.0, 1.0])}) == 2
    assert embedding_size({"a": embedding([1.0, 0.0]), "b": embedding([1.0])}) is None
    assert embedding_size({}) is None


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (typed(embedding([0.6, 0.8], [1.0, 0.0])), None),
        (typed(embedding([0.6, 0.8, 0.0])), "dimensions=2 gave 3 values"),
        (typed(embedding([1.2, 1.6])), "dimensions=2 gave norm 2.00000, expected 1"),
        (failed(message="dimensions too large"), "dimensions=2: InvalidRequestError: dimensions too large"),
        (
            Answer(Outcome(ok=True), problem="not a valid EmbeddingResponse: x"),
            "not a valid EmbeddingResponse",
        ),
    ],
    ids=["unit-vectors", "wrong-size", "not-normalised", "refused", "off-schema"],
)
def test_check_embeddings_norm(answer: Answer, problem: str | None) -> None:
    _judged(check_embeddings_norm(2, answer), problem)


@pytest.mark.parametrize(
    ("latencies", "max_latency_s", "problem"),
    [
        ([0.1, 0.3], None, None),
        ([0.1, 0.3], 0.5, None),
        ([0.1, 0.5], 0.2, "slowest sample took 0.500 s > max_latency_s 0.2"),
        ([None], None, "no sample answered"),
    ],
    ids=["no-limit", "under-the-limit", "over-the-limit", "no-latencies"],
)
def test_check_latency(
    latencies: list[float | None], max_latency_s: float | None, problem: str | None
) -> None:
    checks = [CheckResult(name=f"sample:{i}", passed=True, latency_s=lat) for i, lat in enumerate(latencies)]

    result = check_latency(checks, max_latency_s)

    _judged(result, problem)
    assert problem is not None or result.detail.startswith("p50 0.200 s, max 0.300 s over 2 samples")


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
TOOLS = [{"type": "function", "function": {"name": "count", "parameters": SCHEMA}}]


def called(arguments: str, name: str = "count") -> Any:
    call = ToolCall(id="call_1", function=FunctionCall(name=name, arguments=arguments))
    message = AssistantMessage(content=None, tool_calls=[call])
    usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    choice = ChatChoice(index=0, message=message, finish_reason="tool_calls")
    return ChatCompletionResponse(model="m", choices=[choice], usage=usage)


@pytest.mark.parametrize(
    ("given", "answer", "default", "problem"),
    [
        (sample(response_format=FORMAT), typed(chat('{"n": 3}')), None, None),
        (sample(response_format=FORMAT), typed(chat('{"n": "3"}')), None, "does not match response_format"),
        (sample(response_format=FORMAT), typed(chat('{"n": ', finish="length")), None, None),
        (sample(response_format={"type": "json_object"}), typed(chat("[1]")), None, "does not match"),
        (sample(), typed(chat('{"m": 1}')), FORMAT, "does not match response_format"),
        (sample(tools=TOOLS), typed(called('{"n": 1}')), None, None),
        (sample(tools=TOOLS), typed(called('{"n": true}')), None, "'count' arguments do not validate"),
        (sample(tools=TOOLS), typed(called("{}", name="other")), None, "not one of the tools"),
    ],
    ids=[
        "valid",
        "invalid",
        "cut-at-length",
        "not-an-object",
        "model-config-default",
        "call",
        "bad-call",
        "unknown-tool",
    ],
)
def test_check_sample_validates_structured_answers(
    given: ValidationSample, answer: Answer, default: dict[str, Any] | None, problem: str | None
) -> None:
    result = check_sample(given, answer, default)
    _judged(result, problem)
    if problem:
        assert problem in result.detail
